"""Hostile weight files: a file is data, its sizes are bounded before anything is built from
them, and every bad file gives a CheckpointError naming it, never a raw traceback.

Tests whose file would make an undefended loader allocate gigabytes run under `memory_cap`: the
address space is capped a little above its current size, so without the defence the test fails
at once on an allocation error instead of swapping the machine."""

import contextlib
import json
import resource
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_sit_args, tiny_vae_args
from repae.models import vae_diffusers
from repae.models.encoders import encoder_spec, load_encoder_from_spec
from repae.models.inception import InceptionV3
from repae.models.latent_norm import LatentNorm
from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL, VAEArgs
from repae.models.vit import resample_pos_embed
from repae.weights import (CheckpointError, _NoNormalInit, load_latent_stats, load_model, load_strict,
                           save_latent_stats)


@contextlib.contextmanager
def memory_cap(extra: int = 1 << 30):
    """RLIMIT_AS (soft) = this process's current address space + `extra`; restored afterwards."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def sit_shapes(hidden: int, **extra) -> dict:
    """The four tensors SiT inference reads, each as small as its read dimension allows."""
    state = {"x_embedder.proj.weight": torch.zeros(hidden, 4, 2, 2), "pos_embed": torch.zeros(1, 16, 1),
             "y_embedder.embedding_table.weight": torch.zeros(11, 1), "blocks.0.mlp.fc1.weight": torch.zeros(4 * hidden, 1)}
    state.update(extra)
    return state


# ------------------------------------------------- A1: architecture inferred from key names


def test_sit_depth_from_a_key_number_is_capped_before_building(tmp_path):
    # 75 KB of real tensors whose key `blocks.99999.x` claims a 100000-block SiT-XL (~8 TB)
    torch.save(sit_shapes(1152, **{"blocks.99999.x": torch.zeros(1)}), tmp_path / "sit.pt")
    with memory_cap(), pytest.raises(CheckpointError, match=r"sit\.pt.*depth=100000 must be an integer in \[1, 256\]"):
        load_model(tmp_path / "sit.pt", kind="sit")


def test_sit_depth_within_caps_is_compared_on_the_meta_device_first(tmp_path):
    # depth 200 is within the caps, but only block 199 has a key: 200 SiT-XL blocks (13 GB) must
    # not be allocated to find out that the others are missing
    torch.save(sit_shapes(1152, **{"blocks.199.x": torch.zeros(1)}), tmp_path / "sit.pt")
    with memory_cap(), pytest.raises(CheckpointError, match=r"sit\.pt does not match SiT:\n  missing keys"):
        load_model(tmp_path / "sit.pt", kind="sit")


def test_vae_res_blocks_from_a_key_number_are_capped(tmp_path):
    state = {"encoder.conv_in.weight": torch.zeros(1024, 3, 3, 3), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
             "encoder.down.0.block.0.conv1.weight": torch.zeros(1024, 1, 1, 1),
             "encoder.down.0.block.99999.x": torch.zeros(1)}
    torch.save(state, tmp_path / "vae.pt")
    with memory_cap(), pytest.raises(CheckpointError, match=r"vae\.pt.*num_res_blocks=100000 must be an integer"):
        load_model(tmp_path / "vae.pt", kind="vae", norm_groups=32)


def test_expanded_tensors_cannot_describe_a_model_the_file_does_not_store(tmp_path):
    # every key and shape of a 6 GB SiT, each tensor a stride-0 view of one float: a 50 KB file
    args = tiny_sit_args(hidden_size=4096, num_heads=32, depth=8, encoder_depth=4, z_dims=[], input_size=32)
    with torch.device("meta"), _NoNormalInit():  # shapes only, without importing torch's meta kernels
        shapes = {k: v.shape for k, v in SiT(args).state_dict().items()}
    one = torch.zeros(())
    torch.save({k: one.expand(s) for k, s in shapes.items()}, tmp_path / "sit.pt")
    with memory_cap(), pytest.raises(CheckpointError, match=r"sit\.pt: its tensors describe \d+ MiB but store only"):
        load_model(tmp_path / "sit.pt", kind="sit")


def test_genuine_files_still_load(tmp_path):
    sit, vae = SiT(tiny_sit_args()), AutoencoderKL(tiny_vae_args())
    torch.save(sit.state_dict(), tmp_path / "sit.pt")
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    loaded = load_model(tmp_path / "sit.pt", kind="sit", num_classes=10, encoder_depth=2)
    torch.testing.assert_close(loaded.state_dict(), sit.state_dict())
    torch.testing.assert_close(load_model(tmp_path / "vae.pt", norm_groups=8).state_dict(), vae.state_dict())


# ------------------------------------------------------------------ A5/C3: diffusers dirs


def diffusers_dir(tmp_path, config, state=None):
    d = tmp_path / "diffusers"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    save_file(state or {"x": torch.zeros(1)}, str(d / "diffusion_pytorch_model.safetensors"))
    return d


def one_float_per_key(args: VAEArgs) -> dict:
    """Every diffusers key the layout `args` needs, each holding one float."""
    return {vae_diffusers.ldm_key_to_diffusers(k, len(args.ch_mult)): torch.zeros(1)
            for k in vae_diffusers._ldm_keys(replace(args, ch=8, norm_groups=8))}


@pytest.mark.parametrize("width", [8192, 4096])
def test_diffusers_config_sizes_are_capped_and_compared_before_building(tmp_path, width):
    # 8192: beyond the width cap; 4096: within it, but the tensors are one float each. Either way the
    # 2.4 GB (resp. 0.6 GB per conv) model must not be allocated before the shapes are compared.
    config = {"block_out_channels": [width], "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4}
    args = vae_diffusers.args_from_diffusers_config(config)
    d = diffusers_dir(tmp_path, config, one_float_per_key(args))
    expected = r"ch=8192 must be an integer in \[1, 4096\]" if width == 8192 else r"wrong shapes"
    with memory_cap(), pytest.raises(CheckpointError, match=expected):
        load_model(d)


def test_diffusers_layers_per_block_is_capped(tmp_path):
    d = diffusers_dir(tmp_path, {"block_out_channels": [8], "layers_per_block": 65, "norm_num_groups": 4})
    with pytest.raises(CheckpointError, match=r"config\.json: architecture: .*num_res_blocks=65 must be"):
        load_model(d)


@pytest.mark.parametrize("config, message", [
    ([1, 2], "holds a JSON list, not an object"),
    ({"block_out_channels": [0]}, "block_out_channels must be a list of 1 to 64 positive integers"),
    ({"block_out_channels": "abc"}, "block_out_channels must be a list"),
    ({"block_out_channels": [8], "down_block_types": [1]}, "down_block_types must be a list of 1 block names"),
    ({"block_out_channels": [8], "layers_per_block": float("inf")}, "layers_per_block must be an integer"),
    ({"block_out_channels": [8], "latent_channels": "4"}, "latent_channels must be an integer"),
    (b"\xff\xfe{}", "is not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "is not valid JSON .nested too deeply"),
    (b" " * ((1 << 20) + 1), "is larger than 1048576 bytes"),
])
def test_bad_diffusers_configs_are_named(tmp_path, config, message):
    d = diffusers_dir(tmp_path, config)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(d)
    assert str(d) in str(err.value)


# --------------------------------------------------------------------- B1: latent statistics


@pytest.mark.parametrize("content, message", [
    ({"mean": torch.zeros(4), "var": -torch.ones(4)}, "variance must be positive"),
    ({"mean": torch.zeros(4), "var": torch.zeros(4)}, "variance must be positive"),
    ({"mean": torch.zeros(4), "var": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, "must be finite"),
    ({"mean": torch.full((4,), float("inf")), "var": torch.ones(4)}, "must be finite"),
    ({"latents_scale": torch.full((1, 4, 1, 1), 1e-30), "latents_bias": torch.zeros(1, 4, 1, 1)}, "must be finite"),
    ({"latents_scale": -torch.ones(1, 4, 1, 1), "latents_bias": torch.zeros(1, 4, 1, 1)}, "must be positive"),
    ({"mean": torch.zeros(4), "var": torch.ones(7)}, "mean has 4 entries but var has 7"),
    ({"mean": torch.zeros(0), "var": torch.ones(0)}, "has 0 entries"),
    ({"latents_scale": 3, "latents_bias": 4}, "latents_scale must be a real-valued tensor, found int"),
    ({"mean": torch.zeros(4, dtype=torch.bool), "var": torch.ones(4)}, "mean must be a real-valued tensor"),
    (torch.zeros(3), "holds no latent statistics.*found a Tensor"),
    ({1: torch.zeros(4), "x": 1}, "holds no latent statistics"),
])
def test_bad_latent_statistics_are_refused(tmp_path, content, message):
    torch.save(content, tmp_path / "stats.pt")
    with pytest.raises(CheckpointError, match=message) as err:
        load_latent_stats(tmp_path / "stats.pt")
    assert "stats.pt" in str(err.value)


def test_latent_statistics_of_another_channel_count_are_named(tmp_path):
    save_latent_stats(torch.zeros(4), torch.ones(4), tmp_path / "stats.safetensors")
    with pytest.raises(CheckpointError, match=r"stats\.safetensors holds statistics of 4 latent channels; the VAE has 16"):
        load_latent_stats(tmp_path / "stats.safetensors", channels=16)
    mean, var = load_latent_stats(tmp_path / "stats.safetensors")
    with pytest.raises(CheckpointError, match="4 means and 4 variances, but the latent norm has 16 channels"):
        LatentNorm(16).init_from_stats(mean, var)


def test_good_latent_statistics_load_in_both_conventions(tmp_path):
    torch.save({"latents_scale": torch.full((1, 4, 1, 1), 0.5), "latents_bias": torch.arange(4.0).reshape(1, 4, 1, 1)},
               tmp_path / "official.pt")
    mean, var = load_latent_stats(tmp_path / "official.pt", channels=4)
    torch.testing.assert_close(mean, torch.arange(4.0))
    torch.testing.assert_close(var, torch.full((4,), 4.0))


# ------------------------------------------------------------- C2: weight-file inference


@pytest.mark.parametrize("content, kind, message", [
    ({"x_embedder.proj.weight": torch.zeros(8)}, "sit", "x_embedder.proj.weight is a 1-D tensor, expected a 4-D"),
    (sit_shapes(8, **{"projectors.0.0.weight": torch.zeros(16, 8)}), "sit", "missing key 'projectors.0.4.weight'"),
    ({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
      "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3), "encoder.down.3.x": torch.zeros(1)}, "vae",
     "missing key 'encoder.down.1.block.0.conv1.weight'"),
    ({"encoder.conv_in.weight": "hello", "post_quant_conv.weight": 1}, "vae", "holds a value of type str, not a tensor"),
    ({"encoder.conv_in.weight": torch.zeros(0, 3, 3, 3), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)}, "vae",
     "encoder.conv_in.weight has no output channels"),
    (sit_shapes(0), "sit", "x_embedder.proj.weight has no output channels"),
    ({3: torch.zeros(1)}, "sit", "key 3 is of type int"),
    ({"model": {"a": 1}}, None, "'a' holds a value of type int"),
    (torch.zeros(3), "sit", "holds a Tensor, not a state dict"),
])
def test_bad_weight_files_are_named(tmp_path, content, kind, message):
    torch.save(content, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(tmp_path / "w.pt", kind=kind, norm_groups=1)
    assert "w.pt" in str(err.value)


def test_load_strict_names_keys_that_are_not_names_and_values_that_are_not_tensors():
    state = SiT(tiny_sit_args()).state_dict()
    state[7] = torch.zeros(1)
    state["final_layer.linear.bias"] = "x"
    with pytest.raises(CheckpointError) as err:
        load_strict(SiT(tiny_sit_args()), state, "ckpt.pt")
    msg = str(err.value)
    assert "keys that are not names: 7 (int)" in msg and "values that are not tensors: final_layer.linear.bias (str)" in msg


def test_inception_file_with_odd_keys_is_named(tmp_path):
    torch.save({3: torch.zeros(1)}, tmp_path / "inception.pth")
    with pytest.raises(CheckpointError, match=r"keys that are not names: 3 \(int\)"):
        InceptionV3.from_file(tmp_path / "inception.pth")
    torch.save([torch.zeros(1)], tmp_path / "inception.pth")
    with pytest.raises(CheckpointError, match=r"inception\.pth holds a list, not the Inception state dict"):
        InceptionV3.from_file(tmp_path / "inception.pth")


# ------------------------------------------------------------------ A6/C4: encoder files


D = 32


def tiny(name: str):
    spec = encoder_spec(name)
    return replace(spec, embed_dim=D, vit=replace(spec.vit, embed_dim=D, depth=1, num_heads=2))


def test_encoder_pos_embed_claiming_a_huge_grid_is_refused(tmp_path):
    # a stride-0 position embedding of a 1000x1000 grid: 2 KB on disk, 1.5 GB once resampled
    torch.save({"pos_embed": torch.zeros(1).expand(1, 1 + 1000 * 1000, 384)}, tmp_path / "enc.pth")
    with memory_cap(), pytest.raises(CheckpointError, match=r"enc\.pth: its tensors describe \d+ MiB but store only"):
        load_encoder_from_spec(tiny("dinov2-vit-s"), str(tmp_path / "enc.pth"), 256)


def test_resample_pos_embed_bounds_the_grid_it_is_given():
    with memory_cap(), pytest.raises(ValueError, match=r"1000x1000 grid of width 384; at most 128x128"):
        resample_pos_embed(torch.zeros(1).expand(1, 1 + 1000 * 1000, 384), 16)


def hf_dinov2(**layer):
    return {"embeddings.cls_token": torch.zeros(1, 1, D), **layer}


@pytest.mark.parametrize("name, content, message", [
    ("dinov2-vit-s", torch.zeros(3), "holds a Tensor, not a state dict or checkpoint"),
    ("dinov2-vit-s", [torch.zeros(3)], "holds a list, not a state dict or checkpoint"),
    ("dinov2-vit-s", {"pos_embed": torch.zeros(1, 1 + 7, D)}, "7 patch entries .* not a square grid"),
    ("dinov2-vit-s", {"pos_embed": torch.zeros(D)}, r"must be a \[1, tokens, width\] tensor, found \(32,\)"),
    ("jepa-vit-h", {"pos_embed": torch.zeros(1, 1 + 16, D)}, "17 patch entries .* not a square grid"),
    ("dinov2-vit-s", {"pos_embed": torch.zeros(1, 1 + 129 * 129, 1)}, "claims a 129x129 grid of width 1; at most 128x128"),
    ("dinov2-vit-s", hf_dinov2(**{"encoder.layer.x.foo": torch.zeros(1)}), "unexpected keys: encoder.layer.x.foo"),
    ("dinov2-vit-s", hf_dinov2(**{"encoder.layer.0.attention.attention.query.weight": torch.zeros(1)}),
     "has encoder.layer.0.attention.attention.query.weight but not encoder.layer.0.attention.attention.key.weight"),
    ("dinov2-vit-s", hf_dinov2(**{f"encoder.layer.0.attention.attention.{p}.{w}": torch.zeros(1, *[1] * (p == "key"))
                                 for p in ("query", "key", "value") for w in ("weight", "bias")}),
     "cannot fuse"),
    ("clip-vit-L", {"embeddings.patch_embedding.weight": torch.zeros(1),
                    "encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1)},
     "has encoder.layers.0.self_attn.q_proj.weight but not encoder.layers.0.self_attn.k_proj.weight"),
    ("mocov3-vit-s", {1: torch.zeros(1)}, "key 1 is of type int"),
    ("mocov3-vit-s", {"state_dict": {"a": torch.zeros(1), "epoch": 3}}, "'epoch' holds a value of type int"),
])
def test_bad_encoder_files_are_named(tmp_path, name, content, message):
    torch.save(content, tmp_path / "enc.pth")
    with pytest.raises(CheckpointError, match=message) as err:
        load_encoder_from_spec(tiny(name), str(tmp_path / "enc.pth"), 256)
    assert "enc.pth" in str(err.value)



def _saved_sit_with(tmp_path, key: str, change):
    """A tiny SiT saved by save_model, then one tensor replaced by change(tensor), metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from repae.weights import save_model

    path = save_model(SiT(tiny_sit_args()), tmp_path / "sit.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    state[key] = change(state[key])
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.to(torch.complex64) + 1j, "wrong kinds of number: x_embedder.proj.weight: file torch.complex64"),
    (lambda t: (t * 100).to(torch.int8), "wrong kinds of number: x_embedder.proj.weight: file torch.int8"),
    (lambda t: t > 0, "wrong kinds of number: x_embedder.proj.weight: file torch.bool"),
    (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "NaN or infinite values in x_embedder.proj.weight"),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "NaN or infinite values in x_embedder.proj.weight"),
])
def test_weights_of_the_wrong_kind_or_not_finite_are_refused(tmp_path, damage, message):
    """Undefended, each loaded: complex with a warning and its imaginary part dropped, int8 and bool cast to
    float silently, NaN and inf kept, for NaN samples later with nothing naming the file."""
    path = _saved_sit_with(tmp_path, "x_embedder.proj.weight", damage)
    with pytest.raises(CheckpointError, match=f"(?s)sit.safetensors.*{message}"):
        load_model(path, kind="sit")


def test_weights_stored_in_another_float_width_still_load(tmp_path):
    path = _saved_sit_with(tmp_path, "x_embedder.proj.weight", lambda t: t.double() + 0.25)
    weight = load_model(path, kind="sit").x_embedder.proj.weight
    assert weight.dtype == torch.float32 and bool((weight >= 0.25 - 1).all())
