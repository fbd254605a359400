"""Architecture metadata in a weight file is checked before a model is built from it."""

import json

import pytest
from safetensors.torch import save_file

from repae.cli import main
from repae.models import sit as sit_module
from repae.models import vae as vae_module
from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL
from repae.weights import CheckpointError, file_metadata, load_model, save_model
from conftest import tiny_sit_args, tiny_vae_args


@pytest.fixture
def no_building(monkeypatch):
    """Fail the test if a SiT or VAE is constructed at all."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from metadata that should have been refused")

    monkeypatch.setattr(sit_module.SiT, "__init__", refuse)
    monkeypatch.setattr(vae_module.AutoencoderKL, "__init__", refuse)


def _rewrite_metadata(path, **changes):
    """The same tensors with `repae_args` fields changed (or the raw metadata replaced)."""
    from safetensors.torch import load_file

    meta = file_metadata(path)
    raw = changes.pop("_raw", None)
    if raw is not None:
        meta["repae_args"] = raw
    else:
        fields = json.loads(meta["repae_args"])
        fields.update(changes)
        meta["repae_args"] = json.dumps(fields)
    save_file(load_file(str(path)), str(path), metadata=meta)
    return path


@pytest.fixture
def sit_file(tmp_path):
    return save_model(SiT(tiny_sit_args()), tmp_path / "sit.safetensors")


@pytest.fixture
def vae_file(tmp_path):
    return save_model(AutoencoderKL(tiny_vae_args()), tmp_path / "vae.safetensors")


def test_intact_files_still_load(sit_file, vae_file):
    assert isinstance(load_model(sit_file), SiT) and isinstance(load_model(vae_file), AutoencoderKL)


@pytest.mark.parametrize("changes,message", [
    # a small file claiming SiT-XL-sized (and larger) layers: refused against the tensors, never built
    (dict(hidden_size=1152, depth=28), r"hidden_size=1152 \(tensors: 64\), depth=28 \(tensors: 4\)"),
    (dict(hidden_size=10**9), r"hidden_size=1000000000 must be an integer in \[1, 16384\]"),
    (dict(depth=-1), r"depth=-1 must be an integer"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio=nan must be a finite number"),
    (dict(z_dims=[32] * 1000), "z_dims="),
    (dict(input_size="big"), "input_size='big' must be an integer"),
    (dict(qk_norm="yes"), "qk_norm=yes must be true or false"),
    (dict(attention="flash9"), "attention='flash9' must be one of"),
    (dict(surprise=1), "unknown field 'surprise'"),
    (dict(encoder_depth=9), "encoder_depth=9 is deeper than depth=4"),
    (dict(num_classes=500), "label table has 11 rows"),
    (dict(_raw="{not json"), "repae_args is not valid JSON"),
    (dict(_raw="[1, 2]"), "must be a JSON object"),
    (dict(_raw="[" * 100000 + "]" * 100000), "characters"),
])
def test_bad_sit_metadata_is_refused_before_building(sit_file, no_building, changes, message):
    _rewrite_metadata(sit_file, **changes)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(sit_file)
    assert "sit.safetensors" in str(info.value)


@pytest.mark.parametrize("changes,message", [
    (dict(ch=512, ch_mult=[1, 2, 4, 4], z_channels=16), r"ch=512 \(tensors: 32\)"),
    (dict(ch_mult=[1] * 20), "ch_mult="),
    (dict(num_res_blocks=0), "num_res_blocks=0 must be an integer"),
    (dict(norm_groups=5), "norm_groups=5 does not divide"),
    (dict(in_channels=4), r"in_channels=4 \(tensors: 3\)"),
])
def test_bad_vae_metadata_is_refused_before_building(vae_file, no_building, changes, message):
    _rewrite_metadata(vae_file, **changes)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(vae_file)
    assert "vae.safetensors" in str(info.value)


def test_metadata_of_another_kind_is_named(sit_file, no_building):
    with pytest.raises(CheckpointError, match="holds a sit, not a vae"):
        load_model(sit_file, kind="vae")


def test_info_on_a_file_claiming_a_huge_model_is_one_line(sit_file, no_building, capsys):
    _rewrite_metadata(sit_file, hidden_size=16384, depth=256, input_size=1024, patch_size=1)
    assert main(["info", str(sit_file)]) == 2
    err = capsys.readouterr().err
    assert "sit.safetensors" in err and "hidden_size=16384" in err and "Traceback" not in err


def test_zero_byte_weight_file_is_a_checkpoint_error(tmp_path, capsys):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert main(["info", str(empty)]) == 2
    assert "empty.safetensors" in capsys.readouterr().err


def test_a_runs_checkpoint_weight_files_record_their_architecture(tmp_path):
    """A checkpoint's sit/ema/vae files load on their own with the run's architecture. Without the record
    the SiT's head count is guessed from its width (64 -> 1 head of 64), and that wrong SiT loads strictly:
    attention with other heads, the same tensor shapes."""
    import copy

    import torch

    from repae.config import load_config
    from repae.train.checkpoint import save_checkpoint

    sit = SiT(tiny_sit_args(num_heads=4))
    vae = AutoencoderKL(tiny_vae_args(norm_groups=4))  # 4 groups: not what a bare VAE file would be guessed to have
    modules = {"sit": sit, "ema": copy.deepcopy(sit), "vae": vae, "regulariser": torch.nn.Linear(2, 2)}
    ckpt = save_checkpoint(tmp_path, 7, modules, {"step": 7}, load_config("toy"))
    for name in ("sit", "ema"):
        assert load_model(ckpt / f"{name}.safetensors").args == sit.args
    assert load_model(ckpt / "vae.safetensors").args == vae.args
    assert file_metadata(ckpt / "regulariser.safetensors") == {}  # no architecture record for other modules
