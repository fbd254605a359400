"""TorchScript archives are read for their tensors only: the same state dict torch.jit.load gives,
none of the archive's code run, hostile pickles and oversized storages refused."""

import io
import pickle
import zipfile
from typing import Dict

import pytest
import torch
from torch import nn

from repae.models.encoder_weights import read_encoder_file
from repae.torchscript_archive import is_torchscript_archive, read_torchscript_state
from repae.weights import CheckpointError


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("low", torch.randn(3, 4).to(torch.bfloat16)[:, 1:3])  # bf16 (copied: contiguous)
        self.register_buffer("view", torch.arange(20.0).reshape(4, 5)[1:, 2:].t())  # offset 7, strides (1, 5)
        self.register_buffer("steps", torch.tensor([3, -1], dtype=torch.int64))

    def forward(self, x):
        return self.lin(x)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4).half())
        self.inner = _Inner()
        self.seq = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Sequential(nn.Linear(2, 1)))

    def forward(self, x):
        return self.seq(self.inner(x))


def test_reader_equals_torch_jit_state_dict_bit_for_bit(tmp_path):
    module = torch.jit.script(_Outer())
    torch.jit.save(module, tmp_path / "m.pt")
    expected = module.state_dict()
    assert expected["inner.view"].storage_offset() == 7 and not expected["inner.view"].is_contiguous()
    assert is_torchscript_archive(tmp_path / "m.pt")
    ours = read_torchscript_state(tmp_path / "m.pt")
    assert list(ours) == list(expected)
    for name, want in expected.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset(), name
        assert torch.equal(_bits(got), _bits(want)), name


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


class _SideEffect(nn.Module):
    """A module whose TorchScript __setstate__ changes its buffer when torch.jit.load runs it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("buf", torch.ones(3))

    def forward(self, x):
        return x + self.buf

    @torch.jit.export
    def __getstate__(self) -> Dict[str, torch.Tensor]:
        return {"buf": self.buf}

    @torch.jit.export
    def __setstate__(self, state: Dict[str, torch.Tensor]) -> None:
        self.buf = state["buf"] * 7
        self.training = False


def test_archive_code_does_not_run(tmp_path):
    torch.jit.save(torch.jit.script(_SideEffect()), tmp_path / "s.pt")
    assert torch.equal(torch.jit.load(tmp_path / "s.pt").state_dict()["buf"], torch.full((3,), 7.0))  # code ran
    assert torch.equal(read_torchscript_state(tmp_path / "s.pt")["buf"], torch.ones(3))  # stored value
    assert torch.equal(read_encoder_file(tmp_path / "s.pt")["buf"], torch.ones(3))


class _TupleState(_SideEffect):
    @torch.jit.export
    def __getstate__(self):
        return (self.buf, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.buf = state[0]
        self.training = state[1]


def test_custom_state_that_only_code_can_name_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(_TupleState()), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="custom __getstate__"):
        read_torchscript_state(tmp_path / "t.pt")


def test_read_encoder_file_never_calls_torch_jit_load(tmp_path, monkeypatch):
    torch.jit.save(torch.jit.script(_Outer()), tmp_path / "m.pt")
    expected = torch.jit.load(tmp_path / "m.pt").state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    ours = read_encoder_file(tmp_path / "m.pt")
    assert list(ours) == list(expected) and all(torch.equal(ours[k], v) for k, v in expected.items())


# ------------------------------------------------------------------------ hostile archives


def _op(value) -> bytes:
    """One value as protocol-2 pickle opcodes (PROTO and STOP stripped, no memo)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.fast = True
    pickler.dump(value)
    return buffer.getvalue()[2:-1]


def _tensor_ops(numel: int, size: tuple, stride: tuple, offset: int = 0) -> bytes:
    storage = (b"(" + _op("storage") + b"ctorch\nFloatStorage\n" + _op("0") + _op("cpu") + _op(numel)
               + b"tQ")
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _op(offset) + _op(size) + _op(stride)
            + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")


def _archive(path, data_pkl: bytes, storage_bytes: bytes = b"\0" * 16):
    """A zip laid out as torch.jit.save lays it out, with a hand-written data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("evil/data.pkl", data_pkl)
        z.writestr("evil/data/0", storage_bytes)
        z.writestr("evil/code/__torch__.py", "class M(Module):\n  pass\n")
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/byteorder", "little")
    return path


def _module_pickle(tensor_ops: bytes) -> bytes:
    return b"\x80\x02c__torch__\nM\n)\x81}(" + _op("training") + b"\x88" + _op("w") + tensor_ops + b"ub."


def test_hand_built_archive_reads(tmp_path):
    """The builder below makes readable archives: the hostile variants fail for their one defect."""
    path = _archive(tmp_path / "ok.pt", _module_pickle(_tensor_ops(4, (2, 2), (2, 1))),
                    torch.arange(4.0).numpy().tobytes())
    assert torch.equal(read_torchscript_state(path)["w"], torch.arange(4.0).reshape(2, 2))


def test_forbidden_global_is_refused_and_not_called(tmp_path):
    marker = tmp_path / "marker"
    evil = b"\x80\x02cos\nsystem\n" + _op(f"touch {marker}") + b"\x85R."
    path = _archive(tmp_path / "evil.pt", evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*'os\.system'"):
        read_encoder_file(path)
    assert not marker.exists()
    # the same global nested inside a module's state, reached through a stand-in
    nested = _module_pickle(b"cposix\nsystem\n" + _op(f"touch {marker}") + b"\x85R")
    with pytest.raises(CheckpointError, match="'posix.system'"):
        read_torchscript_state(_archive(tmp_path / "nested.pt", nested))
    assert not marker.exists()


def test_copyreg_extension_codes_are_refused(tmp_path):
    """EXT opcodes resolve through copyreg's process-wide cache, not through find_class."""
    import copyreg

    marker = tmp_path / "marker"
    copyreg.add_extension("os", "system", 0x7FFFFF01)
    try:
        pickle.loads(b"\x80\x02\x84\x01\xff\xff\x7f.")  # resolve once, as another unpickler in the process might
        evil = b"\x80\x02\x84\x01\xff\xff\x7f" + _op(f"touch {marker}") + b"\x85R."
        with pytest.raises(CheckpointError, match="extension code"):
            read_torchscript_state(_archive(tmp_path / "ext.pt", evil))
    finally:
        copyreg.remove_extension("os", "system", 0x7FFFFF01)
        copyreg.clear_extension_cache()
    assert not marker.exists()


def test_build_on_anything_but_a_stand_in_is_refused(tmp_path):
    """BUILD on an allowed function would set its attributes (e.g. __defaults__) for later loads."""
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}" + _op("__defaults__") + _op((1, 2)) + b"sb."
    with pytest.raises(CheckpointError, match="BUILD"):
        read_torchscript_state(_archive(tmp_path / "b.pt", pkl))
    from repae import torchscript_archive
    assert torchscript_archive._rebuild_tensor.__defaults__ == (False, None, None)


def test_storage_larger_than_its_bytes_is_refused(tmp_path):
    big = _module_pickle(_tensor_ops(10**12, (10**12,), (1,)))  # 4 TB claimed, 16 bytes held
    with pytest.raises(CheckpointError, match="holds 16 bytes but its storage claims 4000000000000"):
        read_torchscript_state(_archive(tmp_path / "big.pt", big))


def test_view_beyond_its_storage_is_refused(tmp_path):
    over = _module_pickle(_tensor_ops(4, (3, 3), (3, 1), offset=1))  # reaches element 9 of 4
    with pytest.raises(CheckpointError, match="reaches element 9 of a storage of 4"):
        read_torchscript_state(_archive(tmp_path / "over.pt", over))
