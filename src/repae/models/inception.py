"""InceptionV3 as the FID/sFID/IS evaluators use it ("2015-12-05" TF graph), in plain torch.

Weights: the PyTorch port of the TF FID graph, `pt_inception-2015-12-05-6726825d.pth`
(mseitzer/pytorch-fid, GitHub release `fid_weights`). Architecture and state-dict key names are
those of pytorch-fid's `fid_inception_v3()`: torchvision's `Inception3` layout with 1008 classes,
no auxiliary classifier, and the TF-specific blocks (the average pool inside Mixed_5b..7b ignores
padded zeros, `count_include_pad=False`; Mixed_7c's pool branch is a *max* pool; BatchNorm eps
1e-3). Keys per conv layer: `<layer>.conv.weight`, `<layer>.bn.{weight,bias,running_mean,
running_var}`; plus `fc.weight` [1008,2048], `fc.bias` [1008]: 94 conv layers, 472 tensors.
Our BatchNorm is a frozen affine (buffers only), so the module holds no `num_batches_tracked`:
the TF graph has no such counter, and the published converter of these weights (torch-fidelity
`utils/util_convert_inception_weights.py`, whose output torch-fidelity hosts under the same
name suffix, `weights-inception-2015-12-05-6726825d.pth`) writes exactly the 472 tensors above
and none. (The file itself could not be inspected here: no network.) So that either form loads,
`from_file` drops `*.num_batches_tracked` entries if a copy carries them (a torchvision-style
`state_dict()` would; they never affect inference) and is strict about every other key and shape.

Preprocessing (owned here; input is uint8 [B,3,H,W], any H and W), chosen to reproduce what the
ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) feeds the TF graph. ADM maps
its float32 NHWC batch (0..255) onto the graph node `ExpandDims:0`; the graph then runs
`ResizeBilinear` to 299x299, `Sub` 128 and `Mul` 1/128 before the first conv. So:
1. resize to 299x299 with **TF1 `resize_bilinear`, align_corners=False, no half-pixel centres**:
   output pixel i samples input coordinate `i * (in/out)` (scale in float32), lower index
   `floor`, upper `min(lower+1, in-1)`, linear weights; x is interpolated first, then y, as the
   TF kernel does. This is NOT torch's `interpolate(..., align_corners=False)`, which samples at
   `(i+0.5)*in/out-0.5` (half-pixel centres); pytorch-fid uses the latter, torch-fidelity
   implements the former (`interpolate_bilinear_2d_like_tensorflow1x`) to match TF FID. No
   antialiasing, like TF1. Done in float32 on the 0..255 values, as in the graph.
2. `(x - 128) / 128` (exactly the graph's `(x - 128) * 0.0078125`: dividing by a power of two).

Outputs of one forward (`InceptionOutput`, all float32):
- `pool` [B,2048]: TF `pool_3:0`, the global average pool after Mixed_7c (FID, precision/recall).
- `spatial` [B,2023]: the ADM sFID features, TF `mixed_6/conv:0`, first 7 channels, flattened.
  Which layer that is: the graph names its 11 mixed blocks mixed, mixed_1 ... mixed_10, in order
  Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c (the weight converter's table maps
  `mixed_6/conv/conv2d_params` -> `Mixed_6d.branch1x1.conv`; 6b (c7=128) and 6e (c7=192) pin the
  order by shape). Inside a block, `conv` is the 1x1 branch (`tower*` are the others). In this
  graph a layer scope `X` holds `X/conv2d_params`, `X/Conv2D`, `X/batchnorm` (+ its constants),
  `X/CheckNumerics`, `X/control_dependency`, and the op named `X` itself is the layer's output
  after the ReLU (the op list of classify_image_graph_def.pb shows nothing else in the scope,
  and the port reproduces pool_3 only with conv->BN->ReLU). So `mixed_6/conv:0` is the
  **post-BN, post-ReLU output of `Mixed_6d.branch1x1`**, [B,17,17,192] in TF's NHWC. ADM keeps
  `[..., :7]` and reshapes to [B, 17*17*7] in NHWC (h, w, c) order; we take channels 0..6 of
  our NCHW map and permute to NHWC before flattening, so element (h*17 + w)*7 + c matches.
- `logits` [B,1008]: what ADM's IS softmax is applied to. ADM takes the weight input of the
  graph node `softmax/logits/MatMul` and computes `softmax(pool_3 @ W)`: **no bias**. W is our
  `fc.weight.T`, so `logits = pool @ fc.weight.T` (torch-fidelity calls this `logits_unbiased`).

Mixed precision: `forward(x, autocast=torch.bfloat16)` runs the conv trunk under autocast;
resizing, normalisation and the logits stay float32 and every output is returned as float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
NUM_CLASSES = 1008
SFID_CHANNELS = 7
POOL_DIM = 2048  # pool_3 features (FID, precision/recall)
SPATIAL_DIM = 17 * 17 * SFID_CHANNELS  # mixed_6/conv[..., :7] flattened (sFID): 2023
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE

Size2 = Union[int, Tuple[int, int]]


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weight file is missing."""


class InceptionOutput(NamedTuple):
    pool: torch.Tensor  # [B, 2048] float32, TF pool_3
    spatial: torch.Tensor  # [B, 17*17*7] float32, TF mixed_6/conv[..., :7] flattened in HWC order
    logits: torch.Tensor  # [B, 1008] float32, pool @ softmax weights (no bias), as ADM's IS


# ----------------------------------------------------------------------------- preprocessing


def _tf1_axis(in_size: int, out_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (lower, upper) [out] and lerp weights [out] of TF1 resize_bilinear on one axis
    (align_corners=False, half_pixel_centers=False): source coordinate = i * (in/out) in float32."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lower = src.floor()
    upper = torch.clamp(lower + 1, max=in_size - 1)
    frac = src - lower
    return lower.long().to(device), upper.long().to(device), frac.to(device)


def resize_bilinear_tf1(x: torch.Tensor, size: Size2) -> torch.Tensor:
    """TF1 `tf.image.resize_bilinear(align_corners=False)` of float x [B,C,H,W] -> [B,C,h,w].

    Interpolates along x (width) first on the two source rows, then along y, in x's dtype."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = x.shape[-2:]
    y0, y1, fy = _tf1_axis(in_h, out_h, x.device)
    x0, x1, fx = _tf1_axis(in_w, out_w, x.device)
    fx, fy = fx.to(x.dtype), fy.to(x.dtype)
    top, bottom = x[..., y0, :], x[..., y1, :]  # [B,C,h,W]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx  # [B,C,h,w]
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 [B,3,299,299] in [-1, 127/128], as the TF graph's input ops."""
    if images.dtype != torch.uint8:
        raise TypeError(f"InceptionV3 expects uint8 images [B,3,H,W], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"InceptionV3 expects images [B,3,H,W], got shape {tuple(images.shape)}")
    x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
    return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------- layers


class FrozenBatchNorm2d(nn.Module):
    """Inference BatchNorm (running statistics, eps 1e-3); state keys weight, bias, running_mean,
    running_var, and no num_batches_tracked. Computes in the input's dtype."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU; one TF layer scope (its output is the ReLU)."""

    def __init__(self, cin: int, cout: int, kernel: Size2, stride: int = 1, padding: Size2 = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3/1 SAME average pool that, like TF, divides by the number of real (unpadded) inputs."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (TF mixed, mixed_1, mixed_2): 35x35."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a (TF mixed_3): 35x35 -> 17x17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (TF mixed_4 .. mixed_7): 17x17, factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward_with_1x1(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(block output [B,768,17,17], the 1x1 branch output [B,192,17,17] = TF `<block>/conv`)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(d)))
        return torch.cat([b1, b7, d, self.branch_pool(_avg_pool_tf(x))], 1), b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_1x1(x)[0]


class InceptionD(nn.Module):
    """Mixed_7a (TF mixed_8): 17x17 -> 8x8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c (TF mixed_9 / mixed_10): 8x8. The FID graph's Mixed_7c pools with *max*."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


# ----------------------------------------------------------------------------- network


class InceptionV3(nn.Module):
    """FID InceptionV3. forward(uint8 [B,3,H,W]) -> InceptionOutput(pool, spatial, logits), float32.

    Random weights until loaded: use `InceptionV3.from_file(path)` for real metrics."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionV3":
        return super().train(False)  # a fixed metric network: always in inference mode

    def trunk(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised x [B,3,299,299] -> (pool_3 [B,2048], Mixed_6d 1x1 branch [B,192,17,17])."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)  # [B,64,73,73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)  # [B,192,35,35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [B,288,35,35]
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # [B,768,17,17]
        x, mixed_6_conv = self.Mixed_6d.forward_with_1x1(x)  # TF mixed_6 and mixed_6/conv
        x = self.Mixed_7a(self.Mixed_6e(x))  # [B,1280,8,8]
        x = self.Mixed_7c(self.Mixed_7b(x))  # [B,2048,8,8]
        return x.mean(dim=(2, 3)), mixed_6_conv

    @torch.no_grad()
    def forward(self, images: torch.Tensor, autocast: Optional[torch.dtype] = None) -> InceptionOutput:
        """images: uint8 [B,3,H,W]. autocast: e.g. torch.bfloat16 to run the trunk in mixed precision."""
        x = preprocess(images)
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            pool, mixed_6_conv = self.trunk(x)
        pool = pool.float()
        spatial = mixed_6_conv[:, :SFID_CHANNELS].float().permute(0, 2, 3, 1).reshape(len(pool), -1)
        logits = pool @ self.fc.weight.float().t()  # no bias: ADM multiplies by the softmax weights only
        return InceptionOutput(pool=pool, spatial=spatial, logits=logits)

    @classmethod
    def from_file(cls, path: Optional[Union[str, os.PathLike]]) -> "InceptionV3":
        """Load the FID weights (`pt_inception-2015-12-05-6726825d.pth`) strictly from a local file or hub id."""
        from repae.hub import local_path
        from repae.weights import CheckpointError, load_strict, read_file

        path = local_path(path, "inception")
        if not path or not Path(path).is_file():
            raise InceptionWeightsError(
                f"the FID Inception network needs the weight file {WEIGHTS_FILE} (pytorch-fid's port of the "
                f"TF 2015-12-05 Inception graph, from its GitHub release: {WEIGHTS_URL}); "
                + (f"not found: {path}" if path else "no path was given")
            )
        state = read_file(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not the Inception state dict")
        # keys that are not names stay in the dict for load_strict to list
        dropped: List[str] = [k for k in state if isinstance(k, str) and k.endswith(".num_batches_tracked")]
        state = {k: v for k, v in state.items() if k not in dropped}
        return load_strict(cls(), state, str(path))
