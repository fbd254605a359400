"""Stage 2 on the toy world: a tiny REPA-E run -> export-vae -> cache-latents -> train-ldm.

The exported formats agree with each other and with the run; the cache holds the encoder's
moments and resumes to the same result after a crash; training on cached latents equals training
on images with the same frozen VAE and draws, resumes, and writes samples."""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from repae.config import ConfigError, load_config
from repae.data.sampler import ResumableOrder
from repae.pixels import to_vae_range
from repae.stage2 import cache as cache_mod
from repae.fileio import sha256_file
from repae.stage2.cache import LatentCache, ToySource, cache_latents, read_manifest, shard_name
from repae.stage2.commands import add_parsers, load_ldm_config
from repae.train.checkpoint import latest_checkpoint
from repae.train.loop import train
from repae.weights import load_latent_stats, load_model, read_file
from test_train_loop import TINY


def cli(*argv) -> int:
    """`repae ...` through the real parser (stage-2 commands added if cli.py does not list them yet)."""
    from repae import cli as repae_cli
    from repae.weights import CheckpointError

    parser = repae_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "export-vae" not in sub.choices:
        add_parsers(sub, repae_cli._add_config_args)
    args = parser.parse_args([str(a) for a in argv])
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as err:
        print(f"repae {args.command}: error: {err}")
        return 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage2")
    base = TINY + [f"toy.cache_dir={tmp / 'cache'}", f"output_dir={tmp / 'runs'}"]
    stage1 = load_config("toy", overrides=base + ["exp_name=e2e", "train.max_steps=2"])
    train(stage1, progress=False)
    export, latents = tmp / "export", tmp / "latents"
    assert cli("export-vae", stage1.run_dir, "--out", export) == 0
    assert cli("cache-latents", "--vae", export, "--data", "toy", "--out", latents, "--shard-size", 50,
               "--no-progress", *base) == 0
    vae = load_model(export / "vae.safetensors")
    toy = np.load(next((tmp / "cache").glob("toyworld-*")) / "train.npz")
    return SimpleNamespace(tmp=tmp, base=base, stage1=stage1, export=export, latents=latents, vae=vae.eval(),
                           images=torch.from_numpy(toy["images"]), labels=torch.from_numpy(toy["labels"]))


# ---------------------------------------------------------------------------------- export-vae


def test_export_holds_the_runs_vae_and_ema_bn_stats_in_every_format(world):
    ckpt = latest_checkpoint(world.stage1.run_dir)
    tuned, ema = read_file(ckpt / "vae.safetensors"), read_file(ckpt / "ema.safetensors")
    mean, var = ema["bn.running_mean"], ema["bn.running_var"]
    for key, value in tuned.items():
        assert torch.equal(world.vae.state_dict()[key], value), key
    ours = load_latent_stats(world.export / "latent_stats.safetensors")
    official = load_latent_stats(world.export / "latents-stats.pt")
    assert torch.equal(ours[0], mean) and torch.equal(ours[1], var)
    torch.testing.assert_close(official[0], mean) and torch.testing.assert_close(official[1], var, rtol=1e-5, atol=0)
    plain = torch.load(world.export / "latents-stats.pt", weights_only=True)
    assert plain["latents_scale"].shape == (1, 4, 1, 1)
    torch.testing.assert_close(plain["latents_scale"].flatten(), var.rsqrt())
    state = torch.load(world.export / "e2e-vae.pt", weights_only=True)  # a plain state dict
    assert state.keys() == tuned.keys() and all(torch.equal(state[k], tuned[k]) for k in state)
    official_vae = load_model(world.export / "e2e-vae.pt", args=world.vae.args)
    assert all(torch.equal(official_vae.state_dict()[k], tuned[k]) for k in tuned)
    record = json.loads((world.export / "export.json").read_text())
    assert record["step"] == 2 and record["checkpoint"] == ckpt.name and record["latent_stats_from"] == "ema"
    assert record["sha256"]["vae.safetensors"] == sha256_file(world.export / "vae.safetensors")
    readme = (world.export / "README.txt").read_text()  # the toy VAE's GroupNorm, said out loud
    assert f"{world.vae.args.norm_groups} group(s)" in readme and "e2e-vae.json" in readme
    assert load_model(world.export / "e2e-vae.pt").args == world.vae.args  # the sidecar: no args needed


def test_diffusers_export_decodes_cached_latents_like_our_vae(world):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.AutoencoderKL.from_pretrained(world.export / "diffusers").eval()
    z = LatentCache(world.latents).moments(range(6))[0]
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, world.vae.decode(z), atol=1e-4, rtol=0)
    mean, var = load_latent_stats(world.export / "latent_stats.safetensors")
    torch.testing.assert_close(torch.tensor(theirs.config.latents_std), var.sqrt())
    torch.testing.assert_close(torch.tensor(theirs.config.latents_mean), mean)


def test_export_of_a_run_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert cli("export-vae", tmp_path / "run") == 2
    assert "has no checkpoints" in capsys.readouterr().out


# ------------------------------------------------------------------------------- cache-latents


def test_cache_holds_the_posterior_moments_labels_and_provenance(world):
    manifest = read_manifest(world.latents)
    assert manifest["count"] == 120 and manifest["num_shards"] == 3 and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["vae"]["sha256"] == sha256_file(world.export / "vae.safetensors")
    assert manifest["dtype"] == "float32" and manifest["source"]["kind"] == "toy"
    cache = LatentCache(world.latents)
    assert torch.equal(torch.from_numpy(cache.labels), world.labels)
    items = [0, 7, 49, 50, 119]
    with torch.no_grad():
        posterior = world.vae.encode(to_vae_range(world.images[items]))
    mean, std = cache.moments(items)
    torch.testing.assert_close(mean, posterior.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, posterior.std, atol=1e-5, rtol=1e-5)
    # the cache's statistics: those of z ~ q(z|x) over all images
    all_mean, all_std = cache.moments(range(120))
    stats = load_latent_stats(world.latents / "latent_stats.safetensors")
    torch.testing.assert_close(stats[0], all_mean.double().mean((0, 2, 3)).float())
    second = (all_mean.double() ** 2 + all_std.double() ** 2).mean((0, 2, 3)) - all_mean.double().mean((0, 2, 3)) ** 2
    torch.testing.assert_close(stats[1], second.float())


def test_interrupted_cache_resumes_to_what_an_uninterrupted_run_writes(world, tmp_path, monkeypatch):
    source = ToySource(world.images[:30], world.labels[:30])
    kwargs = dict(vae_file=world.export / "vae.safetensors", shard_size=8, batch_size=8, progress=False)
    cache_latents(world.vae, source, tmp_path / "straight", **kwargs)
    real, written = cache_mod._write_shard, []

    def crash_on_third(path, tensors, meta):
        if len(written) == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")  # what a crash leaves
            raise KeyboardInterrupt("power cut")
        written.append(path.name)
        return real(path, tensors, meta)

    monkeypatch.setattr(cache_mod, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(world.vae, source, tmp_path / "split", **kwargs)
    with pytest.raises(ConfigError, match="unfinished"):
        LatentCache(tmp_path / "split")
    monkeypatch.setattr(cache_mod, "_write_shard", lambda *a: (written.append(a[0].name), real(*a)))
    cache_latents(world.vae, source, tmp_path / "split", **kwargs)
    assert written == [shard_name(0), shard_name(1), shard_name(2), shard_name(3)]  # 0 and 1 not redone
    for k in range(4):
        a, b = read_file(tmp_path / "straight" / shard_name(k)), read_file(tmp_path / "split" / shard_name(k))
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert read_manifest(tmp_path / "split")["stats_var"] == read_manifest(tmp_path / "straight")["stats_var"]
    with pytest.raises(ConfigError, match="other settings"):
        cache_latents(world.vae, source, tmp_path / "split", **{**kwargs, "shard_size": 10})


def test_mirrored_items_pair_flipped_images_with_their_own_moments(world, tmp_path):
    from repae.stage2.latents import LatentBatches

    source = ToySource(world.images[:5], world.labels[:5])
    cache_latents(world.vae, source, tmp_path / "c", vae_file=world.export / "vae.safetensors", shard_size=4,
                  hflip_too=True, store_dtype=torch.bfloat16, progress=False)
    cache = LatentCache(tmp_path / "c")
    assert len(cache) == 10
    batches = LatentBatches(cache, source, seed=0)
    images, labels, (mean, std) = batches.next(10)
    with torch.no_grad():
        posterior = world.vae.encode(to_vae_range(images))
    # stored as bf16: equal up to one bf16 step (2^-7 relative), as encoding in other batch sizes
    # may move an fp32 value across a bf16 rounding boundary
    torch.testing.assert_close(mean, posterior.mean.bfloat16().float(), atol=0, rtol=2**-7)
    assert torch.equal(labels, world.labels[:5].repeat(2)[batches.order._permutation(0)])


def test_latent_batches_come_pinned_when_asked(world, tmp_path, pinning):
    """train-ldm on a GPU: cached moments (and images for REPA) pass through the DataLoader's pin step."""
    from repae.stage2.latents import LatentBatches

    source = ToySource(world.images[:4], world.labels[:4])
    cache_latents(world.vae, source, tmp_path / "c", vae_file=world.export / "vae.safetensors", shard_size=4,
                  progress=False)
    batch = LatentBatches(LatentCache(tmp_path / "c"), source, seed=0, pin_memory=True).next(4)
    assert len(pinning) == 1 and pinning[0] is batch
    LatentBatches(LatentCache(tmp_path / "c"), source, seed=0).next(4)
    assert len(pinning) == 1


# ---------------------------------------------------------------------------------- train-ldm


def _ldm(world, *extra):
    return load_ldm_config("toy", [], world.base + [f"latents.path={world.latents}", *extra])


def test_train_ldm_runs_resumes_and_samples_with_the_frozen_vae(world, capsys):
    assert cli("train-ldm", "--no-progress", *world.base, f"latents.path={world.latents}", "train.max_steps=2") == 0
    cfg = _ldm(world, "train.max_steps=3")
    assert cfg.exp_name == "toy-ldm" and not cfg.train.tune_vae and cfg.latent_norm.mode == "fixed"
    summary = train(cfg, progress=False)
    assert summary["steps_this_invocation"] == 1 and "repa_sit" in summary["final"]  # REPA: images loaded too
    assert (cfg.run_dir / "samples" / "step-0000003.png").is_file()
    ckpt = latest_checkpoint(cfg.run_dir)
    vae = read_file(ckpt / "vae.safetensors")
    assert all(torch.equal(vae[k], v) for k, v in world.vae.state_dict().items())  # frozen
    ema = read_file(ckpt / "ema.safetensors")  # the fixed normaliser: the exported (EMA BN) statistics
    mean, var = load_latent_stats(world.export / "latent_stats.safetensors")
    assert torch.equal(ema["bn.running_mean"], mean) and torch.equal(ema["bn.running_var"], var)


def test_cached_latents_train_like_images_through_the_same_frozen_vae(world):
    lr, steps = 0.004, 3
    common = ["train.precision=fp32", f"train.max_steps={steps}", f"optim_sit.lr={lr}", "train.log_every=1",
              "train.tune_vae=false",
              "latent_norm.mode=fixed", f"vae.path={world.export / 'vae.safetensors'}",
              f"vae.latent_stats_path={world.export / 'latent_stats.safetensors'}"]
    images = train(load_config("toy", overrides=world.base + common + ["exp_name=from-images"]), progress=False)
    cached = train(_ldm(world, *common, "exp_name=from-latents"), progress=False)
    runs = world.tmp / "runs"
    logs = [[json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("from-images", "from-latents")]
    for a, b in zip(*logs):
        for key in ("diffusion", "repa_sit"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    # The latents differ by float rounding (encoded in other batches), so the gradients by a little. Under
    # adaLN-Zero the blocks' MLP weights get near-zero gradients in the first steps, and Adam moves an element
    # whose gradient is near its eps by lr * g / (|g| + eps): a rounding there can move it by a good part of
    # lr. So the two SiTs are compared as functions, on latents and times neither trained on.
    sits = [load_model(latest_checkpoint(runs / name) / "sit.safetensors", kind="sit").eval()
            for name in ("from-images", "from-latents")]
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(16, 4, 8, 8, generator=gen)  # the toy latents
    t, y = torch.rand(16, generator=gen), torch.arange(16) % 10
    with torch.no_grad():
        v_images, v_cached = (sit.velocity(z, t, y) for sit in sits)
    assert v_images.abs().mean() > 1e-3  # trained: no longer the zero velocity of a fresh adaLN-Zero SiT
    assert (v_cached - v_images).norm() <= 1e-4 * v_images.norm()  # 2.8e-6 when written
    weights = [sit.state_dict() for sit in sits]  # loaded strictly: every key of the two files
    for key, value in weights[0].items():
        # each run moves an element by about lr per step at most: more apart than both together is a real difference
        assert (weights[1][key] - value).abs().max() <= 2 * steps * lr, key
    assert images["steps"] == cached["steps"] == steps


def test_diffusion_loss_falls_on_cached_latents(world):
    # vanilla SiT (no teacher grid to match), so patch 1: 64 tokens learn the tiny model's latents
    # within 100 steps, where patch 2's 16 tokens at hidden 48 need far more. Uniform t, as the
    # 10% threshold was set with: under the toy preset's lognormal t it fell 9% (1.986 -> 1.810)
    cfg = _ldm(world, "exp_name=vanilla", "loss.proj_coeff=0", "train.global_batch_size=16", "train.max_steps=100",
               "flow.time_sampling=uniform",
               "optim_sit.lr=3e-3", "train.log_every=20", "train.ckpt_every=1000", "train.precision=fp32", "model.arch=SiT-T/1")
    train(cfg, progress=False)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "repa_sit" not in records[0]  # vanilla SiT: no encoder, no images loaded
    assert records[-1]["diffusion"] < 0.9 * records[0]["diffusion"], [r["diffusion"] for r in records]


def test_train_ldm_refuses_a_config_that_does_not_fit_the_cache(world, tmp_path):
    with pytest.raises(ConfigError, match="latents.path"):
        load_ldm_config("toy", [], world.base)
    with pytest.raises(ConfigError, match="tune_vae=false"):
        _ldm(world, "train.tune_vae=true")
    other = tmp_path / "other.safetensors"
    other.write_bytes((world.export / "e2e-vae.pt").read_bytes())
    with pytest.raises(ConfigError, match="not the VAE"):
        train(_ldm(world, f"vae.path={other}", "exp_name=wrong-vae"), progress=False)


def test_image_folder_cache_and_batches_with_workers(world, tmp_path):
    from PIL import Image

    from repae.data.sources import cache_source
    from repae.stage2.latents import LatentBatches

    for i in range(6):  # two classes, three images each
        folder = tmp_path / "folder" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(world.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    cfg = load_config("toy", overrides=["data.source=folder", f"data.path={tmp_path / 'folder'}", "data.image_size=32",
                                        "loss.proj_coeff=0", "loss.vae_align_proj_coeff=0"])
    source = cache_source(cfg, num_workers=1)  # what `repae cache-latents --data FOLDER` reads
    manifest = cache_latents(world.vae, source, tmp_path / "c", vae_file=world.export / "vae.safetensors",
                             shard_size=4, batch_size=2, progress=False)
    assert manifest["source"]["kind"] == "folder" and manifest["classes"] == ["class0", "class1"]
    cache = LatentCache(tmp_path / "c")
    assert cache.labels.tolist() == [0, 0, 0, 1, 1, 1]
    images, labels, (mean, _) = LatentBatches(cache, source, seed=1, num_workers=1).next(6)
    with torch.no_grad():
        torch.testing.assert_close(mean, world.vae.encode(to_vae_range(images)).mean, atol=1e-5, rtol=1e-5)
    assert torch.equal(labels, torch.from_numpy(cache.labels)[ResumableOrder(6, 1).take(6)])


def test_a_cache_made_through_the_diffusers_export_trains_with_that_vae(world, tmp_path):
    from repae.build import build_vae
    from repae.stage2.latents import resolve_latents

    assert cli("cache-latents", "--vae", world.export / "diffusers", "--data", "toy", "--out", tmp_path / "d",
               "--no-progress", *world.base) == 0
    manifest = read_manifest(tmp_path / "d")
    assert manifest["vae"]["sha256"] == sha256_file(world.export / "diffusers" / "diffusion_pytorch_model.safetensors")
    torch.testing.assert_close(LatentCache(tmp_path / "d").moments(range(4))[0],
                               LatentCache(world.latents).moments(range(4))[0], atol=1e-5, rtol=1e-5)
    cfg = load_ldm_config("toy", [], world.base + [f"latents.path={tmp_path / 'd'}"])
    resolve_latents(cfg)
    assert cfg.vae.path == str((world.export / "diffusers").resolve())
    assert cfg.vae.latent_stats_path == str((tmp_path / "d" / "latent_stats.safetensors").resolve())  # the cache's
    assert all(torch.equal(v, world.vae.state_dict()[k]) for k, v in build_vae(cfg).state_dict().items())
