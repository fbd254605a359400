"""Every export format of an E2E-VAE loads back as the same function, for a non-default
architecture; a bare `.pt` with no architecture record says what it guessed or refuses."""

import json

import pytest
import torch

from repae.cli import main
from repae.models.vae import AutoencoderKL, VAEArgs
from repae.stage2.export import write_vae_exports
from repae.weights import CheckpointError, load_model

# 4 groups, ch 16: the tensors also fit 1, 2, 8 and 16 groups (and LDM's 32 does not divide 16)
ODD = VAEArgs(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[], norm_groups=4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    vae = AutoencoderKL(ODD).eval()
    with torch.no_grad():  # GroupNorm affine away from (1, 0) so the group count changes outputs visibly
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    write_vae_exports(vae, torch.zeros(4), torch.ones(4), out, image_size=16)
    return out, vae


@pytest.mark.parametrize("name", ["vae.safetensors", "e2e-vae.pt", "diffusers"])
def test_every_export_format_decodes_like_the_exported_vae(exported, name):
    out, vae = exported
    loaded = load_model(out / name, kind="vae").eval()
    assert loaded.args.norm_groups == 4 and loaded.args.ch == 16
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), vae.decode(z))


def test_the_pt_sidecar_holds_the_architecture(exported):
    out, _ = exported
    record = json.loads((out / "e2e-vae.json").read_text())
    assert record["repae_kind"] == "vae" and record["repae_args"]["norm_groups"] == 4


def test_a_caller_group_count_that_contradicts_the_sidecar_is_refused(exported):
    out, _ = exported
    with pytest.raises(CheckpointError, match="records norm_groups=4"):
        load_model(out / "e2e-vae.pt", kind="vae", norm_groups=8)


def test_repae_info_shows_the_exported_pt_architecture(exported, capsys):
    out, _ = exported
    assert main(["info", str(out / "e2e-vae.pt")]) == 0
    printed = capsys.readouterr().out
    assert "norm_groups=4" in printed and "ch=16" in printed and "e2e-vae.json" in printed


def test_a_bare_pt_whose_shapes_fit_several_group_counts_is_refused(exported, tmp_path, capsys):
    bare = tmp_path / "bare.pt"
    bare.write_bytes((exported[0] / "e2e-vae.pt").read_bytes())  # no sidecar beside it
    with pytest.raises(CheckpointError) as err:
        load_model(bare, kind="vae")
    message = str(err.value)
    assert str(bare) in message and "[1, 2, 4, 8, 16]" in message and "vae.norm_groups=N" in message
    assert "bare.json" in message
    assert main(["info", str(bare)]) == 2
    assert "norm_groups" in capsys.readouterr().err
    loaded = load_model(bare, kind="vae", norm_groups=4)  # told: loads, and says what it took
    assert loaded.args.norm_groups == 4
    guessed = [line for line in capsys.readouterr().err.splitlines() if "guessed" in line]
    assert len(guessed) == 1 and "norm_groups=4 (as passed)" in guessed[0]
    (tmp_path / "bare.json").write_text('{"repae_kind": "vae", "repae_args": {"norm_groups": 4}}')  # a partial sidecar
    assert load_model(bare, kind="vae").args == ODD


def test_an_sd_vae_shaped_bare_pt_loads_with_32_groups_and_says_it_guessed(tmp_path, capsys):
    sd_like = VAEArgs(ch=128, ch_mult=[1], num_res_blocks=1, z_channels=4, attn_resolutions=[])
    torch.save(AutoencoderKL(sd_like).state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", kind="vae")
    assert loaded.args.norm_groups == 32
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "guessed" in lines[0] and "norm_groups=32" in lines[0] and "LDM convention" in lines[0]


def test_an_older_export_without_sidecar_loads_from_its_export_json(exported, tmp_path):
    """Exports written before sidecars: export.json lists the .pt's sha256 and the VAEArgs."""
    from repae.fileio import sha256_file

    old = tmp_path / "old"
    old.mkdir()
    (old / "e2e-vae.pt").write_bytes((exported[0] / "e2e-vae.pt").read_bytes())
    record = {"sha256": {"e2e-vae.pt": sha256_file(old / "e2e-vae.pt")}, "vae_args": ODD.__dict__ | {"ch_mult": [1, 2]}}
    (old / "export.json").write_text(json.dumps(record))
    assert load_model(old / "e2e-vae.pt", kind="vae").args.norm_groups == 4
    record["sha256"]["e2e-vae.pt"] = "0" * 64  # another file's record: not used, so refused as unknown
    (old / "export.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not record its GroupNorm group count"):
        load_model(old / "e2e-vae.pt", kind="vae")
