"""Alignment encoders: what the config needs to know about each (embed dim, token grid).

The networks and their weight loaders are added by the encoder work (issue 4); this
table is what config validation needs today: the patch grid each encoder produces for
an image size, which must equal the SiT's token grid.
"""

from __future__ import annotations

from dataclasses import dataclass


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
