"""DataLoader workers ignore SIGTERM (repae.interrupt), so nothing else stops them at exit: a
persistent loader still alive when the program ends must not keep it from ending. CI once hung
after "538 passed" on exactly this (a LatentBatches kept alive by a reference cycle)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import Dataset
    from repae.data.folder import DatasetBatches

    class Images(Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            return torch.full((3, 4, 4), i, dtype=torch.uint8), i % 2, ()

    batches = DatasetBatches(Images(), seed=0, num_workers=1)
    batches.me = batches  # a reference cycle: nothing frees the loader before the interpreter exits
    images, labels = batches.next(4)
    assert images.shape == (4, 3, 4, 4)
    print("took a batch", flush=True)
""")


def test_a_program_with_a_live_persistent_loader_exits(tmp_path):
    script = tmp_path / "live_loader.py"
    script.write_text(SCRIPT)
    env = {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    try:
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-9", "-f", str(script)])  # the hung program and its worker
        pytest.fail("the program did not exit within 60 s: its DataLoader worker outlived it")
    assert done.returncode == 0, done.stderr
    assert "took a batch" in done.stdout


def test_shut_down_workers_stops_every_live_iterator():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from repae.data.workers import shut_down_workers, worker_iter
    from repae.interrupt import ignore_stop_signals

    loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=2, num_workers=1, persistent_workers=True,
                        worker_init_fn=ignore_stop_signals)
    it = worker_iter(loader)
    assert next(it)[0].tolist() == [0, 1]
    workers = list(it._workers)
    assert all(w.is_alive() for w in workers)
    assert shut_down_workers() == 1
    assert not any(w.is_alive() for w in workers)
    assert shut_down_workers() == 0  # nothing left to stop
    assert worker_iter(DataLoader(TensorDataset(torch.arange(2)))) is not None and shut_down_workers() == 0
