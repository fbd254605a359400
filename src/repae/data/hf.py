"""Hugging Face `datasets` tables (data.source=hf): parquet or arrow files with an image column and a label column.

This is how the hub holds ImageNet (`ILSVRC/imagenet-1k`: data/train-00000-of-00294.parquet ..., columns
`image` = struct {bytes, path} and `label` = int64) and how `datasets` caches and saves it (`*.arrow`, Arrow
IPC streams). data.path is one such file, a directory searched recursively (a copy of a dataset repo, a
`save_to_disk` output, or a snapshot directory of the huggingface_hub cache), or a hub id
`hf:owner/name[@revision][/sub/dir]` of a dataset repo in that cache (repae.hub.dataset_dir). When the files
are named by split (train-*.parquet, train/..., validation-*...), only those of data.split are read.

Read with pyarrow, the library `datasets` itself stores these files with (no `datasets` needed). Records are
read by index, so the training order is the global ResumableOrder every source shares:
- arrow files are memory-mapped: reading record i touches only its bytes;
- parquet files are read a row group at a time (the unit parquet compresses and stores), and each process
  keeps the last few row groups it read. In a random order nearly every image costs its row group's read
  and decompression: `datasets` writes image parquet with 100-row groups, so ~100x the image bytes are read.
  Fine for small sets and fast disks; for ImageNet-scale training prefer arrow files (`datasets`'
  `save_to_disk`, or its download cache) or convert once (README: "Train on your ImageNet copy").

Labels are read once, at open (only the label column). Class names come from the `datasets` ClassLabel
metadata when the files carry it (every label must then be below their number), else "0".."max label"; a
label over the config's cap on model.num_classes (MAX_CLASSES) is an error at open. An image cell may hold
encoded bytes (binary), or a struct with `bytes` (and `path`); a null cell, null bytes or bytes that do not
decode are bad records, skipped and counted (repae.data.records).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from repae.data.images import DEFAULT_MAX_PIXELS, UnreadableImage, decode_image
from repae.data.records import ImageRecords, PerProcess
from repae.data.sources import MAX_CLASSES

TABLE_SUFFIXES = (".parquet", ".arrow")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")  # the first one present is the image column
LABEL_COLUMNS = ("label", "labels", "cls", "class")
SPLITS = ("train", "validation", "valid", "val", "test")


class TableDataError(ValueError):
    """A data.path that does not hold a usable image table."""


def _pyarrow():
    try:
        import pyarrow  # noqa: F401  (imported for its submodules)
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise TableDataError("data.source=hf reads parquet/arrow files with pyarrow: pip install 'repae[data]' "
                             "(or pip install pyarrow)") from None
    return pyarrow


def _split_of(rel: Path) -> Optional[str]:
    """The split a file's relative path names (a directory or the file name's first word), if any."""
    for part in rel.parts:
        word = part.split("-")[0].split(".")[0].split("_")[0].lower()
        if word in SPLITS:
            return word
    return None


def list_table_files(path: str | Path, split: str = "train") -> List[Path]:
    """The parquet/arrow files of `path` (a file or a directory, searched recursively), sorted, restricted
    to `split` when the files are named by split. TableDataError (one line) if there are none."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise TableDataError(f"{path} is not a .parquet or .arrow file")
        return [path]
    if not path.is_dir():
        raise TableDataError(f"{path} does not exist")
    found = sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise TableDataError(f"no .parquet or .arrow files under {path}")
    splits = {p: _split_of(p.relative_to(path)) for p in found}
    if any(splits.values()):
        chosen = [p for p in found if splits[p] == split.lower()]
        if not chosen:
            named = sorted({s for s in splits.values() if s})
            raise TableDataError(f"no {split!r} files under {path} (its files are named by split: "
                                 f"{', '.join(named)}); set data.split")
        found = chosen
    return found


def _pick(columns: Sequence[str], wanted: Sequence[str], what: str, where: Path) -> str:
    for name in wanted:
        if name in columns:
            return name
    raise TableDataError(f"{where} has no {what} column (looked for {', '.join(wanted)}; "
                         f"found {', '.join(columns) or 'none'})")


def _class_names(schema, label_column: str) -> Optional[List[str]]:
    """ClassLabel names from the `datasets` metadata in the schema, if present."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(raw)["info"]["features"][label_column]
        names = feature.get("names")
        return [str(n) for n in names] if names else None
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError):  # deep nesting: RecursionError
        return None


def _is_image_type(pa, t) -> bool:
    def binary(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    # or the `datasets` Image struct, whose `bytes` must be binary too (a string there would be taken for a path)
    return binary(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and binary(t.field("bytes").type))


class _TableFile:
    """One parquet or arrow file: its schema and row chunks (parquet row groups, arrow record batches).
    Data is read lazily in the process that reads it; arrow files are memory-mapped once per process."""

    def __init__(self, path: Path):
        pa = _pyarrow()
        self.path, self.parquet = path, path.suffix == ".parquet"
        self._mapped = PerProcess()
        try:
            if self.parquet:
                parquet = pa.parquet.ParquetFile(path)
                self.schema = parquet.schema_arrow  # with the `datasets` metadata
                meta = parquet.metadata
                self.chunk_rows = [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]
            else:
                self.schema = _arrow_reader(pa, path).schema
                batches = self.batches()
                for b in batches:  # offsets pointing outside the memory map would crash the process (SIGBUS)
                    b.validate(full=True)
                self.chunk_rows = [b.num_rows for b in batches]
        except (OSError, pa.ArrowException) as err:
            raise TableDataError(f"{path} is not a readable {path.suffix[1:]} file ({err})") from None

    def batches(self) -> list:
        """The arrow file's record batches (zero-copy views of its memory map, mapped once per process)."""
        def read(_):
            reader = _arrow_reader(_pyarrow(), self.path)
            if hasattr(reader, "num_record_batches"):  # the IPC file format: batches by index
                return [reader.get_batch(k) for k in range(reader.num_record_batches)]
            return list(reader)  # a stream

        return self._mapped.get(0, read, 1)

    def read_column(self, name: str):
        """A whole column (only that column is read), as one array."""
        pa = _pyarrow()
        if self.parquet:
            return pa.parquet.read_table(self.path, columns=[name], use_threads=False).column(name).combine_chunks()
        return pa.chunked_array([b.column(name) for b in self.batches()],
                                type=self.schema.field(name).type).combine_chunks()

    def read_chunk(self, k: int, name: str):
        """Column `name` of row group / record batch k, as one array."""
        if self.parquet:
            table = _pyarrow().parquet.ParquetFile(self.path).read_row_group(k, columns=[name], use_threads=False)
            return table.column(name).combine_chunks()
        return self.batches()[k].column(name)


def _arrow_reader(pa, path: Path):
    """An arrow file's reader over a memory map: the IPC file format, else the IPC stream `datasets` writes."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r"))



class TableImages(ImageRecords):
    """Item i -> (uint8 [3,S,S], label, skipped) of the rows of parquet/arrow `files`, in file then row order,
    by the rule of repae.data.records. Nothing read is kept open across a pickle (DataLoader workers)."""

    chunks_kept = 4  # per process: the last row groups / record batches read

    def __init__(self, files: Sequence[Path], image_size: int = 256, hflip: bool = False, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, root: Optional[Path] = None):
        pa = _pyarrow()
        self.root = Path(root) if root else Path(files[0]).parent
        self.tables = [_TableFile(Path(f)) for f in files]
        first = self.tables[0]
        columns = first.schema.names
        self.image_column = _pick(columns, IMAGE_COLUMNS, "image", first.path)
        self.label_column = _pick(columns, LABEL_COLUMNS, "label", first.path)
        for t in self.tables:
            missing = [c for c in (self.image_column, self.label_column) if c not in t.schema.names]
            if missing:
                raise TableDataError(f"{t.path} has no {missing[0]} column (found {', '.join(t.schema.names)})")
            if not _is_image_type(pa, t.schema.field(self.image_column).type):
                raise TableDataError(f"{t.path}: column {self.image_column!r} is "
                                     f"{t.schema.field(self.image_column).type}, not image bytes")
        self.image_size, self.hflip, self.seed, self.max_pixels = image_size, hflip, seed, max_pixels
        self.labels = self._read_labels()  # int64 [N]
        rows = [(f, k, n) for f, t in enumerate(self.tables) for k, n in enumerate(t.chunk_rows)]
        self._chunk_file = np.asarray([f for f, _, _ in rows], dtype=np.int64)
        self._chunk_index = np.asarray([k for _, k, _ in rows], dtype=np.int64)
        self._chunk_start = np.cumsum([0] + [n for _, _, n in rows])  # [chunks+1]
        if len(self.labels) == 0:
            raise TableDataError(f"{self.root}: the tables hold no rows")
        names = _class_names(first.schema, self.label_column)
        if names and int(self.labels.max()) >= len(names):  # the label would name no class, or the CFG null one
            raise TableDataError(f"{self.root}: {int((self.labels >= len(names)).sum())} rows have a label of "
                                 f"{len(names)} or more (e.g. {int(self.labels.max())}), but the ClassLabel metadata "
                                 f"of {first.path} names {len(names)} classes")
        self.classes = names or [str(c) for c in range(int(self.labels.max()) + 1)]
        self._cache = PerProcess()  # image columns of the chunks read last, in the process that read them

    def _read_labels(self) -> np.ndarray:
        pa, parts = _pyarrow(), []
        for t in self.tables:
            column = t.read_column(self.label_column)
            if column.null_count:
                raise TableDataError(f"{t.path}: {column.null_count} rows have no {self.label_column!r}")
            if not pa.types.is_integer(column.type):
                raise TableDataError(f"{t.path}: column {self.label_column!r} is {column.type}, not integer class ids")
            values = column.to_numpy(zero_copy_only=False)  # its own integer type: a uint64 must not wrap
            # bounded before anything is sized by it (the class names "0".."max") or it becomes int64
            if len(values) and values.max() >= MAX_CLASSES:
                raise TableDataError(f"{t.path}: {int((values >= MAX_CLASSES).sum())} rows have a label over the "
                                     f"largest class id any model can have, e.g. {int(values.max())} "
                                     f"({MAX_CLASSES - 1}; model.num_classes <= {MAX_CLASSES})")
            parts.append(np.asarray(values, dtype=np.int64))
        labels = np.concatenate(parts)
        if len(labels) and labels.min() < 0:
            raise TableDataError(f"{self.root}: {int((labels < 0).sum())} rows have a negative label (an unlabelled "
                                 f"split such as ImageNet's test?); train on a labelled split")
        return labels

    def __len__(self) -> int:
        return len(self.labels)

    def _chunk(self, c: int):
        """The image column of chunk c (a row group or record batch), kept among the last few read."""
        def read(c: int):
            return self.tables[int(self._chunk_file[c])].read_chunk(int(self._chunk_index[c]), self.image_column)

        return self._cache.get(c, read, self.chunks_kept)

    def _encoded(self, j: int) -> bytes:
        c = int(np.searchsorted(self._chunk_start, j, side="right")) - 1
        cell = self._chunk(c)[j - int(self._chunk_start[c])].as_py()
        if isinstance(cell, dict):  # the `datasets` Image struct {bytes, path}
            cell = cell.get("bytes")
        if not cell:
            raise UnreadableImage(f"{self._describe(j)} has no image bytes")
        return cell

    def _load(self, j: int) -> np.ndarray:
        return decode_image(self._encoded(j), self.max_pixels, self.image_size)

    def _label(self, j: int) -> int:
        return int(self.labels[j])

    def _describe(self, j: int) -> str:
        c = int(np.searchsorted(self._chunk_start, j, side="right")) - 1
        return f"row {j - int(self._chunk_start[c])} of chunk {int(self._chunk_index[c])} of " \
               f"{self.tables[int(self._chunk_file[c])].path}"


def open_table_images(path: str | Path, split: str = "train", **kw) -> TableImages:
    """TableImages over the files `list_table_files(path, split)` finds."""
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    return TableImages(list_table_files(path, split), root=root, **kw)
