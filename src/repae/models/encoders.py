"""Alignment encoders: what the config needs to know about each (embed dim, token grid).

The networks and their weight loaders are added by the encoder work (issue 4); this
table is what config validation needs today: the patch grid each encoder produces for
an image size, which must equal the SiT's token grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    embed_dim: int
    patch_size: int
    # The reference resizes 256px images to 224 for patch-14 encoders (224 * res / 256),
    # and feeds patch-16 encoders the image as is, so both give a res/16 grid.
    resize_to_224: bool

    def token_grid(self, image_size: int) -> int:
        """Side of the patch-token grid for a square input of `image_size` pixels."""
        size = 224 * image_size // 256 if self.resize_to_224 else image_size
        return size // self.patch_size


_SPECS = {
    spec.name: spec
    for spec in [
        EncoderSpec("dinov2-vit-s", 384, 14, True),
        EncoderSpec("dinov2-vit-b", 768, 14, True),
        EncoderSpec("dinov2-vit-l", 1024, 14, True),
        EncoderSpec("dinov2-vit-g", 1536, 14, True),
        EncoderSpec("dinov1-vit-b", 768, 16, False),
        EncoderSpec("mocov3-vit-s", 384, 16, False),
        EncoderSpec("mocov3-vit-b", 768, 16, False),
        EncoderSpec("mocov3-vit-l", 1024, 16, False),
        EncoderSpec("clip-vit-L", 1024, 14, True),
        EncoderSpec("mae-vit-l", 1024, 16, False),
        EncoderSpec("jepa-vit-h", 1280, 14, True),
        # Toy world stand-in for DINOv2: 32px images, patch 4 -> 8x8 tokens.
        EncoderSpec("toy-teacher", 128, 4, False),
    ]
}


def encoder_spec(name: str) -> EncoderSpec:
    """Spec of a registered encoder; KeyError with the known names otherwise."""
    if name not in _SPECS:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(_SPECS)}")
    return _SPECS[name]


# ----------------------------------------------------------------------------- DINOv2

DINOV2_SIZES = {  # name suffix -> (embed_dim, depth, heads, swiglu)
    "s": (384, 12, 6, False),
    "b": (768, 12, 12, False),
    "l": (1024, 24, 16, False),
    "g": (1536, 40, 24, True),
}


_HF_LAYER_RENAMES = [  # (old transformers name | transformers>=5 name) -> hub name
    ("attention.output.dense", "attn.proj"), ("attention.o_proj", "attn.proj"),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in", "mlp.w12"), ("mlp.weights_out", "mlp.w3"), ("mlp.down_proj", "mlp.w3"),
]
_HF_FUSED = {  # hub name -> parts to concatenate, in either naming scheme
    "attn.qkv": (["attention.attention.query", "attention.attention.key", "attention.attention.value"],
                 ["attention.q_proj", "attention.k_proj", "attention.v_proj"]),
    "mlp.w12": (["mlp.gate_proj", "mlp.up_proj"],),
}


def hf_dinov2_to_hub(state: dict) -> dict:
    """Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` state dict (either transformers
    naming scheme) -> DINOv2 hub layout (fused qkv and SwiGLU w12, ls*.gamma, blocks.N)."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    embed = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
             "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    out = {embed[k]: v for k, v in state.items() if k in embed}
    fused_parts = {p for schemes in _HF_FUSED.values() for scheme in schemes for p in scheme}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    for i in layers:
        prefix = f"encoder.layer.{i}."
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest.rsplit(".", 1)[0] in fused_parts:
                continue
            for old, new in _HF_LAYER_RENAMES:
                rest = rest.replace(old, new)
            out[f"blocks.{i}.{rest}"] = value
        for hub, schemes in _HF_FUSED.items():
            for scheme in schemes:
                if f"{prefix}{scheme[0]}.weight" in state:
                    for part in ("weight", "bias"):
                        out[f"blocks.{i}.{hub}.{part}"] = torch.cat([state[f"{prefix}{n}.{part}"] for n in scheme])
    return out
