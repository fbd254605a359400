"""Packed, sharded image store: an image folder ADM-centre-cropped once and encoded into a few large files.

Layout of `out_dir`:

    manifest.json            settings, class names, counts, skipped sources, one record per finished shard
    shard-00000.bin          the encoded images of source files [0, shard_size), concatenated
    shard-00000.idx.npy      int64 [n, 3]: byte offset, byte length, label of each image in the .bin
    ...

Shard k always holds source files [k*shard_size, (k+1)*shard_size) of the sorted listing (minus
unreadable ones), so a resumed run writes exactly what an uninterrupted one would. A shard is written
to `*.tmp` files, fsynced, renamed, and only then recorded in the manifest (itself replaced atomically):
a shard that is not in the manifest does not exist as far as any reader is concerned.

Codecs (measured in benchmarks/bench_packed.py on synthetic and photo 256px crops): `webp` (lossless,
the default: pixels identical to the crop, 5-27% smaller than PNG, ~1.4x faster to decode, 2x faster to
encode), `png` (lossless, the universal one), `jpeg` (lossy, 4:4:4 chroma, `quality` 95 by default:
~2.2x smaller than WebP-lossless at 38-43 dB PSNR, ~2x faster to decode). The reference implementation
stores uncompressed PNG: 192 KiB per 256px image, ~252 GB for ImageNet-1k train.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from repae.data.folder import list_image_folder
from repae.data.images import DEFAULT_MAX_PIXELS, UnreadableImage
from repae.data.images import decode_image as _decode
from repae.data.records import ImageRecords, PerProcess, bad_run
from repae.fileio import (JsonFileError, paths_overlap, read_json_object, read_npy, refuse_unrelated, safe_name,
                          sha256_file, write_atomic, write_json_atomic)

FORMAT, VERSION, MANIFEST = "repae-packed", 1, "manifest.json"
CODECS = ("webp", "png", "jpeg")
# what the manifest promises about how the pixels were stored; part of the resume check
_ENCODER = {
    "webp": {"format": "WEBP", "lossless": True, "method": 1, "quality": 0},  # quality = effort when lossless
    "png": {"format": "PNG", "compress_level": 6},
    "jpeg": {"format": "JPEG", "subsampling": 0},  # 4:4:4: 4:2:0 costs 2-3 dB on photos, far more on sharp colour
}


class PackedDataError(ValueError):
    """A packed directory that cannot be used as it is (missing, unfinished, truncated or foreign)."""


def encoder_settings(codec: str, quality: Optional[int] = 95) -> dict:
    """The exact Pillow save() settings for `codec`; `quality` (1-100) applies to jpeg only."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    settings = dict(_ENCODER[codec])
    if codec == "jpeg":
        if quality is None or not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg quality must be in 1..100, got {quality}")
        settings["quality"] = int(quality)
    return settings


def encode_image(arr: np.ndarray, settings: dict) -> bytes:
    """uint8 [H,W,3] -> encoded bytes with the Pillow `settings` of encoder_settings()."""
    out = io.BytesIO()
    Image.fromarray(arr).save(out, **settings)
    return out.getvalue()


def decode_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 [S,S,3]; UnreadableImage (a ValueError) if undecodable, over `max_pixels`
    (checked from the header, before decoding) or not an S x S image."""
    arr = _decode(data, max_pixels)
    if arr.shape != (image_size, image_size, 3):
        raise UnreadableImage(f"decoded image has shape {arr.shape}, expected {(image_size, image_size, 3)}")
    return arr


def _prepare_one(task: Tuple[str, int, dict, int]) -> Tuple[Optional[bytes], Optional[str]]:
    """(path, size, encoder settings, max pixels) -> (encoded crop, None), or (None, reason) if the source is
    unreadable or too large. Runs in a worker process; an encoder failure is not the source's fault and propagates."""
    path, size, settings, max_pixels = task
    try:
        arr = _decode(path, max_pixels, size)
    except UnreadableImage as err:
        return None, str(err)
    return encode_image(arr, settings), None


def _close(f) -> None:
    f.close()


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    write_json_atomic(out_dir / MANIFEST, manifest)


class _ShardWriter:
    """Accumulates one shard in `*.tmp` files; finish() makes it durable, renames it and returns its record."""

    def __init__(self, out_dir: Path, index: int):
        self.index, self.out_dir = index, out_dir
        self.bin_name, self.idx_name = f"shard-{index:05d}.bin", f"shard-{index:05d}.idx.npy"
        self._tmp = out_dir / (self.bin_name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._rows: List[Tuple[int, int, int]] = []  # offset, length, label
        self._offset, self._hash = 0, hashlib.sha256()
        self.skipped: List[dict] = []

    def add(self, data: bytes, label: int) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._rows.append((self._offset, len(data), label))
        self._offset += len(data)

    def finish(self) -> dict:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        buf = io.BytesIO()
        np.save(buf, np.asarray(self._rows, dtype=np.int64).reshape(-1, 3))
        write_atomic(self.out_dir / self.idx_name, buf.getvalue())
        os.replace(self._tmp, self.out_dir / self.bin_name)
        return {"index": self.index, "bin": self.bin_name, "idx": self.idx_name, "count": len(self._rows),
                "bin_bytes": self._offset, "bin_sha256": self._hash.hexdigest(),
                "idx_bytes": buf.getbuffer().nbytes, "idx_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                "skipped": self.skipped}

    def abandon(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _shard_on_disk(out_dir: Path, rec: dict) -> bool:
    """Both files of a recorded shard are present with the recorded sizes."""
    paths_sizes = ((out_dir / rec["bin"], rec["bin_bytes"]), (out_dir / rec["idx"], rec["idx_bytes"]))
    return all(p.is_file() and p.stat().st_size == n for p, n in paths_sizes)


def _listing_digest(root: Path, files: List[Path], labels: List[int], classes: List[str]) -> str:
    # file names as the bytes the file system holds (os.fsencode): a non-UTF-8 name hashes like any other,
    # and UTF-8 names give the same digest as before
    h = hashlib.sha256(json.dumps(classes).encode())
    for f, y in zip(files, labels):
        h.update(os.fsencode(f.relative_to(root).as_posix()) + f"\t{y}\n".encode())
    return h.hexdigest()


def _skip_record(rel: str, error: str) -> dict:
    record = {"path": safe_name(rel), "error": safe_name(error)}  # Pillow's messages quote the path
    if record["path"] != rel:  # not UTF-8: keep the exact bytes too
        record["path_bytes_hex"] = os.fsencode(rel).hex()
    return record


def empty_classes(labels: List[int], classes: List[str]) -> List[str]:
    """The class folders that hold no image file."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return [name for name, n in zip(classes, counts) if n == 0]


_OWN = re.compile(r"(manifest\.json|shard-\d{5,}\.(bin|idx\.npy))(\.tmp)?")


def _own_name(name: str) -> bool:
    """A file write_packed makes (an unfinished run before its first shard has no manifest yet)."""
    return _OWN.fullmatch(name) is not None


def _start_manifest(out_dir: Path, fresh: dict) -> dict:
    """The manifest to continue from: a previous run's (same settings, same sources) with the shards still
    intact on disk, or `fresh`. A previous run with other settings is an error, never silently overwritten."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return fresh
    old = read_manifest(out_dir, require_complete=False)
    keys = ("image_size", "codec", "quality", "encoder", "shard_size", "source_digest", "num_source_files",
            "max_image_pixels")
    diff = [f"{k}: {old.get(k)!r} there, {fresh[k]!r} now" for k in keys if old.get(k) != fresh[k]]
    if diff:
        raise PackedDataError(f"{out_dir} holds a packing made with other settings or source files "
                              f"({'; '.join(diff)}); use a new output directory or delete it")
    kept = [rec for rec in old["shards"] if _shard_on_disk(out_dir, rec)]
    return {**fresh, "shards": kept}


def _tasks(n: int, todo: List[int], shard_size: int) -> Iterator[Tuple[int, int]]:
    """(shard index, source index) in writing order, for the shards still to do."""
    for k in todo:
        for i in range(k * shard_size, min((k + 1) * shard_size, n)):
            yield k, i


def _finalise(manifest: dict) -> dict:
    shards = sorted(manifest["shards"], key=lambda r: r["index"])
    skipped = [s for rec in shards for s in rec["skipped"]]
    return {**manifest, "shards": shards, "num_images": sum(r["count"] for r in shards),
            "num_skipped": len(skipped), "total_bytes": sum(r["bin_bytes"] + r["idx_bytes"] for r in shards)}


def write_packed(src_root: str | Path, out_dir: str | Path, image_size: int = 256, shard_size: int = 5000,
                 codec: str = "webp", quality: int = 95, num_workers: int = 0, progress: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, allow_empty_classes: bool = False) -> dict:
    """Pack the image folder `src_root` (class per sub-folder) into `out_dir`; returns the manifest.

    Every image is ADM-centre-cropped to `image_size` (the crop ImageFolder applies at training time)
    and encoded with `codec`. Re-running the same command resumes: finished shards are kept, the rest
    are (re)written. Unreadable source images, and those over `max_pixels` (refused from their header,
    never decoded), are skipped and listed in the manifest. `num_workers`
    processes decode/crop/encode (0: in this process). A class folder without images is an error (it is
    usually an incomplete copy or extraction, and would leave a class the model is told about but never
    sees) unless `allow_empty_classes`; the manifest lists such classes under "empty_classes"."""
    if image_size <= 0 or shard_size <= 0 or num_workers < 0 or max_pixels <= 0:
        raise ValueError(f"need image_size > 0, shard_size > 0, num_workers >= 0, max_pixels > 0; got {image_size}, "
                         f"{shard_size}, {num_workers}, {max_pixels}")
    settings = encoder_settings(codec, quality)
    src_root, out_dir = Path(src_root), Path(out_dir)
    if paths_overlap(src_root, out_dir):  # the shards would land among the images (a class folder of shards)
        raise PackedDataError(f"the output {out_dir} and the image folder {src_root} are the same directory or "
                              f"one lies inside the other; give an output directory outside the image folder")
    if not (out_dir / MANIFEST).is_file():  # with one, _start_manifest decides whether it is ours to resume
        refuse_unrelated(out_dir, _own_name, "prepare-data", PackedDataError)
    files, labels, classes = list_image_folder(src_root)
    empty = [safe_name(c) for c in empty_classes(labels, classes)]
    if empty and not allow_empty_classes:
        raise ValueError(f"{len(empty)} class folder(s) of {src_root} hold no images: {', '.join(empty[:10])}"
                         f"{' ...' if len(empty) > 10 else ''} (an incomplete copy?); fill or remove them, or pass "
                         f"--allow-empty-classes to keep them as classes with no images")
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh = {"format": FORMAT, "version": VERSION, "complete": False, "image_size": image_size, "codec": codec,
             "quality": settings["quality"] if codec == "jpeg" else None, "encoder": settings,
             "pillow": PIL.__version__, "crop": "adm_center_crop", "shard_size": shard_size,
             "max_image_pixels": max_pixels,
             "source": safe_name(str(src_root.resolve())),
             "classes": [safe_name(c) for c in classes], "empty_classes": empty, "num_source_files": len(files),
             "source_digest": _listing_digest(src_root, files, labels, classes), "shards": []}
    manifest = _start_manifest(out_dir, fresh)  # a foreign or other-settings manifest is refused here
    for stale in out_dir.glob("*.tmp"):  # debris of an interrupted run of ours; never part of the data
        if _own_name(stale.name):
            stale.unlink()
    done = {rec["index"] for rec in manifest["shards"]}
    todo = [k for k in range(-(-len(files) // shard_size)) if k not in done]
    manifest = _write_shards(out_dir, manifest, src_root, files, labels, todo, settings, num_workers, progress)
    counts = np.zeros(len(classes), dtype=np.int64)
    for rec in manifest["shards"]:
        np.add.at(counts, read_npy(out_dir / rec["idx"])[:, 2], 1)
    _check_readable(manifest, counts, empty, allow_empty_classes)  # else a complete store of nothing
    manifest = _finalise({**manifest, "complete": True})
    manifest["class_counts"] = counts.tolist()
    _write_manifest(out_dir, manifest)
    return manifest


def _check_readable(manifest: dict, counts: np.ndarray, empty: List[str], allow_empty_classes: bool) -> None:
    """PackedDataError, leaving the store unfinished, when no source image was readable, or when a class has
    images but none readable (the empty-class rule applies to it as to an empty folder)."""
    skipped = [s["path"] for rec in manifest["shards"] for s in rec["skipped"]]
    if counts.sum() == 0:
        raise PackedDataError(f"none of the {manifest['num_source_files']} source images is readable (e.g. "
                              f"{', '.join(skipped[:3])}): nothing to pack")
    unreadable = [c for c, n in zip(manifest["classes"], counts) if n == 0 and c not in empty]
    if unreadable and not allow_empty_classes:
        raise PackedDataError(f"{len(unreadable)} class(es) have images but none readable: "
                              f"{', '.join(unreadable[:10])}{' ...' if len(unreadable) > 10 else ''}; replace "
                              f"them, or pass --allow-empty-classes to keep them as classes with no images")


def _pool(num_workers: int):
    """Worker processes for decode/crop/encode. Fork where there is one: instant start, and no need for the
    calling script to guard `if __name__ == "__main__"` (spawn re-runs an unguarded script in every worker
    and never gets going). The workers use only PIL and numpy, never torch's thread pools."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(num_workers)


def _write_shards(out_dir: Path, manifest: dict, root: Path, files: List[Path], labels: List[int],
                  todo: List[int], settings: dict, num_workers: int, progress: bool) -> dict:
    """Encode and write the shards `todo`, recording each in the manifest as soon as it is on disk."""
    shard_size, size = manifest["shard_size"], manifest["image_size"]
    order = list(_tasks(len(files), todo, shard_size))
    jobs = ((files[i], size, settings, manifest["max_image_pixels"]) for _, i in order)
    pool = _pool(num_workers) if num_workers > 0 else None
    results = pool.imap(_prepare_one, jobs, chunksize=8) if pool else map(_prepare_one, jobs)
    bar = tqdm(total=len(files), initial=len(files) - len(order), unit="img", desc="prepare-data",
               disable=not progress, dynamic_ncols=True)
    skipped = _finalise(manifest)["num_skipped"]
    writer: Optional[_ShardWriter] = None
    try:
        for (k, i), (data, error) in zip(order, results):
            if writer is None:
                writer = _ShardWriter(out_dir, k)
            if data is None:
                writer.skipped.append(_skip_record(files[i].relative_to(root).as_posix(), error))
                skipped += 1
                bar.set_postfix(skipped=skipped, refresh=False)
            else:
                writer.add(data, labels[i])
            if i == min((k + 1) * shard_size, len(files)) - 1:  # the last source file of shard k
                manifest = _finalise({**manifest, "shards": manifest["shards"] + [writer.finish()]})
                _write_manifest(out_dir, manifest)
                writer = None
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:  # an interrupted shard leaves nothing behind
            writer.abandon()
        if pool is not None:  # every result has been consumed, or we are failing anyway
            pool.terminate()
    return manifest


def read_manifest(out_dir: str | Path, require_complete: bool = True) -> dict:
    """The manifest of a packed directory, checked for format; PackedDataError with the remedy if unusable."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        hint = " (prepare-data did not finish its first shard; re-run it)" if Path(out_dir).is_dir() else ""
        raise PackedDataError(f"no {MANIFEST} in {out_dir}: not a packed dataset{hint}; "
                              f"make one with `repae prepare-data SRC {out_dir}`")
    try:
        manifest = read_json_object(path)
    except JsonFileError as err:
        raise PackedDataError(f"{err}; delete it and re-run `repae prepare-data`") from None
    if manifest.get("format") != FORMAT:
        raise PackedDataError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise PackedDataError(f"{path} has format version {manifest.get('version')}; this repae reads {VERSION}")
    if require_complete and not manifest.get("complete"):
        done = len(manifest.get("shards", []))
        raise PackedDataError(f"{out_dir} is unfinished ({done} shards written): re-run `repae prepare-data` "
                              f"with the same arguments to complete it")
    return manifest


def _load_index(out_dir: Path, rec: dict, num_classes: int) -> np.ndarray:
    """A shard's index int64 [n,3] (offset, length, label), checked against the manifest and the .bin size:
    every image inside the .bin, every label one of the manifest's `num_classes` classes."""
    bin_path, idx_path = out_dir / rec["bin"], out_dir / rec["idx"]
    for p, n in ((bin_path, rec["bin_bytes"]), (idx_path, rec["idx_bytes"])):
        size = p.stat().st_size if p.is_file() else None
        if size != n:
            what = "is missing" if size is None else f"has {size} bytes, the manifest says {n}"
            raise PackedDataError(f"shard file {p} {what}: the copy is incomplete or damaged; re-run "
                                  f"`repae prepare-data` on the source (it rewrites only damaged shards)")
    try:
        index = read_npy(idx_path)  # bounded: a forged header cannot allocate more than the file holds
    except (OSError, ValueError) as err:
        raise PackedDataError(f"shard index {idx_path} is unreadable: {err}") from None
    if index.shape != (rec["count"], 3) or index.dtype.kind not in "iu":
        raise PackedDataError(f"shard index {idx_path} does not match its manifest record / .bin file")
    offsets, lengths, labels = index[:, 0], index[:, 1], index[:, 2]
    # each bounded before they are added, so the sum cannot wrap round int64; a negative offset or length would
    # fail later as a raw OSError / ValueError from the read
    bin_bytes = rec["bin_bytes"]  # the .bin's size on disk (checked above)
    if len(index) and (min(offsets.min(), lengths.min()) < 0 or max(offsets.max(), lengths.max()) > bin_bytes
                       or (offsets + lengths).max() > bin_bytes):
        raise PackedDataError(f"shard index {idx_path} does not match its manifest record / .bin file (an image "
                              f"at a negative offset or length, or past the {bin_bytes} bytes of {rec['bin']})")
    if len(index) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = (labels < 0) | (labels >= num_classes)
        raise PackedDataError(f"shard index {idx_path}: {int(bad.sum())} labels are outside the {num_classes} classes "
                              f"of its manifest, e.g. {int(labels[bad][0])}: damaged or hand-edited")
    return index.astype(np.int64, copy=False)


class PackedDataset(ImageRecords):
    """Item i -> (uint8 [3,S,S], label, skipped) by the rule of repae.data.records, like ImageFolder.
    Shard files are opened lazily in the process that reads them (never pickled open)."""

    max_open_files = 64  # per process; shards are opened on first use and the least recently used closed

    def __init__(self, root: str | Path, hflip: bool = False, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.manifest = manifest = read_manifest(self.root)
        self.hflip, self.seed, self.max_pixels = hflip, seed, max_pixels
        try:
            self.image_size, self.codec = manifest["image_size"], manifest["codec"]
            self.classes: List[str] = manifest["classes"]
            shards = manifest["shards"]
            if not isinstance(self.classes, list):
                raise PackedDataError(f"{self.root / MANIFEST}: 'classes' is not a list: damaged or hand-edited")
            indexes = [_load_index(self.root, rec, len(self.classes)) for rec in shards]
            self._bins = [str(self.root / rec["bin"]) for rec in shards]
        except (KeyError, TypeError) as err:
            raise PackedDataError(f"{self.root / MANIFEST} lacks field {err}: damaged or hand-edited") from None
        if sum(len(ix) for ix in indexes) == 0:
            raise PackedDataError(f"{self.root} holds no images")
        self._shard = np.concatenate([np.full(len(ix), k, np.int32) for k, ix in enumerate(indexes)])  # [N]
        self._index = np.concatenate(indexes)  # [N,3] int64: byte offset, byte length, label
        self.labels = self._index[:, 2]  # [N] int64 (a view: no per-item Python objects to copy into workers)
        self._handles = PerProcess(close=_close)  # shard files, opened on first use

    def __len__(self) -> int:
        return len(self._index)

    def _file(self, shard: int):
        return self._handles.get(shard, lambda k: open(self._bins[k], "rb", buffering=0), self.max_open_files)

    def _read(self, i: int) -> bytes:
        shard = int(self._shard[i])
        offset, length = int(self._index[i, 0]), int(self._index[i, 1])
        f = self._file(shard)
        if hasattr(os, "pread"):
            data = os.pread(f.fileno(), length, offset)
        else:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise PackedDataError(f"{self._bins[shard]} was truncated after it was opened")
        return data

    def _load(self, j: int) -> np.ndarray:
        # a short read is damage to the store, not to one image: PackedDataError, not skipped
        return decode_image(self._read(j), self.image_size, self.max_pixels)

    def _label(self, j: int) -> int:
        return int(self._index[j, 2])

    def _too_many_bad(self, i: int, tried: int) -> Exception:
        return PackedDataError(f"{bad_run(tried, len(self), 'undecodable')} from index {i} in {self.root}: the "
                               f"shards are damaged; check them with repae.data.packed.verify_packed")


def verify_packed(out_dir: str | Path, progress: bool = True) -> List[str]:
    """Re-hash every shard file; returns the names whose sha256 differs from the manifest (empty: all good)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir, require_complete=False)
    bad = []
    for rec in tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress):
        for name, digest in ((rec["bin"], rec["bin_sha256"]), (rec["idx"], rec["idx_sha256"])):
            if not (out_dir / name).is_file() or sha256_file(out_dir / name) != digest:
                bad.append(name)
    return bad
