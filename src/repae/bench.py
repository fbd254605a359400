"""`repae bench step|sample|evaluate`: throughput, a per-part breakdown, FLOPs and how close
the machine's measured matmul peak they come.

Models are built at the config's sizes with random weights (no weight file is needed), fed
random uint8 images: speed does not depend on the values. Each timing is the median of
`iters` runs after `warmup` runs, with the device synchronised around it.

    repae bench step --preset toy                  # full REPA-E step + parts, FLOPs, peak memory
    repae bench step --preset sit-b2-f8d4 train.global_batch_size=8
    repae bench sample --preset toy                # images/s: ODE-50 / SDE-250, with and without CFG
    repae bench evaluate                           # Inception feature extraction images/s
    repae bench loop --preset toy                  # the training loop itself (repae.bench_loop)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time
from typing import Callable, Dict, Optional

import torch

from repae.cli import NON_NEGATIVE, POSITIVE, SEED, UsageError, bounded, out_file
from repae.config import RunConfig
from repae.nn_utils import autocast, autocast_dtype, compile_for_sampling, init_device, resolve_precision


# ------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int = 5, warmup: int = 2) -> float:
    """Median wall time of fn() over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: Optional[int] = None) -> float:
    """Measured dense matmul FLOP/s of this device in `dtype` (the roofline we compare against)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, iters=5, warmup=2)
    return 2 * n**3 / seconds


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one fn() call (matmuls, convolutions, attention; forward and backward), counted on eager
    code. torch.compile'd modules run eagerly here on purpose (set_stance "force_eager"): dynamo does not
    trace under the counter's dispatch mode, and a compiled module it meets there is skipped from then on,
    running eagerly for the rest of the process; every timing after a FLOP count would then be of eager
    code (found with torch 2.13; tests/test_bench.py shows it)."""
    from torch.utils.flop_counter import FlopCounterMode

    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6 (pyproject allows 2.2)
    with stance("force_eager") if stance else contextlib.nullcontext(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated by torch. CPU: the process's peak resident set (everything it holds)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------ models


def random_trainables(cfg: RunConfig, device: torch.device):
    """The run's trainables at the config's sizes with random weights (encoders included)."""
    from repae.build import build_sit, uses_repa, vae_args
    from repae.losses import VAERegulariser
    from repae.models.encoders import AlignmentEncoder, build_network, encoder_spec
    from repae.models.lpips import LPIPS
    from repae.models.toy_teacher import ToyTeacher
    from repae.models.vae import AutoencoderKL
    from repae.train.setup import make_trainables

    torch.manual_seed(0)
    encoders = []
    if uses_repa(cfg):
        for name in cfg.encoder.names:
            spec = encoder_spec(name)
            encoders.append(ToyTeacher(layout=True) if name == "toy-teacher"
                            else AlignmentEncoder(spec, build_network(spec, cfg.data.image_size)))
    regulariser = None
    if cfg.train.tune_vae and cfg.train.use_reg_loss:
        regulariser = VAERegulariser(cfg.loss, lpips=LPIPS() if cfg.loss.lpips_weight > 0 else None)
    sit, vae = build_sit(cfg), AutoencoderKL(vae_args(cfg))
    for module in (sit, vae, regulariser, *encoders):
        if module is not None:
            module.to(device)
    return make_trainables(cfg, sit, vae, [e.to(device) for e in encoders], regulariser)


def _batch(cfg: RunConfig, device: torch.device, n: int):
    gen = torch.Generator().manual_seed(0)
    size = cfg.data.image_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, cfg.model.num_classes, (n,), generator=gen).to(device)
    return images, labels


# ------------------------------------------------------------------------------ bench step


def step_parts(m, cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor,
               gen: torch.Generator) -> Dict[str, Callable[[], object]]:
    """One closure per mechanism of the step, each a forward (+ backward where it trains)."""
    from repae.pixels import to_vae_range
    from repae.train.step import (alignment_loss_for_vae, draw_step_noise, sit_losses, teacher_features,
                                  uses_alignment)

    x = to_vae_range(images)
    draws = draw_step_noise(m, x, cfg, gen)
    feats = teacher_features(m.encoders, images) if uses_alignment(cfg) else []
    with torch.no_grad():
        z = m.vae.encode(x).mean.float()
        recon = m.vae.decode(z).float()
    t, noise = draws["t"], draws["noise"]
    parts: Dict[str, Callable[[], object]] = {}
    if m.encoders:
        parts["encoder (no grad)"] = lambda: teacher_features(m.encoders, images)

    def vae_fwd_bwd():
        _, z_s, rec = m.vae(x, noise=draws["posterior"], decode=True)
        (rec.float().abs().mean() + z_s.float().pow(2).mean()).backward()

    if cfg.train.tune_vae:
        parts["VAE fwd+bwd"] = vae_fwd_bwd
    reg = m.regulariser
    if reg is not None and reg.lpips is not None:
        parts["LPIPS fwd+bwd"] = lambda: reg.lpips(x, recon.clone().requires_grad_()).mean().backward()
    if reg is not None and cfg.loss.gan_weight > 0:
        parts["discriminator fwd+bwd"] = lambda: reg.discriminator_terms(x, recon)["total"].backward()
    if cfg.train.tune_vae and cfg.loss.vae_align_proj_coeff > 0:
        parts["alignment pass fwd+bwd"] = lambda: alignment_loss_for_vae(
            m.sit, z.clone().requires_grad_(), t, noise, labels, feats, cfg).backward()
    parts["SiT fwd+bwd"] = lambda: sum(sit_losses(m.sit, z, t, noise, labels, feats, cfg).values()).backward()

    def optimisers():
        for opt in (m.sit_opt, m.vae_opt, m.disc_opt):
            if opt is not None:
                opt.step()

    parts["optimisers"] = optimisers
    parts["EMA update"] = lambda: m.ema.update(m.sit)
    return parts


def in_own_autocast(fn: Callable[[], object], cfg: RunConfig, device: torch.device) -> Callable[[], object]:
    """fn, run under a bf16 autocast context of its own (where the config resolves to bf16), as the training
    loop enters one per step. Inside one context autocast keeps its bf16 copies of the weights: calls sharing
    a context would skip those casts, and after an optimiser update would compute with the old weights."""
    def run():
        with autocast(cfg.train.precision, device):
            return fn()
    return run


def time_parts(m, cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
               iters: int = 5, warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each part of `step_parts` on one micro-batch, each call under the run's autocast
    (`in_own_autocast`; call this outside any); the gradients the parts leave behind are cleared afterwards."""
    device = images.device
    parts = in_own_autocast(lambda: step_parts(m, cfg, images, labels, gen), cfg, device)()
    seconds = {name: median_seconds(in_own_autocast(fn, cfg, device), device, iters, warmup)
               for name, fn in parts.items()}
    for opt in (m.sit_opt, m.vae_opt, m.disc_opt):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    return seconds


def step_setup(cfg: RunConfig, device: torch.device):
    """What `bench step` times: the trainables with random weights, a random global batch split into the
    config's micro-batches, the step's generator, and one full REPA-E step (the next step number at each call)
    under an autocast context of its own, as in training. Returns (m, batches, gen, full_step)."""
    m = random_trainables(cfg, device)
    n = cfg.train.global_batch_size
    images, labels = _batch(cfg, device, n)
    micro = n // cfg.train.grad_accum_steps
    batches = [(images[i:i + micro], labels[i:i + micro]) for i in range(0, n, micro)]
    gen = torch.Generator(device).manual_seed(0)
    return m, batches, gen, full_steps(m, batches, cfg, gen, device)


def full_steps(m, batches: list, cfg: RunConfig, gen: torch.Generator, device: torch.device,
               first_step: int = 0) -> Callable[[], None]:
    """A callable that runs one full REPA-E step on `batches` (micro-batches on the device) per call, the step
    number counting up from `first_step`, under an autocast context of its own, as in training."""
    from repae.train.step import repae_step

    step = {"i": first_step}

    def one_step() -> None:
        repae_step(m, batches, cfg, step["i"], gen)
        step["i"] += 1

    return in_own_autocast(one_step, cfg, device)


def bench_step(cfg: RunConfig, device: torch.device, iters: int = 5, warmup: int = 2) -> dict:
    """images/s of the full REPA-E step, per-part seconds, FLOPs/image, FLOP/s vs matmul peak, memory."""
    from repae.train.setup import compile_settings, conv_layouts

    m, batches, gen, full_step = step_setup(cfg, device)
    n = cfg.train.global_batch_size
    part_seconds = time_parts(m, cfg, batches[0][0], batches[0][1], gen, iters, warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(full_step, device, iters, warmup)
    flops = count_flops(full_step)
    precision = resolve_precision(cfg.train.precision, device)
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    achieved = flops / seconds
    return {
        "preset": cfg.preset, "device": str(device), "precision": precision,
        **compile_settings(cfg, device), "layout": conv_layouts(cfg, device),
        "threads": torch.get_num_threads(), "global_batch": n, "grad_accum_steps": cfg.train.grad_accum_steps,
        "step_seconds": seconds, "images_per_s": n / seconds,
        "parts_seconds_per_micro_batch": part_seconds,
        "flops_per_image": flops / n, "achieved_flops": achieved, "matmul_peak_flops": peak,
        "fraction_of_peak": achieved / peak, "peak_memory_bytes": peak_memory_bytes(device),
        "params": {"sit": sum(p.numel() for p in m.sit.parameters()),
                   "vae": sum(p.numel() for p in m.vae.parameters())},
    }


def _print_step(r: dict) -> None:
    print(f"REPA-E step, preset {r['preset']}, {r['device']} ({r['threads']} threads), {r['precision']}, "
          f"global batch {r['global_batch']} (accum {r['grad_accum_steps']})")
    print(f"  full step        {r['step_seconds'] * 1e3:9.1f} ms   {r['images_per_s']:8.1f} images/s")
    total = sum(r["parts_seconds_per_micro_batch"].values())
    for name, sec in r["parts_seconds_per_micro_batch"].items():
        print(f"  {name:24s} {sec * 1e3:9.1f} ms  ({100 * sec / total:4.1f}% of parts)")
    print(f"  FLOPs/image {r['flops_per_image'] / 1e9:.3f} GFLOP; achieved {r['achieved_flops'] / 1e9:.1f} GFLOP/s "
          f"= {100 * r['fraction_of_peak']:.1f}% of the measured {r['precision']} matmul peak "
          f"({r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")
    print(f"  peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB "
          f"({'CUDA allocated' if 'cuda' in r['device'] else 'process RSS'})")


# ------------------------------------------------------------------------------ bench sample / evaluate


def parse_modes(specs) -> list:
    """['ode-50:1', 'sde-250:4', 'sde-250:2.2:0-0.65'] -> [('ode', 50, 1.0, None), ('sde', 250, 4.0, None),
    ('sde', 250, 2.2, (0.0, 0.65))]: sampler, steps, CFG scale, and the guidance interval [low, high] of t
    where CFG applies (None: sample.guidance_low/high)."""
    out = []
    for spec in specs:
        try:
            sampler, rest = spec.split("-", 1)
            steps, scale, *interval = rest.split(":") if ":" in rest else (rest, "1")
            if sampler not in ("ode", "sde") or int(steps) < 1 or not 0 <= float(scale) <= 1000 or len(interval) > 1:
                raise ValueError
            low_high = None
            if interval:
                low, high = (float(v) for v in interval[0].split("-"))
                if not 0 <= low <= high <= 1:
                    raise ValueError
                low_high = (low, high)
            out.append((sampler, int(steps), float(scale), low_high))
        except ValueError:
            raise UsageError(f"--modes {spec!r}: expected ode-STEPS:CFG or sde-STEPS:CFG with STEPS >= 1 and "
                             "CFG in [0, 1000], e.g. sde-250:4, optionally :LOW-HIGH, the interval of t where CFG "
                             "applies (0 <= LOW <= HIGH <= 1), e.g. sde-250:2.2:0-0.65") from None
    return out


# sampler steps of bench sample's warm-up run: enough for both guided and unguided steps to occur
# under any guidance interval wider than a tenth of [0, 1]
WARMUP_SAMPLER_STEPS = 12


def bench_sample(cfg: RunConfig, device: torch.device, num_samples: Optional[int] = None,
                 modes: Optional[list] = None) -> dict:
    """images/s of generation (sampler + decode): by default ODE-50 and SDE-250, without and with CFG;
    `modes`: [(sampler, steps, cfg scale[, guidance interval (low, high) or None])] instead (`parse_modes`).
    A mode with its own interval is keyed "... interval LOW-HIGH"; the others use sample.guidance_low/high
    (`guidance_interval` in the result). One process for every mode: sample.compile compiles once.
    `peak_memory_bytes`: after every mode (on a CPU the whole process's peak, as `bench step`'s)."""
    from repae.build import build_sit, vae_args
    from repae.generate import generate_images
    from repae.models.vae import AutoencoderKL

    torch.manual_seed(0)
    sit, vae = build_sit(cfg).to(device).eval(), AutoencoderKL(vae_args(cfg)).to(device).eval()
    if cfg.sample.compile:
        compile_for_sampling(sit, vae, cfg.sample.compile_mode)
    n = cfg.sample.batch_size if num_samples is None else num_samples
    labels = torch.arange(n) % cfg.model.num_classes
    guided = cfg.sample.cfg_scale if cfg.sample.cfg_scale != 1.0 else 4.0
    out = {"preset": cfg.preset, "device": str(device), "samples": n, "compile": cfg.sample.compile,
           "compile_mode": cfg.sample.compile_mode if cfg.sample.compile else None,
           "guidance_interval": [cfg.sample.guidance_low, cfg.sample.guidance_high], "images_per_s": {}}
    modes = modes or [(mode, steps, scale) for mode, steps in (("ode", 50), ("sde", 250)) for scale in (1.0, guided)]
    for mode, steps, scale, *own in modes:
        interval = own[0] if own else None  # the mode's own guidance interval, else the config's
        low, high = interval or (cfg.sample.guidance_low, cfg.sample.guidance_high)

        def run(num_steps: int):
            return generate_images(
                sit, vae, labels, mode=mode, num_steps=num_steps, cfg_scale=scale, batch_size=n, progress=False,
                guidance_low=low, guidance_high=high, autocast_dtype=autocast_dtype(cfg.train.precision, device))

        if device.type == "cuda" or cfg.sample.compile:
            # one short untimed run first, with the timed run's shapes (guided and unguided steps alike):
            # a first call pays for cuDNN/cuBLAS set-up (an H100 run that timed it gave SiT-XL/2 ODE-50 at
            # 11 images/s, ~1/3 of what its FLOPs allow), and sample.compile compiles there
            run(min(steps, WARMUP_SAMPLER_STEPS))
        seconds = median_seconds(lambda: run(steps), device, iters=1, warmup=0)
        key = f"{mode}-{steps} cfg {scale:g}" + (f" interval {low:g}-{high:g}" if interval else "")
        out["images_per_s"][key] = n / seconds
    # whether a larger batch would still fit: issue 19 asks for images/s that rise with the batch up to the memory
    # limit. The largest mode sets it (CFG doubles the SiT's batch; the decoder sees the whole batch at once).
    out["peak_memory_bytes"] = peak_memory_bytes(device)
    out["peak_memory_kind"] = ("cuda max_memory_allocated, models included" if device.type == "cuda"
                               else "the process's peak resident set")
    return out


def bench_evaluate(device: torch.device, batch: int = 50, size: int = 256, iters: int = 3) -> dict:
    """images/s of FID Inception feature extraction (pool, spatial, logits) on size-px uint8 images."""
    from repae.models.inception import InceptionV3

    net = InceptionV3().to(device).eval()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    out = {"device": str(device), "batch": batch, "input_size": size, "images_per_s": {}}
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        with torch.no_grad():
            seconds = median_seconds(lambda: net(images, autocast=dtype), device, iters=iters, warmup=1)
        out["images_per_s"][name] = batch / seconds
    return out


# ------------------------------------------------------------------------------ CLI


def arm_name(text: str) -> str:
    """An argparse `type=` for --arms: nargs="+" would also take the key=value overrides that follow it."""
    if "=" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not an arm name: put key=value overrides before --arms")
    return text


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks: step | loop | sample | evaluate; reproduce: the paper's "
                                     "claims on the toy world or your data and weights (REPRODUCTION.md)")
    p.add_argument("what", choices=["step", "loop", "sample", "evaluate", "reproduce"],
                   help="step: one REPA-E training step and its parts; loop: the training loop; sample: "
                        "generation; evaluate: Inception features; reproduce: the paper's claims, measured")
    p.add_argument("--preset", default="toy", help="starting preset (default: toy); see `repae config --list`")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file(s) merged in order")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. "
                                                                     "train.global_batch_size=8")
    p.add_argument("--iters", type=NON_NEGATIVE, default=5, help="timed repetitions (median reported); loop: of "
                                                                 "each part of the step breakdown (0: no breakdown)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="untimed runs first; loop: untimed first steps")
    p.add_argument("--samples", type=POSITIVE, help="bench sample: how many images (default sample.batch_size); "
                                               "reproduce: class-balanced samples per measurement")
    p.add_argument("--modes", nargs="+", metavar="MODE-STEPS:CFG[:LOW-HIGH]",
                   help="bench sample: which samplers, e.g. ode-50:1 sde-250:4 sde-250:2.2:0-0.65 (the last: CFG only "
                        "for t in [0, 0.65]; without it, sample.guidance_low/high) (default: ODE-50 and SDE-250, each "
                        "without CFG and with sample.cfg_scale or 4)")
    p.add_argument("--step-iters", type=NON_NEGATIVE, default=0,
                   help="bench loop: after the loop, also time this many full steps on a batch already on the device, "
                        "as bench step does, in the same process: a compiled run reuses the loop's graphs (default 0: "
                        "none)")
    p.add_argument("--data-dir", help="bench loop: where its store of random images is made, and reused when "
                                      "there already (default: a temporary folder)")
    p.add_argument("--out", type=out_file(), help="also write the result as JSON here")
    g = p.add_argument_group("reproduce")
    g.add_argument("--quick", action="store_true", help="the short plan (1 seed, 150 steps) instead of the full "
                                                        "one (2 seeds, 1200 steps); times in the README")
    g.add_argument("--dir", help="runs, logs and results.json (default: runs/reproduce[-quick])")
    g.add_argument("--report", help="where REPRODUCTION.md goes, figures in docs/reproduction/ beside it "
                                    "(default: DIR/REPRODUCTION.md)")
    g.add_argument("--seeds", type=SEED, nargs="+", help="training seeds (plan default: quick 0; full 0 1)")
    g.add_argument("--arms", nargs="+", metavar="ARM", type=arm_name,
                   help="train and report only these arms, in this order (default: all): repae repa vanilla "
                        "e2e-diffusion no-stopgrad no-bn no-reg, no-gan where the config has a GAN term, "
                        "stage2-e2e-vae (needs repae; trains after the other arms, whose REPA-E VAE it waits "
                        "for: to train it first, name only repae and stage2-e2e-vae)")
    g.add_argument("--steps", type=POSITIVE, help="training steps per arm; bench loop: steps in all (default 12, "
                                             "--warmup of them untimed)")
    g.add_argument("--eval-every", type=POSITIVE, help="measure a checkpoint every this many steps")
    g.add_argument("--jobs", type=POSITIVE, help="runs at once (cores are split between them)")
    g.add_argument("--final-samples", type=POSITIVE, metavar="N",
                   help="class-balanced samples at the last step, where the verdicts are read (full plan 2000, "
                        "other steps 500; --quick: as at the other steps)")
    g.add_argument("--cfg-scales", type=bounded(1.0, 1000.0, float), nargs="*", metavar="S",
                   help="also measure the last step of REPA-E, REPA and stage 2 at these CFG scales, a guidance "
                        "sweep for (c) and (d) (full plan: 1.5 2 2.5 3; none: no sweep)")
    g.add_argument("--longer", metavar="DIR",
                   help="the directory of a longer reproduction of REPA-E and REPA on the same world and judges "
                        "(e.g. --arms repae repa --steps 3600 --dir DIR): the report adds its trend past this "
                        "plan's budget; the verdicts are still read at this plan's last step")
    g.add_argument("--heldout", metavar="PATH", help="real data only: labelled images to measure against: class "
                                                     "sub-folders, parquet/arrow (validation split), tar shards or a "
                                                     "prepare-data store (default: the training data, data.path)")
    g.add_argument("--heldout-images", type=POSITIVE, default=None, metavar="N",
                   help="real data only: how many held-out images, spread evenly over them (default 1000)")
    p.set_defaults(func=run_bench)


def _check_bench_args(args: argparse.Namespace) -> None:
    """What argparse cannot check alone, before any model is built."""
    if args.what in ("step", "evaluate") and args.iters < 1:  # a median of no timings
        raise UsageError(f"bench {args.what} needs --iters >= 1 (timed repetitions), got {args.iters}")
    if args.what == "loop" and (12 if args.steps is None else args.steps) <= args.warmup:
        raise UsageError(f"bench loop times the steps after --warmup {args.warmup}: give --steps above it")
    if args.what != "loop" and args.step_iters:
        raise UsageError("--step-iters is for bench loop (bench step times the step on its own)")


def run_bench(args: argparse.Namespace) -> int:
    from repae.config import load_config

    if args.what == "reproduce":
        from repae.reproduce.cli import run_reproduce

        return run_reproduce(args)
    _check_bench_args(args)
    modes = parse_modes(args.modes) if args.modes else None
    cfg = load_config(args.preset, args.config, args.overrides)
    device = init_device(cfg)
    if args.what == "step":
        result = bench_step(cfg, device, args.iters, args.warmup)
        _print_step(result)
    elif args.what == "loop":
        from repae.bench_loop import bench_loop, print_loop

        steps = 12 if args.steps is None else args.steps
        result = bench_loop(cfg, device, steps, args.warmup, args.iters, args.warmup, args.data_dir, args.step_iters)
        print_loop(result)
    elif args.what == "sample":
        result = bench_sample(cfg, device, args.samples, modes)
        for name, value in result["images_per_s"].items():
            print(f"  {name:18s} {value:8.2f} images/s ({result['samples']} samples, {result['device']})")
        print(f"  peak memory {result['peak_memory_bytes'] / 2**20:.0f} MiB ({result['peak_memory_kind']})")
    else:
        result = bench_evaluate(device, iters=args.iters)
        for name, value in result["images_per_s"].items():
            print(f"  Inception {name:14s} {value:8.1f} images/s (batch {result['batch']}, {result['device']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
