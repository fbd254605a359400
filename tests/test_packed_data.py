import argparse
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import repae.data.packed as packed
from repae.data.folder import DatasetBatches, ImageFolder, adm_center_crop, list_image_folder
from repae.data.packed import PackedDataError, PackedDataset, read_manifest, verify_packed, write_packed
from repae.data import prepare_cli
from repae.data.prepare_cli import add_parser

SIZE = 16


def photoish(rng, h, w):
    """Smooth colour gradients + a bright disc + mild noise: compresses like a photo, not like static."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a, b = rng.uniform(-1, 1, (2, 3))
    img = 128 + 80 * np.sin(3 * (a * xx[..., None] + b * yy[..., None]) + rng.uniform(0, 6, 3))
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, 0.2 * min(h, w)
    img[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def make_folder(root, per_class=4, classes=("cat", "dog", "eel")):
    """Sources of varied sizes (some >= 2x the crop, so the BOX halving runs) and formats."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = [(30, 40), (50, 36), (16, 16), (70, 90)][i % 4]
            Image.fromarray(photoish(rng, h, w)).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}", quality=90)
    return root


def crops(root):
    files, labels, classes = list_image_folder(root)
    out = []
    for f in files:
        with Image.open(f) as img:
            out.append(adm_center_crop(img, SIZE))
    return out, labels, classes


def tree_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("codec", ["png", "webp"])
def test_lossless_round_trip_equals_the_adm_crop(tmp_path, codec):
    src = make_folder(tmp_path / "src")
    m = write_packed(src, tmp_path / "out", image_size=SIZE, shard_size=5, codec=codec, progress=False)
    expected, labels, classes = crops(src)
    assert m["complete"] and m["num_images"] == 12 and len(m["shards"]) == 3 and m["quality"] is None
    assert m["classes"] == ["cat", "dog", "eel"] and m["class_counts"] == [4, 4, 4]
    ds = PackedDataset(tmp_path / "out")
    assert len(ds) == 12 and ds.classes == classes and ds.labels.tolist() == labels
    for i in range(len(ds)):
        image, label, bad = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and bad == ()
        assert label == labels[i] and np.array_equal(image.permute(1, 2, 0).numpy(), expected[i])
    assert verify_packed(tmp_path / "out", progress=False) == []


def test_jpeg_round_trip_within_psnr_bound(tmp_path):
    src = make_folder(tmp_path / "src")
    m = write_packed(src, tmp_path / "out", image_size=SIZE, codec="jpeg", quality=95, progress=False)
    assert m["codec"] == "jpeg" and m["quality"] == 95 and m["encoder"]["subsampling"] == 0
    expected, labels, _ = crops(src)
    ds = PackedDataset(tmp_path / "out")
    psnr = []
    for i, want in enumerate(expected):
        image, label, _ = ds[i]
        assert label == labels[i]
        err = image.permute(1, 2, 0).numpy().astype(np.float64) - want
        psnr.append(10 * np.log10(255**2 / (err**2).mean()))
    # lossy but close: 37-44 dB on these tiny sharp-edged crops (quality 75 gives 29-38, mean 32)
    assert min(psnr) > 36 and np.mean(psnr) > 38 and max(psnr) < 60


def test_interrupted_write_resumes_to_the_identical_result(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src")
    ref = write_packed(src, tmp_path / "ref", image_size=SIZE, shard_size=3, num_workers=2, progress=False)

    real, calls = packed.encode_image, []

    def failing(arr, settings):  # the encoder dies on the 5th image: shard 0 done, shard 1 half-way
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real(arr, settings)

    out = tmp_path / "out"
    monkeypatch.setattr(packed, "encode_image", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_packed(src, out, image_size=SIZE, shard_size=3, progress=False)
    m = read_manifest(out, require_complete=False)
    assert not m["complete"] and [r["index"] for r in m["shards"]] == [0]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.bin", "shard-00000.idx.npy"]
    with pytest.raises(PackedDataError, match="unfinished"):  # a reader never sees a half-written store
        PackedDataset(out)
    # debris of a harder crash: a renamed but unrecorded shard, and a stale temporary file
    (out / "shard-00001.bin").write_bytes(b"half a shard")
    (out / "shard-00002.bin.tmp").write_bytes(b"junk")
    kept = (out / "shard-00000.bin").stat().st_mtime_ns
    resumed = write_packed(src, out, image_size=SIZE, shard_size=3, progress=False)
    assert (out / "shard-00000.bin").stat().st_mtime_ns == kept  # finished shards are not redone
    assert len(calls) == 5 + 9  # and only the 9 images of shards 1..3 were encoded again
    assert {k: v for k, v in resumed.items() if k != "source"} == {k: v for k, v in ref.items() if k != "source"}
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")  # byte-identical, manifest included
    assert write_packed(src, out, image_size=SIZE, shard_size=3, progress=False) == resumed  # complete: no-op


def test_corrupt_sources_are_skipped_and_counted(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (src / "eel" / "0.jpg").read_bytes()
    (src / "eel" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert prepare_cli.CODECS == packed.CODECS
    args = parser.parse_args(["prepare-data", str(src), str(tmp_path / "out"), "--image-size", str(SIZE),
                              "--workers", "0", "--no-progress"])
    assert args.func(args) == 0
    report = capsys.readouterr().out
    assert "12 images" in report and "skipped 2 unreadable" in report and "dog/broken.png" in report
    m = read_manifest(tmp_path / "out")
    assert m["num_images"] == 12 and m["num_skipped"] == 2 and m["num_source_files"] == 14
    assert sorted(s["path"] for r in m["shards"] for s in r["skipped"]) == ["dog/broken.png", "eel/truncated.jpg"]
    assert m["class_counts"] == [4, 4, 4]
    assert all(PackedDataset(tmp_path / "out")[i][2] == () for i in range(12))


def test_a_folder_with_nothing_readable_is_refused_not_packed(tmp_path):
    # was: exit 0 and a complete store of 0 images, which training then refused as empty
    src = make_folder(tmp_path / "src", per_class=2)
    for path in src.rglob("*.*"):
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(PackedDataError, match="none of the 6 source images is readable"):
        write_packed(src, tmp_path / "out", image_size=SIZE, progress=False)
    assert not read_manifest(tmp_path / "out", require_complete=False)["complete"]


def test_a_class_whose_images_are_all_unreadable_counts_as_empty(tmp_path):
    src = make_folder(tmp_path / "src", per_class=2)
    for path in (src / "dog").iterdir():
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(PackedDataError, match="1 class\\(es\\) have images but none readable: dog"):
        write_packed(src, tmp_path / "out", image_size=SIZE, progress=False)
    m = write_packed(src, tmp_path / "out", image_size=SIZE, progress=False, allow_empty_classes=True)  # resumes
    assert m["complete"] and m["class_counts"] == [2, 0, 2] and m["num_skipped"] == 2


@pytest.mark.parametrize("hflip", [False, True])
def test_batches_equal_image_folder_batches(tmp_path, hflip):
    src = make_folder(tmp_path / "src")
    write_packed(src, tmp_path / "out", image_size=SIZE, shard_size=5, codec="png", progress=False)
    a = DatasetBatches(ImageFolder(src, image_size=SIZE, hflip=hflip, seed=7), seed=7)
    b = DatasetBatches(PackedDataset(tmp_path / "out", hflip=hflip, seed=7), seed=7)
    for _ in range(5):  # crosses epochs (12 images, batches of 5)
        (x1, y1), (x2, y2) = a.next(5), b.next(5)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.state_dict() == b.state_dict()
    plain, maybe = PackedDataset(tmp_path / "out"), PackedDataset(tmp_path / "out", hflip=hflip, seed=7)
    flips = [not torch.equal(plain[i][0], maybe[i][0]) for i in range(12)]
    assert all(torch.equal(maybe[i][0], plain[i][0].flip(-1)) for i in range(12) if flips[i])
    assert (0 < sum(flips) < 12) if hflip else not any(flips)


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_batches_resume_exactly(tmp_path, workers):
    write_packed(make_folder(tmp_path / "src"), tmp_path / "out", image_size=SIZE, shard_size=5, progress=False)
    ds = PackedDataset(tmp_path / "out", hflip=True, seed=3)
    ds.max_open_files = 2  # 3 shards: handles get closed and reopened
    [ds[i] for i in (0, 6, 11, 0)]  # opens handles in this process: the dataset must still pickle / fork cleanly
    assert torch.equal(pickle.loads(pickle.dumps(ds))[1][0], ds[1][0])
    a = DatasetBatches(ds, seed=3, num_workers=workers)
    for _ in range(3):
        a.next(4)
    state = a.state_dict()
    expected = [a.next(4) for _ in range(3)]
    b = DatasetBatches(PackedDataset(tmp_path / "out", hflip=True, seed=3), seed=3, num_workers=workers)
    b.load_state_dict(json.loads(json.dumps(state)))
    for (x1, y1), (x2, y2) in zip(expected, [b.next(4) for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    a._it = b._it = None  # stop the workers now, not whenever the garbage collector gets to them


def test_clear_errors_for_damaged_or_foreign_stores(tmp_path):
    with pytest.raises(PackedDataError, match="no manifest.json"):
        PackedDataset(tmp_path)
    src = make_folder(tmp_path / "src")
    out = tmp_path / "out"
    write_packed(src, out, image_size=SIZE, shard_size=5, progress=False)
    data = (out / "shard-00001.bin").read_bytes()
    (out / "shard-00001.bin").write_bytes(data[:-10])
    with pytest.raises(PackedDataError, match=r"shard-00001.bin has \d+ bytes, the manifest says \d+"):
        PackedDataset(out)
    (out / "shard-00001.bin").unlink()
    with pytest.raises(PackedDataError, match="shard-00001.bin is missing"):
        PackedDataset(out)
    write_packed(src, out, image_size=SIZE, shard_size=5, progress=False)  # re-running repairs it
    assert len(PackedDataset(out)) == 12 and verify_packed(out, progress=False) == []
    data = bytearray((out / "shard-00002.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum notices
    (out / "shard-00002.bin").write_bytes(bytes(data))
    assert verify_packed(out, progress=False) == ["shard-00002.bin"]
    with pytest.raises(PackedDataError, match="other settings.*codec"):
        write_packed(src, out, image_size=SIZE, shard_size=5, codec="jpeg", progress=False)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(PackedDataError, match="manifest.json is not valid JSON"):
        PackedDataset(out)
    with pytest.raises(ValueError, match="unknown codec"):
        write_packed(src, tmp_path / "x", codec="gif")


def test_training_reads_a_packed_store(tmp_path):
    """data.source=packed trains on the store (vanilla SiT on a frozen random VAE, 2 steps) and the
    first batch equals the image folder's first batch for the same seed."""
    from repae.config import ConfigError, load_config
    from repae.data.sources import training_batches as _data_source
    from repae.train.loop import train

    src = make_folder(tmp_path / "src")
    write_packed(src, tmp_path / "packed", image_size=32, codec="png", num_workers=0)
    base = ["data.image_size=32", "data.num_workers=0", "model.arch=SiT-T/2", "model.depth=2", "model.hidden_size=48",
            "model.num_heads=2", "model.encoder_depth=1", "vae.from_scratch=true",
            "train.tune_vae=false", "latent_norm.mode=fixed", "loss.proj_coeff=0", "model.num_classes=3",
            "train.global_batch_size=4", "train.max_steps=2", "train.sample_every=100", "sample.num_samples=3",
            "sample.batch_size=3", "sample.num_steps=2", "eval.num_samples=3", f"output_dir={tmp_path / 'runs'}"]
    packed_cfg = load_config("toy", overrides=base + ["data.source=packed", f"data.path={tmp_path / 'packed'}"])
    folder_cfg = load_config("toy", overrides=base + ["data.source=folder", f"data.path={src}"])
    a, b = _data_source(packed_cfg, None).next(4), _data_source(folder_cfg, None).next(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert train(packed_cfg, progress=False)["steps"] == 2
    with pytest.raises(ConfigError, match="holds 32px crops, not 64px"):
        _data_source(load_config("toy", overrides=base + ["data.source=packed", f"data.path={tmp_path / 'packed'}",
                                                          "data.image_size=64", "model.arch=SiT-T/4"]), None)
