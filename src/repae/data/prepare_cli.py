"""`repae prepare-data SRC OUT`: pack an ImageNet-style folder into ADM-cropped, encoded shards.

Registered by `repae.cli` through `add_parser(subparsers)`; the work is `repae.data.packed.write_packed`.
"""

from __future__ import annotations

import argparse
import os
import sys

from repae.cli import IMAGE_SIZE, NON_NEGATIVE, POSITIVE, bounded, out_dir

CODECS = ("webp", "png", "jpeg")  # = repae.data.packed.CODECS, not imported: building the parser stays torch-free


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `prepare-data` on an argparse sub-parsers object; returns the new parser."""
    p = subparsers.add_parser(
        "prepare-data", help="pack an image folder (class per sub-folder) into ADM-cropped encoded shards",
        description="ADM-centre-crop every image of SRC (one sub-folder per class), encode it and pack it into "
                    "large shard files in OUT with a manifest.json. Re-run the same command to resume.")
    p.add_argument("src", metavar="SRC", help="image folder: SRC/<class>/<image> (e.g. ILSVRC2012 train)")
    p.add_argument("out", metavar="OUT", type=out_dir,
                   help="output directory outside SRC: new or empty (created), or a partial run of the same "
                        "command, which is resumed")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=256, help="crop size in pixels (default: 256)")
    p.add_argument("--codec", choices=CODECS, default="webp",
                   help="webp: lossless (default); png: lossless, larger, slower; jpeg: lossy (4:4:4), ~2.2x "
                        "smaller than webp, ~40 dB PSNR at quality 95")
    p.add_argument("--quality", type=bounded(1, 100), default=95, help="jpeg quality 1-100 (default: 95; ignored if lossless)")
    p.add_argument("--shard-size", type=POSITIVE, default=5000, help="source images per shard (default: 5000)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=os.cpu_count() or 1,
                   help="encoding processes (default: all CPU cores; 0 = in this process)")
    p.add_argument("--max-image-pixels", type=POSITIVE, default=64_000_000, metavar="N",
                   help="skip (and list) source images whose header claims more than N pixels, without decoding "
                        "them (default 64000000, as data.max_image_pixels)")
    p.add_argument("--allow-empty-classes", action="store_true",
                   help="keep class folders that hold no images (default: an error, as they are usually an "
                        "incomplete copy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare_data)
    return p


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from repae.data.packed import PackedDataError, write_packed

    try:
        m = write_packed(args.src, args.out, image_size=args.image_size, shard_size=args.shard_size,
                         codec=args.codec, quality=args.quality, num_workers=args.workers,
                         progress=not args.no_progress, max_pixels=args.max_image_pixels,
                         allow_empty_classes=args.allow_empty_classes)
    except (PackedDataError, FileNotFoundError, ValueError) as err:
        print(f"repae prepare-data: error: {err}", file=sys.stderr)
        return 2
    n, raw = m["num_images"], m["num_images"] * 3 * m["image_size"] ** 2
    quality = f" q{m['quality']}" if m["quality"] is not None else " (lossless)"
    print(f"{args.out}: {n} images of {m['image_size']}px in {len(m['shards'])} shards, {m['codec']}{quality}, "
          f"{_human(m['total_bytes'])} ({m['total_bytes'] / max(n, 1) / 1024:.1f} KiB/image, "
          f"{raw / max(m['total_bytes'], 1):.1f}x smaller than raw pixels), {len(m['classes'])} classes")
    if m.get("empty_classes"):
        print(f"warning: {len(m['empty_classes'])} classes have no images: {', '.join(m['empty_classes'][:10])}",
              file=sys.stderr)
    if m["num_skipped"]:
        first = [s["path"] for rec in m["shards"] for s in rec["skipped"]][:5]
        print(f"skipped {m['num_skipped']} unreadable source images (listed in manifest.json), e.g. "
              f"{', '.join(first)}")
    return 0
