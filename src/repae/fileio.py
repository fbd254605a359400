"""Small file helpers: atomic writes and hashes for everything that writes results, bounded readers for
JSON records (`read_json_object`) and for .npy/.npz arrays read back from files (`read_npy`).

A crash never leaves a half-written file under the final name: data goes to `name.tmp`,
is flushed to disk, then renamed over the target (rename is atomic on POSIX). An array file's
header is never trusted: its claimed size is checked against the bytes really there before
anything is allocated."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

if TYPE_CHECKING:
    import numpy as np

PathLike = Union[str, os.PathLike]


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: PathLike, data: bytes) -> Path:
    """Write bytes to `path` via a flushed temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: PathLike, obj, indent: int = 1) -> Path:
    return write_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode())


# ----------------------------------------------------------------------------- JSON records read back

# the largest JSON record repae reads back: a manifest listing tens of thousands of shards is a few MiB
MAX_JSON_BYTES = 64 << 20


class JsonFileError(ValueError):
    """A JSON file that is not one readable object: the message names the file and what is wrong (missing,
    unreadable, too large, not UTF-8 JSON, too deeply nested, or a JSON list / number instead of an object).
    Callers add their remedy, or treat it as "no record" where the file is only a cache of their own."""


def is_number(value, kind: type | Tuple[type, ...] = (int, float)) -> bool:
    """Whether a value read from a file (JSON, YAML, a checkpoint's plain data) is a number of `kind` (int and
    float by default): true and false load as Python bools, which are ints, and must not pass for one."""
    return isinstance(value, kind) and not isinstance(value, bool)


# what a path that is_special_file "is": reading a FIFO blocks until something writes to it, /dev/zero never ends
SPECIAL_FILE = "not a regular file (a pipe, socket or device)"


def is_special_file(path: PathLike) -> bool:
    """Whether `path` exists (links followed) as neither a regular file nor a directory: a FIFO, socket or
    device, which a reader must refuse before opening it."""
    p = Path(path)
    return p.exists() and not p.is_file() and not p.is_dir()


def read_json_object(path: PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object stored in `path`, read with its size bounded before it is parsed; JsonFileError
    otherwise. The file is data: nothing in it is interpreted beyond JSON."""
    p = Path(path)
    if is_special_file(p):
        raise JsonFileError(f"{p} is {SPECIAL_FILE}")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise JsonFileError(f"cannot read {p}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise JsonFileError(f"{p} is larger than {max_bytes} bytes, more than any record of this kind")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(err, RecursionError) else " ".join(str(err).split())[:120]
        raise JsonFileError(f"{p} is not valid JSON ({why})") from None
    if not isinstance(obj, dict):
        raise JsonFileError(f"{p} holds a JSON {type(obj).__name__}, not an object")
    return obj


# ----------------------------------------------------------------------------- bounded .npy / .npz reading


class ArrayFileError(ValueError):
    """An .npy file or .npz member that cannot be read safely: the message names the file (and member) and
    what is wrong. A ValueError, so callers that already turn ValueError into their own error class keep
    doing so; most catch it and re-raise their module's error with the remedy."""


# .npy header versions numpy's public API parses (3.0 only adds UTF-8 field names, which nothing here writes)
_NPY_HEADER_READERS = {(1, 0): "read_array_header_1_0", (2, 0): "read_array_header_2_0"}
_READ_BLOCK = 1 << 24  # 16 MiB: a compressed member grows its buffer only with data that actually arrives


def _npy_header(f, where: str) -> Tuple[Tuple[int, ...], bool, "np.dtype"]:
    """(shape, fortran_order, dtype) from the header at f's position, refusing object dtypes and bad shapes."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(f)
        reader = _NPY_HEADER_READERS.get(version)
        if reader is None:
            raise ArrayFileError(f"{where}: unsupported .npy format version {version}")
        shape, fortran, dtype = getattr(np.lib.format, reader)(f)  # header <= 10000 chars, literal_eval'd
    except ArrayFileError:
        raise
    except (ValueError, SyntaxError, RecursionError, MemoryError, EOFError) as err:
        raise ArrayFileError(f"{where}: not a readable .npy array ({' '.join(str(err).split())[:200]})") from None
    if dtype.hasobject:  # object arrays are pickles: code, not data
        raise ArrayFileError(f"{where}: holds Python objects (dtype {dtype}); only plain numeric arrays are read")
    if dtype.itemsize == 0:
        raise ArrayFileError(f"{where}: dtype {dtype} has no size")
    if any(n < 0 for n in shape):
        raise ArrayFileError(f"{where}: negative dimension in shape {shape}")
    return tuple(int(n) for n in shape), bool(fortran), dtype


def read_npy(path: PathLike, key: Optional[str] = None, *, max_bytes: Optional[int] = None) -> "np.ndarray":
    """One array from an .npy file (`key` None) or from member `key` of an .npz archive, read without
    trusting its header: nothing is allocated for a size the file cannot back.

    The header is parsed with numpy.lib.format (read_magic + read_array_header_1_0/2_0: a bounded
    literal, never a pickle). Object dtypes are refused (`allow_pickle=False` semantics), and the
    claimed size prod(shape) * itemsize is checked before any allocation against the bytes that are
    really there: the .npy file's size, or an uncompressed (stored) .npz member's size, itself checked
    against the archive's size. A compressed member's size is only a claim of its zip header, so its
    data is read in blocks and the buffer grows only with bytes that actually decompress (a forged
    header fails at the first short read). `max_bytes`, when given, caps the array's size on top.

    Returns a writable array of the stored dtype and shape (Fortran order honoured). Raises
    ArrayFileError (a ValueError) naming the file, and the member, for anything wrong: missing member,
    not a zip / .npy, unsupported version, object dtype, a size over the file's or over `max_bytes`,
    truncated or corrupt data; FileNotFoundError when `path` does not exist. Callers re-raise it as
    their module's error class with the remedy (delete the cache, re-run the command, ...)."""
    import zipfile
    import zlib

    path = Path(path)
    where = str(path) if key is None else f"{path} (array '{key}')"
    if is_special_file(path):
        raise ArrayFileError(f"{path} is {SPECIAL_FILE}")
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    try:
        if key is None:
            with open(path, "rb") as f:
                shape, fortran, dtype = _npy_header(f, where)
                available: Optional[int] = os.fstat(f.fileno()).st_size - f.tell()
                return _read_data(f, shape, fortran, dtype, available, max_bytes, where)
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(f"{key}.npy")
            except KeyError:
                found = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
                raise ArrayFileError(f"{path} has no array '{key}' (found {found[:20]})") from None
            available = None
            if info.compress_type == zipfile.ZIP_STORED:
                # stored bytes lie inside the archive: their extent is real, unlike a compressed member's size
                if info.header_offset + info.compress_size > path.stat().st_size or info.file_size != info.compress_size:
                    raise ArrayFileError(f"{where}: its zip entry claims more bytes than the archive holds "
                                         "(truncated or damaged)")
                available = info.file_size
            with zf.open(info) as f:
                shape, fortran, dtype = _npy_header(f, where)
                if available is not None:
                    available -= f.tell()
                return _read_data(f, shape, fortran, dtype, available, max_bytes, where)
    except ArrayFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:  # NotImplementedError: codec
        raise ArrayFileError(f"{where}: not a readable .npz archive ({' '.join(str(err).split())[:200]})") from None
    except OSError as err:
        raise ArrayFileError(f"{where}: cannot be read ({err.strerror or err})") from None


def _read_data(f, shape: Tuple[int, ...], fortran: bool, dtype, available: Optional[int],
               max_bytes: Optional[int], where: str):
    import numpy as np

    count = 1
    for n in shape:  # Python ints: no overflow, however large the claim
        count *= n
    nbytes = count * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise ArrayFileError(f"{where}: shape {shape} of {dtype} is {nbytes} bytes, over the {max_bytes} allowed")
    if available is not None and nbytes > available:
        raise ArrayFileError(f"{where}: its header claims shape {shape} of {dtype} ({nbytes} bytes), but only "
                             f"{available} bytes follow it (truncated, or a forged header)")
    if available is not None:  # the size is backed by the file: one allocation, filled in place
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:
            n = f.readinto(view[got:got + _READ_BLOCK])
            if not n:
                break
            got += n
    else:  # a compressed member: grow with the data that arrives, never with the claim
        buf = bytearray()
        while len(buf) < nbytes:
            block = f.read(min(_READ_BLOCK, nbytes - len(buf)))
            if not block:
                break
            buf += block
        got = len(buf)
    if got < nbytes:
        raise ArrayFileError(f"{where}: truncated: {got} of the {nbytes} data bytes of shape {shape} are there")
    try:
        arr = np.frombuffer(buf, dtype=dtype, count=count)
        return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    except ValueError as err:  # e.g. more dimensions than numpy allows
        raise ArrayFileError(f"{where}: shape {shape} cannot be built ({err})") from None


def safe_name(name: str) -> str:
    """A file or class name as valid Unicode for the manifest and messages: a name that is not UTF-8 on disk
    (Python holds its stray bytes as lone surrogates, which strict JSON readers and terminals reject) gets
    each such byte written as a \\xNN escape."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# ------------------------------------------------- output directories (every command that writes one)

# what an operating system or file system puts into a directory by itself (a fresh volume's root, a folder a
# file browser has shown): not a sign that the directory holds something else
_SYSTEM_NAMES = frozenset({"lost+found", ".DS_Store"})


def unrelated_entries(directory: Path, is_own: Callable[[str], bool], limit: int = 3) -> List[str]:
    """Up to `limit` names in `directory` (not recursive) that `is_own` does not claim as a file the writing
    command makes; [] for an empty or missing directory. Stops early: an image folder of a million files is
    not listed in full."""
    found: List[str] = []
    try:
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return found
    with entries:
        for entry in entries:
            if entry.name not in _SYSTEM_NAMES and not is_own(entry.name):
                found.append(safe_name(entry.name))
                if len(found) >= limit:
                    break
    return sorted(found)


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two directories are the same or one lies inside the other (after resolving symlinks and
    `..`; either may not exist yet)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)


def refuse_unrelated(directory: Path, is_own: Callable[[str], bool], command: str, error: type) -> None:
    """`error` when `directory` holds files that an earlier (possibly partial) run of `command` did not write:
    its output goes beside them, and its clean-up (stale temporary files) would touch them."""
    other = unrelated_entries(directory, is_own, limit=4)
    if other:
        raise error(f"{directory} is not empty and is not an earlier `repae {command}` output: it holds "
                    f"{', '.join(other[:3])}{', ...' if len(other) > 3 else ''}; give a new or empty directory "
                    f"(an earlier output of the same command is resumed or rewritten)")
