"""Bad input gives one clear error naming the path or the key."""

import pytest
import torch

from repae.models.sit import SiT
from repae.weights import CheckpointError, load_model, load_strict, read_file, save_model
from conftest import tiny_sit_args


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nowhere.pt"):
        load_model(tmp_path / "nowhere.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_names_the_path(tmp_path, suffix):
    model = SiT(tiny_sit_args())
    path = tmp_path / f"sit{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_model(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*sit{suffix}"):
        load_model(path, kind="sit")


def test_wrong_shaped_tensor_names_the_key(tmp_path):
    model = SiT(tiny_sit_args())
    state = model.state_dict()
    state["blocks.1.attn.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"wrong shapes: blocks\.1\.attn\.proj\.weight: file \(3, 3\)"):
        load_strict(SiT(tiny_sit_args()), state, "x.pt")


def test_missing_and_unexpected_keys_are_named():
    state = SiT(tiny_sit_args()).state_dict()
    del state["final_layer.linear.bias"]
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_strict(SiT(tiny_sit_args()), state, "ckpt.pt")
    assert "missing keys: final_layer.linear.bias" in str(err.value)
    assert "unexpected keys: head.weight" in str(err.value)
    assert "ckpt.pt" in str(err.value)


def test_wrong_model_kind_is_named(tmp_path):
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match="not a SiT state dict: missing key 'x_embedder.proj.weight'"):
        load_model(tmp_path / "vae.pt", kind="sit")


class Payload:
    """Stands in for any pickled object that could run code when constructed."""


def test_pickles_outside_the_allow_list_are_refused(tmp_path):
    torch.save({"model": {}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"it pickles test_weights\.Payload, which repae does not unpickle") as err:
        read_file(tmp_path / "evil.pt")
    # torch's own message advised re-running with weights_only=False (letting the file run code), in ANSI bold
    assert "weights_only" not in str(err.value) and "\x1b" not in str(err.value)


def test_a_state_pt_outside_the_allow_list_names_the_object(tmp_path):
    from repae.train.checkpoint import read_checkpoint

    torch.save({"step": 3, "extra": Payload()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"state.pt: it pickles test_weights\.Payload") as err:
        read_checkpoint(tmp_path, [])
    assert "weights_only" not in str(err.value)


def test_directory_that_is_not_a_diffusers_vae(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("hidden, heads, guessed", [(48, 2, 1), (96, 3, 1), (192, 6, 3), (200, 2, 2)])
def test_a_narrow_sit_loads_with_and_without_its_metadata(tmp_path, hidden, heads, guessed):
    # widths below 64 were refused, even in our own files: the shape check guessed 48 // 64 = 0 heads
    torch.manual_seed(0)
    model = SiT(tiny_sit_args(hidden_size=hidden, num_heads=heads, z_dims=[32])).eval()
    save_model(model, tmp_path / "sit.safetensors")
    assert load_model(tmp_path / "sit.safetensors", kind="sit").args.num_heads == heads  # from its metadata
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # no metadata: heads of 64 channels, dividing the width
    plain = load_model(tmp_path / "plain.pt", kind="sit")
    assert plain.args.num_heads == guessed and hidden % guessed == 0
    assert plain.state_dict().keys() == model.state_dict().keys()


def test_a_guessed_head_count_is_said_and_a_published_one_is_not(tmp_path, capsys):
    # a wrong head count loads strictly and computes another function: it was guessed without a word
    torch.manual_seed(0)
    torch.save(SiT(tiny_sit_args(hidden_size=64, num_heads=4, z_dims=[32])).state_dict(), tmp_path / "plain.pt")
    assert load_model(tmp_path / "plain.pt", kind="sit").args.num_heads == 1
    assert "the weights do not say the SiT's head count; assuming 1" in capsys.readouterr().err
    assert load_model(tmp_path / "plain.pt", kind="sit", num_heads=4).args.num_heads == 4  # given: no warning
    assert "head count" not in capsys.readouterr().err
