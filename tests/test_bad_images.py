"""Bad image files in every reader: decompression bombs and over-limit images refused from the header,
every Pillow mode mapped to RGB with known answers, skip counts of distinct files, awkward file names
and empty class folders in `repae prepare-data`."""

import argparse
import io
import json
import os
import struct
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from repae.data.folder import DatasetBatches, ImageFolder
from repae.data.images import ImageTooLarge, UnreadableImage, decode_image, to_rgb
from repae.data.packed import PackedDataset, read_manifest, write_packed
from repae.data.prepare_cli import add_parser
from repae.evaluate.sources import open_folder


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose IHDR claims width x height RGB pixels, followed by a few zero rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


BOMB = png_claiming(30000, 30000)  # 900 MP: what killed folder training on main (Pillow's own bomb error)
BIG = png_claiming(9000, 9000)  # 81 MP: under Pillow's limits, over ours (64 MP); a decode would take 243 MB


@pytest.fixture
def no_big_decodes(monkeypatch):
    """Any attempt to decode an image of more than 10 MP fails the test (Pillow decodes in ImageFile.load)."""
    original = ImageFile.ImageFile.load

    def guarded(self):
        assert self.size[0] * self.size[1] <= 10_000_000, f"decoded a {self.size} image"
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def save_rgb(path, value, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- the pixel limit


def test_bombs_are_refused_from_the_header(no_big_decodes):
    for data in (BOMB, BIG):
        start = time.perf_counter()
        with pytest.raises(ImageTooLarge):
            decode_image(data)
        with pytest.raises(ImageTooLarge):
            decode_image(data, size=16)
        assert time.perf_counter() - start < 1.0


def test_pillow_bomb_warning_as_error_is_a_skip(no_big_decodes):
    """Under `-W error` Pillow raises DecompressionBombWarning (not an OSError) at open, above ~89 MP."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLarge):
            decode_image(png_claiming(10000, 10000), max_pixels=150_000_000)


def test_over_limit_valid_image_is_refused_and_at_limit_is_read():
    data = png_bytes(Image.new("RGB", (20, 20), (10, 20, 30)))
    with pytest.raises(ImageTooLarge, match="20x20"):
        decode_image(data, max_pixels=399)
    assert decode_image(data, max_pixels=400).shape == (20, 20, 3)
    assert issubclass(ImageTooLarge, UnreadableImage) and issubclass(UnreadableImage, ValueError)


def test_config_has_the_limit_with_a_range():
    from repae.config import ConfigError, load_config, validate

    assert load_config("toy").data.max_image_pixels == 64_000_000
    with pytest.raises(ConfigError, match="data.max_image_pixels"):
        validate(load_config("toy", overrides=["data.max_image_pixels=0"]))


# ----------------------------------------------------------------------------- modes -> RGB


def grey(values) -> np.ndarray:
    return np.asarray(values, dtype=np.uint8)


def decoded_grey(img: Image.Image, fmt: str = "PNG") -> np.ndarray:
    arr = decode_image(png_bytes(img, fmt))
    assert arr.dtype == np.uint8 and arr.shape[2] == 3
    assert (arr == arr[:, :, :1]).all(), "a grey image must stay grey"
    return arr[0, :, 0]


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    expected = grey([0, 1, 128, 255])
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    assert np.array_equal(decoded_grey(img), expected)  # a 16-bit PNG read back from bytes
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big_endian))[0, :, 0], expected)
    as_int = Image.fromarray(values.astype(np.int32), "I")  # how Pillow has opened 16-bit greyscale files
    assert np.array_equal(np.asarray(to_rgb(as_int))[0, :, 0], expected)
    assert np.array_equal(decoded_grey(as_int, "TIFF"), expected)


def test_float_images_are_unit_intensities():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], np.float32), "F")
    assert np.array_equal(decoded_grey(img, "TIFF"), grey([0, 128, 255, 255, 0, 0]))


def test_bilevel_and_grey():
    assert np.array_equal(decoded_grey(Image.fromarray(np.array([[False, True]]))), grey([0, 255]))
    assert np.array_equal(decoded_grey(Image.fromarray(grey([[0, 7, 255]]))), grey([0, 7, 255]))


def test_transparency_is_composited_on_white():
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [100, 128]]], np.uint8), "LA")
    assert np.array_equal(decoded_grey(la), grey([255, 0, 177]))  # 100*128/255 + 255*127/255 = 177.2
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 51]]], np.uint8), "RGBA")
    assert decode_image(png_bytes(rgba))[0].tolist() == [[255, 255, 255], [255, 0, 0], [204, 204, 255]]
    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    pal.info["transparency"] = 0  # palette entry 0 (red) is transparent
    assert decode_image(png_bytes(pal))[0].tolist() == [[255, 255, 255], [0, 0, 255], [0, 255, 0]]


def test_cmyk():
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK")
    assert decode_image(png_bytes(cmyk, "TIFF"))[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


# ----------------------------------------------------------------------------- readers


def bad_folder(root, good=3):
    """root/cat: `good` readable images, a 30000x30000 bomb and a corrupt file."""
    for i in range(good):
        save_rgb(root / "cat" / f"{i}.png", 50 * i)
    (root / "cat" / "bomb.png").write_bytes(BOMB)
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return root


def test_folder_counts_distinct_files_over_epochs(tmp_path, no_big_decodes):
    ds = ImageFolder(bad_folder(tmp_path / "data"), image_size=16)
    bomb = [i for i, f in enumerate(ds.files) if f.name == "bomb.png"][0]
    image, _, skipped = ds[bomb]
    assert image.shape == (3, 16, 16) and bomb in skipped
    batches = DatasetBatches(ds, seed=0)
    for _ in range(3):  # three epochs of the 5 files: each bad file met three times
        batches.next(5)
    assert batches.bad_images == 2
    again = DatasetBatches(ds, seed=0)
    again.load_state_dict(batches.state_dict())
    assert again.bad_images == 2
    again.next(5)
    assert again.bad_images == 2


def test_many_bad_in_a_row_is_still_an_error(tmp_path, no_big_decodes):
    for i in range(3):
        (tmp_path / "d" / "cat").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "cat" / f"{i}.png").write_bytes(BIG)
    with pytest.raises(RuntimeError, match="all 3 images are unreadable"):  # 3 tried, not the limit of 100
        ImageFolder(tmp_path / "d", image_size=16)[0]


def test_distinct_count_over_ranks():
    from repae.train.loop import distinct_skipped

    class Data:
        dataset, skipped = range(10), {3, 7}

    assert distinct_skipped(Data()) == 2 and distinct_skipped(object()) == 0


def test_folder_training_skips_the_bomb(tmp_path):
    """data.source=folder trains through a 30000x30000 bomb (main died of it) and counts it once, though
    2 steps of batch 4 over 4 files meet it twice."""
    from repae.config import load_config
    from repae.train.loop import train

    root = tmp_path / "data"
    for i in range(3):
        save_rgb(root / "cat" / f"{i}.png", 60 * i, size=(40, 36))
    (root / "cat" / "bomb.png").write_bytes(BOMB)
    cfg = load_config("toy", overrides=[
        "data.source=folder", f"data.path={root}", "data.image_size=32", "data.num_workers=0",
        "model.arch=SiT-T/2", "model.depth=2", "model.hidden_size=48", "model.num_heads=2", "model.encoder_depth=1",
        "vae.from_scratch=true", "train.tune_vae=false", "latent_norm.mode=fixed",
        "loss.proj_coeff=0", "model.num_classes=1", "train.global_batch_size=4", "train.max_steps=2",
        "train.sample_every=100", "sample.num_samples=1", "sample.batch_size=1", "sample.num_steps=2",
        "eval.num_samples=1", f"output_dir={tmp_path / 'runs'}"])
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and summary["unreadable_images_skipped"] == 1


def test_packed_path_skips_the_bomb(tmp_path, monkeypatch, no_big_decodes):
    src = bad_folder(tmp_path / "src")
    (src / "cat" / "big.png").write_bytes(BIG)
    m = write_packed(src, tmp_path / "out", image_size=16, codec="png", progress=False)
    skipped = {s["path"]: s["error"] for rec in m["shards"] for s in rec["skipped"]}
    assert m["num_images"] == 3 and set(skipped) == {"cat/bomb.png", "cat/big.png", "cat/corrupt.png"}
    assert "over the limit" in skipped["cat/big.png"] and m["max_image_pixels"] == 64_000_000
    ds = PackedDataset(tmp_path / "out")
    read = ds._read
    monkeypatch.setattr(ds, "_read", lambda i: BIG if i == 1 else read(i))  # a bomb inside a shard
    image, _, bad = ds[1]
    assert bad == (1,) and image.shape == (3, 16, 16)


def test_evaluate_folder_source_skips_the_bomb(tmp_path, no_big_decodes):
    source = open_folder(bad_folder(tmp_path / "imgs"), batch_size=8, workers=1)
    images = torch.cat([b[0] for b in source])
    assert images.shape == (3, 3, 20, 24)
    assert sorted(os.path.basename(p) for p in source.skipped) == ["bomb.png", "corrupt.png"]
    list(source)  # a second pass lists them again, not twice
    assert len(source.skipped) == 2


# ----------------------------------------------------------------------------- prepare-data


def prepare(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["prepare-data", *map(str, argv), "--image-size", "16", "--workers", "0",
                              "--no-progress"])
    return args.func(args)


def test_prepare_data_takes_non_utf8_names(tmp_path, capfd):
    src = tmp_path / "src"
    save_rgb(src / "cat" / "a.png", 10)
    try:
        save_rgb(src / "dog" / os.fsdecode(b"caf\xe9.png"), 20)
        (src / "dog" / os.fsdecode(b"bad\xff.png")).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 file names")
    if sys.getfilesystemencoding().lower() != "utf-8":
        pytest.skip("file names are not decoded as UTF-8 here")
    assert prepare([src, tmp_path / "out"]) == 0
    out = capfd.readouterr().out
    assert "2 images" in out and "dog/bad\\xff.png" in out
    m = read_manifest(tmp_path / "out")
    (rec,) = [s for r in m["shards"] for s in r["skipped"]]
    assert rec["path"] == "dog/bad\\xff.png" and bytes.fromhex(rec["path_bytes_hex"]) == b"dog/bad\xff.png"
    parsed = json.loads((tmp_path / "out" / "manifest.json").read_bytes().decode("utf-8"))
    json.dumps(parsed, ensure_ascii=False).encode("utf-8")  # strict: fails on any lone surrogate in a string
    assert prepare([src, tmp_path / "out"]) == 0  # and it resumes (same listing digest)


def test_prepare_data_empty_class_folder(tmp_path, capfd):
    src = tmp_path / "src"
    save_rgb(src / "cat" / "a.png", 10)
    save_rgb(src / "eel" / "b.png", 20)
    (src / "dog").mkdir()
    (src / "dog" / "readme.txt").write_text("no images here")
    assert prepare([src, tmp_path / "out"]) == 2
    err = capfd.readouterr().err
    assert "1 class folder(s)" in err and "dog" in err and "--allow-empty-classes" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert prepare([src, tmp_path / "out", "--allow-empty-classes"]) == 0
    assert "classes have no images: dog" in capfd.readouterr().err
    m = read_manifest(tmp_path / "out")
    assert m["empty_classes"] == ["dog"] and m["class_counts"] == [1, 0, 1]
