"""CPU execution settings: train.precision=auto (bf16 only where it is fast on the device, else
fp32), train.num_threads, and the note on an oversubscribed CPU."""

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


def _scripted_timings(monkeypatch, fp32, bf16):
    """_matmul_seconds returns the next of `fp32` / `bf16` for the dtype it is given."""
    queues = {torch.float32: list(fp32), torch.bfloat16: list(bf16)}
    monkeypatch.setattr(nn_utils, "_matmul_seconds", lambda a: queues[a.dtype].pop(0))
    nn_utils.cpu_bf16_is_fast.cache_clear()


def test_a_burst_of_load_during_one_timing_does_not_pick_bf16(monkeypatch):
    try:  # another process busy while fp32 was first timed (5 ms); fp32 is 2x faster otherwise
        _scripted_timings(monkeypatch, [5.0, 1.0, 1.0], [2.0, 2.0, 2.0])
        assert nn_utils.cpu_bf16_is_fast(trials=3) is False
        _scripted_timings(monkeypatch, [1.2] * 3, [1.1] * 3)  # a near tie: keep fp32's precision
        assert nn_utils.cpu_bf16_is_fast(trials=3) is False
        _scripted_timings(monkeypatch, [1.0, 1.0, 1.0], [0.3, 3.0, 0.3])  # bf16 clearly faster, one slow timing
        assert nn_utils.cpu_bf16_is_fast(trials=3) is True
    finally:
        nn_utils.cpu_bf16_is_fast.cache_clear()


def test_the_measurement_returns_a_bool_and_is_cached():
    first = nn_utils.cpu_bf16_is_fast()
    assert isinstance(first, bool) and nn_utils.cpu_bf16_is_fast() is first


def test_auto_is_the_default_of_every_preset():
    assert load_config("toy").train.precision == "auto"
    assert load_config("sit-xl2-f8d4").train.precision == "auto"


def test_oversubscription_note_counts_other_runnable_threads(monkeypatch, tmp_path):
    from repae import dist

    monkeypatch.setattr(dist, "usable_cores", lambda: 2)
    assert dist.oversubscription_note(2, others=0) is None
    note = dist.oversubscription_note(2, others=2)
    assert note is not None and "train.num_threads" in note and "2 core(s)" in note
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.00 0.50 0.20 3/210 12345\n")
    assert dist.runnable_elsewhere(str(loadavg)) == 2  # 3 running, one of them the reader
    loadavg.write_text("garbage")
    assert dist.runnable_elsewhere(str(loadavg)) is None


def test_train_num_threads_is_applied(monkeypatch):
    from repae.train import loop

    before = torch.get_num_threads()
    try:
        loop.set_threads(load_config("toy", overrides=["train.num_threads=1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_summary_speed_is_the_median_of_the_log_lines():
    from repae.train import loop

    assert loop._median([120.0, None, 20.0, 130.0]) == 120.0  # not the last line (130) nor the mean
    assert loop._median([None]) is None


def test_the_busy_cpu_note_goes_to_stderr_so_stdout_stays_the_json_summary(monkeypatch, capsys):
    from repae import dist
    from repae.config import load_config
    from repae.train.loop import set_threads

    monkeypatch.setattr(dist, "usable_cores", lambda: 2)
    monkeypatch.setattr(dist, "runnable_elsewhere", lambda: 3)
    before = torch.get_num_threads()
    try:
        set_threads(load_config("toy"))
    finally:
        torch.set_num_threads(before)
    out, err = capsys.readouterr()
    assert out == "" and "expect a large slowdown" in err
