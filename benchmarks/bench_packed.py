"""Size, fidelity and decode speed of the packed-data codecs, and packed DatasetBatches throughput.

    python benchmarks/bench_packed.py [--images 48] [--loader-images 512] [--batch 64] [--size 256] [--out FILE]

Test images (no ImageNet here; real photos differ, so read the numbers as a guide):
  deadleaves  the dead-leaves model of natural images: occluding discs/polygons with power-law sizes,
              optical blur, an illumination gradient and sensor noise. Saturated colours and many
              sharp edges: harder to compress than most photos.
  photo       random crops (256-512 px, downscaled to 256) of the one real photo on this machine,
              matplotlib's sample grace_hopper.jpg (a JPEG portrait: smoother than average ImageNet).
Every codec runs on one core (Pillow encodes/decodes single-threaded); decode and loader rates are the
best of 3 runs, since the cores may be shared. `png0` is what the reference
implementation stores (uncompressed PNG in HDF5); the others are repae.data.packed's codecs.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from repae.data.folder import DatasetBatches, adm_center_crop
from repae.data.packed import PackedDataset, decode_image, encode_image, encoder_settings, write_packed

IMAGENET_TRAIN = 1_281_167


def dead_leaves(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [size,size,3] dead-leaves image, drawn at 2x and box-filtered down (anti-aliased)."""
    n = 2 * size
    img = Image.new("RGB", (n, n), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(600):
        r = float(np.clip((rng.pareto(2.0) + 1) * n * 0.01, 2, n * 0.6))  # power-law radii: scale invariance
        x, y = rng.random(2) * n
        col = rng.integers(0, 256, 3)
        col = tuple(int(c) for c in 0.6 * col + 0.4 * col.mean())
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=col)
        else:
            angles = np.sort(rng.random(3 + int(rng.integers(0, 4)))) * 2 * np.pi
            draw.polygon([(x + r * math.cos(a), y + r * math.sin(a)) for a in angles], fill=col)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)).resize((size, size), Image.BOX), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    shade = 1 + 0.25 * np.sin(2 * np.pi * (xx * rng.random() + yy * rng.random()))
    arr = arr * shade[..., None] + rng.normal(0, 2.0, (size, size, 1)) + rng.normal(0, 1.0, (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def photo_crops(rng: np.random.Generator, count: int, size: int) -> List[np.ndarray]:
    import matplotlib

    path = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as img:
        photo = img.convert("RGB")
    w, h = photo.size
    out = []
    for _ in range(count):
        s = int(rng.integers(min(size, w, h), min(w, h) + 1))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(adm_center_crop(photo.crop((x, y, x + s, y + s)), size))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse else float("inf")


CANDIDATES: Dict[str, dict] = {
    "png0 (reference)": {"format": "PNG", "compress_level": 0},
    "png": encoder_settings("png"),
    "webp (lossless)": encoder_settings("webp"),
    "jpeg q95 4:4:4": encoder_settings("jpeg", 95),
    "jpeg q90 4:4:4": encoder_settings("jpeg", 90),
    "jpeg q95 4:2:0": {**encoder_settings("jpeg", 95), "subsampling": 2},
}


def codec_table(sets: Dict[str, List[np.ndarray]], size: int, repeats: int = 3) -> List[dict]:
    rows = []
    print(f"\n{'set':11s} {'codec':17s} {'KiB/img':>8s} {'ImageNet GB':>11s} {'enc img/s':>9s} "
          f"{'dec img/s/core':>14s} {'PSNR mean/min dB':>16s}")
    for name, images in sets.items():
        for label, settings in CANDIDATES.items():
            t0 = time.perf_counter()
            blobs = [encode_image(a, settings) for a in images]
            enc = len(images) / (time.perf_counter() - t0)
            best = float("inf")
            for _ in range(repeats):  # best of: the cores may be shared with other work
                t0 = time.perf_counter()
                decoded = [decode_image(b, size) for b in blobs]
                best = min(best, time.perf_counter() - t0)
            dec = len(images) / best
            nbytes = float(np.mean([len(b) for b in blobs]))
            ps = [psnr(a, d) for a, d in zip(images, decoded)]
            fid = "lossless" if min(ps) == float("inf") else f"{np.mean(ps):.1f}/{min(ps):.1f}"
            print(f"{name:11s} {label:17s} {nbytes / 1024:8.1f} {nbytes * IMAGENET_TRAIN / 1e9:11.0f} {enc:9.0f} "
                  f"{dec:14.0f} {fid:>16s}")
            rows.append({"set": name, "codec": label, "kib_per_image": nbytes / 1024,
                         "imagenet_gb": nbytes * IMAGENET_TRAIN / 1e9, "encode_images_per_s": enc,
                         "decode_images_per_s_per_core": dec,
                         "psnr_mean_db": None if fid == "lossless" else float(np.mean(ps)),
                         "psnr_min_db": None if fid == "lossless" else min(ps)})
    return rows


def loader_throughput(images: List[np.ndarray], batch: int, tmp: Path, codecs: List[str]) -> List[dict]:
    rows = []
    src = tmp / "src"
    for i, arr in enumerate(images):  # 8 classes of size x size PNGs: the ADM crop is then the identity
        (src / f"c{i % 8}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(src / f"c{i % 8}" / f"{i:05d}.png", compress_level=1)
    print(f"\npacked DatasetBatches throughput ({len(images)} images, batch {batch}, hflip, "
          f"{os.cpu_count()} cores)")
    for codec in codecs:
        out = tmp / codec
        t0 = time.perf_counter()
        write_packed(src, out, image_size=images[0].shape[0], shard_size=256, codec=codec, progress=False)
        pack = len(images) / (time.perf_counter() - t0)
        for workers in (0, 2):
            batches = DatasetBatches(PackedDataset(out, hflip=True), seed=0, num_workers=workers)
            batches.next(batch)  # start-up (worker processes, first files)
            steps, rate = max(1, len(images) // batch), 0.0
            for _ in range(3):  # best of 3 epochs: the cores may be shared with other work
                t0 = time.perf_counter()
                for _ in range(steps):
                    batches.next(batch)
                rate = max(rate, steps * batch / (time.perf_counter() - t0))
            batches._it = None  # shut the workers down now
            print(f"  {codec:5s} workers={workers}: {rate:6.0f} img/s   "
                  f"(prepare-data from PNG sources, 1 process: {pack:.0f} img/s)")
            rows.append({"codec": codec, "workers": workers, "images_per_s": rate, "prepare_images_per_s": pack})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images per test set for the codec table")
    parser.add_argument("--loader-images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--codecs", default="webp,png,jpeg", help="codecs for the loader benchmark")
    parser.add_argument("--out", help="also write the numbers (and the settings) to this JSON file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sets = {"deadleaves": [dead_leaves(rng, args.size) for _ in range(args.images)],
            "photo": photo_crops(rng, args.images, args.size)}
    codecs = codec_table(sets, args.size)
    raw = 3 * args.size**2
    print(f"(raw pixels: {raw / 1024:.0f} KiB/img; ImageNet-1k train = {IMAGENET_TRAIN} images)")
    loader_imgs = [dead_leaves(rng, args.size) if i % 2 else photo_crops(rng, 1, args.size)[0]
                   for i in range(args.loader_images)]
    with tempfile.TemporaryDirectory() as tmp:
        loader = loader_throughput(loader_imgs, args.batch, Path(tmp), args.codecs.split(","))
    if args.out:
        import json
        import platform

        record = {"settings": vars(args), "cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "imagenet_train_images": IMAGENET_TRAIN, "codecs": codecs, "loader": loader}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
