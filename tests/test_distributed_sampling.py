"""Work split across 2 gloo processes equals one process: sampling to an ADM .npz (library and
`repae sample`), caching latents (disjoint shards, no gaps), and training on cached latents."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import randomize, tiny_sit_args, tiny_vae_args
from repae.data.toy import toy_tensor
from repae.generate import generate_images, generate_npz, rank_batches, sample_labels
from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL
from repae.stage2.cache import LatentCache, ToySource, cache_latents, shard_name
from repae.weights import read_file

N, BATCH = 7, 2  # 4 batches over 2 ranks; the last one short
SAMPLER = dict(mode="ode", num_steps=2, cfg_scale=2.0, seed=3)
SAMPLE_CLI = ["--random-init", "train.device=cpu", "train.precision=fp32", "model.depth=2", "model.hidden_size=32",
              "model.num_heads=2", "model.encoder_depth=1", "model.projector_dim=16", "vae.ch=16",
              "vae.ch_mult=[1,2,2]", "sample.num_samples=5", "sample.batch_size=2", "sample.num_steps=2"]


def _models():
    torch.manual_seed(0)
    sit = randomize(SiT(tiny_sit_args(input_size=16, depth=2, hidden_size=32, num_heads=2, z_dims=[])), 0.05).eval()
    sit.bn.init_from_stats(torch.randn(4) * 0.1, torch.rand(4) + 0.5)
    vae = AutoencoderKL(tiny_vae_args(ch=16, ch_mult=[1, 2], norm_groups=4)).eval()
    return sit, vae


@pytest.fixture
def one_thread():
    """The workers run one thread each; the reference too, so no sum is split differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: Path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from repae import dist
    from repae.cli import main

    dist.init_from_env("cpu")
    sit, vae = _models()
    labels = sample_labels(N, 10, "uniform", seed=5)
    first = generate_npz(sit, vae, labels, tmp / "two.npz", batch_size=BATCH, keep=3, progress=False, **SAMPLER)
    if rank == 0:
        torch.save(first, tmp / "first.pt")
    images, toy_labels = toy_tensor(10, seed=1)
    cache_latents(vae, ToySource(images, toy_labels), tmp / "cache-two", vae_file=tmp / "vae.safetensors",
                  shard_size=3, batch_size=2, progress=False)
    assert main(["sample", *SAMPLE_CLI, "--out", str(tmp / "two.png"), "--npz", str(tmp / "cli-two.npz")]) == 0
    from repae.train.loop import setup_run, train_steps

    run = setup_run(_ldm_cfg(tmp, "exp_name=ldm-two"))  # REPA on cached latents (+ images for the teacher)
    train_steps(run, run.cfg.train.max_steps, progress=False)
    tdist.destroy_process_group()


def _ldm_cfg(tmp: Path, *extra):
    from test_distributed import DDP_RUN
    from test_train_loop import tiny_cfg

    return tiny_cfg(tmp, *DDP_RUN, "train.max_steps=2", "train.tune_vae=false", "latent_norm.mode=fixed",
                    f"latents.path={tmp / 'toy-latents'}", *extra)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    from repae.weights import save_model

    from repae.build import vae_args
    from repae.toyworld import ensure_toy_world
    from repae.weights import load_model

    tmp = tmp_path_factory.mktemp("dist-sampling")
    save_model(_models()[1], tmp / "vae.safetensors")
    cfg = _ldm_cfg(tmp)
    toy = ensure_toy_world(vae_args(cfg), cfg.toy)  # the pretrained toy VAE stands in for an E2E-VAE
    cache_latents(load_model(toy.vae_path).eval(), ToySource(toy.train_images, toy.train_labels), tmp / "toy-latents",
                  vae_file=toy.vae_path, vae_stats=toy.latent_stats_path, shard_size=50, progress=False)
    mp.start_processes(_worker, args=(2, _free_port(), tmp), nprocs=2, start_method="spawn", join=True)
    return tmp


def test_rank_batches_cover_every_index_once():
    for n, bs, world in [(7, 2, 2), (10, 3, 4), (1, 4, 3), (64, 64, 2)]:
        got = sorted(i for r in range(world) for a, b in rank_batches(n, bs, r, world) for i in range(a, b))
        assert got == list(range(n))


def test_labels_balanced_and_uniform_are_functions_of_the_index():
    assert sample_labels(12, 5).tolist() == [i % 5 for i in range(12)]
    uniform = sample_labels(200, 10, "uniform", seed=1)
    assert torch.equal(uniform[:50], sample_labels(50, 10, "uniform", seed=1))
    assert not torch.equal(uniform, sample_labels(200, 10, "uniform", seed=2))
    assert set(uniform.tolist()) == set(range(10))


def test_two_ranks_write_the_npz_one_process_writes(spawned, tmp_path, one_thread):
    sit, vae = _models()
    labels = sample_labels(N, 10, "uniform", seed=5)
    first = generate_npz(sit, vae, labels, tmp_path / "one.npz", batch_size=BATCH, keep=3, progress=False, **SAMPLER)
    one, two = np.load(tmp_path / "one.npz"), np.load(spawned / "two.npz")
    assert two["arr_0"].shape == (N, 16 * 2, 16 * 2, 3) and two["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(two["labels"], labels.numpy())
    assert len({two["arr_0"][i].tobytes() for i in range(N)}) == N  # distinct samples: no index twice
    # and both equal plain generation of indices 0..N-1
    direct = generate_images(sit, vae, labels, batch_size=BATCH, progress=False, **SAMPLER)
    assert np.array_equal(direct.permute(0, 2, 3, 1).numpy(), two["arr_0"])
    assert torch.equal(torch.load(spawned / "first.pt"), first) and torch.equal(first, direct[:3])
    assert sorted(p.name for p in spawned.iterdir() if p.name.startswith("two.npz")) == ["two.npz"]  # parts gone


def test_repae_sample_under_two_processes_equals_one(spawned, tmp_path, one_thread):
    from repae.cli import main

    assert main(["sample", *SAMPLE_CLI, "--out", str(tmp_path / "one.png"), "--npz", str(tmp_path / "one.npz")]) == 0
    one, two = np.load(tmp_path / "one.npz"), np.load(spawned / "cli-two.npz")
    assert one["arr_0"].shape[0] == 5 and np.array_equal(one["arr_0"], two["arr_0"])
    assert two["labels"].tolist() == [i % 10 for i in range(5)]
    assert (spawned / "two.png").is_file()


def test_two_ranks_cache_disjoint_shards_equal_to_one_process(spawned, tmp_path, one_thread):
    images, labels = toy_tensor(10, seed=1)
    _, vae = _models()
    manifest = cache_latents(vae, ToySource(images, labels), tmp_path / "cache-one",
                             vae_file=spawned / "vae.safetensors", shard_size=3, batch_size=2, progress=False)
    assert manifest["num_shards"] == 4 and manifest["count"] == 10
    for k in range(4):  # each shard written once, by rank k % 2, with the same content
        a, b = read_file(spawned / "cache-two" / shard_name(k)), read_file(tmp_path / "cache-one" / shard_name(k))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    names = [sorted(p.name for p in d.iterdir()) for d in (spawned / "cache-two", tmp_path / "cache-one")]
    assert names[0] == names[1]
    two = LatentCache(spawned / "cache-two")
    assert two.labels.tolist() == labels.tolist()
    torch.testing.assert_close(two.moments(range(10))[0], LatentCache(tmp_path / "cache-one").moments(range(10))[0])


def test_two_ranks_train_on_cached_latents_like_one_process(spawned):
    from repae.train.checkpoint import latest_checkpoint
    from repae.train.loop import train

    train(_ldm_cfg(spawned, "exp_name=ldm-one"), progress=False)
    for name in ("sit", "ema"):
        a = read_file(latest_checkpoint(spawned / "runs" / "ldm-one") / f"{name}.safetensors")
        b = read_file(latest_checkpoint(spawned / "runs" / "ldm-two") / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4, msg=f"{name}.{key}")
