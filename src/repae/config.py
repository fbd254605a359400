"""One typed schema for a whole run, its presets, and how YAML files and `key=value`
overrides are merged into it.

The schema is a tree of dataclasses. OmegaConf does the merging and the type checks
(a wrong type or an unknown key is rejected with the key's dotted name); `validate`
then rejects combinations that cannot work (image size vs VAE factor, SiT token grid
vs encoder patch grid, ...) before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from repae.fileio import SPECIAL_FILE, is_number, is_special_file


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message that names the key."""


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """The SiT. `arch` is `SiT-{T,S,B,L,XL}/{1,2,4,8}`; depth/hidden/heads override it when > 0."""

    arch: str = "SiT-XL/2"
    depth: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    encoder_depth: int = 8  # block after which hidden states are aligned (1-based)
    projector_dim: int = 2048
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for CFG; null class id = num_classes
    attention: str = "auto"  # auto | sdpa | math
    time_scale: float = 1.0  # t is embedded as time_scale*t; 1 matches SiT/REPA checkpoints


@dataclass
class VAEConfig:
    """LDM AutoencoderKL. `arch` names a known layout; the fields below override it when set."""

    arch: str = "f8d4"  # f8d4 (SD-VAE) | f16d32 (IN-VAE / VA-VAE) | toy-f4d4 | custom
    ch: int = 0
    ch_mult: List[int] = field(default_factory=list)
    num_res_blocks: int = 0
    z_channels: int = 0
    attn_resolutions: Optional[List[int]] = None
    resolution: int = 256  # the LDM "resolution" used only to place attention blocks
    norm_groups: int = 32
    path: Optional[str] = None  # weights: our .safetensors, official .pt, or a diffusers directory
    latent_stats_path: Optional[str] = None  # *-latents-stats.pt or our latent_stats.safetensors
    from_scratch: bool = False  # start from random VAE weights (ignores path; stats measured on the data)


@dataclass
class EncoderConfig:
    """Frozen alignment encoder(s); one projector per encoder."""

    names: List[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    paths: List[str] = field(default_factory=list)  # one weight file per name (local)


@dataclass
class LatentNormConfig:
    """BatchNorm2d(C, eps, momentum, affine=False) on latents (DESIGN.md section 1).

    mode "batch": REPA-E's BN (batch statistics in the SiT pass, running stats follow the
    latents); "fixed": a fixed scale/shift from the initial latent statistics, never updated
    (the paper's "no BN" ablation, and the usual normaliser for a frozen VAE)."""

    mode: str = "batch"  # batch | fixed
    momentum: float = 0.1
    eps: float = 1e-4


@dataclass
class FlowConfig:
    """Interpolant convention: t=0 data, t=1 noise."""

    path_type: str = "linear"  # linear | cosine
    prediction: str = "v"
    time_sampling: str = "uniform"  # uniform | lognormal
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0


@dataclass
class LossConfig:
    proj_coeff: float = 0.5  # lambda_g: REPA weight in the SiT loss
    vae_align_proj_coeff: float = 1.5  # lambda_v: REPA weight in the VAE loss
    recon_type: str = "l1"  # l1 (released config) | mse (paper text)
    recon_weight: float = 1.0
    lpips_weight: float = 1.0
    kl_weight: float = 1e-6
    gan_weight: float = 0.1
    gan_start_step: int = 0
    gan_adaptive_weight: bool = False  # scale GAN term by |grad rec| / |grad gan| at the decoder's last layer
    disc_ndf: int = 64
    disc_layers: int = 3
    lecam_weight: float = 0.0  # LeCam regulariser on the discriminator (0 = off, as in REPA-E)
    lecam_ema_decay: float = 0.999
    lpips_path: Optional[str] = None  # LPIPS v0.1 linear heads (vgg.pth)
    vgg_path: Optional[str] = None  # torchvision VGG16 ImageNet weights (vgg16-397923af.pth)
    discriminator_path: Optional[str] = None  # official *-discriminator-ckpt.pt or ours
    # Related-work regularisers for VAE tuning, all off by default:
    vf_weight: float = 0.0  # VA-VAE vision-foundation alignment of latents (paper: 0.1)
    vf_margin_cos: float = 0.5  # m1
    vf_margin_dist: float = 0.25  # m2
    vf_adaptive: bool = True  # times |grad rec| / |grad vf| at the encoder's last layer
    eq_weight: float = 0.0  # EQ-VAE: decode(T z) ~ T x for random rotations / scalings
    scale_eq_weight: float = 0.0  # scale equivariance: decode(down_s z) ~ down_s x
    scale_eq_factors: List[int] = field(default_factory=lambda: [2, 4])


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    # the lr falls linearly to 0 over this last fraction of train.max_steps (repae.train.schedule);
    # 0: constant, as the paper trains (its 400K steps are far from converged)
    decay_fraction: float = 0.0


@dataclass
class DataConfig:
    source: str = "imagenet"  # toy | folder | imagenet | packed | hf | wds (repae.data.sources)
    path: Optional[str] = None
    split: str = "train"  # data.source=hf: the split read when the files are named by split (train-*.parquet)
    image_size: int = 256
    hflip: bool = False
    num_workers: int = 4
    # images whose header claims more pixels are skipped (and counted) without being decoded: decompression
    # bombs and absurd files; ImageNet's largest are ~10-20 MP (repae.data.images explains the default)
    max_image_pixels: int = 64_000_000


@dataclass
class LatentsConfig:
    """Stage 2: train on latents cached by `repae cache-latents` (posterior mean and std of a frozen
    VAE, which is then the VAE of the run) instead of encoding images every step."""

    path: Optional[str] = None  # the cache directory (manifest.json + shards)


@dataclass
class ToyWorldConfig:
    """Sizes of the built-in toy world (data.source=toy), built once and cached."""

    cache_dir: Optional[str] = None  # default: $REPAE_CACHE or ~/.cache/repae
    train_size: int = 20000
    heldout_size: int = 2000
    teacher_steps: int = 150  # the teacher's and the evaluator's, with Muon (repae.toyworld's note)
    vae_steps: int = 600  # with Muon (repae.toyworld's recipe note): 29.3-30.3 dB over 5 seeds
    batch_size: int = 64  # the teacher's and the evaluator's
    vae_batch_size: int = 32
    # unlabelled smaller shapes behind the labelled one in every image (repae.data.toy.render_with_coverage);
    # 0: the single-shape world
    distractors: int = 0
    # the generator's training images (SiT, and the VAE when it tunes end to end): the first N of the
    # train_size the teacher, the VAE's pre-training and the evaluator learn from, N/classes per class
    # (image i is of class i mod classes). 0: all of them. Where the paper's DINOv2 saw ~110x the
    # images its SiT trains on (LVD-142M against ImageNet-1k's 1.28M), this lets the toy teacher
    # know more than the generator's data holds.
    generator_images: int = 0


DEVICE_NAMES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what train.device and every --device may say
LOG_SINKS = ("tensorboard", "wandb")  # what train.log_to may name (repae.train.report opens each)


@dataclass
class TrainConfig:
    """Training cadence and the REPA-E switches (each ablation of the paper is one switch)."""

    global_batch_size: int = 256
    grad_accum_steps: int = 1
    max_steps: int = 400_000
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1+step)/(10+step)): useful for short runs
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where it is fast on the device) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # The VAE's convolutions in NHWC (and the regulariser's, unless regulariser_channels_last says otherwise).
    # null (auto): on for a CPU, off for a GPU.
    # Measured in bf16: toy VAE fwd+bwd on 2 CPU cores 319 -> 291 ms per 64 images (NHWC faster);
    # f8d4 at 256 px on an H100, batch 32: 347 ms NCHW vs 494 ms NHWC (GroupNorm and the
    # elementwise ops between convolutions pay for the layout there)
    channels_last: Optional[bool] = None
    # The regulariser's convolution nets (LPIPS's VGG, the PatchGAN discriminator) in NHWC: they have
    # no GroupNorm, so they may gain from the layout where the VAE loses. null: as channels_last.
    # On one H200 (f8d4 + SiT-XL/2, eager) NHWC for them alone gave 51.7 -> 51.9 images/s at batch 16 and
    # 62.2 -> 62.5 at 32, within one run's noise (docs/benchmarks, H200 second session).
    regulariser_channels_last: Optional[bool] = None
    # recompute SiT blocks in the backward pass: less activation memory for ~1/3 more SiT compute
    activation_checkpointing: bool = False
    # torch.compile each repeated region (SiT blocks, VAE encoder/decoder, discriminator, LPIPS,
    # encoder blocks): one graph per block type keeps compile time to seconds-minutes, and the
    # modules keep their names, so checkpoints do not change. null (auto): on for a CUDA device, as
    # the reference's --compile default is (one H200, SiT-XL/2 + f8d4, batch 16: our loop 53.4 -> 68.4
    # images/s, ~2 minutes of compiling: docs/benchmarks, H200), off elsewhere. Off for the toy preset:
    # on a CPU `repae bench step --preset toy` (2 cores) went 1159 -> 1053 ms per step, but compiling
    # took ~3 minutes (bench wall 42 -> 237 s), more than the ~1.8 minutes it saves over the default
    # run's 1000 steps
    compile: Optional[bool] = None
    # torch.compile's mode for those regions: "default", or "max-autotune-no-cudagraphs" (inductor times
    # its own matmul and convolution kernels against the libraries' for each shape: a longer compile, for
    # a faster step where its kernels win). No CUDA-graph modes: the regions run inside autograd and the
    # optimisers update their weights in place between steps.
    compile_mode: str = "default"
    # On a CUDA device: float32 matmuls and convolutions in TF32, as the reference's --allow-tf32
    # default does (bf16 autocast covers most of the step; TF32 speeds up what stays float32), and
    # cuDNN's benchmark mode, which times its convolution algorithms once per shape and keeps the
    # fastest (the VAE is most of the step's convolutions). No effect on a CPU.
    tf32: bool = True
    cudnn_benchmark: bool = True
    tune_vae: bool = True  # False: REPA / vanilla SiT with a frozen VAE
    stop_grad: bool = True  # False: the "no stop-grad" ablation (diffusion loss reaches the VAE)
    use_reg_loss: bool = True  # False: the "no L_REG" ablation
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last: int = 3
    sample_every: int = 10_000
    max_nonfinite_in_a_row: int = 10
    num_threads: int = 0  # CPU threads for torch (0: torch's default, one per usable core)
    log_to: List[str] = field(default_factory=list)  # extra sinks besides metrics.jsonl: LOG_SINKS


@dataclass
class SampleConfig:
    mode: str = "sde"  # ode | sde
    num_steps: int = 250
    heun: bool = False
    # the time at which Heun's corrector decides whether CFG is on (its velocity is always taken at
    # t_next): t_cur as the official sampler does (the published numbers come from it), or t_next.
    # They differ only on a step whose [t_next, t_cur] contains a guidance-interval boundary.
    heun_cfg_at: str = "t_cur"
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    num_samples: int = 64
    batch_size: int = 64
    seed: int = 0
    use_ema: bool = True
    # torch.compile the SiT blocks and the VAE decoder for generation (static shapes: one graph
    # per batch shape, guided and unguided). Pays on a GPU over many batches (FID-50K); on a CPU
    # or for one grid the compile time costs more than it saves.
    compile: bool = False
    # torch.compile's mode for them: "default"; "reduce-overhead" replays each region as a CUDA graph
    # (no per-kernel launch cost from Python: the sampler calls the same shapes hundreds of times);
    # "max-autotune-no-cudagraphs" times inductor's own kernels against the libraries'; "max-autotune" both.
    compile_mode: str = "default"


@dataclass
class EvalConfig:
    num_samples: int = 50_000
    ref_batch: Optional[str] = None
    label_sampling: str = "balanced"  # balanced | uniform
    inception_path: Optional[str] = None


@dataclass
class RunConfig:
    preset: str = "custom"
    # "repae": our defaults; "official": reproduce the official REPA-E code where repae deliberately
    # differs (trained SiT pos_embed, LPIPS fed [-1,1] as if [0,1], latent denormalisation with
    # sqrt(var) instead of sqrt(var+eps)); README "Differences from the official code" lists them
    compat: str = "repae"
    output_dir: str = "runs"
    exp_name: str = "repae"
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    latent_norm: LatentNormConfig = field(default_factory=LatentNormConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim_sit: OptimConfig = field(default_factory=OptimConfig)
    optim_vae: OptimConfig = field(default_factory=OptimConfig)
    optim_disc: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.exp_name


# --------------------------------------------------------------------- architectures

# name -> (depth, hidden_size, num_heads). "T" is our CPU-sized toy; the rest are SiT's.
SIT_SIZES = {
    "T": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
SIT_PATCHES = (1, 2, 4, 8)

# name -> LDM AutoencoderKL layout
VAE_ARCHS = {
    "f8d4": dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, attn_resolutions=[16]),
    "f16d32": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=32, attn_resolutions=[16]),
    # 32x32 images -> 8x8x4 latents, small enough for a CPU. Widths 16/32/64 double at each level as
    # SD-VAE's 128/256/512 do. Toy world v5; v4 had 32/64/64, which costs 2.4x the FLOPs (1.26 against
    # 0.53 GFLOP per image for fwd+bwd) and, pre-trained with the same recipe, reconstructed worse:
    # 29.1 dB (v4) against 29.6 dB held-out PSNR, 1200 steps of batch 32 on 2 cores. Tried for a faster
    # default run, not kept: 16/32/32 (107 MFLOP forward per image against 179) cut `repae bench step --preset
    # toy` from 1159 to 970 ms and the pre-training (600 Muon steps, 2 threads, seed 0) from 234.7 s to 157.1 s,
    # but reconstructed worse and less reliably: 29.46, 29.23, 27.16 dB for seeds 0, 2, 3 (16/32/64: 30.62 dB
    # that day; 29.3-30.3 dB over seeds 0-4 earlier). 16/16/32: 27.36 dB.
    "toy-f4d4": dict(ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, z_channels=4, attn_resolutions=[]),
}


def sit_dims(model: ModelConfig) -> tuple[int, int, int, int]:
    """(depth, hidden_size, num_heads, patch_size) of a ModelConfig, overrides applied."""
    try:
        size, patch = model.arch.removeprefix("SiT-").split("/")
        depth, hidden, heads = SIT_SIZES[size]
        patch = int(patch)
    except (ValueError, KeyError):
        raise ConfigError(
            f"model.arch={model.arch!r} is not a SiT architecture; use SiT-{{{','.join(SIT_SIZES)}}}/"
            f"{{{','.join(map(str, SIT_PATCHES))}}}"
        ) from None
    if patch not in SIT_PATCHES:
        raise ConfigError(f"model.arch={model.arch!r}: patch size must be one of {SIT_PATCHES}")
    return (model.depth or depth, model.hidden_size or hidden, model.num_heads or heads, patch)


def vae_layout(vae: VAEConfig) -> dict:
    """The full AutoencoderKL layout of a VAEConfig (named arch with field overrides)."""
    if vae.arch == "custom":
        base: dict = {}
    elif vae.arch in VAE_ARCHS:
        base = dict(VAE_ARCHS[vae.arch])
    else:
        raise ConfigError(f"vae.arch={vae.arch!r} is unknown; use one of {sorted(VAE_ARCHS)} or 'custom'")
    for key in ("ch", "num_res_blocks", "z_channels"):
        if getattr(vae, key):
            base[key] = getattr(vae, key)
    if vae.ch_mult:
        base["ch_mult"] = list(vae.ch_mult)
    if vae.attn_resolutions is not None:
        base["attn_resolutions"] = list(vae.attn_resolutions)
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "z_channels") if k not in base]
    if missing:
        raise ConfigError(f"vae.arch='custom' needs vae.{', vae.'.join(missing)}")
    base.setdefault("attn_resolutions", [])
    base["resolution"] = vae.resolution
    base["norm_groups"] = vae.norm_groups
    return base


def vae_downsample_factor(vae: VAEConfig) -> int:
    return 2 ** (len(vae_layout(vae)["ch_mult"]) - 1)


# --------------------------------------------------------------------------- presets


def _paper(arch: str, vae: str) -> RunConfig:
    """The paper's ImageNet-256 recipe: DINOv2-B at depth 8, lambda 0.5/1.5, batch 256, 400K steps."""
    cfg = RunConfig(preset=f"{arch.lower().replace('/', '')}-{vae}")
    cfg.model.arch = arch
    cfg.vae.arch = vae
    cfg.exp_name = cfg.preset
    return cfg


def _toy() -> RunConfig:
    """CPU-sized run on the built-in toy world (32x32, 10 classes): minutes on 2 cores."""
    cfg = RunConfig(preset="toy", exp_name="toy")
    cfg.model = ModelConfig(arch="SiT-T/2", encoder_depth=2, projector_dim=512, num_classes=10)
    # GroupNorm with 8 groups: 2, 4 and 8 channels a group at the 16-, 32- and 64-channel levels (SD-VAE's
    # 32 groups have 4, 8 and 16; 1 group normalises each image's whole map at once, 32 groups every
    # channel on its own). Measured here on the v4 widths 32/64/64, MSE pre-training, batch 32, 600 steps:
    # 1 group 24.4 dB, 8 groups 25.4 dB (held-out PSNR). The grey toy VAE of earlier versions came from the L1 loss,
    # not from the groups: see repae.toyworld's pre-training recipe.
    cfg.vae = VAEConfig(arch="toy-f4d4", norm_groups=8)
    cfg.encoder = EncoderConfig(names=["toy-teacher"])
    cfg.data = DataConfig(source="toy", image_size=32, num_workers=0)
    # no LPIPS in the toy world: its VGG16 weights cannot be downloaded here (explicit, not silent)
    cfg.loss.lpips_weight = 0.0
    # no GAN either: REPA-E starts from a *pretrained* discriminator, which the toy world does not
    # have yet; a random one cut the toy VAE's PSNR from 20.6 to 16.2 dB in 700 steps (measured),
    # while without it REPA-E raised the PSNR to 24.2 dB in 600 steps
    cfg.loss.gan_weight = 0.0
    # a 5M-parameter SiT learns far faster at 1e-3 than at the paper's 1e-4 (batch 64, 600 steps:
    # teacher accuracy of samples 19.5% vs 13% at 5e-4 and 400 steps), and faster still at 2e-3 with
    # lognormal t (for the linear path t = sigmoid(N(0,1)): the mid-range t where shapes form come
    # up more often). Measured at 1200 steps, toy-evaluator accuracy of 300 samples / toy FID:
    # uniform, 1e-3: 39.3% / 17.1; lognormal, 1e-3: 40.7% / 14.3; lognormal, 2e-3: 49.0% / 13.3
    # (one seed each). The paper presets keep its uniform t.
    # The toy budget is ~1000 steps, the paper's 400K: a small SiT gets more from a short run with a higher lr
    # that falls linearly to zero over the second half, and an EMA that lags less. Measured on toy world v6
    # (seed 0, accuracy of 300 samples): constant 2e-3, EMA 0.995, 1200 steps 89.0% (raw weights 89.7%), at
    # step 600 45.0% (raw 62.3%); decayed over 600 steps, 2e-3 44.7% (raw 67.3%), 4e-3 46.3% (raw 69.0%);
    # 4e-3 decayed over 900 steps, EMA 0.99: 87.0%, toy FID 8.9 (one thread), 84.3%, 9.2 (two threads, the
    # whole default run: 300 samples tell 85% from 87% by ~1 standard error), hence 1000 steps: 87.3%, toy FID
    # 8.3 on a 2-core AMD EPYC, 88.7%, 8.0 on a 2-core Xeon (toy world v7 on that Xeon: 92.0%, 7.45; v8 on a Xeon
    # with AMX: 86.7%, 12.81 by v8's own evaluator, the README's default run); batch 32, 1500 steps:
    # 76.3% (raw 75.3%). On an earlier world, at 1200 steps, a 2x wider/deeper SiT (hidden 256, depth 8) did not
    # score better (40.7% vs 42.7%).
    cfg.optim_sit.lr = 4e-3
    cfg.optim_sit.decay_fraction = 0.5
    # The VAE trains at the SiT's lr, as in the paper (train_repae.py: --learning-rate and --vae-learning-rate
    # both 1e-4). Raising only the SiT's to 4e-3 had left the VAE at 1/40 of the paper's ratio: REPA-E's
    # VAE then barely moved but for its latent scale, and REPA-E trailed REPA. One seed on toy world v8
    # (bench reproduce, step 1200, unguided toy FID): VAE lr 1e-4 7.24, 1e-3 7.31, 4e-3 5.32 (REPA 6.03);
    # the 3-seed figures and the report: REPRODUCTION.md and docs/reproduction/HISTORY.md.
    cfg.optim_vae.lr = cfg.optim_sit.lr
    cfg.optim_vae.decay_fraction = cfg.optim_sit.decay_fraction
    cfg.flow.time_sampling = "lognormal"
    cfg.train = TrainConfig(
        global_batch_size=64, max_steps=1000, ema_decay=0.99, log_every=25,
        ckpt_every=300, sample_every=300, compile=False,
    )
    # The CFG scale by the default run's class accuracy. CFG 4 was chosen at ad90d20 (teacher accuracy of 200
    # samples 19.5% at 1, 34.5% at 4, 27.5% at 7). With the VAE at the SiT's lr it over-guides: the default run
    # (seed 0, step 1000, 300 samples, toy evaluator) 79.3% / toy FID 12.6 at 4, 86.0% / 6.0 at 3, 86.7% / 4.2 at
    # 2.5 (`repae evaluate samples runs/toy sample.cfg_scale=S`); REPA-E at step 1200 over 3 seeds (the guidance
    # sweep of REPRODUCTION.md) 0.813 at 4, 0.862 at 3, 0.873 at 2.5, 0.852 at 2. `repae bench reproduce` keeps 4
    # for its guided verdicts (repae.reproduce.runner.TOY_GUIDED_SCALE).
    cfg.sample = SampleConfig(mode="ode", num_steps=50, num_samples=40, batch_size=40, cfg_scale=2.5)
    cfg.eval = EvalConfig(num_samples=300)  # 30 per class for the teacher-scored sample accuracy
    return cfg


def _build_presets() -> dict:
    presets = {"toy": _toy}
    for size in ("B", "L", "XL"):
        # the paper pairs /2 with f8d4 and /1 with f16d32: both give 16x16 tokens = DINOv2's grid at 256
        for patch, vae in ((2, "f8d4"), (1, "f16d32")):
            arch = f"SiT-{size}/{patch}"
            presets[f"sit-{size.lower()}{patch}-{vae}"] = (lambda a=arch, v=vae: _paper(a, v))
    return presets


PRESETS = _build_presets()


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ------------------------------------------------------------------- load and merge

# A config file is a few hundred lines: 1 MiB is far beyond any real one and keeps parsing cheap.
MAX_CONFIG_BYTES = 1 << 20
# Bounds on the YAML *tree*: a config has ~150 leaves and is 3 levels deep. Anchors and aliases are
# allowed (`<<: *defaults` is a fair use), but the tree they expand to is measured before anything
# walks it, so a "billion laughs" file (a few hundred bytes whose aliases expand to 10^9 nodes) is
# refused at parse time instead of exhausting memory in the merge.
MAX_YAML_NODES = 20_000
MAX_YAML_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader (no Python object tags) that refuses trees over MAX_YAML_NODES expanded nodes or
    MAX_YAML_DEPTH levels, and cyclic aliases. The composer already shares an aliased node instead of
    copying it, so parsing stays small; the expanded size is counted on that shared graph (each node
    once, memoised) before the constructor or OmegaConf could expand it."""

    def compose_document(self):
        node = super().compose_document()
        _check_yaml_tree(node)
        return node

    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is refused: YAML's loaders keep the last silently, so a second
        `train:` section would drop every key of the first. Merge keys (<<) may still be overridden."""
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value[:60]!r} (first on line {seen[key_node.value]})",
                            key_node.start_mark)
                    seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _check_yaml_tree(root: yaml.Node) -> None:
    sizes: dict = {}  # id(node) -> (expanded node count, depth)
    stack: list = [(root, False)]
    on_path: set = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _yaml_children(node)
            size = 1 + sum(sizes[id(c)][0] for c in children)
            depth = 1 + max((sizes[id(c)][1] for c in children), default=0)
            if size > MAX_YAML_NODES:
                raise yaml.YAMLError(f"expands to more than {MAX_YAML_NODES} nodes (aliases included); "
                                     "a config needs a few hundred")
            if depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nests deeper than {MAX_YAML_DEPTH} levels")
            sizes[key] = (size, depth)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise yaml.YAMLError("an alias refers to a node that contains it (a cyclic structure)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _yaml_children(node) if id(c) not in sizes)


def _yaml_children(node: yaml.Node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_yaml(path: str | os.PathLike, what: str = "config file") -> dict:
    """The mapping in a YAML file, read with bounded size, tree size and depth.

    ConfigError naming the file for anything else: missing, too large, not UTF-8 text, not YAML,
    empty, or not a mapping. Used for user config files and for the config.yaml of a run."""
    path = Path(path)
    if path.is_dir() or is_special_file(path):  # were "not found"; opening a FIFO would block
        raise ConfigError(f"{what} {path} is {'a directory' if path.is_dir() else SPECIAL_FILE}, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KiB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start}): is it a binary file?") from None
    try:
        data = yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"{what} {path} is not valid YAML or is refused: {reason}") from None
    except (ValueError, RecursionError, OverflowError) as err:  # e.g. an integer of 10^5 digits
        raise ConfigError(f"{what} {path} holds a value that cannot be read: {str(err)[:200]}") from None
    if data is None:
        raise ConfigError(f"{what} {path} is empty; expected a mapping of config sections")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at top level, not a {type(data).__name__}")
    return data


def load_config(
    preset_name: Optional[str] = "toy",
    files: Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
    world_size: Optional[int] = None,
) -> RunConfig:
    """Preset, then YAML files in order, then `a.b=value` overrides; validated.

    Raises ConfigError naming the offending key, file or value.
    """
    base = preset(preset_name) if preset_name else RunConfig()
    merged = OmegaConf.structured(base)
    for path in files:
        data = read_yaml(path)
        _refuse_interpolation(data, f"config file {path}")
        merged = _merge(merged, lambda d=data: OmegaConf.create(d), f"file {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        shown = f"{item[:100]!r}{'...' if len(item) > 100 else ''}"
        merged = _merge(merged, lambda i=item: OmegaConf.from_dotlist([i]), f"override {shown}")
    cfg: RunConfig = _to_object(merged, "the overrides")
    validate(cfg, world_size=world_size)
    return cfg


def _refuse_interpolation(data, where: str, key: str = "") -> None:
    """ConfigError for an OmegaConf interpolation (`${...}`) anywhere in a file's values.

    A config file is data: it may be shared, or be the saved config of someone else's run, and
    OmegaConf would otherwise evaluate it when the config is built: `${oc.env:VAR}` copies an
    environment variable (a token, a password) into the run's saved config.yaml, and any resolver
    runs on the file's say. Values are never rewritten (the escaped form would silently change what
    the user meant): such a file is refused with the key, and the remedy. Overrides on the command
    line are the user's own words and keep OmegaConf's interpolation."""
    if isinstance(data, dict):
        for k, v in data.items():
            _refuse_interpolation(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _refuse_interpolation(v, where, f"{key}[{i}]")
    elif isinstance(data, str) and "${" in data:
        raise ConfigError(f"{where}: {key}={data[:80]!r} is an interpolation; config files hold plain values "
                          f"(nothing in them is evaluated, environment variables included): write the value itself, "
                          f"or pass it on the command line as an override")


def _to_object(merged, where: str):
    """The dataclasses of a merged config; an interpolation that cannot be resolved (`${no.such.key}`) or
    gives a value of the wrong type is a ConfigError naming the key, not OmegaConf's traceback."""
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{where}: bad key {key!r}: {reason}" if key else f"{where}: {reason}") from None


def _merge(base, make_other, where: str):
    try:
        return OmegaConf.merge(base, make_other())
    except OmegaConfBaseException as err:
        raise ConfigError(_merge_message(err, where)) from None
    except yaml.YAMLError as err:  # an override's value is parsed as YAML: '[1', '!foo 3', '*a', a python tag
        raise ConfigError(f"{where}: not valid YAML or refused ({' '.join(str(err).split())[:200]})") from None


def _merge_message(err: OmegaConfBaseException, where: str) -> str:
    """OmegaConf's error in the user's terms: a value of the wrong type is a bad value, not a bad key."""
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0]
    if not key:
        return f"{where}: {reason}"
    if isinstance(err, ValidationError):
        if "is not a ListConfig" in reason:
            return f"{where}: {key} expects a list, e.g. {key}=[a,b]"
        if "Incompatible value 'None'" in reason:
            return f"{where}: {key} has no value: give one after '='"
        return f"{where}: bad value for {key}: {reason}"
    return f"{where}: bad key {key!r}: {reason}"


def to_dict(cfg: RunConfig) -> dict:
    """Plain data (dicts, lists, str, numbers) for saving with a run or a checkpoint."""
    return dataclasses.asdict(cfg)


def config_differences(a: dict, b: dict, ignore: Sequence[str] = ()) -> List[str]:
    """Dotted keys whose values differ between two config dicts (`to_dict` form), a key present in
    only one of them included; `ignore` holds dotted keys or whole sections ("sample" skips sample.*)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out: dict = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def ignored(key: str) -> bool:
        return any(key == i or key.startswith(i + ".") for i in ignore)

    fa, fb = flat(a), flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if not ignored(k) and fa.get(k, ...) != fb.get(k, ...))


def from_dict(data: dict) -> RunConfig:
    """A RunConfig from plain data (a run's saved config): values taken as written, never evaluated."""
    _refuse_interpolation(data, "saved config")
    merged = _merge(OmegaConf.structured(RunConfig), lambda: OmegaConf.create(data), "saved config")
    return _to_object(merged, "saved config")


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


# ------------------------------------------------------------------------ validation

_CHOICES = {
    "compat": ("repae", "official"),
    "model.attention": ("auto", "sdpa", "math"),
    "latent_norm.mode": ("batch", "fixed"),
    "flow.path_type": ("linear", "cosine"),
    "flow.prediction": ("v",),
    "flow.time_sampling": ("uniform", "lognormal"),
    "loss.recon_type": ("l1", "mse"),
    "data.source": ("toy", "folder", "imagenet", "packed", "hf", "wds"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.compile_mode": ("default", "max-autotune-no-cudagraphs"),
    "sample.compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"),
    "sample.mode": ("ode", "sde"),
    "sample.heun_cfg_at": ("t_cur", "t_next"),
    "eval.label_sampling": ("balanced", "uniform"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@dataclass(frozen=True)
class Range:
    """A numeric rule: integer or finite real in [lo, hi] (an open end when lo_open / hi_open);
    `each` applies it to every item of a list whose length lies in [min_len, max_len]."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    integer: bool = False
    lo_open: bool = False
    hi_open: bool = False
    each: bool = False
    min_len: int = 0
    max_len: int = 64

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.hi is None:
            bound = f"{'>' if self.lo_open else '>='} {_num(self.lo)}" if self.lo is not None else ""
        else:
            bound = (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                     f"{')' if self.hi_open else ']'}")
        return f"{kind} {bound}".strip()

    def check(self, key: str, value: Any) -> Optional[str]:
        if self.each:
            if value is None:
                return None
            if not isinstance(value, (list, tuple)) or not self.min_len <= len(value) <= self.max_len:
                n = f"exactly {self.min_len}" if self.min_len == self.max_len else f"{self.min_len} to {self.max_len}"
                return f"{key}={_short(value)} must be a list of {n} items, each {self.describe()}"
            bad = [v for v in value if not self._ok(v)]
            return f"{key}={_short(value)}: every item must be {self.describe()}" if bad else None
        return None if self._ok(value) else f"{key}={_short(value)} must be {self.describe()}"

    def _ok(self, v: Any) -> bool:
        if not is_number(v):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)


def _num(x: Optional[float]) -> str:
    return f"{int(x)}" if x is not None and float(x).is_integer() and abs(x) < 1e15 else f"{x}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(lo: int, hi: Optional[int] = None) -> Range:
    return Range(lo, hi, integer=True)


def _real(lo: Optional[float], hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo, hi, lo_open=lo_open, hi_open=hi_open)


def _ints(lo: int, hi: int, min_len: int = 0, max_len: int = 64) -> Range:
    return Range(lo, hi, integer=True, each=True, min_len=min_len, max_len=max_len)


MAX_IMAGE_SIZE = 4096  # the bound on data.image_size and on every command's --image-size (see above)
_PROB = _real(0.0, 1.0)
_WEIGHT = _real(0.0)  # a loss weight: finite, >= 0 (0 switches the term off)
MAX_SEED = 2**32 - 1  # numpy's seed range; torch and random accept it too
_SEED = _int(0, MAX_SEED)
_COUNT = _int(1)
_OPTIM = {
    "lr": _real(0.0, 1.0, lo_open=True),  # Adam's step is ~lr per weight: above 1 is never a learning rate
    "betas": Range(0.0, 1.0, hi_open=True, each=True, min_len=2, max_len=2),  # beta=1: the moment never moves
    "weight_decay": _real(0.0),
    "eps": _real(0.0, 1.0, lo_open=True),
    "max_grad_norm": _real(0.0),  # 0 = no clipping
    "decay_fraction": _PROB,
}

# Every int / float (or list of them) field of RunConfig has a rule here: tests/test_config_ranges.py
# walks the schema and fails on a field without one. Upper bounds are sanity caps, far above any
# published setting but low enough that a typo cannot ask for terabytes: e.g. data.image_size <= 4096
# (REPA-E trains at 256 and 512; 4096 is 4x the largest latent-diffusion resolutions in use, while a
# 4096^2 uint8 image is still 48 MB), SiT/VAE widths <= 16384 / 4096 (SiT-XL: 1152, SD-VAE: 512).
RANGES: dict = {
    "model.depth": _int(0, 256),  # 0 = from model.arch
    "model.hidden_size": _int(0, 16384),
    "model.num_heads": _int(0, 1024),
    "model.mlp_ratio": _real(0.0, 64.0, lo_open=True),
    "model.encoder_depth": _int(1, 256),
    "model.projector_dim": _int(1, 65536),
    "model.num_classes": _int(1, 1_000_000),
    "model.class_dropout_prob": _real(0.0, 1.0, hi_open=True),  # 1 would never show a label
    "model.time_scale": _real(0.0, 1e6, lo_open=True),
    "vae.ch": _int(0, 4096),  # 0 = from vae.arch
    "vae.ch_mult": _ints(1, 64, max_len=8),  # [] = from vae.arch; 8 levels = f128
    "vae.num_res_blocks": _int(0, 64),
    "vae.z_channels": _int(0, 4096),
    "vae.attn_resolutions": _ints(1, 65536, max_len=16),
    "vae.resolution": _int(1, 65536),
    "vae.norm_groups": _int(1, 4096),
    "latent_norm.momentum": _PROB,
    "latent_norm.eps": _real(0.0, 1.0, lo_open=True),
    "flow.lognormal_mean": _real(-10.0, 10.0),  # t = sigmoid(N(m, s)): |m| > 10 puts every t at 0 or 1
    "flow.lognormal_std": _real(0.0, 10.0, lo_open=True),
    "loss.proj_coeff": _WEIGHT,
    "loss.vae_align_proj_coeff": _WEIGHT,
    "loss.recon_weight": _WEIGHT,
    "loss.lpips_weight": _WEIGHT,
    "loss.kl_weight": _WEIGHT,
    "loss.gan_weight": _WEIGHT,
    "loss.gan_start_step": _int(0),
    "loss.disc_ndf": _int(1, 4096),
    "loss.disc_layers": _int(1, 8),  # each layer halves the patch grid: 8 = 256x smaller
    "loss.lecam_weight": _WEIGHT,
    "loss.lecam_ema_decay": _PROB,
    "loss.vf_weight": _WEIGHT,
    "loss.vf_margin_cos": _real(0.0, 2.0),  # relu(1 - m1 - cos): m1 >= 2 turns the term off entirely
    "loss.vf_margin_dist": _real(0.0, 2.0),  # |cos - cos| <= 2
    "loss.eq_weight": _WEIGHT,
    "loss.scale_eq_weight": _WEIGHT,
    "loss.scale_eq_factors": _ints(2, 64, max_len=8),  # 1 would compare an image with itself
    **{f"optim_{part}.{k}": rule for part in ("sit", "vae", "disc") for k, rule in _OPTIM.items()},
    "data.image_size": _int(1, MAX_IMAGE_SIZE),
    "data.num_workers": _int(0, 256),
    "data.max_image_pixels": _int(1, 178_956_970),  # Pillow itself refuses more (2 x Image.MAX_IMAGE_PIXELS)
    "toy.train_size": _int(1, 1_000_000),  # held in memory: 3 KB per 32x32 image
    "toy.heldout_size": _int(1, 1_000_000),
    "toy.teacher_steps": _int(1, 10_000_000),
    "toy.vae_steps": _int(1, 10_000_000),
    "toy.batch_size": _int(1, 65536),
    "toy.vae_batch_size": _int(1, 65536),
    "toy.distractors": _int(0, 4),
    "toy.generator_images": _int(0, 1_000_000),
    "train.num_threads": _int(0, 4096),
    "train.global_batch_size": _int(1, 1 << 20),
    "train.grad_accum_steps": _int(1, 1 << 20),
    "train.max_steps": _int(1, 10**10),
    "train.ema_decay": _PROB,
    "train.seed": _SEED,
    "train.log_every": _COUNT,
    "train.ckpt_every": _COUNT,
    "train.keep_last": _int(0),  # 0 = keep every checkpoint
    "train.sample_every": _COUNT,
    "train.max_nonfinite_in_a_row": _COUNT,
    "sample.num_steps": _int(1, 100_000),
    "sample.cfg_scale": _real(0.0, 1000.0),
    "sample.guidance_low": _PROB,
    "sample.guidance_high": _PROB,
    "sample.num_samples": _int(1, 10**8),
    "sample.batch_size": _int(1, 65536),
    "sample.seed": _SEED,
    "eval.num_samples": _int(0, 10**8),  # 0 = no end-of-run evaluation
}


def _check_names(cfg: RunConfig) -> List[str]:
    """exp_name is one directory name inside output_dir: no separators, no '..', nothing odd."""
    errors = []
    name = cfg.exp_name
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or len(name) > 200 or any(ord(c) < 32 for c in name)):
        errors.append(f"exp_name={_short(name)} must be a plain directory name (1-200 characters, no '/', "
                      "'\\', control characters, and not '.' or '..')")
    out = cfg.output_dir
    if not isinstance(out, str) or not out or "\x00" in out or len(out) > 4096:
        errors.append(f"output_dir={_short(out)} must be a non-empty path of at most 4096 characters")
    return errors


def range_errors(cfg: RunConfig) -> List[str]:
    """One message per field outside its RANGES rule (dotted key, value, allowed range)."""
    errors = [msg for key, rule in RANGES.items() for msg in [rule.check(key, _get(cfg, key))] if msg]
    return errors + _check_names(cfg)


def toy_teacher_hint(cfg: RunConfig) -> str:
    """Why the toy preset's encoder cannot align a run on real data, and the overrides that can.
    Real encoders give an image_size/16 token grid (patch-14 ones after the 224/256 resize), so the
    SiT grid image_size / VAE factor / SiT patch needs factor x patch = 16."""
    factor = vae_downsample_factor(cfg.vae)
    arch = cfg.model.arch.split("/")[0]
    if cfg.preset == "toy" and 16 % factor == 0:
        size = max(64, cfg.data.image_size // 16 * 16)
        grid = (f"model.arch={arch}/{16 // factor} data.image_size={size} "
                f"vae.from_scratch=true (or vae.path=YOUR_VAE)")
    else:
        grid = "a SiT grid (image_size / VAE factor / SiT patch) of image_size/16"
    return (f"encoder 'toy-teacher' exists only in the toy world (data.source=toy), not with "
            f"data.source={cfg.data.source}: name a real encoder and its local weights, e.g. "
            f"encoder.names=[dinov2-vit-b] encoder.paths=[/path/to/dinov2_vitb14_pretrain.pth] {grid}; "
            f"or a paper preset (--preset sit-b2-f8d4, 256px)")


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Reject impossible combinations before anything runs. Raises ConfigError.

    Field ranges are checked first, all at once; the combinations (which divide by these fields)
    are only checked once every field is in range."""
    from repae.models.encoders import encoder_spec  # late: encoders import config

    errors: List[str] = range_errors(cfg)
    if cfg.data.source == "toy" and cfg.toy.generator_images:
        n, classes = cfg.toy.generator_images, cfg.model.num_classes
        if n > cfg.toy.train_size or n % classes:
            errors.append(f"toy.generator_images={n} must be a multiple of model.num_classes={classes} and at "
                          f"most toy.train_size={cfg.toy.train_size} (0: all of them)")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            errors.append(f"{key}={_get(cfg, key)!r} must be one of {choices}")
    if not DEVICE_NAMES.fullmatch(cfg.train.device):
        errors.append(f"train.device={cfg.train.device!r} must be auto, cpu, mps, cuda or cuda:N")
    unknown_sinks = [s for s in cfg.train.log_to if s not in LOG_SINKS]
    if unknown_sinks:  # found now, not after the toy world is built
        errors.append(f"train.log_to has unknown sink(s) {unknown_sinks}: use {' or '.join(LOG_SINKS)}")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))

    depth, hidden, heads, patch = sit_dims(cfg.model)
    if hidden % heads:
        errors.append(f"model: hidden_size {hidden} is not divisible by num_heads {heads}")
    if not 1 <= cfg.model.encoder_depth <= depth:
        errors.append(f"model.encoder_depth={cfg.model.encoder_depth} must be in [1, SiT depth {depth}]")

    layout = vae_layout(cfg.vae)
    groups = layout["norm_groups"]
    widths = sorted({layout["ch"] * m for m in [1, *layout["ch_mult"]]})
    if any(w % groups for w in widths):
        errors.append(f"vae.norm_groups={groups} must divide every VAE width {widths} (GroupNorm)")
    factor = vae_downsample_factor(cfg.vae)
    size = cfg.data.image_size
    if size % factor:
        errors.append(f"data.image_size={size} is not divisible by the VAE downsampling factor {factor}")
    elif (size // factor) % patch:
        errors.append(f"latent size {size // factor} is not divisible by the SiT patch size {patch}")
    else:
        grid = size // factor // patch
        # the same rule as build.uses_repa: the VAE-side REPA term only exists when the VAE trains
        if cfg.loss.proj_coeff > 0 or (cfg.train.tune_vae and cfg.loss.vae_align_proj_coeff > 0):
            if cfg.encoder.paths and len(cfg.encoder.paths) != len(cfg.encoder.names):
                errors.append("encoder.paths must give one path per encoder name (or none)")
            for name in cfg.encoder.names:
                if name == "toy-teacher" and cfg.data.source != "toy":
                    errors.append(toy_teacher_hint(cfg))
                    continue
                try:
                    spec = encoder_spec(name)
                except KeyError as err:
                    errors.append(str(err.args[0]))
                    continue
                enc_grid = spec.token_grid(size)
                if enc_grid != grid:
                    errors.append(
                        f"SiT token grid {grid}x{grid} (image {size} / VAE f{factor} / patch {patch}) "
                        f"!= encoder {name!r} patch grid {enc_grid}x{enc_grid}"
                    )

    world = world_size or _env_world_size()
    per_step = world * cfg.train.grad_accum_steps
    if cfg.train.global_batch_size % per_step:
        errors.append(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"world size {world} x grad_accum_steps {cfg.train.grad_accum_steps}"
        )
    if not 0 <= cfg.sample.guidance_low <= cfg.sample.guidance_high <= 1:
        errors.append("need 0 <= sample.guidance_low <= sample.guidance_high <= 1")
    if cfg.compat == "official" and cfg.sample.heun_cfg_at != "t_cur":
        errors.append("compat=official samples as the official code does: it needs sample.heun_cfg_at=t_cur")
    if cfg.sample.cfg_scale != 1.0 and cfg.model.class_dropout_prob == 0:
        errors.append("sample.cfg_scale != 1 needs a null class: model.class_dropout_prob > 0")
    if cfg.latents.path and (cfg.train.tune_vae or cfg.vae.from_scratch):
        errors.append("latents.path (cached latents of a frozen VAE) needs train.tune_vae=false and "
                      "vae.from_scratch=false")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _env_world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r} must be an integer >= 1")
    return world
