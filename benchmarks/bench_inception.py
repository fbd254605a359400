"""Throughput of FID Inception feature extraction (pool + spatial + logits), random weights.

    python benchmarks/bench_inception.py [--batch 50] [--size 256] [--iters 3] [--device cpu]

Prints images/s for float32 and for bf16 autocast. Input: uint8 [B,3,size,size], resized
inside the network to 299x299 (TF1 bilinear), as for ImageNet-256 samples.
"""

from __future__ import annotations

import argparse
import time

import torch

from repae.models.inception import InceptionV3


def images_per_second(net: InceptionV3, images: torch.Tensor, autocast, iters: int) -> float:
    net(images[:2], autocast=autocast)  # warm-up (allocator, kernels)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        net(images, autocast=autocast)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return iters * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    net = InceptionV3().to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=gen).to(device)
    print(f"InceptionV3 (FID) features, batch {args.batch}, {args.size}px input -> 299px, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        print(f"  {name:14s} {images_per_second(net, images, dtype, args.iters):8.1f} images/s")


if __name__ == "__main__":
    main()
