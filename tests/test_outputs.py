"""What the commands leave on disk and say about it (CLI audit items 7, 8, 9, 10):

- `repae sample --npz` writes its .npz whole or not at all: an interrupt (Ctrl-C, SIGTERM) or an error
  removes the temporary part files (61 MB per 20000 toy samples, ~10 GB at 50k 256px) and says so;
- export-vae, cache-latents and prepare-data write only into a new or empty directory or an earlier
  output of the same command (resumed), never among unrelated files, and prepare-data never into its
  own image folder;
- export-vae of a run that never tuned its VAE says so (a warning; the export is still written);
- `repae train`'s final evaluation shows a progress bar when training does;
- a latent-statistics file for another number of channels is named, not a shape error.

Every model here is tiny and every failure is injected after the first batch, so each test takes a second
or two; the SIGTERM test installs its own handler first, so a missing defence fails the test instead of
killing the test process."""

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import randomize, tiny_sit_args, tiny_vae_args
from repae import generate
from repae.cli import main
from repae.config import ConfigError, load_config, save_config
from repae.data.packed import PackedDataError, read_manifest, write_packed
from repae.generate import generate_npz, sample_labels
from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL
from repae.weights import read_file, save_latent_stats, save_model, save_weights

SAMPLER = dict(mode="ode", num_steps=2, cfg_scale=1.0, seed=0)
# `repae sample --random-init` with a SiT and VAE small enough to sample 6 images in well under a second
SAMPLE_CLI = ["--random-init", "train.device=cpu", "train.precision=fp32", "model.depth=2", "model.hidden_size=32",
              "model.num_heads=2", "model.encoder_depth=1", "model.projector_dim=16", "vae.ch=16",
              "vae.ch_mult=[1,2,2]", "sample.num_samples=6", "sample.batch_size=2", "sample.num_steps=2"]


def _models():
    sit = randomize(SiT(tiny_sit_args(depth=2, hidden_size=32, num_heads=2, z_dims=[])), 0.05).eval()
    vae = AutoencoderKL(tiny_vae_args(ch=16, ch_mult=[1, 2], norm_groups=4)).eval()
    return sit, vae


def _fail_after_first_batch(monkeypatch, exc):
    """generate_images works for the first batch, then raises `exc` (a class or a callable that raises)."""
    real, calls = generate.generate_images, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            if isinstance(exc, type):
                raise exc()
            exc()
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_images", flaky)
    return calls


def _left(directory: Path, name: str) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(name))


# ----------------------------------------------------------------------------- item 8: sample --npz


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_or_failed_npz_leaves_no_temporary_file(tmp_path, monkeypatch, exc):
    sit, vae = _models()
    calls = _fail_after_first_batch(monkeypatch, exc)
    with pytest.raises(exc):
        generate_npz(sit, vae, sample_labels(6, 10), tmp_path / "big.npz", batch_size=2, progress=False, **SAMPLER)
    assert len(calls) == 2  # the part file had a finished batch in it when the failure came
    assert _left(tmp_path, "big.npz") == []  # was: big.npz.part0-of-1.tmp.npy


def test_a_failure_while_assembling_leaves_nothing_either(tmp_path, monkeypatch):
    sit, vae = _models()

    def disk_full(*args, **kwargs):  # the labels are saved after the parts were gathered into arr_0.npy
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generate.np, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        generate_npz(sit, vae, sample_labels(6, 10), tmp_path / "big.npz", batch_size=2, progress=False, **SAMPLER)
    assert _left(tmp_path, "big.npz") == []  # parts, big.npz.assemble/ and its arrays are gone


@pytest.mark.parametrize("npz", [False, True])
def test_samples_that_are_not_finite_are_refused_not_written_black(tmp_path, monkeypatch, capsys, npz):
    # finite weights whose output overflows (a diverged run): the uint8 conversion made NaN pixels black, and
    # `repae sample` wrote the grid and the .npz with exit 0
    real = AutoencoderKL.decode

    def overflowing(self, z):
        return real(self, z) * float("inf")

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    out = ["--out", str(tmp_path / "g.png")] + (["--npz", str(tmp_path / "s.npz")] if npz else [])
    assert main(["sample", *SAMPLE_CLI, *out]) == 2
    assert "the samples from index 0 on are NaN or infinite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_evaluating_a_model_whose_samples_are_not_finite_is_refused(monkeypatch):
    # `evaluate samples RUN` samples on the fly: black images would have been scored as samples
    from repae.evaluate.sources import SampledImages
    from repae.generate import NonFiniteSamples

    sit, vae = _models()
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z: torch.full((len(z), 3, 16, 16), float("nan")))
    settings = dict(mode="ode", num_steps=2, heun=False, heun_cfg_at="t_cur", cfg_scale=1.0, guidance_low=0.0,
                    guidance_high=1.0, path_type="linear", seed=0)
    with pytest.raises(NonFiniteSamples):
        next(iter(SampledImages(sit, vae, sample_labels(4, 10), settings, batch_size=2)))


def test_a_disk_too_small_for_the_npz_is_refused_before_sampling(tmp_path, monkeypatch):
    # was: sampling into a sparse memory map until the disk filled, then SIGBUS (exit 135, no message)
    sit, vae = _models()
    calls = _fail_after_first_batch(monkeypatch, RuntimeError)
    monkeypatch.setattr(generate.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=5000))
    with pytest.raises(OSError, match="No space left on device: 6 samples of 16 px need") as err:
        generate_npz(sit, vae, sample_labels(6, 10), tmp_path / "big.npz", batch_size=2, progress=False, **SAMPLER)
    assert err.value.errno == 28 and calls == [] and _left(tmp_path, "big.npz") == []


def test_the_npz_part_is_reserved_on_disk_before_sampling(tmp_path, monkeypatch):
    # a disk that fills after the check: the reservation fails (an OSError and the clean-up), not a write into the map
    sit, vae = _models()
    calls = _fail_after_first_batch(monkeypatch, RuntimeError)
    sizes = []

    def full(fd, offset, length):
        sizes.append(length)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generate.os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError, match="No space left on device") as err:
        generate_npz(sit, vae, sample_labels(6, 10), tmp_path / "big.npz", batch_size=2, progress=False, **SAMPLER)
    assert calls == [] and sizes and sizes[0] >= 6 * 16 * 16 * 3  # the whole part, before any batch
    assert str(tmp_path / "big.npz") in str(err.value.filename) and _left(tmp_path, "big.npz") == []


def test_a_full_disk_while_saving_weights_is_an_oserror_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from repae.train.checkpoint import save_checkpoint

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as err:
        save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert err.value.errno == 28 and err.value.filename == str(tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
    cfg = load_config("toy", overrides=[f"output_dir={tmp_path}"])
    with pytest.raises(OSError):  # a checkpoint half-written on a full disk: its step-*.tmp goes too
        save_checkpoint(cfg.run_dir, 2, {"sit": torch.nn.Linear(2, 2)}, {"step": 2}, cfg)
    assert list((cfg.run_dir / "checkpoints").iterdir()) == []


def test_sigterm_while_sampling_removes_the_part_and_restores_the_handler(tmp_path, monkeypatch):
    class Escaped(Exception):
        """Raised by this test's own SIGTERM handler: SIGTERM reached it instead of generate_npz's."""

    def ours(signum, frame):
        raise Escaped()

    sit, vae = _models()
    _fail_after_first_batch(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, ours)
    try:
        with pytest.raises(generate.SamplingTerminated) as info:
            generate_npz(sit, vae, sample_labels(6, 10), tmp_path / "big.npz", batch_size=2, progress=False,
                         **SAMPLER)
        assert signal.getsignal(signal.SIGTERM) is ours  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.exit_code == 143
    assert _left(tmp_path, "big.npz") == []


def test_repae_sample_interrupted_says_nothing_was_kept(tmp_path, monkeypatch, capsys):
    _fail_after_first_batch(monkeypatch, KeyboardInterrupt)
    npz = tmp_path / "s.npz"
    assert main(["sample", *SAMPLE_CLI, "--out", str(tmp_path / "g.png"), "--npz", str(npz)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "nothing was kept" in err and str(npz) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no grid either: the command did not finish


def test_repae_sample_terminated_exits_143(tmp_path, monkeypatch, capsys):
    _fail_after_first_batch(monkeypatch, generate.SamplingTerminated)
    assert main(["sample", *SAMPLE_CLI, "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz")]) == 143
    assert "nothing was kept" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_repae_sample_names_latent_stats_of_another_vae(tmp_path, capsys):
    """The SiT has 4 latent channels; a 3-channel statistics file is named, with the channels, exit 2."""
    stats = tmp_path / "other-vae-stats.safetensors"
    save_latent_stats(torch.zeros(3), torch.ones(3), stats)
    code = main(["sample", *SAMPLE_CLI, f"vae.latent_stats_path={stats}", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and str(stats) in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


# ----------------------------------------------------------------------------- item 9: prepare-data


def _image_folder(root: Path) -> Path:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 18), (60 * i, 90, 10)).save(root / c / f"{i}.png")
    return root


def _tree(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("out", [".", "packed", "cat/packed"])
def test_prepare_data_refuses_its_own_image_folder(tmp_path, out):
    src = _image_folder(tmp_path / "imgs")
    before = _tree(src)
    with pytest.raises(PackedDataError, match="image folder"):
        write_packed(src, src / out, image_size=16, codec="png", progress=False)
    assert _tree(src) == before  # was: shards and manifest.json written among the images


def test_prepare_data_refuses_an_output_that_holds_the_images(tmp_path, capsys):
    src = _image_folder(tmp_path / "data" / "imgs")
    assert main(["prepare-data", str(src), str(tmp_path / "data"), "--workers", "0", "--no-progress"]) == 2
    assert "image folder" in capsys.readouterr().err
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_prepare_data_refuses_a_directory_of_other_files(tmp_path, capsys):
    src, out = _image_folder(tmp_path / "imgs"), tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "draft.tmp").write_text("mine too")
    assert main(["prepare-data", str(src), str(out), "--image-size", "16", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "not an earlier `repae prepare-data` output" in err
    assert sorted(p.name for p in out.iterdir()) == ["draft.tmp", "notes.txt"]  # was: draft.tmp deleted, shards


def test_prepare_data_resumes_its_own_output_and_keeps_other_temporary_files(tmp_path):
    src, out = _image_folder(tmp_path / "imgs"), tmp_path / "packed"
    first = write_packed(src, out, image_size=16, shard_size=2, codec="png", progress=False)
    (out / "notes.tmp").write_text("the user's")  # next to a finished store: not ours to delete
    (out / "shard-00001.bin.tmp").write_text("debris of a crash")  # ours: removed
    assert write_packed(src, out, image_size=16, shard_size=2, codec="png", progress=False) == first
    assert (out / "notes.tmp").read_text() == "the user's"
    assert not (out / "shard-00001.bin.tmp").exists()
    # an unfinished run that never got to its first manifest (only its own files) is resumed too
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shard-00000.idx.npy").write_bytes(b"x")
    (partial / "shard-00000.bin.tmp").write_bytes(b"x")
    write_packed(src, partial, image_size=16, shard_size=2, codec="png", progress=False)
    assert read_manifest(partial)["num_images"] == 4


# ----------------------------------------------------------------------------- item 9: cache-latents


@pytest.fixture
def tiny_cache_inputs(tmp_path):
    from repae.stage2.cache import ToySource

    vae = AutoencoderKL(tiny_vae_args(ch=8, ch_mult=[1, 2], norm_groups=4)).eval()
    save_model(vae, tmp_path / "vae.safetensors")
    source = ToySource(torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), torch.arange(4) % 2)
    return vae, source, dict(vae_file=tmp_path / "vae.safetensors", shard_size=2, progress=False)


@pytest.mark.parametrize("content", ["notes", "shards without settings", "foreign settings"])
def test_cache_latents_refuses_a_directory_that_is_not_a_cache(tmp_path, tiny_cache_inputs, content):
    from repae.stage2.cache import cache_latents

    vae, source, kwargs = tiny_cache_inputs
    out = tmp_path / "out"
    out.mkdir()
    if content == "notes":
        (out / "notes.txt").write_text("mine")
    elif content == "shards without settings":  # which VAE, which images? unknown: never reused
        (out / "shard-00000.safetensors").write_bytes(b"x")
    else:
        (out / "settings.json").write_text(json.dumps({"another": "tool"}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="cache-latents|not a latent cache"):
        cache_latents(vae, source, out, **kwargs)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing replaced


def test_cache_latents_still_resumes_its_own_cache(tmp_path, tiny_cache_inputs):
    from repae.stage2.cache import LatentCache, cache_latents, shard_name

    vae, source, kwargs = tiny_cache_inputs
    out = tmp_path / "cache"
    cache_latents(vae, source, out, **kwargs)
    (out / shard_name(1)).unlink()
    (out / "manifest.json").unlink()
    (out / "README.md").write_text("the user's note beside a cache: tolerated once the cache is ours")
    cache_latents(vae, source, out, **kwargs)
    assert len(LatentCache(out)) == 4


def test_cache_latents_cli_refuses_an_out_inside_its_data_before_loading(tmp_path, tiny_cache_inputs, monkeypatch,
                                                                         capsys):
    import repae.weights

    def boom(*args, **kwargs):
        raise AssertionError("the VAE was loaded before --out was checked")

    src = _image_folder(tmp_path / "imgs")
    monkeypatch.setattr(repae.weights, "load_model", boom)
    for out in (src / "latents", tmp_path / "imgs"):
        assert main(["cache-latents", "--vae", str(tmp_path / "vae.safetensors"), "--data", str(src),
                     "--out", str(out), "--no-progress"]) == 2
        assert "outside the data" in capsys.readouterr().err
    assert not (src / "latents").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    assert main(["cache-latents", "--vae", str(tmp_path / "vae.safetensors"), "--data", "toy",
                 "--out", str(tmp_path / "notes"), "--no-progress"]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_cache_latents_names_the_unreadable_images_it_filled(tmp_path, tiny_cache_inputs, capsys):
    # was silent: "wrote ...: 6 images" where two entries held a neighbour's latents
    from repae.stage2.cache import LatentCache

    src = _image_folder(tmp_path / "imgs")
    Image.new("RGB", (20, 18), (200, 10, 10)).save(src / "dog" / "2.png")
    for name in ("cat/1.png", "dog/0.png"):
        (src / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "cache"
    argv = ["cache-latents", "--vae", str(tmp_path / "vae.safetensors"), "--data", str(src), "--out", str(out),
            "--image-size", "16", "--shard-size", "2", "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 unreadable source images: their entries hold the next readable image" in err
    assert "cat/1.png, dog/0.png" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unreadable_images"]["count"] == 2
    assert manifest["unreadable_images"]["examples"] == ["cat/1.png", "dog/0.png"]  # across two shards
    cache = LatentCache(out)  # order cat/0, cat/1 (bad), dog/0 (bad), dog/1, dog/2: 1 and 2 hold dog/1's latents
    assert torch.equal(cache.moments([1])[0], cache.moments([3])[0]) and torch.equal(cache.moments([2])[0],
                                                                                       cache.moments([3])[0])
    assert not torch.equal(cache.moments([0])[0], cache.moments([3])[0])


def test_an_all_unreadable_folder_says_how_many_it_tried(tmp_path, tiny_cache_inputs, capsys):
    src = tmp_path / "imgs" / "cat"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main(["cache-latents", "--vae", str(tmp_path / "vae.safetensors"), "--data", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "cache"), "--image-size", "16", "--no-progress"]) == 2
    assert "all 3 images are unreadable, starting from" in capsys.readouterr().err  # was: "100 ... in a row"


# ----------------------------------------------------------------------------- items 9, 10: export-vae


def _fake_run(root: Path, *overrides) -> Path:
    """A run directory as export-vae reads it: config, VAE weights, the EMA SiT's latent BatchNorm stats."""
    from repae.build import vae_args

    cfg = load_config("toy", overrides=list(overrides))
    ckpt = root / "checkpoints" / "step-0000003"
    ckpt.mkdir(parents=True)
    save_config(cfg, ckpt / "config.yaml")
    save_model(AutoencoderKL(vae_args(cfg)), ckpt / "vae.safetensors")
    c = vae_args(cfg).z_channels
    save_weights({"bn.running_mean": torch.zeros(c), "bn.running_var": torch.ones(c)}, ckpt / "ema.safetensors")
    (ckpt / "state.pt").write_bytes(b"")  # unverifiable (no manifest), but usable
    return root


def test_export_vae_refuses_a_directory_of_other_files_and_rewrites_its_own(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export-vae", str(run), "--out", str(out)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # was: the export written beside the notes
    (out / "notes.txt").unlink()
    assert main(["export-vae", str(run), "--out", str(out)]) == 0
    (out / "export.json").unlink()  # an export that crashed before its record: the same command finishes it
    (out / "vae.safetensors.tmp").write_bytes(b"x")
    assert main(["export-vae", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "export.json").read_text())["step"] == 3


def test_export_vae_of_a_frozen_vae_warns_and_says_so(tmp_path, capsys):
    frozen = _fake_run(tmp_path / "frozen", "train.tune_vae=false", "latent_norm.mode=fixed")
    assert main(["export-vae", str(frozen)]) == 0  # a warning, not a refusal: scripts keep working
    out, err = capsys.readouterr()
    assert "E2E-VAE of" not in out and "frozen (not tuned) VAE" in out
    assert "warning:" in err and "did not tune its VAE" in err and "not an E2E-VAE" in err
    record = json.loads((frozen / "e2e-vae" / "export.json").read_text())
    assert record["vae_tuned"] is False and "Not an E2E-VAE" in (frozen / "e2e-vae" / "README.txt").read_text()

    tuned = _fake_run(tmp_path / "tuned")
    assert main(["export-vae", str(tuned)]) == 0
    out, err = capsys.readouterr()
    assert "E2E-VAE of step-0000003" in out and "did not tune" not in err
    assert json.loads((tuned / "e2e-vae" / "export.json").read_text())["vae_tuned"] is True


@pytest.mark.parametrize("mean, var", [(float("nan"), 1.0), (0.0, float("inf")), (0.0, 0.0), (0.0, -1.0)])
def test_export_vae_refuses_latent_statistics_no_reader_takes(tmp_path, mean, var, capsys):
    # a diverged (NaN) or edited EMA BatchNorm: was exported with exit 0, and every loader refused the export
    run = _fake_run(tmp_path / "run")
    ema = run / "checkpoints" / "step-0000003" / "ema.safetensors"
    c = read_file(ema)["bn.running_mean"].numel()
    save_weights({"bn.running_mean": torch.full((c,), mean), "bn.running_var": torch.full((c,), var)}, ema)
    assert main(["export-vae", str(run)]) == 2
    err = capsys.readouterr().err
    assert "ema.safetensors (bn.running_mean / bn.running_var)" in err and "latent" in err
    assert not (run / "e2e-vae").exists()  # refused before a file was written


def test_latent_statistics_are_refused_before_they_are_written(tmp_path):
    from repae.weights import CheckpointError

    with pytest.raises(CheckpointError, match="must be finite"):
        save_latent_stats(torch.zeros(4), torch.tensor([1.0, float("nan"), 1.0, 1.0]), tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


# ----------------------------------------------------------------------------- item 7: final evaluation


def test_the_final_evaluation_shows_a_bar_when_training_does(monkeypatch, capsys):
    """toy_summary samples eval.num_samples images after the training bar reached 100%: with progress on it
    says so and shows a bar (was: minutes of silence at 256px); with progress off, nothing."""
    import repae.evaluate.toy
    import repae.toyworld
    from repae.train.loop import toy_summary

    monkeypatch.setattr(repae.toyworld, "psnr", lambda vae, images: 30.0)
    monkeypatch.setattr(repae.evaluate.toy, "score_samples", lambda *a: {
        "sample_class_accuracy": 1.0, "sample_toy_fid": 0.0, "samples_scored": 4})
    sit, vae = _models()
    cfg = load_config("toy", overrides=["eval.num_samples=4", "sample.num_steps=1", "model.num_classes=10"])
    teacher = SimpleNamespace(logits=lambda x: torch.zeros(len(x), 10))
    models = SimpleNamespace(vae=vae, ema=SimpleNamespace(model=sit))
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), m=models,
                          toy=SimpleNamespace(heldout_images=torch.zeros(2, 3, 16, 16, dtype=torch.uint8), report={},
                                              evaluator=torch.nn.Identity(), teacher=teacher))
    toy_summary(run, progress=True)
    err = capsys.readouterr().err
    assert "final evaluation:" in err and "100%|" in err
    toy_summary(run, progress=False)
    assert capsys.readouterr().err == ""
