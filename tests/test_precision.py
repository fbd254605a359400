"""train.precision=auto: bf16 only where it is fast on the device, else fp32."""

import torch

from repae import nn_utils
from repae.config import load_config


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(nn_utils, "cpu_bf16_is_fast", lambda: False)
    assert nn_utils.resolve_precision("bf16", "cpu") == "bf16"
    assert nn_utils.resolve_precision("fp32", "cpu") == "fp32"
    assert nn_utils.autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert nn_utils.autocast_dtype("fp32", "cpu") is None


def test_auto_follows_the_cpu_measurement(monkeypatch):
    for fast, expected, dtype in ((True, "bf16", torch.bfloat16), (False, "fp32", None)):
        monkeypatch.setattr(nn_utils, "cpu_bf16_is_fast", lambda fast=fast: fast)
        assert nn_utils.resolve_precision("auto", torch.device("cpu")) == expected
        assert nn_utils.autocast_dtype("auto", "cpu") is dtype
        with nn_utils.autocast("auto", torch.device("cpu")):
            out = torch.ones(4, 4) @ torch.ones(4, 4)
        assert out.dtype == (dtype or torch.float32)


def test_the_measurement_returns_a_bool_and_is_cached():
    first = nn_utils.cpu_bf16_is_fast()
    assert isinstance(first, bool) and nn_utils.cpu_bf16_is_fast() is first


def test_auto_is_the_default_of_every_preset():
    assert load_config("toy").train.precision == "auto"
    assert load_config("sit-xl2-f8d4").train.precision == "auto"
