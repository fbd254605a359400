"""repae.freed_memory: glibc keeps the memory torch frees for the next tensors instead of unmapping it, so large
CPU tensors stop page-faulting on every allocation (benchmarks/freed_memory.py measures what that costs)."""

import os
import platform
import subprocess
import sys

import pytest

from repae import freed_memory
from repae.config import load_config

_FAULTS_PER_ALLOCATION = """
import resource, torch
from repae.freed_memory import reuse_freed_memory
print(reuse_freed_memory())
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 64 MiB: above glibc's largest automatic mmap threshold (32 MiB); the heap settles first
    torch.empty(16 << 20).fill_(1)
before = faults()
for _ in range(10):
    torch.empty(16 << 20).fill_(1)
print(faults() - before)
"""


def _faults(system_malloc: str):
    env = dict(os.environ, REPAE_SYSTEM_MALLOC=system_malloc)
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_ALLOCATION], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[-2] == "True", int(out[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_a_freed_tensor_is_reused_without_page_faults_unless_the_environment_opts_out():
    (set_default, unmapped), (set_reused, reused) = _faults("1"), _faults("0")
    assert not set_default and set_reused
    assert unmapped > 1000  # each 64 MiB tensor mapped afresh and faulted in page by page
    assert reused < unmapped / 20


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(freed_memory, "reuse_freed_memory", lambda: seen.append(1) or True)
    return seen


def test_every_cli_command_sets_it_first(calls, capsys):
    from repae.cli import main

    assert main(["config", "--preset", "toy"]) == 0
    assert calls == [1] and "train:" in capsys.readouterr().out


def test_init_device_sets_it_for_programs_that_use_the_library(calls):
    from repae.nn_utils import init_device

    init_device(load_config("toy", [], ["train.device=cpu"]))
    assert calls == [1]
