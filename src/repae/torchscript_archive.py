"""TorchScript archives read for their tensors only: nothing in the file ever runs.

A TorchScript archive (`torch.jit.save`; OpenAI's CLIP `ViT-L-14.pt` is one) is a zip holding
`<folder>/data.pkl` (the module tree as a pickle), `<folder>/data/N` (raw storage bytes) and
`<folder>/code/` (TorchScript source). `torch.jit.load` compiles that source and runs it, including
any `__setstate__` the file defines, so loading an archive that way executes the file. Here the
pickle is read by a restricted unpickler instead:

- allowed globals are only those that rebuild tensors and plain containers, each replaced by our
  own implementation: `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
  `collections.OrderedDict` (empty only), the typed storage names (`torch.FloatStorage`, ...)
  and the typed-list markers of `torch.jit._pickle`, which only return the list they are given;
- `__torch__.*` classes (the archive's modules) become inert stand-ins that record their class
  name and pickled state; no method from the archive is ever called;
- storages come from `data/N` entries, never larger than the bytes the entry holds, and every
  tensor view is checked against its storage before it is made;
- `code/` is never read; any other global is refused with a CheckpointError naming it.

The module tree is then flattened to dotted names like `torch.jit.load(f).state_dict()`. One
difference, documented: the pickle does not say which tensor attributes TorchScript registers as
parameters or buffers (only `code/` does), so a *scripted* module's plain tensor attributes also
appear; traced modules (CLIP's files) have none.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

from repae.fileio import is_number
from repae.weights import CheckpointError, StateDict

_STORAGE_DTYPES = {
    f"{name}Storage": dtype for name, dtype in [
        ("Double", torch.float64), ("Float", torch.float32), ("Half", torch.float16),
        ("BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16),
        ("Char", torch.int8), ("Byte", torch.uint8), ("Bool", torch.bool),
        ("ComplexFloat", torch.complex64), ("ComplexDouble", torch.complex128)]
}


def is_torchscript_archive(path: Union[str, os.PathLike]) -> bool:
    """True for a zip written by `torch.jit.save` (it has `code/` or `constants.pkl` under its folder)."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        rests = [name.split("/", 1)[-1] for name in archive.namelist()]
    return any(rest.startswith("code/") or rest == "constants.pkl" for rest in rests)


def read_torchscript_state(path: Union[str, os.PathLike]) -> StateDict:
    """TorchScript archive -> {dotted name: tensor}, as `torch.jit.load(path).state_dict()` names
    them, without running any of the archive's code (see the module docstring)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _folder(archive, path)
            pkl = _read_entry(archive, prefix + "data.pkl", None, path)
            root = _ArchiveUnpickler(archive, prefix, path, pkl).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"cannot read TorchScript archive {path}: {err}") from None
    except Exception as err:  # a malformed pickle raises many types; name the file either way
        raise CheckpointError(f"cannot read TorchScript archive {path}: malformed data.pkl "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(root, _StandIn):
        raise CheckpointError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
    out: StateDict = {}
    try:
        _flatten(root, "", out, set(), path)
    except RecursionError:
        raise CheckpointError(f"{path}: the module tree in data.pkl is nested too deeply") from None
    return out


# ----------------------------------------------------------------------- archive layout


def _folder(archive: zipfile.ZipFile, path: Path) -> str:
    """The archive's single top-level folder ('name/'), checked to be little-endian."""
    found = [n[: -len("data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(found) != 1:
        raise CheckpointError(f"{path}: expected one <folder>/data.pkl in the TorchScript archive, found {len(found)}")
    prefix = found[0]
    if prefix + "byteorder" in archive.namelist():
        order = archive.read(prefix + "byteorder")[:16].strip()
        if order != b"little":
            raise CheckpointError(f"{path}: storages are stored {order!r}-endian; only little-endian is supported")
    return prefix


def _read_entry(archive: zipfile.ZipFile, name: str, nbytes, path: Path) -> bytes:
    """The first `nbytes` (all when None) of an uncompressed entry; torch never compresses entries,
    so the bytes read are bounded by the file's own size."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: the archive has no entry {name!r}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: entry {name!r} is compressed; torch.jit.save writes stored entries only")
    if nbytes is not None and nbytes > info.file_size:
        raise CheckpointError(f"{path}: entry {name!r} holds {info.file_size} bytes but its storage "
                              f"claims {nbytes}")
    with archive.open(info) as handle:
        return handle.read(info.file_size if nbytes is None else nbytes)


# ----------------------------------------------------------------------- inert objects


class _StandIn:
    """An inert record of one `__torch__.*` object: class name and pickled state, nothing else."""

    qualified_name = "__torch__"

    def __new__(cls, *args):
        if args:
            raise pickle.UnpicklingError(f"{cls.qualified_name} built with arguments")
        obj = object.__new__(cls)
        object.__setattr__(obj, "_state", _UNSET)
        return obj


_UNSET = object()


class _StorageType:
    """Marker for a typed storage name (`torch.FloatStorage`): carries its dtype, nothing else."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    __slots__ = ("key", "data")

    def __init__(self, key: str, data: torch.Tensor):
        self.key, self.data = key, data  # data: 1-D tensor of the storage's dtype


# ----------------------------------------------------------------------- the unpickler


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> torch.Tensor:
    """Our `_rebuild_tensor_v2`: a view of a storage read from the archive, bounds checked first."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not an archive storage")
    if not (is_number(storage_offset, int) and storage_offset >= 0 and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(is_number(s, int) and s >= 0 for s in size + stride)):
        raise pickle.UnpicklingError(f"bad tensor geometry offset={storage_offset!r} size={size!r} stride={stride!r}")
    if metadata:
        raise pickle.UnpicklingError("tensor metadata (conjugate/negative bits) is not supported")
    numel = storage.data.numel()
    if 0 not in size:
        last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= numel:
            raise pickle.UnpicklingError(f"tensor of size {list(size)} stride {list(stride)} offset "
                                         f"{storage_offset} reaches element {last} of a storage of {numel}")
    return torch.as_strided(storage.data, size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


def _empty_ordered_dict(*args) -> collections.OrderedDict:
    if args:
        raise pickle.UnpicklingError("OrderedDict built with arguments (only empty hook dicts are expected)")
    return collections.OrderedDict()


def _plain_list(data, *_type_tag) -> list:
    """`torch.jit._pickle.build_*list` / `restore_type_tag`: type markers around plain data."""
    if not isinstance(data, (list, dict)):
        raise pickle.UnpicklingError(f"typed-list marker around a {type(data).__name__}")
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _empty_ordered_dict,
    **{("torch.jit._pickle", name): _plain_list for name in
       ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")},
}


class _Refused(pickle.UnpicklingError):
    pass


class _ArchiveUnpickler(pickle._Unpickler):  # the pure-Python one: its BUILD can be replaced
    """Unpickles data.pkl with the allow-list above; BUILD only ever fills a stand-in's record."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path, pkl: bytes):
        super().__init__(io.BytesIO(pkl))
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: Dict[str, _Storage] = {}
        self._classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type("StandIn", (_StandIn,), {"qualified_name": qualified})
            return self._classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise _Refused(f"{module}.{name}")

    def get_extension(self, code: int):
        # EXT1/2/4 name a global through copyreg's registry and a process-wide cache that
        # bypasses find_class; torch never writes them
        raise pickle.UnpicklingError(f"extension code {code} (copyreg registry) is not allowed")

    def persistent_load(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[3], str) and is_number(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.200}")
        _, kind, key, _location, numel = pid
        if key in self._storages:
            known = self._storages[key].data
            if known.dtype != kind.dtype or known.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key} referenced with two different types or sizes")
            return self._storages[key]
        itemsize = torch.empty((), dtype=kind.dtype).element_size()
        raw = _read_entry(self._archive, f"{self._prefix}data/{key}", numel * itemsize, self._path)
        data = torch.frombuffer(bytearray(raw), dtype=kind.dtype) if numel else torch.empty(0, dtype=kind.dtype)
        self._storages[key] = _Storage(key, data)
        return self._storages[key]

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, _StandIn) or inst._state is not _UNSET:
            raise pickle.UnpicklingError(f"BUILD applied to a {type(inst).__name__}; "
                                         f"only TorchScript objects are built")
        object.__setattr__(inst, "_state", state)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def load(self):
        try:
            return super().load()
        except _Refused as err:
            raise CheckpointError(
                f"{self._path}: refused to load the global '{err}' named in data.pkl; a TorchScript archive "
                f"is read for its tensors only, and only tensor-rebuilding globals are allowed") from None


# ----------------------------------------------------------------------- flattening


def _holds_tensor(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)) and depth < 4:
        return any(_holds_tensor(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 4:
        return any(_holds_tensor(v, depth + 1) for v in value.values())
    return False


def _flatten(obj: _StandIn, prefix: str, out: StateDict, path_ids: set, path: Path) -> None:
    """Tensor attributes -> `prefix+name`, stand-in attributes recursed into (like Module.state_dict)."""
    if id(obj) in path_ids:
        raise CheckpointError(f"{path}: the module tree in data.pkl contains a cycle at {prefix or 'the root'}")
    state = obj._state
    if not isinstance(state, dict):
        if _holds_tensor(state):
            raise CheckpointError(
                f"{path}: {obj.qualified_name} at {prefix or 'the root'} keeps its tensors in a custom __getstate__ "
                f"form that only its own TorchScript code can name; it cannot be read without running that code")
        return
    path_ids.add(id(obj))
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _StandIn):
            _flatten(value, f"{prefix}{name}.", out, path_ids, path)
    path_ids.discard(id(obj))
