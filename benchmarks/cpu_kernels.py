"""Two of the toy step's non-matrix costs on a CPU, against the other ways to compute the same function.

    python benchmarks/cpu_kernels.py [--iters 50] [--out F]

- GELU with the tanh approximation (the SiT's MLP, as the official code has it) at the toy SiT's MLP shape,
  forward and backward: PyTorch's kernel, the exact (erf) GELU for scale, `torch.tanh` against `torch.sigmoid`
  (the tanh form's cost), the same GELU under torch.compile, and x * sigmoid(2u), the identity
  0.5 (1 + tanh u) = sigmoid(2u) written out in torch ops.
- The VAE's GroupNorm + SiLU on its channels-last bf16 activations (toy VAE shapes), forward and backward, four
  ways: in fp32 channels-last (what repae.models.vae.GroupNorm does on a CPU), in fp32 NCHW, in bf16 NCHW, and
  PyTorch's bf16 channels-last kernel.

Each variant's output is compared with the first's (elements that differ, the largest difference), so the table
compares ways of computing one function (the erf GELU, a different function, only for scale). Median milliseconds over `--iters` calls, in this process's
threads (2 here: the CPU toy step's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from repae.bench import median_seconds

GELU_SHAPE = (64, 16, 768)  # toy preset: batch 64, 16 tokens, MLP hidden 4 x 192
GN_SHAPES = [(64, 16, 32, 32), (64, 32, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]  # toy VAE: 8 groups
GROUPS = 8
CPU = torch.device("cpu")
SQRT_2_OVER_PI = (2 / torch.pi) ** 0.5


def median_ms(fn: Callable[[], object], iters: int) -> float:
    return 1e3 * median_seconds(fn, CPU, iters, warmup=3)


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two results of one function are apart: elements that differ, and the largest difference."""
    return {"elements_differing": int((a != b).sum()), "max_abs_difference": float((a.float() - b.float()).abs().max())}


def gelu_sigmoid_form(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x) = 0.5 x (1 + tanh u) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); in fp32."""
    xf = x.float()
    return (xf * torch.sigmoid(xf * (2 * SQRT_2_OVER_PI) * (1 + 0.044715 * xf * xf))).to(x.dtype)


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    leaf = x.detach().requires_grad_(True)
    return lambda: fn(leaf).backward(grad)


def gelu_rows(iters: int) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(GELU_SHAPE, generator=g).to(torch.bfloat16)
    grad = torch.randn(GELU_SHAPE, generator=g).to(torch.bfloat16)
    tanh_gelu = lambda t: F.gelu(t, approximate="tanh")  # noqa: E731
    compiled = torch.compile(tanh_gelu)
    reference = tanh_gelu(x)
    rows = []
    for name, fn in (("gelu tanh (PyTorch)", tanh_gelu), ("gelu tanh, torch.compile", compiled),
                     ("x * sigmoid(2u), torch ops", gelu_sigmoid_form), ("gelu erf (another function)", F.gelu)):
        rows.append({"what": name, "forward_ms": median_ms(lambda: fn(x), iters),
                     "forward_backward_ms": median_ms(_fwd_bwd(fn, x, grad), iters),
                     **difference(fn(x), reference)})
    for name, fn in (("torch.tanh", torch.tanh), ("torch.sigmoid", torch.sigmoid)):
        rows.append({"what": name, "forward_ms": median_ms(lambda: fn(x), iters), "forward_backward_ms": None})
    return rows


def _gn_ways() -> Dict[str, Callable[..., torch.Tensor]]:
    cl = torch.channels_last
    return {
        "fp32 channels-last (repae)": lambda x, w, b: F.group_norm(x.float(), GROUPS, w, b, 1e-6).to(x.dtype),
        "fp32 NCHW": lambda x, w, b: F.group_norm(x.float().contiguous(), GROUPS, w, b, 1e-6).to(
            x.dtype, memory_format=cl),
        "bf16 NCHW": lambda x, w, b: F.group_norm(x.contiguous(), GROUPS, w, b, 1e-6).contiguous(memory_format=cl),
        "bf16 channels-last (PyTorch)": lambda x, w, b: F.group_norm(x, GROUPS, w, b, 1e-6),
    }


def group_norm_rows(iters: int) -> List[dict]:
    rows = []
    for shape in GN_SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
        reference = None
        for name, norm in _gn_ways().items():
            fn = lambda t, norm=norm: F.silu(norm(t, w, b))  # noqa: E731
            out = fn(x)
            reference = out if reference is None else reference
            rows.append({"shape": list(shape), "what": name, "forward_backward_ms": median_ms(_fwd_bwd(fn, x, grad), iters),
                         **difference(out, reference)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result: Dict[str, object] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "gelu": gelu_rows(args.iters), "group_norm_silu": group_norm_rows(args.iters)}
    print(f"{result['threads']} threads, torch {result['torch']}; GELU at {list(GELU_SHAPE)} bf16:")
    for r in result["gelu"]:
        both = "" if r["forward_backward_ms"] is None else f"  fwd+bwd {r['forward_backward_ms']:6.3f} ms"
        same = "" if "elements_differing" not in r else (f"  vs the first: {r['elements_differing']} elements differ, "
                                                         f"by at most {r['max_abs_difference']:.2g}")
        print(f"  {r['what']:30s} fwd {r['forward_ms']:6.3f} ms{both}{same}")
    print(f"GroupNorm ({GROUPS} groups) + SiLU on channels-last bf16, forward + backward:")
    for r in result["group_norm_silu"]:
        print(f"  {str(r['shape']):18s} {r['what']:30s} {r['forward_backward_ms']:6.2f} ms  "
              f"(vs the first: {r['elements_differing']} elements differ, by at most {r['max_abs_difference']:.2g})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
