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


def test_the_reproduction_runners_measure_process_sets_it_too(calls, monkeypatch, tmp_path):
    from repae.reproduce import measure

    monkeypatch.setattr(measure, "measure_run", lambda *args, **kwargs: calls.append("measured"))
    assert measure.main([str(tmp_path)]) == 0
    assert calls == [1, "measured"]


class _Libc:
    """A C library whose mallopt refuses an mmap threshold above `largest` and records every call (the 1 GiB
    asked for is refused by a glibc that caps the threshold; 2.36, where this was measured, took it)."""

    def __init__(self, largest: int):
        self.largest, self.calls = largest, []

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return int(param != freed_memory._M_MMAP_THRESHOLD or value <= self.largest)

        self.mallopt = mallopt


@pytest.fixture
def glibc(monkeypatch):
    monkeypatch.delenv(freed_memory.OPT_OUT, raising=False)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.17"))

    def install(largest: int) -> _Libc:
        libc = _Libc(largest)
        monkeypatch.setattr(freed_memory.ctypes, "CDLL", lambda name: libc)
        return libc
    return install


def test_a_glibc_that_refuses_1_gib_gets_its_32_mib_maximum(glibc):
    libc = glibc(largest=32 << 20)
    assert freed_memory.reuse_freed_memory()
    mmap, trim = freed_memory._M_MMAP_THRESHOLD, freed_memory._M_TRIM_THRESHOLD
    assert libc.calls == [(mmap, 1 << 30), (mmap, 32 << 20), (trim, 2**31 - 1)]


def test_a_glibc_that_takes_1_gib_is_asked_once_and_one_that_refuses_both_reports_false(glibc):
    mmap, trim = freed_memory._M_MMAP_THRESHOLD, freed_memory._M_TRIM_THRESHOLD
    libc = glibc(largest=1 << 30)
    assert freed_memory.reuse_freed_memory()
    assert libc.calls == [(mmap, 1 << 30), (trim, 2**31 - 1)]
    refusing = glibc(largest=1 << 20)
    assert not freed_memory.reuse_freed_memory()
    assert refusing.calls == [(mmap, 1 << 30), (mmap, 32 << 20)]
