"""Alignment encoders: the registry (name -> architecture, weight format, preprocessing, embed
dim), their preprocessing from uint8 images, and loading them from local weight files.

`encoder.names: [dinov2-vit-b]` in a config is all a user writes; `encoder.paths` points at
the weight files (or hub ids, `hf:owner/name[@revision][/file]`, resolved by `repae.hub`). Without a path the file is looked up by its published name under
`$REPAE_WEIGHTS` (default `~/.cache/repae/weights`); a missing file is an error naming it and
where it is published, never a random initialisation.

Preprocessing follows REPA / REPA-E's `preprocess_raw_image` exactly, including its order:
x/255, then ImageNet mean/std, then bicubic resize to 224*res/256 for DINOv2 and I-JEPA;
x/255, bicubic resize, then CLIP mean/std for CLIP; x/255 and ImageNet mean/std only (no
resize) for DINOv1, MoCo v3 and MAE, whose patch-16 grids are already res/16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from repae import hub
from repae.models.encoder_weights import CONVERTERS, read_encoder_file
from repae.models.vit import ViT, ViTArgs, resample_pos_embed
from repae.weights import CheckpointError, load_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    embed_dim: int
    patch_size: int
    # The reference resizes 256px images to 224 for patch-14 encoders (224 * res / 256),
    # and feeds patch-16 encoders the image as is, so both give a res/16 grid.
    resize_to_224: bool
    family: str = "toy"  # dinov2 | dinov1 | mocov3 | mae | jepa | clip | toy
    vit: Optional[ViTArgs] = None  # architecture (grid filled in at load time)
    filename: str = ""  # the published weight file's name
    published_by: str = ""  # where that file comes from, for error messages
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    resize_before_normalize: bool = False  # CLIP's order; DINOv2/I-JEPA normalise first

    def token_grid(self, image_size: int) -> int:
        """Side of the patch-token grid for a square input of `image_size` pixels."""
        return self.input_size(image_size) // self.patch_size

    def input_size(self, image_size: int) -> int:
        """Side of the image the network sees after preprocessing."""
        return 224 * image_size // 256 if self.resize_to_224 else image_size


def _dinov2(size: str, registers: int) -> EncoderSpec:
    dim, depth, heads, swiglu = {"s": (384, 12, 6, False), "b": (768, 12, 12, False),
                                 "l": (1024, 24, 16, False), "g": (1536, 40, 24, True)}[size]
    reg = "_reg4" if registers else ""
    return EncoderSpec(
        f"dinov2{'reg' if registers else ''}-vit-{size}", dim, 14, True, "dinov2",
        ViTArgs(dim, depth, heads, 14, num_registers=registers, swiglu=swiglu),
        f"dinov2_vit{size}14{reg}_pretrain.pth", "facebookresearch/dinov2 (torch hub weights) or hf:facebook/dinov2-*")


def _plain(name: str, family: str, dim: int, depth: int, heads: int, patch: int, filename: str, by: str,
           **vit) -> EncoderSpec:
    args = ViTArgs(dim, depth, heads, patch, layer_scale=False, mask_token=False, **vit)
    return EncoderSpec(name, dim, patch, patch == 14, family, args, filename, by)


_SPECS = {spec.name: spec for spec in [
    *[_dinov2(s, r) for r in (0, 4) for s in "sblg"],
    _plain("dinov1-vit-b", "dinov1", 768, 12, 12, 16, "dino_vitbase16_pretrain.pth", "facebookresearch/dino"),
    # MoCo v3's ViT-S uses 12 heads (as its code and REPA's copy of it do)
    _plain("mocov3-vit-s", "mocov3", 384, 12, 12, 16, "vit-s-300ep.pth.tar", "facebookresearch/moco-v3"),
    _plain("mocov3-vit-b", "mocov3", 768, 12, 12, 16, "vit-b-300ep.pth.tar", "facebookresearch/moco-v3"),
    _plain("mocov3-vit-l", "mocov3", 1024, 24, 16, 16, "vit-l-300ep.pth.tar", "facebookresearch/moco-v3"),
    # MAE's forward_features in REPA returns the last block's tokens without the final norm
    _plain("mae-vit-l", "mae", 1024, 24, 16, 16, "mae_pretrain_vit_large.pth", "facebookresearch/mae",
           final_norm=False),
    _plain("jepa-vit-h", "jepa", 1280, 32, 16, 14, "IN1K-vit.h.14-300e.pth.tar", "facebookresearch/ijepa",
           class_token=False),
    # CLIP: transformer output before ln_post (REPA's UpdatedVisionTransformer), QuickGELU, ln_pre
    replace(_plain("clip-vit-L", "clip", 1024, 24, 16, 14, "ViT-L-14.pt",
                   "openai/CLIP (clip.load cache) or hf:openai/clip-vit-large-patch14", eps=1e-5,
                   patch_bias=False, norm_pre=True, final_norm=False, act="quick_gelu"),
            mean=CLIP_MEAN, std=CLIP_STD, resize_before_normalize=True),
    # Toy world stand-in for DINOv2: 32px images, patch 8 -> 4x4 tokens (built by repae.toyworld).
    EncoderSpec("toy-teacher", 128, 8, False),
]}


def encoder_spec(name: str) -> EncoderSpec:
    """Spec of a registered encoder; KeyError with the known names otherwise."""
    if name not in _SPECS:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(_SPECS)}")
    return _SPECS[name]


def encoder_names() -> List[str]:
    return list(_SPECS)


# --------------------------------------------------------------------- preprocessing


def normalisation(spec: EncoderSpec, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """spec's per-channel mean and std as float32 [1,3,1,1] tensors on `device`. Made from Python
    floats, so on a GPU each is a blocking copy from the host: build them once, not per batch."""
    return (torch.tensor(spec.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(spec.std, device=device).view(1, 3, 1, 1))


def preprocess(images: torch.Tensor, spec: EncoderSpec,
               mean_std: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float [B,3,S,S] as the encoder expects (S = spec.input_size(H)),
    in the reference's order of operations (module docstring). `mean_std`: `normalisation(spec,
    images.device)`, made beforehand (else made here)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"encoders take uint8 images, got {images.dtype}")
    x = images.float() / 255.0
    size = spec.input_size(images.shape[-1])
    mean, std = mean_std if mean_std is not None else normalisation(spec, x.device)

    def resize(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] == size:
            return t
        return F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)

    if spec.resize_before_normalize:
        return (resize(x) - mean) / std
    return resize((x - mean) / std)


# --------------------------------------------------------------------- the module


class AlignmentEncoder(nn.Module):
    """A frozen encoder: uint8 images [B,3,H,W] -> patch features [B,N,D] in fp32, no grad.

    Under the caller's autocast (bf16 in training) the network runs in bf16; features come
    back in fp32 for the REPA loss."""

    def __init__(self, spec: EncoderSpec, network: nn.Module):
        super().__init__()
        self.spec = spec
        self.network = network.eval().requires_grad_(False)
        self.embed_dim = spec.embed_dim
        # per device: made at the first batch there. Not buffers: `.to(dtype)` must not round them
        self._mean_std: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def train(self, mode: bool = True) -> "AlignmentEncoder":
        return super().train(False)  # always eval: frozen

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.device not in self._mean_std:
            self._mean_std[images.device] = normalisation(self.spec, images.device)
        return self.network(preprocess(images, self.spec, self._mean_std[images.device])).float()


def build_network(spec: EncoderSpec, image_size: int) -> ViT:
    """The family's ViT with a position embedding for `image_size` inputs (random weights)."""
    if spec.vit is None:
        raise ValueError(f"encoder {spec.name!r} is not a ViT family encoder")
    return ViT(replace(spec.vit, grid=spec.token_grid(image_size)))


def weights_dir() -> Path:
    return Path(os.environ.get("REPAE_WEIGHTS", Path.home() / ".cache" / "repae" / "weights"))


def _locate(spec: EncoderSpec, path: Optional[str]) -> Path:
    if hub.is_hub_id(path):
        return hub.resolve(path, "encoder")  # a repo: its snapshot directory; a named file: that file
    candidate = Path(path).expanduser() if path else weights_dir() / spec.filename
    if not candidate.exists():
        where = f"encoder path {path}" if path else f"no encoder.paths given and {candidate}"
        raise CheckpointError(f"{spec.name}: {where} does not exist; expected the published file "
                              f"{spec.filename} from {spec.published_by} (or a hf: hub id)")
    return candidate


def load_encoder(name: str, path: Optional[str], image_size: int) -> AlignmentEncoder:
    """Build `name` for `image_size` inputs and load its weights strictly from `path`.

    The file's position embedding is resampled once to the token grid (bicubic, as the
    reference does with timm); CheckpointError names any missing / unexpected key."""
    return load_encoder_from_spec(encoder_spec(name), path, image_size)


def load_encoder_from_spec(spec: EncoderSpec, path: Optional[str], image_size: int) -> AlignmentEncoder:
    """`load_encoder` for an explicit spec (e.g. a registered one with other sizes)."""
    network = build_network(spec, image_size)
    file = _locate(spec, path)
    state = CONVERTERS[spec.family](read_encoder_file(file), str(file))
    if "pos_embed" in state:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], spec.token_grid(image_size), network.num_prefix)
    load_strict(network, state, f"{file} (read as {spec.family} weights)")
    return AlignmentEncoder(spec, network)


def load_encoders(names: Sequence[str], paths: Sequence[str], image_size: int) -> List[AlignmentEncoder]:
    """Several encoders at once (one REPA projector each); `paths` empty or one per name."""
    if paths and len(paths) != len(names):
        raise ValueError(f"encoder.paths has {len(paths)} entries for {len(names)} encoders")
    return [load_encoder(n, paths[i] if paths else None, image_size) for i, n in enumerate(names)]
