import os

import pytest
import torch

from repae.models.sit import SiT, SiTArgs
from repae.models.vae import AutoencoderKL, VAEArgs


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes in all) run in CI, where .ci/run sets REPAE_RUN_SLOW=1, and whenever -m
    picks markers; a plain `python -m pytest` skips them and says how to run them."""
    if os.environ.get("REPAE_RUN_SLOW") == "1" or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: REPAE_RUN_SLOW=1 (as in .ci/run) or -m slow runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_sit_args(**kw) -> SiTArgs:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                num_classes=10, z_dims=[32, 48], projector_dim=96, encoder_depth=2)
    base.update(kw)
    return SiTArgs(**base)


def tiny_vae_args(**kw) -> VAEArgs:
    base = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[], norm_groups=8)
    base.update(kw)
    return VAEArgs(**base)


def randomize(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Non-zero weights everywhere (SiT zero-inits its output layers, which would hide bugs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    return module


@pytest.fixture
def tiny_sit() -> SiT:
    return randomize(SiT(tiny_sit_args())).eval()


@pytest.fixture
def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(tiny_vae_args()).eval()


@pytest.fixture
def pinning(monkeypatch) -> list:
    """The DataLoader's pin step, seen on a machine without a GPU: it believes an accelerator is there and
    records each batch it is asked to pin (a CPU-only torch cannot pin)."""
    import torch.utils.data._utils.pin_memory as pin

    pinned = []
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(pin, "pin_memory", lambda data, device=None: pinned.append(data) or data)
    return pinned
