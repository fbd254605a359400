"""train.reuse_freed_memory: glibc keeps the memory torch frees for the next tensors instead of unmapping it, so
large CPU tensors stop page-faulting on every allocation (the toy step's ~15,000 faults per step)."""

import subprocess
import sys

import pytest

from repae.config import load_config
from repae import nn_utils

_FAULTS_PER_ALLOCATION = """
import resource, sys, torch
from repae.nn_utils import reuse_freed_memory
if sys.argv[1] == "on":
    assert reuse_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 64 MiB: above glibc's largest automatic mmap threshold (32 MiB); the heap settles first
    torch.empty(16 << 20).fill_(1)
before = faults()
for _ in range(10):
    torch.empty(16 << 20).fill_(1)
print(faults() - before)
"""


def _faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_ALLOCATION, setting], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def test_a_freed_tensor_is_reused_without_page_faults():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    unmapped, reused = _faults("off"), _faults("on")
    assert unmapped > 1000  # each 64 MiB tensor mapped afresh and faulted in page by page
    assert reused < unmapped / 20


@pytest.mark.parametrize("setting,calls", [("true", 1), ("false", 0)])
def test_init_device_applies_the_setting(monkeypatch, setting, calls):
    seen = []
    monkeypatch.setattr(nn_utils, "reuse_freed_memory", lambda: seen.append(1) or True)
    cfg = load_config("toy", [], ["train.device=cpu", f"train.reuse_freed_memory={setting}"])
    nn_utils.init_device(cfg)
    assert len(seen) == calls
