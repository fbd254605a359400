"""Data-parallel training on CPU with gloo: 2 processes x B equal 1 process x 2B (latent
BatchNorm statistics included), ranks agree after every step, and resume under 2 processes
continues exactly."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from repae.train.checkpoint import latest_checkpoint
from repae.train.loop import train
from repae.weights import read_file
from test_train_loop import tiny_cfg

# fp32: the comparison is about what is computed, not about bf16 rounding
DDP_RUN = ["train.precision=fp32", "train.log_every=1", "train.ckpt_every=2", "train.keep_last=5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat_state(run) -> torch.Tensor:
    """Every trained number a rank holds: SiT (with BN running stats), EMA, VAE."""
    mods = [run.m.sit, run.m.ema.model, run.m.vae]
    return torch.cat([v.detach().double().flatten() for m in mods for v in m.state_dict().values()])


def _worker(rank: int, world: int, port: int, tmp_path, extra, mismatches):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from repae.train.loop import setup_run, train_steps, try_resume

    cfg = tiny_cfg(tmp_path, *DDP_RUN, *extra)
    run = setup_run(cfg)  # joins the process group
    try_resume(run)

    def check_ranks_agree(record):
        mine = _flat_state(run)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        tdist.all_gather(gathered, mine)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            mismatches.append(record["step"])

    train_steps(run, cfg.train.max_steps, on_log=check_ranks_agree, progress=False)
    tdist.destroy_process_group()


def _spawn(tmp_path, *extra):
    mismatches = mp.Manager().list()
    mp.start_processes(_worker, args=(2, _free_port(), tmp_path, list(extra), mismatches), nprocs=2,
                       start_method="spawn", join=True)
    assert list(mismatches) == [], f"ranks disagreed after steps {list(mismatches)}"


def _weights(run_dir):
    ckpt = latest_checkpoint(run_dir)
    return {name: read_file(ckpt / f"{name}.safetensors") for name in ("sit", "ema", "vae")}


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, accum):
    one = tiny_cfg(tmp_path, *DDP_RUN, "exp_name=one", "train.max_steps=3", f"train.grad_accum_steps={accum}")
    train(one, progress=False)  # also builds the toy world cache the workers then read
    _spawn(tmp_path, "exp_name=two", "train.max_steps=3", f"train.grad_accum_steps={accum}")
    a, b = _weights(one.run_dir), _weights(tmp_path / "runs" / "two")
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(b[name][key], a[name][key], atol=2e-5, rtol=1e-4, msg=f"{name}.{key}")
    # the latent BatchNorm saw the global batch on both ranks: same running stats, same count
    torch.testing.assert_close(b["sit"]["bn.running_var"], a["sit"]["bn.running_var"], atol=1e-6, rtol=1e-5)
    assert b["sit"]["bn.num_batches_tracked"].item() == a["sit"]["bn.num_batches_tracked"].item() == 3 * accum


def test_resume_under_two_processes_continues_exactly(tmp_path):
    train(tiny_cfg(tmp_path, *DDP_RUN, "exp_name=warm", "train.max_steps=1"), progress=False)  # build the world
    _spawn(tmp_path, "exp_name=straight", "train.max_steps=4")
    _spawn(tmp_path, "exp_name=split", "train.max_steps=2")
    _spawn(tmp_path, "exp_name=split", "train.max_steps=4")  # the same command, larger budget: resumes
    a, b = _weights(tmp_path / "runs" / "straight"), _weights(tmp_path / "runs" / "split")
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"


def test_device_named_resolves_auto_and_keeps_explicit_names_without_a_process_group():
    from repae import dist

    assert dist.device_named("cpu") == torch.device("cpu")
    assert dist.device_named("cuda:1") == torch.device("cuda", 1)  # named, not checked for existence
    assert dist.device_named("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert dist.device_named() == dist.device_named("auto") and not dist.is_distributed()
