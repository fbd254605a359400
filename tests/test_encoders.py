"""Alignment encoders: each family's published key layout loads strictly, numbers equal an
independent implementation where one installs here (transformers), preprocessing equals
hand-computed values, and bad files give errors that name the problem."""

from dataclasses import replace

import pytest
import torch

from repae.models.encoders import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, AlignmentEncoder,
                                   encoder_spec, load_encoder, load_encoder_from_spec, load_encoders, preprocess)
from repae.weights import CheckpointError

D, DEPTH, HEADS = 32, 2, 2  # tiny sizes; key names and layouts are the published ones


def tiny(name, **vit):
    spec = encoder_spec(name)
    return replace(spec, embed_dim=D, vit=replace(spec.vit, embed_dim=D, depth=DEPTH, num_heads=HEADS, **vit))


def r(*shape):
    return torch.randn(*shape) * 0.1


def timm_blocks(prefix="", mlp=4 * D):
    """Block keys of timm / DINO / MoCo v3 / MAE / I-JEPA ViTs, written out by name."""
    sd = {}
    for i in range(DEPTH):
        b = f"{prefix}blocks.{i}."
        sd.update({b + "norm1.weight": r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(mlp, D),
                   b + "mlp.fc1.bias": r(mlp), b + "mlp.fc2.weight": r(D, mlp), b + "mlp.fc2.bias": r(D)})
    return sd


def timm_vit(prefix="", patch=16, grid=14, cls=True):
    sd = {f"{prefix}patch_embed.proj.weight": r(D, 3, patch, patch), f"{prefix}patch_embed.proj.bias": r(D),
          f"{prefix}pos_embed": r(1, int(cls) + grid * grid, D), f"{prefix}norm.weight": r(D),
          f"{prefix}norm.bias": r(D), **timm_blocks(prefix)}
    if cls:
        sd[f"{prefix}cls_token"] = r(1, 1, D)
    return sd


def dinov2_hub(registers=0):
    sd = {**timm_vit(patch=14, grid=37), "mask_token": r(1, D)}
    for i in range(DEPTH):
        sd[f"blocks.{i}.ls1.gamma"] = r(D)
        sd[f"blocks.{i}.ls2.gamma"] = r(D)
    if registers:
        sd["register_tokens"] = r(1, registers, D)
    return sd


# --------------------------------------------------------------- strict round trips


FAMILIES = {  # name -> (file content in the published layout, the key our pos_embed came from)
    "dinov2-vit-b": lambda: dinov2_hub(),
    "dinov2reg-vit-b": lambda: dinov2_hub(registers=4),
    "dinov1-vit-b": lambda: timm_vit(),
    "mocov3-vit-b": lambda: {"epoch": 300, "arch": "vit_base", "state_dict": {
        **timm_vit("module.base_encoder."), "module.base_encoder.head.0.weight": r(8, D),
        **timm_vit("module.momentum_encoder."), "module.predictor.0.weight": r(8, 8)}},
    "mae-vit-l": lambda: {"model": timm_vit()},
    "jepa-vit-h": lambda: {"epoch": 300, "encoder": timm_vit("module.", patch=14, grid=16, cls=False),
                           "target_encoder": timm_vit("module.", patch=14, grid=16, cls=False),
                           "predictor": {"module.predictor_embed.weight": r(4, D)}},
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_published_layout_loads_strictly_and_resamples_pos_embed_once(name, tmp_path):
    content = FAMILIES[name]()
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    enc = load_encoder_from_spec(tiny(name), str(path), image_size=256)
    net = enc.network
    grid = 16
    assert net.pos_embed.shape[1] == net.num_prefix + grid * grid
    # the weights that were not resampled arrive unchanged
    flat = content.get("state_dict", content.get("model", content.get("encoder", content)))
    prefix = "module.base_encoder." if name.startswith("mocov3") else "module." if name.startswith("jepa") else ""
    torch.testing.assert_close(net.blocks[1].mlp.fc2.weight, flat[f"{prefix}blocks.1.mlp.fc2.weight"])
    feats = enc(torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8))
    assert feats.shape == (2, grid * grid, D) and feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_mocov3_vit_l_misnamed_keys_are_fixed(tmp_path):
    sd = timm_vit("module.base_encoder.")
    # the published ViT-L file names these four keys wrongly (REPA renames them the same way)
    spec = tiny("mocov3-vit-l")
    spec = replace(spec, vit=replace(spec.vit, depth=15))
    for i in range(DEPTH, 15):
        sd.update({k.replace("blocks.0.", f"blocks.{i}."): v for k, v in timm_blocks("module.base_encoder.").items()
                   if ".blocks.0." in k})
    for old, new in [("blocks.13.norm1", "blocks.13.norm13"), ("blocks.13.mlp.fc1", "blocks.13.mlp.fc13"),
                     ("blocks.14.norm2", "blocks.14.norm14"), ("blocks.14.mlp.fc2", "blocks.14.mlp.fc14")]:
        for part in ("weight", "bias"):
            sd[f"module.base_encoder.{new}.{part}"] = sd.pop(f"module.base_encoder.{old}.{part}")
    torch.save({"state_dict": sd}, tmp_path / "l.pth.tar")
    enc = load_encoder_from_spec(spec, str(tmp_path / "l.pth.tar"), 256)
    torch.testing.assert_close(enc.network.blocks[14].norm2.weight, sd["module.base_encoder.blocks.14.norm14.weight"])


def test_wrong_family_file_names_the_missing_keys(tmp_path):
    torch.save({"model": timm_vit()}, tmp_path / "mae.pth")
    with pytest.raises(CheckpointError) as err:
        load_encoder_from_spec(tiny("dinov2-vit-b"), str(tmp_path / "mae.pth"), 256)
    msg = str(err.value)
    assert "missing keys" in msg and "mask_token" in msg and "blocks.0.ls1.gamma" in msg and "wrong shapes" in msg


def test_unexpected_keys_are_named(tmp_path):
    sd = timm_vit()
    sd["blocks.0.attn.extra"] = r(3)
    torch.save(sd, tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.0.attn.extra"):
        load_encoder_from_spec(tiny("dinov1-vit-b"), str(tmp_path / "dino.pth"), 256)


def test_missing_weight_file_names_the_published_file(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAE_WEIGHTS", str(tmp_path))
    with pytest.raises(CheckpointError, match="dinov2_vitb14_pretrain.pth.*facebookresearch/dinov2"):
        load_encoder("dinov2-vit-b", None, 256)
    with pytest.raises(CheckpointError, match="does not exist.*ViT-L-14.pt"):
        load_encoder("clip-vit-L", str(tmp_path / "nope.pt"), 256)


def test_default_location_is_used_without_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAE_WEIGHTS", str(tmp_path))
    spec = tiny("dinov1-vit-b")
    torch.save(timm_vit(), tmp_path / spec.filename)
    assert isinstance(load_encoder_from_spec(spec, None, 256), AlignmentEncoder)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="hf:facebook/dinov2-base: the repo .* not in the local hub cache"):
        load_encoder("dinov2-vit-b", "hf:facebook/dinov2-base", 256)


def test_full_size_registry_entry_loads(tmp_path):
    """The registry's real DINOv2-S architecture accepts a file of the real shapes (22M params)."""
    spec = encoder_spec("dinov2-vit-s")
    net = load_encoder_from_spec.__globals__["build_network"](spec, 518)  # the hub file's 37x37 grid
    torch.save(net.state_dict(), tmp_path / spec.filename)
    enc = load_encoder("dinov2-vit-s", str(tmp_path / spec.filename), 256)
    assert enc.network.pos_embed.shape == (1, 1 + 256, 384)


def test_several_encoders_at_once(tmp_path):
    torch.save(timm_vit(), tmp_path / "a.pth")
    with pytest.raises(ValueError, match="2 encoders"):
        load_encoders(["dinov1-vit-b", "mae-vit-l"], [str(tmp_path / "a.pth")], 256)


# --------------------------------------------------------------- equal to transformers


transformers = pytest.importorskip("transformers")


def _hf_clip_vision():
    cfg = transformers.CLIPVisionConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=DEPTH,
                                        num_attention_heads=HEADS, image_size=56, patch_size=14,
                                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _hf_to_openai(state):
    """transformers CLIPVisionModel -> OpenAI CLIP `visual.*` names, written out here by hand."""
    s = {k.removeprefix("vision_model."): v for k, v in state.items()}
    out = {"visual.class_embedding": s["embeddings.class_embedding"],
           "visual.conv1.weight": s["embeddings.patch_embedding.weight"],
           "visual.positional_embedding": s["embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": s["pre_layrnorm.weight"], "visual.ln_pre.bias": s["pre_layrnorm.bias"],
           "visual.ln_post.weight": s["post_layernorm.weight"], "visual.ln_post.bias": s["post_layernorm.bias"],
           "visual.proj": r(D, 16), "token_embedding.weight": r(10, 8), "ln_final.weight": r(8)}
    for i in range(DEPTH):
        h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[o + f"attn.in_proj_{part}"] = torch.cat([s[h + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[o + f"attn.out_proj.{part}"] = s[h + f"self_attn.out_proj.{part}"]
            out[o + f"ln_1.{part}"] = s[h + f"layer_norm1.{part}"]
            out[o + f"ln_2.{part}"] = s[h + f"layer_norm2.{part}"]
            out[o + f"mlp.c_fc.{part}"] = s[h + f"mlp.fc1.{part}"]
            out[o + f"mlp.c_proj.{part}"] = s[h + f"mlp.fc2.{part}"]
    return out


def _torchscript_archive(state, path):
    """A TorchScript archive (as OpenAI ships CLIP) holding `state` under the same dotted names."""
    root = torch.nn.Module()
    for key, value in state.items():
        module = root
        for part in key.split(".")[:-1]:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(key.rsplit(".", 1)[-1], torch.nn.Parameter(value.clone()))
    torch.jit.save(torch.jit.script(root), path)


@pytest.mark.parametrize("layout", ["openai", "openai-torchscript", "huggingface"])
def test_clip_equals_transformers_clip_vision(layout, tmp_path, monkeypatch):
    hf = _hf_clip_vision()
    state = _hf_to_openai(hf.state_dict()) if layout.startswith("openai") else hf.state_dict()
    if layout == "openai-torchscript":  # read for its tensors only: torch.jit.load would run its code
        _torchscript_archive(state, tmp_path / "clip.pt")
        monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load called"))
    else:
        torch.save(state, tmp_path / "clip.pt")
    enc = load_encoder_from_spec(tiny("clip-vit-L"), str(tmp_path / "clip.pt"), image_size=64)  # 56px, 4x4
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        theirs = hf(pixel_values=x).last_hidden_state[:, 1:]  # before post_layernorm, as REPA takes it
        mine = enc.network(x)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def _hf_vit():
    cfg = transformers.ViTConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=DEPTH,
                                 num_attention_heads=HEADS, image_size=64, patch_size=16, layer_norm_eps=1e-6,
                                 hidden_act="gelu", qkv_bias=True)
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _hf_vit_to_timm(state):
    """transformers ViTModel -> timm names, in either transformers naming scheme (4.x or 5.x)."""
    s = state
    out = {"cls_token": s["embeddings.cls_token"], "pos_embed": s["embeddings.position_embeddings"],
           "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"]}
    new_scheme = "layers.0.attention.q_proj.weight" in s
    names = ({"qkv": ["attention.q_proj", "attention.k_proj", "attention.v_proj"], "attn.proj": "attention.o_proj",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"} if new_scheme else
             {"qkv": ["attention.attention.query", "attention.attention.key", "attention.attention.value"],
              "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
    names.update({"norm1": "layernorm_before", "norm2": "layernorm_after"})
    for i in range(DEPTH):
        h = f"layers.{i}." if new_scheme else f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([s[h + f"{n}.{part}"] for n in names["qkv"]])
            for ours, theirs in names.items():
                if ours != "qkv":
                    out[f"blocks.{i}.{ours}.{part}"] = s[h + f"{theirs}.{part}"]
    return out


@pytest.mark.parametrize("name", ["dinov1-vit-b", "mocov3-vit-b", "mae-vit-l"])
def test_timm_family_equals_transformers_vit(name, tmp_path):
    hf = _hf_vit()
    state = _hf_vit_to_timm(hf.state_dict())
    content = {"dinov1-vit-b": state, "mocov3-vit-b": {"state_dict": {f"module.base_encoder.{k}": v
                                                                      for k, v in state.items()}},
               "mae-vit-l": {"model": state}}[name]
    torch.save(content, tmp_path / "w.pth")
    enc = load_encoder_from_spec(tiny(name), str(tmp_path / "w.pth"), image_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        mine = enc.network(x)
    # MAE's features skip the final norm; the others are the normed last layer
    theirs = (out.hidden_states[-1] if name == "mae-vit-l" else out.last_hidden_state)[:, 1:]
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_huggingface_dinov2_directory_loads(tmp_path):
    cfg = transformers.Dinov2Config(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                    patch_size=14, image_size=518, mlp_ratio=4, layerscale_value=0.5)
    hf = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "dinov2")
    enc = load_encoder_from_spec(tiny("dinov2-vit-b"), str(tmp_path / "dinov2"), image_size=256)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():  # HF interpolates its 37x37 grid on the fly (bicubic, other rules): loose check
        theirs = hf(pixel_values=preprocess(images, enc.spec)).last_hidden_state[:, 1:]
    mine = enc(images)
    assert torch.nn.functional.cosine_similarity(mine, theirs, dim=-1).mean() > 0.9


# --------------------------------------------------------------- preprocessing


def _two_halves(size):
    img = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    img[..., size // 2:] = 255
    return img


@pytest.mark.parametrize("name,size,expected_side", [
    ("dinov2-vit-b", 256, 224), ("dinov2-vit-b", 512, 448), ("jepa-vit-h", 256, 224), ("clip-vit-L", 256, 224),
    ("dinov1-vit-b", 256, 256), ("mocov3-vit-b", 256, 256), ("mae-vit-l", 512, 512)])
def test_preprocessing_hand_computed(name, size, expected_side):
    spec = encoder_spec(name)
    out = preprocess(_two_halves(size), spec)
    assert out.shape == (1, 3, expected_side, expected_side)
    mean, std = (CLIP_MEAN, CLIP_STD) if name.startswith("clip") else (IMAGENET_MEAN, IMAGENET_STD)
    for c in range(3):  # far from the edge the bicubic resize leaves each half's value exactly
        assert out[0, c, 5, 3].item() == pytest.approx((0.0 - mean[c]) / std[c], abs=1e-5)
        assert out[0, c, 5, -3].item() == pytest.approx((1.0 - mean[c]) / std[c], abs=1e-5)
    assert spec.token_grid(size) == size // 16


def test_preprocessing_is_bicubic_without_antialias():
    """The reference calls F.interpolate(x, 224, mode='bicubic'): align_corners False, no antialias."""
    img = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    spec = encoder_spec("dinov2-vit-b")
    normed = (img.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = torch.nn.functional.interpolate(normed, size=(224, 224), mode="bicubic", align_corners=False)
    torch.testing.assert_close(preprocess(img, spec), expected)
    with pytest.raises(TypeError, match="uint8"):
        preprocess(img.float(), spec)


def test_encoder_makes_its_normalisation_once_per_device():
    """`torch.tensor(floats, device=cuda)` is a blocking copy from the host: built per batch, the mean and
    std made the GPU drain its queue twice a step. The encoder keeps them per device; its output is the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from repae.models.encoders import build_network

    class HostData(TorchDispatchMode):  # torch.tensor(python data) reaches the dispatcher as lift_fresh
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.made += func.overloadpacket is torch.ops.aten.lift_fresh
            return func(*args, **(kwargs or {}))

    spec = tiny("dinov2-vit-b")
    encoder = AlignmentEncoder(spec, build_network(spec, 64))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    first = encoder(images)
    with HostData() as second_call:
        again = encoder(images)
    assert second_call.made == 0
    assert torch.equal(again, first)
    assert torch.equal(first, encoder.network(preprocess(images, spec)).float())
