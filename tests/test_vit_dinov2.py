"""Our ViT equals transformers' Dinov2Model on the same random weights (test extra)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from repae.models.encoder_weights import hf_dinov2_to_hub
from repae.models.vit import ViT, ViTArgs, resample_pos_embed
from repae.weights import load_strict


def _random_hf(swiglu=False, registers=0):
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    config_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56,
                  mlp_ratio=4, use_swiglu_ffn=swiglu, layerscale_value=0.5)
    if registers:
        kwargs["num_register_tokens"] = registers
    model = cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("swiglu,registers", [(False, 0), (True, 0), (False, 4)], ids=["mlp", "swiglu", "reg4"])
def test_patch_tokens_equal_transformers_dinov2(swiglu, registers):
    hf = _random_hf(swiglu, registers)
    ours = ViT(ViTArgs(embed_dim=64, depth=2, num_heads=4, patch_size=14, grid=4, swiglu=swiglu,
                       num_registers=registers))
    load_strict(ours, hf_dinov2_to_hub(hf.state_dict()), "converted Dinov2Model")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        theirs = hf(pixel_values=x).last_hidden_state[:, 1 + registers:]
        mine = ours(x)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_resample_pos_embed_is_timms_antialiased_bicubic():
    """timm's resample_abs_pos_embed (what REPA calls) defaults to bicubic with antialias=True;
    shrinking DINOv2's 37x37 grid to 16x16 without it gives other embeddings."""
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    interp = torch.nn.functional.interpolate
    expected = interp(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 8))
    aliased = interp(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    assert (out[:, 1:] - aliased.permute(0, 2, 3, 1).reshape(1, 256, 8)).abs().max() > 0.1
    assert resample_pos_embed(pos, 37) is pos


def test_resample_pos_embed_without_prefix_tokens():
    pos = torch.randn(1, 16, 4)  # I-JEPA: no CLS entry
    out = resample_pos_embed(pos, 8, num_prefix=0)
    assert out.shape == (1, 64, 4)
    # bicubic upsampling of a constant field is that constant
    const = resample_pos_embed(torch.full((1, 16, 4), 0.25), 8, num_prefix=0)
    torch.testing.assert_close(const, torch.full((1, 64, 4), 0.25))
