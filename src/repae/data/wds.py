"""WebDataset tar shards (data.source=wds): samples of `KEY.jpg` + `KEY.cls` (or png/webp/..., label/class).

data.path is a brace pattern (`/data/imagenet-train-{000000..001281}.tar`, as webdataset writes it), a glob,
a directory (its *.tar files, sorted) or one .tar. A sample is the set of members sharing a key, the
WebDataset rule: the member path up to the first '.' of its file name (`n01440764/x_1.jpg` -> key
`n01440764/x_1`, extension `jpg`). Samples are numbered in shard order, then member order.

Read with the standard `tarfile` module, not the `webdataset` package: webdataset is a streaming reader
(shards in sequence, shuffle buffers) with no access by index, so it cannot give the one global order every
repae source shares (ResumableOrder over all samples, each rank its slice, exact resume). A plain tar
can be indexed instead: at open each shard's headers are read once (tarfile seeks over the data) and the
labels (a few bytes each); an image is then one `pread` at its recorded offset, in any worker process.
Compressed tars (.tar.gz ...) have no offsets to seek to and are refused with the remedy (gunzip them).

A sample without an image member, or whose image does not decode, is a bad record: skipped and counted
(repae.data.records). A sample without a label, or a label that is not an integer in [0, MAX_CLASSES) (the
config's cap on model.num_classes), is an error at open.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from repae.data.images import DEFAULT_MAX_PIXELS, UnreadableImage, decode_image
from repae.data.records import ImageRecords, PerProcess
from repae.data.sources import MAX_CLASSES

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
LABEL_EXTENSIONS = ("cls", "label", "class", "cls.txt", "label.txt")
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


class TarDataError(ValueError):
    """A data.path that does not hold usable WebDataset tar shards."""


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> List[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero-padded to the first number's width);
    `{a,b}` -> a, b; several braces expand left to right, the leftmost varying slowest (as braceexpand does)."""
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    m = min(found, key=lambda m: m.start())
    if m.re is _RANGE:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        step = 1 if hi >= lo else -1
        parts = [str(k).zfill(width) for k in range(lo, hi + step, step)]
    else:
        parts = m.group(1).split(",")
    return [x for part in parts for x in expand_braces(pattern[:m.start()] + part + pattern[m.end():])]



def list_tar_shards(path: str | Path) -> List[Path]:
    """The tar shards `path` names, in order. TarDataError (one line) when there are none or one is missing."""
    text = str(path)
    if "{" in text:
        shards = [Path(p) for p in expand_braces(text)]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise TarDataError(f"{len(missing)} of the {len(shards)} shards of {text} do not exist, e.g. {missing[0]}")
    elif any(c in text for c in "*?["):
        shards = [Path(p) for p in sorted(glob.glob(text))]
    elif Path(text).is_dir():
        shards = sorted(p for p in Path(text).iterdir() if p.suffix == ".tar" and p.is_file())
        if not shards and any(p.name.endswith(COMPRESSED) for p in Path(text).iterdir()):
            raise TarDataError(f"{text} holds only compressed tars: decompress them (e.g. gunzip), since a "
                               f"compressed tar cannot be read by index")
    elif Path(text).is_file():
        shards = [Path(text)]
    else:
        raise TarDataError(f"{text} does not exist")
    if not shards:
        raise TarDataError(f"no .tar files in {text}")
    for p in shards:
        if p.name.endswith(COMPRESSED):
            raise TarDataError(f"{p} is compressed: decompress it (e.g. gunzip), since a compressed tar cannot "
                               f"be read by index")
    return shards


def _split_key(name: str) -> Tuple[str, str]:
    """WebDataset's key rule: the path up to the first '.' of the file name, and the rest (lower case)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


class _ReadsWithinFile(io.FileIO):
    """A file whose read(n) asks for no more than the file still holds: tarfile reads a GNU long name or a
    pax header with one read of the size the header claims, so a forged size would ask for terabytes."""

    def read(self, size: int = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, os.fstat(self.fileno()).st_size - self.tell()))
        return super().read(size)


def index_tar(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(int64 [n,2] image (offset, size) per sample, -1 where it has none; int64 [n] labels) of one shard."""
    samples: Dict[str, Dict[str, tarfile.TarInfo]] = {}
    try:
        with _ReadsWithinFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = _split_key(member.name)
                    samples.setdefault(key, {})[ext] = member
            found = sorted({ext for members in samples.values() for ext in members})
            if not any(ext in IMAGE_EXTENSIONS for ext in found):
                raise TarDataError(f"{path} has no image members (looked for .{', .'.join(IMAGE_EXTENSIONS)}; "
                                   f"found {', '.join('.' + e for e in found) or 'no files'})")
            rows, labels = [], []
            for key, members in samples.items():
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                label = next((members[e] for e in LABEL_EXTENSIONS if e in members), None)
                if label is None:
                    if image is None:  # no image, no label: not a sample (a README or metadata member)
                        continue
                    raise TarDataError(f"{path}: sample {key} has no label member (.{', .'.join(LABEL_EXTENSIONS)}; "
                                       f"it has .{', .'.join(members)})")
                labels.append(_read_label(tar, label, path))
                rows.append((image.offset_data, image.size) if image is not None else (-1, 0))
    except TarDataError:
        raise
    except (tarfile.TarError, ValueError, OverflowError, EOFError) as err:  # pax fields that do not parse, too
        raise TarDataError(f"{path} is not a readable tar file ({type(err).__name__}: {str(err)[:160]})") from None
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2), np.asarray(labels, dtype=np.int64)


MAX_LABEL_BYTES = 64  # a class id and whitespace: a longer member is not a label (nor read whole)
LABEL_TEXT = re.compile(rb"\s*([+-]?[0-9]+)\s*")  # ASCII digits only: int() also takes "1_0", "٣" and "５"


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    raw = tar.extractfile(member).read(MAX_LABEL_BYTES + 1)
    if len(raw) > MAX_LABEL_BYTES:
        raise TarDataError(f"{path}: {member.name} holds {member.size} bytes, not a class id")
    match = LABEL_TEXT.fullmatch(raw)
    if match is None:
        text = raw.decode("utf-8", "replace").strip()
        raise TarDataError(f"{path}: {member.name} holds {text!r}, not an integer class id")
    value = int(match.group(1))
    if value < 0:
        raise TarDataError(f"{path}: {member.name} holds the negative label {value}")
    if value >= MAX_CLASSES:  # checked here, before the labels become int64 and the class names a list
        raise TarDataError(f"{path}: {member.name} holds the label {value}, over the largest class id any model "
                           f"can have ({MAX_CLASSES - 1}; model.num_classes <= {MAX_CLASSES})")
    return value


class TarImages(ImageRecords):
    """Item i -> (uint8 [3,S,S], label, skipped) of the samples of tar `shards`, in shard then member order,
    by the rule of repae.data.records. Shards are opened lazily in the process that reads them."""

    max_open_files = 64  # per process; the least recently used shard is closed first

    def __init__(self, shards: List[Path], image_size: int = 256, hflip: bool = False, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.shards = [str(p) for p in shards]
        indexes = [index_tar(Path(p)) for p in self.shards]
        self._shard = np.concatenate([np.full(len(labels), k, np.int32) for k, (_, labels) in enumerate(indexes)])
        self._where = np.concatenate([rows for rows, _ in indexes])  # [N,2]: offset, size (-1: no image)
        self.labels = np.concatenate([labels for _, labels in indexes])  # [N]
        if len(self.labels) == 0:
            raise TarDataError(f"{shards[0]}{' ...' if len(shards) > 1 else ''}: no labelled samples")
        self.classes = [str(c) for c in range(int(self.labels.max()) + 1)]
        self.image_size, self.hflip, self.seed, self.max_pixels = image_size, hflip, seed, max_pixels
        self._fds = PerProcess(close=os.close)  # shard file descriptors, opened on first use

    def __len__(self) -> int:
        return len(self.labels)

    def _fd(self, shard: int) -> int:
        return self._fds.get(shard, lambda k: os.open(self.shards[k], os.O_RDONLY), self.max_open_files)

    def _load(self, j: int) -> np.ndarray:
        offset, size = int(self._where[j, 0]), int(self._where[j, 1])
        if offset < 0:
            raise UnreadableImage(f"{self._describe(j)} has no image member")
        data = os.pread(self._fd(int(self._shard[j])), size, offset)
        if len(data) != size:
            raise TarDataError(f"{self.shards[int(self._shard[j])]} was truncated after it was indexed")
        return decode_image(data, self.max_pixels, self.image_size)

    def _label(self, j: int) -> int:
        return int(self.labels[j])

    def _describe(self, j: int) -> str:
        return f"sample {j} ({self.shards[int(self._shard[j])]})"
