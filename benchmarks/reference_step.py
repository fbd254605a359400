"""Images/s and peak memory of the reference implementation's training loop, for the comparison
with `repae bench step` (README, "Benchmarks"). The reference is End2End-Diffusion/REPA-E; its code
is not part of this repository: check it out anywhere and point --ref-dir at it.

    python benchmarks/reference_step.py --ref-dir ../REPA-E --batch 32 --steps 12 [--compile]

It runs the reference's own `train_repae.main()` unmodified, on one process, with offline stand-ins
for what it would download and random data in place of its HDF5 ImageNet (speed does not depend
on weights or pixel values):
- DINOv2 from torch.hub -> the same architecture from timm with random weights, returning the
  patch tokens under the key the reference reads ("x_norm_patchtokens");
- LPIPS's VGG16 ImageNet weights and linear heads -> random weights;
- the SD-VAE checkpoint and its latent statistics -> a random f8d4 VAE saved to --work;
- wandb (imported at module level) -> a stub, and the Accelerator logs nowhere.
Each step is timed at the loop's progress-bar update (after a device synchronisation). The first
two steps are left out: step 1 also samples 64 images (the reference does that at step 1), and
compilation happens in the first steps. Peak memory is torch's max_memory_allocated over the timed
steps, as `repae bench step` reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types


def _install_offline_stand_ins(torch) -> None:
    import timm
    import torchvision

    def hub_load(repo: str, name: str, *args, **kwargs):
        # dinov2_vitb14[_reg] -> timm's vit_base_patch14[_reg4]_dinov2 at 224 px (16x16 patches)
        size = {"s": "small", "b": "base", "l": "large", "g": "giant2"}[name.split("_vit")[1][0]]
        net = timm.create_model(f"vit_{size}_patch14{'_reg4' if name.endswith('_reg') else ''}_dinov2",
                                pretrained=False, img_size=224)
        features = net.forward_features
        net.forward_features = lambda x: {"x_norm_patchtokens": features(x)[:, net.num_prefix_tokens:]}
        return net

    torch.hub.load = hub_load
    vgg16 = torchvision.models.vgg16
    torchvision.models.vgg16 = lambda *a, **k: vgg16(weights=None)
    import accelerate  # noqa: F401  (before the stub: accelerate asks importlib whether wandb exists)

    try:
        import wandb  # noqa: F401
    except ImportError:
        sys.modules["wandb"] = types.SimpleNamespace(Image=lambda *a, **k: None)


class _RandomImages:
    """uint8 [3,H,W] images and labels, from a small pool made once (no decoding cost)."""

    def __init__(self, torch, size: int, pool: int = 64, length: int = 1_000_000):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (pool, 3, size, size), dtype=torch.uint8, generator=gen)
        self.labels = torch.randint(0, 1000, (pool,), generator=gen)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.images[i % len(self.images)], int(self.labels[i % len(self.labels)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-dir", required=True, help="checkout of End2End-Diffusion/REPA-E")
    p.add_argument("--work", default="/tmp/repae-reference-bench", help="scratch: random VAE, logs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="training steps; the first 2 are not timed")
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--compile", action="store_true", help="the reference's default (--compile)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args()

    import torch

    ref_dir = os.path.abspath(args.ref_dir)
    sys.path.insert(0, ref_dir)
    os.makedirs(args.work, exist_ok=True)
    _install_offline_stand_ins(torch)
    import train_repae
    from loss import lpips as ref_lpips
    from models.autoencoder import vae_models

    ref_lpips.LPIPS.load_pretrained = lambda self: None
    vae_path = os.path.join(args.work, "vae-f8d4.pt")
    torch.manual_seed(0)
    torch.save(vae_models["f8d4"]().state_dict(), vae_path)
    torch.save({"latents_scale": torch.ones(1, 4, 1, 1), "latents_bias": torch.zeros(1, 4, 1, 1)},
               vae_path.replace(".pt", "-latents-stats.pt"))
    train_repae.CustomINH5Dataset = lambda data_dir: _RandomImages(torch, 256)

    marks: list = []

    class StepClock:  # stands in for tqdm: one time stamp per finished optimisation step
        def __init__(self, *a, **k):
            pass

        def update(self, n: int = 1) -> None:
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            if len(marks) == 2:  # after step 2: leave out step 1's sampling and compilation
                torch.cuda.reset_peak_memory_stats()

        def set_postfix(self, *a, **k) -> None:
            pass

    class QuietAccelerator(train_repae.Accelerator):  # no experiment tracker: nothing to log to offline
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "log_with": None})

        def init_trackers(self, *a, **k) -> None:
            pass

        def log(self, *a, **k) -> None:
            pass

    train_repae.tqdm = StepClock
    train_repae.Accelerator = QuietAccelerator
    ref_args = train_repae.parse_args([
        "--exp-name", "bench", "--output-dir", args.work, "--report-to", "none",
        "--model", args.model, "--batch-size", str(args.batch), "--max-train-steps", str(args.steps),
        "--checkpointing-steps", str(10 ** 9), "--sampling-steps", str(10 ** 9),
        "--mixed-precision", args.precision, "--vae", "f8d4", "--vae-ckpt", vae_path,
        "--enc-type", "dinov2-vit-b", "--encoder-depth", "8", "--proj-coeff", "0.5",
        "--vae-align-proj-coeff", "1.5", "--num-workers", str(args.num_workers),
        "--loss-cfg-path", os.path.join(ref_dir, "configs/l1_lpips_kl_gan.yaml"),
        "--compile" if args.compile else "--no-compile",
    ])
    cwd = os.getcwd()
    os.chdir(ref_dir)
    try:
        train_repae.main(ref_args)
    finally:
        os.chdir(cwd)
    step_seconds = [b - a for a, b in zip(marks[1:], marks[2:])]
    seconds = statistics.median(step_seconds)
    result = {
        "implementation": "End2End-Diffusion/REPA-E train_repae.py", "model": args.model, "batch": args.batch,
        "precision": args.precision, "compile": args.compile, "device": torch.cuda.get_device_name(),
        "timed_steps": len(step_seconds), "step_seconds_median": seconds, "images_per_s": args.batch / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(), "torch": torch.__version__,
    }
    print(f"reference REPA-E step, {args.model} batch {args.batch}, {args.precision}, compile={args.compile}: "
          f"{seconds * 1e3:.1f} ms median of {len(step_seconds)} steps = {result['images_per_s']:.1f} images/s; "
          f"peak {result['peak_memory_bytes'] / 2**30:.2f} GiB allocated")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
