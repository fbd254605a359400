"""`repae evaluate`: image sources, the JSON record, the sub-commands on a tiny toy run, errors, and
the split of indices across processes.

Most tests use a small stand-in for Inception (`TinyInception`: 16-d pool, 12-d spatial features):
a real InceptionV3 gives 2048-d features whose Fréchet distance (scipy sqrtm) takes many seconds
on 2 cores. One test runs the real architecture (random weights, saved and loaded by path)."""

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from repae.config import load_config
from repae.evaluate import cli as evaluate_cli
from repae.evaluate.fid import compute_fid_family, load_reference
from repae.evaluate.pipeline import fid_family, vae_metrics
from repae.nn_utils import resolve_precision
from repae.evaluate.sources import (
    EvaluationError, TensorImages, class_labels, open_folder, open_npz, shard_range,
)
from repae.models.inception import WEIGHTS_FILE, InceptionOutput, InceptionV3
from test_train_loop import tiny_cfg


class TinyInception(nn.Module):
    """Inception's interface (uint8 [B,3,H,W] of any size -> pool, spatial, logits) at toy size."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_pool = nn.Parameter(torch.randn(48, 16, generator=g) * 0.5, requires_grad=False)
        self.w_spatial = nn.Parameter(torch.randn(48, 12, generator=g) * 0.5, requires_grad=False)
        self.fc = nn.Parameter(torch.randn(16, 10, generator=g), requires_grad=False)

    @torch.no_grad()
    def forward(self, images, autocast=None):
        x = nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)  # [B,48]
        pool = torch.tanh(x @ self.w_pool)
        return InceptionOutput(pool=pool, spatial=torch.tanh(x @ self.w_spatial), logits=pool @ self.fc)


def run_cli(*argv):
    return evaluate_cli.main(["evaluate", *map(str, argv)])


@pytest.fixture
def tiny_inception(monkeypatch, tmp_path):
    """--inception PATH loads TinyInception; PATH is a real file, so its sha256 is recorded."""
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(b"stand-in inception weights")
    monkeypatch.setattr(evaluate_cli, "load_inception", lambda p, device: TinyInception().to(device))
    return path


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def write_pngs(folder: Path, images: np.ndarray, nested: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        sub = folder / f"part{i % 2}" if nested else folder
        sub.mkdir(exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A toy-world training run of 2 steps (tiny models), shared by the tests of this module."""
    from repae.train.loop import train

    root = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_cfg(root, "train.max_steps=2")
    train(cfg, progress=False)
    return cfg


# ----------------------------------------------------------------------------- pieces


def test_shard_range_covers_every_index_exactly_once_in_whole_batches():
    for n in range(0, 23):
        for world in range(1, 6):
            for bs in (1, 3, 4):
                blocks = [shard_range(n, r, world, bs) for r in range(world)]
                assert [i for b in blocks for i in b] == list(range(n))  # contiguous, in rank order
                assert all(b.start % bs == 0 for b in blocks if len(b))  # the batches one process forms
                batches = [-(-len(b) // bs) for b in blocks]
                assert max(batches) - min(batches) <= 1


def test_balanced_labels_give_exactly_n_over_c_per_class():
    labels = class_labels(50_000, 1000, "balanced")
    assert torch.bincount(labels, minlength=1000).tolist() == [50] * 1000
    uni = class_labels(1000, 10, "uniform", seed=3)
    assert torch.equal(uni, class_labels(1000, 10, "uniform", seed=3)) and 0 <= int(uni.min()) <= int(uni.max()) < 10
    assert not torch.equal(uni, class_labels(1000, 10, "uniform", seed=4))
    assert torch.equal(class_labels(300, 10, "uniform", seed=3), uni[:300])  # label i depends on (seed, i) only
    with pytest.raises(EvaluationError, match="balanced or uniform"):
        class_labels(10, 10, "stratified")


def test_npz_and_folder_blocks_restore_the_whole_set(tmp_path):
    imgs = random_images(11, 8)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    write_pngs(tmp_path / "png", imgs, nested=True)
    for world in (1, 3):
        npz = [b for r in range(world) for b in open_npz(tmp_path / "s.npz", 4, r, world)]
        png = [b[0] for r in range(world) for b in open_folder(tmp_path / "png", 4, rank=r, world=world)]
        np.testing.assert_array_equal(torch.cat(npz).permute(0, 2, 3, 1).numpy(), imgs)
        # nested folders, sorted by relative path: part0/00000, part0/00002, ..., part1/00001, ...
        order = sorted(range(11), key=lambda i: (i % 2, i))
        np.testing.assert_array_equal(torch.cat(png).permute(0, 2, 3, 1).numpy(), imgs[order])


def test_distributed_fid_family_equals_compute_fid_family_in_one_process(tmp_path):
    ref, smp = random_images(30, 16, seed=1), random_images(23, 16, seed=2)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    net = TinyInception()
    source = TensorImages(torch.from_numpy(smp).permute(0, 3, 1, 2), batch_size=5)
    reference = load_reference(tmp_path / "ref.npz", net, need_features=True, progress=False)
    ours = fid_family(source, net, reference, is_split_size=7, progress=False)
    theirs = compute_fid_family([x for x, _ in source], net, reference, is_split_size=7, progress=False)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-12), key


class IdentityVAE(nn.Module):
    """encode -> posterior whose mode is the input; decode = identity: perfect reconstructions."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return type("Posterior", (), {"mode": lambda self: x, "sample": lambda self, generator=None: x})()

    def decode(self, z):
        return z


def test_vae_metrics_of_an_identity_vae_hit_the_caps():
    images = torch.from_numpy(random_images(12, 16, seed=5)).permute(0, 3, 1, 2)
    got = vae_metrics(IdentityVAE(), TensorImages(images, batch_size=5), inception=TinyInception(), progress=False)
    assert got["psnr"] == pytest.approx(100.0) and got["ssim"] == pytest.approx(1.0)
    assert abs(got["rfid"]) < 1e-9 and got["num_images"] == 12 and got["lpips"] is None


# ----------------------------------------------------------------------------- samples


def test_three_sources_holding_the_same_images_give_the_same_fid(tmp_path, tiny_run, tiny_inception):
    from repae.cli import main as repae_main

    np.savez(tmp_path / "ref.npz", arr_0=random_images(24, 32, seed=7))
    common = ["--ref", tmp_path / "ref.npz", "--inception", tiny_inception, "--no-progress", "--batch-size", 7]
    over = ["sample.num_steps=2", "sample.batch_size=7"]  # the Inception batches of all three match too
    assert run_cli("samples", tiny_run.run_dir, *common, "--out", tmp_path / "ckpt.json", "eval.num_samples=20",
                   *over) == 0
    assert repae_main(["sample", "--ckpt", str(tiny_run.run_dir), "--out", str(tmp_path / "grid.png"),
                       "--npz", str(tmp_path / "s.npz"), "sample.num_samples=20", *over]) == 0
    write_pngs(tmp_path / "png", np.load(tmp_path / "s.npz")["arr_0"])
    assert run_cli("samples", tmp_path / "s.npz", *common, "--out", tmp_path / "npz.json") == 0
    assert run_cli("samples", tmp_path / "png", *common, "--out", tmp_path / "png.json") == 0
    results = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ckpt", "npz", "png")]
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "num_images"):
        assert results[0]["metrics"][key] == results[1]["metrics"][key] == results[2]["metrics"][key], key
    assert results[0]["metrics"]["num_images"] == 20

    rec = results[0]  # everything needed to reproduce it
    assert rec["settings"]["sampler"] == {"mode": "ode", "num_steps": 2, "heun": False, "heun_cfg_at": "t_cur",
                                          "cfg_scale": load_config("toy").sample.cfg_scale,  # the run's preset's
                                          "guidance_low": 0.0, "guidance_high": 1.0, "seed": 0,
                                          "path_type": "linear", "use_ema": True, "batch_size": 7,
                                          "precision": resolve_precision("auto", "cpu")}
    assert rec["settings"]["labels"]["sampling"] == "balanced"
    assert rec["settings"]["labels"]["min_per_class"] == rec["settings"]["labels"]["max_per_class"] == 2
    assert rec["settings"]["num_samples"] == 20 and rec["settings"]["image_size"] == 32
    files = rec["files"]
    assert files["inception"]["sha256"] == hashlib.sha256(tiny_inception.read_bytes()).hexdigest()
    assert files["reference"]["sha256"] == hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    for role in ("sit", "vae", "config"):
        assert len(files[role]["sha256"]) == 64
    env = rec["environment"]
    assert env["torch_version"] == torch.__version__ and env["repae_version"] and env["date_utc"]
    assert env["command_line"].startswith("repae evaluate samples ")
    assert results[1]["files"]["samples_npz"]["sha256"]


def test_fid_of_a_set_against_its_own_ref_stats_is_zero(tmp_path, tiny_inception):
    write_pngs(tmp_path / "png", random_images(9, 24, seed=3), nested=True)
    assert run_cli("ref-stats", tmp_path / "png", "--out", tmp_path / "stats.npz", "--inception", tiny_inception,
                   "--no-progress") == 0
    with np.load(tmp_path / "stats.npz") as f:
        assert sorted(f.keys()) == ["mu", "mu_s", "sigma", "sigma_s"]
        scale = np.trace(f["sigma"])
    assert json.loads((tmp_path / "stats.json").read_text())["metrics"]["num_images"] == 9
    assert run_cli("samples", tmp_path / "png", "--ref", tmp_path / "stats.npz", "--inception", tiny_inception,
                   "--no-pr", "--out", tmp_path / "r.json", "--no-progress") == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert abs(m["fid"]) < 1e-6 * scale and abs(m["sfid"]) < 1e-6 * scale and m["precision"] is None


@pytest.mark.slow  # the real InceptionV3 (random weights): ~60 s on 2 busy cores, mostly 2048-d sqrtm
def test_real_inception_architecture_end_to_end(tmp_path):
    path = tmp_path / WEIGHTS_FILE
    net = InceptionV3()
    for m in net.modules():  # He init keeps activations alive through 94 convs (the default lets them vanish)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), path)
    write_pngs(tmp_path / "png", random_images(6, 32, seed=4))
    assert run_cli("ref-stats", tmp_path / "png", "--out", tmp_path / "stats.npz", "--inception", path,
                   "--with-images", "--no-progress") == 0
    assert run_cli("samples", tmp_path / "png", "--ref", tmp_path / "stats.npz", "--inception", path,
                   "--out", tmp_path / "r.json", "--no-progress") == 0
    rec = json.loads((tmp_path / "r.json").read_text())
    with np.load(tmp_path / "stats.npz") as f:
        scale = np.trace(f["sigma"])
    # 6 images in 2048 dimensions: a rank-5 covariance, whose sqrtm scipy gets to ~1e-6 relative
    assert abs(rec["metrics"]["fid"]) < 1e-5 * scale
    assert rec["metrics"]["precision"] == rec["metrics"]["recall"] == 1.0
    assert rec["files"]["inception"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_png_is_skipped_and_counted(tmp_path, tiny_inception, capsys):
    write_pngs(tmp_path / "png", random_images(5, 16, seed=8))
    (tmp_path / "png" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    np.savez(tmp_path / "ref.npz", arr_0=random_images(8, 16, seed=9))
    assert run_cli("samples", tmp_path / "png", "--ref", tmp_path / "ref.npz", "--inception", tiny_inception,
                   "--out", tmp_path / "r.json", "--no-progress") == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["num_images"] == 4 and m["unreadable_images_skipped"] == 1
    assert m["unreadable_examples"][0].endswith("00002.png")
    err = capsys.readouterr().err  # said where people look, not only in the JSON
    assert "skipped 1 unreadable images (unreadable_examples in the record), e.g. " in err and "00002.png" in err


def test_bomb_and_over_limit_images_are_skipped_and_counted(tmp_path, tiny_inception):
    """A PNG whose header claims 30000x30000 (Pillow's bomb) and one over --max-image-pixels are skipped."""
    from test_bad_images import BOMB

    write_pngs(tmp_path / "png", random_images(6, 16, seed=8))
    (tmp_path / "png" / "00001.png").write_bytes(BOMB)
    Image.fromarray(random_images(1, 20, seed=3)[0]).save(tmp_path / "png" / "00009.png")  # 400 px > 300
    np.savez(tmp_path / "ref.npz", arr_0=random_images(8, 16, seed=9))
    assert run_cli("samples", tmp_path / "png", "--ref", tmp_path / "ref.npz", "--inception", tiny_inception,
                   "--out", tmp_path / "r.json", "--no-progress", "--max-image-pixels", 300) == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["num_images"] == 5 and m["unreadable_images_skipped"] == 2
    assert sorted(Path(p).name for p in m["unreadable_examples"]) == ["00001.png", "00009.png"]


def test_images_of_several_sizes(tmp_path, tiny_inception, capsys):
    write_pngs(tmp_path / "png", random_images(4, 16, seed=1))
    write_pngs(tmp_path / "png" / "big", random_images(3, 40, seed=2))
    batches = list(open_folder(tmp_path / "png", batch_size=5))
    # sorted paths: 0000*.png, then big/0000*.png; the first batch of 5 is cut where the size changes
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 16, 16), (1, 3, 40, 40), (2, 3, 40, 40)]
    base = ["ref-stats", tmp_path / "png", "--inception", tiny_inception, "--no-progress", "--with-images"]
    assert run_cli(*base, "--out", tmp_path / "a.npz") == 2
    assert "--image-size" in capsys.readouterr().err
    assert run_cli(*base, "--out", tmp_path / "b.npz", "--image-size", 24) == 0
    with np.load(tmp_path / "b.npz") as f:
        assert f["arr_0"].shape == (7, 24, 24, 3) and f["mu"].shape == (16,)


# ----------------------------------------------------------------------------- errors


def test_errors_exit_2_with_a_clear_message(tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(4, 8))
    ref = ["--ref", tmp_path / "ref.npz"]

    def err(*argv):
        assert run_cli(*argv) == 2
        text = capsys.readouterr().err
        assert text.startswith("repae evaluate: error: ")
        return text

    write_pngs(tmp_path / "png", random_images(3, 8))
    assert WEIGHTS_FILE in err("samples", tmp_path / "png", *ref, "--inception", tmp_path / "nope.pth")
    assert "sample source not found" in err("samples", tmp_path / "missing", *ref)
    np.savez(tmp_path / "noarr.npz", images=random_images(2, 8))
    assert "has no 'arr_0'" in err("samples", tmp_path / "noarr.npz", *ref)
    (tmp_path / "empty").mkdir()
    assert "no images under" in err("samples", tmp_path / "empty", *ref)
    np.savez(tmp_path / "badref.npz", something=np.zeros(3))
    assert "neither reference images" in err("samples", tmp_path / "png", "--ref", tmp_path / "badref.npz")
    np.savez(tmp_path / "statsonly.npz", mu=np.zeros(3), sigma=np.eye(3))
    assert "--no-pr" in err("samples", tmp_path / "png", "--ref", tmp_path / "statsonly.npz")
    assert "no reference batch" in err("samples", tmp_path / "png")
    assert "overrides" in err("samples", tmp_path / "png", *ref, "sample.cfg_scale=2")
    assert "checkpoint not found" in err("cknna", "--ckpt", tmp_path / "none.pt")
    assert "has no config.json" in err("vae", "--vae", tmp_path / "png", "--data", tmp_path / "png")  # not a VAE
    from repae.models.vae import AutoencoderKL
    from repae.weights import save_model
    from conftest import tiny_vae_args

    save_model(AutoencoderKL(tiny_vae_args()), tmp_path / "vae.safetensors")
    assert "--data is required" in err("vae", "--vae", tmp_path / "vae.safetensors")
    assert "data folder not found" in err("vae", "--vae", tmp_path / "vae.safetensors", "--data", tmp_path / "x")
    assert "VAE not found" in err("vae", "--vae", tmp_path / "nope.safetensors", "--data", tmp_path / "png")


# ----------------------------------------------------------------------------- vae, latents, cknna


def test_vae_latents_cknna_on_the_toy_world(tmp_path, tiny_run, tiny_inception):
    run = tiny_run.run_dir
    assert run_cli("vae", "--vae", run, "--inception", tiny_inception, "--num-images", 16, "--batch-size", 8,
                   "--out", tmp_path / "vae.json", "--no-progress") == 0
    rec = json.loads((tmp_path / "vae.json").read_text())
    m = rec["metrics"]
    assert m["num_images"] == 16 and 0 < m["psnr"] < 100 and -1 <= m["ssim"] <= 1 and m["rfid"] >= 0
    assert rec["settings"]["data"] == "toy world held-out set" and rec["files"]["data"]["sha256"]

    fig = tmp_path / "pca.png"
    assert run_cli("latents", "--ckpt", run, "--num-images", 16, "--pca-figure", fig, "--pca-images", 4,
                   "--out", tmp_path / "lat.json", "--no-progress") == 0
    m = json.loads((tmp_path / "lat.json").read_text())["metrics"]
    assert {"raw/spatial_variance", "raw/total_variation", "normalized/spatial_variance",
            "normalized/total_variation"} <= m.keys()
    assert Image.open(fig).size[0] > 0 and m["pca_figure"] == str(fig)

    # spectrum: the toy world's starting VAE (its latent statistics) against the run's VAE (its SiT's BatchNorm)
    assert run_cli("spectrum", "--vae", "toy", "--vae", run, "--label", "start", "--label", "e2e", "--num-images", 8,
                   "--out", tmp_path / "spec.json", "--no-progress") == 0
    rec = json.loads((tmp_path / "spec.json").read_text())
    assert set(rec["metrics"]["spectra"]) == {"images", "start/raw", "start/normalized", "e2e/raw", "e2e/normalized"}
    assert rec["files"]["start/latent_stats"]["sha256"] and rec["files"]["e2e/sit"]["sha256"]

    assert run_cli("cknna", "--ckpt", run, "--num-images", 24, "--topk", 3, "--out", tmp_path / "ck.json",
                   "--no-progress") == 0
    rec = json.loads((tmp_path / "ck.json").read_text())
    assert -1 <= rec["metrics"]["cknna"] <= 1 and rec["metrics"]["num_images"] == 24
    assert rec["settings"]["encoder"] == "toy-teacher" and rec["settings"]["labels"] == "data"
    assert rec["settings"]["depth"] == 1 and rec["settings"]["t"] == 0.5
    assert rec["files"]["encoder"]["sha256"]

    # the toy world's own pre-trained VAE, no run: --data toy with the same toy world
    toy = [f"toy.{k}" for k in ("train_size=120", "heldout_size=40", "teacher_steps=2", "vae_steps=2",
                                "batch_size=8")] + [f"toy.cache_dir={tiny_run.toy.cache_dir}"]
    assert run_cli("vae", "--data", "toy", "--out", tmp_path / "vae0.json", "--no-progress", *toy) == 0
    assert json.loads((tmp_path / "vae0.json").read_text())["metrics"]["num_images"] == 40


# ----------------------------------------------------------------------------- two processes


def _fid_worker(rank, port, tmp_path, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    monkey = evaluate_cli.load_inception
    evaluate_cli.load_inception = lambda p, device: TinyInception().to(device)
    try:
        code = run_cli("samples", Path(tmp_path) / "png", "--ref", Path(tmp_path) / "ref.npz", "--inception",
                       Path(tmp_path) / "inc.pth", "--out", result_file, "--no-progress", "--batch-size", 4,
                       "--device", "cpu")
        assert code == 0
    finally:
        evaluate_cli.load_inception = monkey
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


# two spawned processes (gloo): ~5 s on 2 busy cores
def test_two_processes_give_the_one_process_result(tmp_path, tiny_inception):
    import torch.multiprocessing as mp

    write_pngs(tmp_path / "png", random_images(41, 16, seed=11))  # more images than feature dims: full rank
    np.savez(tmp_path / "ref.npz", arr_0=random_images(10, 16, seed=12))
    (tmp_path / "inc.pth").write_bytes(b"x")
    assert run_cli("samples", tmp_path / "png", "--ref", tmp_path / "ref.npz", "--inception", tmp_path / "inc.pth",
                   "--out", tmp_path / "one.json", "--no-progress", "--batch-size", 4) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fid_worker, args=(port, str(tmp_path), str(tmp_path / "two.json")), nprocs=2,
                       start_method="spawn", join=True)
    one = json.loads((tmp_path / "one.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["environment"]["world_size"] == 2 and two["metrics"]["num_images"] == 41
    # the same batches; float32 features may differ in the last bits (1 thread per worker vs 2 here) and the
    # statistics are summed in another order. One image missing or doubled moves the FID by > 1e-3.
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert two["metrics"][key] == pytest.approx(one[key], rel=1e-7), key


# ----------------------------------------------------------------------------- toy judge


def test_samples_of_a_toy_run_need_no_ref_nor_inception(tmp_path, tiny_run, monkeypatch, capsys):
    """No --ref, no Inception file: the toy evaluator judges, with the numbers the run's own
    end-of-training scoring gave for the same samples (same seed, labels and count)."""
    from repae.evaluate.toy import TOY_JUDGE

    monkeypatch.setenv("REPAE_WEIGHTS", str(tmp_path / "no-weights"))
    out = tmp_path / "toy.json"
    # toy_summary draws eval.num_samples balanced samples with seed sample.seed + 1
    same = [f"eval.num_samples={tiny_run.eval.num_samples}", f"sample.seed={tiny_run.sample.seed + 1}"]
    assert run_cli("samples", tiny_run.run_dir, "--out", out, "--no-progress", *same) == 0
    assert f"judged by: {TOY_JUDGE}" in capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["settings"]["judges"] == [TOY_JUDGE] and rec["notes"]["judges"] == [TOY_JUDGE]
    m = rec["metrics"]
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    toy = summary.get("toy", summary)
    assert m["toy_fid"] == toy["sample_toy_fid"] and m["class_accuracy"] == toy["sample_class_accuracy"]
    assert m["toy_num_images"] == tiny_run.eval.num_samples and "fid" not in m
    assert rec["files"]["toy_evaluator"]["sha256"]

    assert run_cli("samples", tiny_run.run_dir, "eval.num_samples=20", "--out", out, "--no-progress") == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["toy_num_images"] == 20 and m["toy_fid"] >= 0 and 0 <= m["class_accuracy"] <= 1


def test_samples_of_a_toy_run_add_inception_when_its_file_is_there(tmp_path, tiny_run, tiny_inception):
    from repae.evaluate.toy import INCEPTION_JUDGE, TOY_JUDGE

    out = tmp_path / "both.json"
    assert run_cli("samples", tiny_run.run_dir, "eval.num_samples=20", "--inception", tiny_inception,
                   "--out", out, "--no-progress") == 0
    rec = json.loads(out.read_text())
    assert rec["settings"]["judges"] == [TOY_JUDGE, INCEPTION_JUDGE]
    assert rec["settings"]["reference"] == "toy world held-out set"
    m = rec["metrics"]
    assert m["fid"] >= 0 and m["num_images"] == 20 and m["toy_num_images"] == 20 and m["precision"] is not None


def test_ref_stats_of_tar_shards_equal_the_same_images_in_a_folder(tmp_path, tiny_inception):
    """`repae evaluate ref-stats` reads WebDataset tar shards (and the other sources `repae train` reads) as it
    reads a folder: the same images, cropped alike, give the same statistics."""
    import io
    import tarfile

    images = random_images(6, 24, seed=5)
    write_pngs(tmp_path / "png" / "a", images)  # one class folder: the folder reader's order is the file order
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for k, path in enumerate(sorted((tmp_path / "png" / "a").iterdir())):
            for name, payload in ((f"{k:04d}.png", path.read_bytes()), (f"{k:04d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    for source, out in ((tmp_path / "png", "folder.npz"), (tmp_path / "shard.tar", "tar.npz")):
        assert run_cli("ref-stats", source, "--image-size", 16, "--out", tmp_path / out, "--inception",
                       tiny_inception, "--no-progress") == 0
    with np.load(tmp_path / "folder.npz") as a, np.load(tmp_path / "tar.npz") as b:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_array_equal(a[key], b[key])
    assert json.loads((tmp_path / "tar.json").read_text())["settings"]["source"]["kind"] == "wds"
