"""`repae train`: set up a run, resume it if it has a checkpoint, and loop over REPA-E steps.

Re-running the same command continues from the newest checkpoint and ends with the same
weights as an uninterrupted run (the step RNG, the data position, optimiser and EMA
states are all in the checkpoint). Only plain data and safetensors are written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from repae import dist
from repae.nn_utils import autocast, init_device, resolve_precision
from repae.build import build_sit, build_vae, uses_repa, vae_args
from repae.models.vae import AutoencoderKL
from repae.config import ConfigError, RunConfig, config_differences, from_dict, read_yaml, save_config, to_dict
from repae.data import sources
from repae.fileio import is_number
from repae.interrupt import Interrupted, StopSignals
from repae.generate import generate_images, sampler_settings, save_image_grid
from repae.losses import VAERegulariser
from repae.train.checkpoint import (WEIGHT_LIMIT, check_train_state, checkpoint_dir, read_checkpoint, rng_state,
                                    save_checkpoint, set_rng_state, usable_checkpoints)
from repae.train.setup import make_trainables
from repae.train.schedule import set_lr
from repae.train.step import Trainables, repae_step
from repae.weights import CheckpointError, load_latent_stats, load_strict


@dataclass
class Run:
    cfg: RunConfig
    device: torch.device
    m: Trainables
    data: object  # repae.data.sources.training_batches: next(batch), state_dict(), load_state_dict()
    gen: torch.Generator
    step: int = 0
    nonfinite_in_a_row: int = 0
    toy: Optional[object] = None  # the ToyWorld when training on it
    # time in the training loop before `clock_since`, summed over every invocation of the run (kept in its
    # checkpoints, so a resume or a lost record of an earlier invocation does not drop it); None: the run resumed
    # from a checkpoint that predates this record, so its total is unknown
    train_seconds: Optional[float] = 0.0
    clock_since: Optional[float] = None  # time.perf_counter() when the loop's current stretch began; None: not in it


def training_seconds(run: Run) -> Optional[float]:
    """Wall time of the run's training so far, over all its invocations: its steps, checkpoints and sample grids,
    not the set-up of each invocation (world build, model construction, the final evaluation). None: unknown."""
    if run.train_seconds is None:
        return None
    return run.train_seconds + (0.0 if run.clock_since is None else time.perf_counter() - run.clock_since)


def _toy_setup(cfg: RunConfig, progress: bool = True):
    """Build/load the toy world and point the config's VAE, stats and encoder at it."""
    from repae.toyworld import ensure_toy_evaluator, ensure_toy_world

    # under torchrun rank 0 builds, the others read; the build trains where the run does
    world = ensure_toy_world(vae_args(cfg), cfg.toy, progress=progress, device=cfg.train.device)
    if cfg.eval.num_samples > 0:  # it scores the run's samples at the end: built now, not after training
        ensure_toy_evaluator(world, cfg.toy, progress=progress, device=cfg.train.device)
    use_toy_vae(cfg, world.vae_path, world.latent_stats_path)
    return world


def use_toy_vae(cfg: RunConfig, vae_path: Path, stats_path: Path) -> None:
    """A toy run whose vae.* names no file trains from the world's pre-trained VAE and its statistics
    (its saved config names them, so a resume with another world's VAE is refused)."""
    if not cfg.vae.from_scratch:
        cfg.vae.path = cfg.vae.path or str(vae_path)
        cfg.vae.latent_stats_path = cfg.vae.latent_stats_path or str(stats_path)


def _encoders(cfg: RunConfig, toy) -> List:
    """The frozen alignment encoders, one per `encoder.names` entry, from local weight files."""
    from repae.models.encoders import load_encoder

    if not uses_repa(cfg):
        return []
    encoders = []
    for i, name in enumerate(cfg.encoder.names):
        if name == "toy-teacher":
            if toy is None:
                from repae.config import toy_teacher_hint

                raise ConfigError(toy_teacher_hint(cfg))
            encoders.append(toy.teacher)
        else:
            encoders.append(load_encoder(name, cfg.encoder.paths[i] if cfg.encoder.paths else None,
                                         cfg.data.image_size))
    return encoders


def distinct_skipped(data) -> int:
    """Unreadable files skipped by any rank, each file once: the ranks' sets of skipped dataset indices are
    OR-ed through one all-reduce of a per-file mask (a file met by two ranks in two epochs counts once)."""
    skipped = getattr(data, "skipped", None)
    if skipped is None:
        return 0
    mask = torch.zeros(len(data.dataset), dtype=torch.int32)  # [N]: 4 bytes per file, once per run
    if skipped:
        mask[torch.tensor(sorted(skipped), dtype=torch.long)] = 1
    return int((dist.all_reduce_sum(mask) > 0).sum().item())


def set_threads(cfg: RunConfig) -> None:
    """Apply train.num_threads, then say (one line) when the CPU is already busy elsewhere."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    note = dist.oversubscription_note(torch.get_num_threads())
    if note and dist.is_main():
        tqdm.write(note, file=sys.stderr)


def setup_run(cfg: RunConfig, progress: bool = True) -> Run:
    set_threads(cfg)
    device = init_device(cfg)
    sources.resolve(cfg)  # stage 2: the frozen VAE and its statistics default to those the latents came from
    toy = _toy_setup(cfg, progress) if cfg.data.source == "toy" else None
    data = sources.training_batches(cfg, toy, pin_memory=device.type == "cuda")
    encoders = [e.to(device) for e in _encoders(cfg, toy)]  # early: a missing weight file fails fast
    # seed after the toy world is built or loaded, so initial weights do not depend on which happened
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    sit = build_sit(cfg)
    vae = AutoencoderKL(vae_args(cfg)) if cfg.vae.from_scratch else build_vae(cfg)
    if cfg.vae.latent_stats_path and not cfg.vae.from_scratch:
        mean, var = load_latent_stats(cfg.vae.latent_stats_path, channels=vae.args.z_channels)
    else:  # no statistics given: measure them on the training data, without moving its position
        from repae.models.latent_norm import measure_latent_stats

        probe = sources.training_batches(cfg, toy)
        mean, var = measure_latent_stats(vae, (probe.next(cfg.train.global_batch_size) for _ in range(20)))
    sit.bn.init_from_stats(mean, var)
    regulariser = None
    if cfg.train.tune_vae and cfg.train.use_reg_loss:
        regulariser = VAERegulariser(cfg.loss, official_lpips_range=cfg.compat == "official")
        if cfg.loss.discriminator_path:
            regulariser.load_discriminator(cfg.loss.discriminator_path)
    for module in (sit, vae, regulariser):
        if module is not None:
            module.to(device)
    m = make_trainables(cfg, sit, vae, encoders, regulariser)
    gen = torch.Generator(device).manual_seed(cfg.train.seed)
    return Run(cfg, device, m, data, gen, toy=toy)


# ----------------------------------------------------------------- checkpoint glue


def _modules(m: Trainables) -> Dict[str, torch.nn.Module]:
    mods = {"sit": m.sit, "ema": m.ema.model, "vae": m.vae}
    if m.regulariser is not None:
        mods["regulariser"] = m.regulariser
    return mods


def _optimisers(m: Trainables) -> Dict[str, torch.optim.Optimizer]:
    return {k: v for k, v in {"opt_sit": m.sit_opt, "opt_vae": m.vae_opt, "opt_disc": m.disc_opt}.items() if v}


def save(run: Run) -> Path:
    state = {"step": run.step, "rng": rng_state(run.gen), "data": run.data.state_dict(),
             "nonfinite_in_a_row": run.nonfinite_in_a_row,
             **{k: opt.state_dict() for k, opt in _optimisers(run.m).items()}}
    seconds = training_seconds(run)
    if seconds is not None:
        state["train_seconds"] = seconds
    if run.m.regulariser is not None:
        state["regulariser_rng"] = list(run.m.regulariser._rng.getstate()[1])
    return save_checkpoint(run.cfg.run_dir, run.step, _modules(run.m), state, run.cfg, run.cfg.train.keep_last)


def try_resume(run: Run) -> bool:
    """Load the newest intact checkpoint of the run, if it has one. Damaged checkpoints (failed
    manifest check, or unreadable) are each reported on one line and passed over for an older one;
    CheckpointError when the run has checkpoints and none of them loads."""
    skipped: List[str] = []
    for path in usable_checkpoints(run.cfg.run_dir, skipped):
        check_same_config(run.cfg, path / "config.yaml")
        # a pre-manifest checkpoint that is damaged, or a state.pt edited by hand (its manifest updated too):
        # every field is checked before it is applied, and a failure passes over to an older checkpoint
        try:
            modules, optimisers = _modules(run.m), _optimisers(run.m)
            weights, state = read_checkpoint(path, list(modules))
            check_train_state(state, list(optimisers), run.gen)
            run.data.load_state_dict(state["data"])  # checks the position first (ValueError)
            for name, module in modules.items():
                load_strict(module, weights[name], str(path / f"{name}.safetensors"))
            for key, opt in optimisers.items():
                opt.load_state_dict(state[key])
        except (CheckpointError, ValueError, KeyError, TypeError) as err:  # the last two: Optimizer.load_state_dict
            skipped.append(f"skipping checkpoint {path}: {err}")
            tqdm.write(skipped[-1], file=sys.stderr)
            continue
        run.step, run.nonfinite_in_a_row = state["step"], state["nonfinite_in_a_row"]
        seconds = state.get("train_seconds")  # absent from checkpoints written before it was recorded
        run.train_seconds = float(seconds) if is_number(seconds) and 0 <= seconds < float("inf") else None
        set_rng_state(state["rng"], run.gen)
        if run.m.regulariser is not None and "regulariser_rng" in state:
            run.m.regulariser._rng.setstate((3, tuple(state["regulariser_rng"]), None))
        return True
    if skipped:
        raise CheckpointError(f"{run.cfg.run_dir}: none of its {len(skipped)} checkpoints is intact; move "
                              f"{run.cfg.run_dir / 'checkpoints'} away to start the run again")
    return False


# budget, cadence, logging and where it runs: changing these and re-running continues the same run
RESUMABLE_TRAIN_KEYS = ("max_steps", "grad_accum_steps", "log_every", "ckpt_every", "keep_last", "sample_every", "log_to", "device",
                        "max_nonfinite_in_a_row", "activation_checkpointing", "channels_last", "regulariser_channels_last",
                        "compile", "compile_mode")


def check_same_config(cfg: RunConfig, saved: Path) -> None:
    """Resuming is only honest with the same recipe; the step budget and cadences may change."""
    old, new = read_yaml(saved, "the saved config of the run"), to_dict(cfg)
    try:  # through the schema, so a section or field added since the run was saved reads as its default
        old = to_dict(from_dict(old))
    except Exception:  # a key the schema no longer has: compare as saved (and differ)
        pass
    # where the run lives is not part of what it is: a moved or copied run directory resumes; nor are
    # its sampling and evaluation settings, and train.* budget and cadence keys may change between invocations
    ignore = ("sample", "eval", "output_dir", "exp_name", *(f"train.{key}" for key in RESUMABLE_TRAIN_KEYS))
    diff = config_differences(old, new, ignore)
    if diff:
        raise ConfigError(f"{cfg.run_dir} holds a run with a different config ({', '.join(diff)}); "
                          "use a new exp_name or output_dir")


# ---------------------------------------------------------------------- the loop


def _autocast(run: Run):
    return autocast(run.cfg.train.precision, run.device)


def _micro_batches(run: Run) -> list:
    cfg = run.cfg
    per_micro = cfg.train.global_batch_size // cfg.train.grad_accum_steps
    out = []
    for _ in range(cfg.train.grad_accum_steps):
        # (images, labels) or, from cached latents, (images or None, labels, (mean, std))
        out.append(_to_device(run.data.next(per_micro), run.device))
    return out


def _to_device(batch, device: torch.device):
    if isinstance(batch, (tuple, list)):
        return tuple(_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True) if batch is not None else None


def step_verdict(m: Trainables, skipped: torch.Tensor, stop: bool) -> Tuple[bool, bool, bool]:
    """(update skipped, weights fine, stop now), agreed by every rank in ONE read back to the host and
    one all-reduce of [skipped, bad weights, stop asked]. `skipped`: the step's flag (0-dim, 1 = the step
    skipped its update; the same on every rank). Weights are fine when the L2 norm of every trained weight
    tensor is finite and within WEIGHT_LIMIT on every rank: then every weight is too. Stricter than
    |w| <= WEIGHT_LIMIT only for a tensor whose norm passes the limit, whose sum of squares overflows
    float32 (unusable as WEIGHT_LIMIT's |w| is). After a skipped update (weights as they were) the check
    runs all the same, since the host learns of the skip only in this read back, and it says fine.
    `stop`: this rank got a stop signal. The step pays this host sync for the weight check anyway:
    carrying the skip and the stop flag in it costs nothing, where a read of the skip of its own would
    make the device wait for the host once more per step, and every rank stops at the same step."""
    params = [p.detach() for p in [*m.sit_params, *m.vae_params] if p.numel()]
    if m.disc_opt is not None:
        params += [p.detach() for p in m.regulariser.discriminator.parameters() if p.numel()]
    # L2, not the largest |w|: torch's CPU inf-norm took 7-11 ms on the toy's 8 M weights, its L2 norm 1.0
    largest = torch.stack(torch._foreach_norm(params)).float().amax()  # NaN stays NaN
    bad = ~(largest <= WEIGHT_LIMIT)
    flags = torch.stack([skipped.float().reshape(()).to(bad.device), bad.float()]).cpu()  # the host sync
    flags = dist.all_reduce_sum(torch.cat([flags, torch.tensor([float(stop)])]))
    was_skipped = flags[0].item() > 0
    return was_skipped, was_skipped or flags[1].item() == 0, flags[2].item() > 0


def _count_nonfinite(run: Run, what: str) -> None:
    run.nonfinite_in_a_row += 1
    tqdm.write(f"step {run.step}: {what} ({run.nonfinite_in_a_row} in a row)", file=sys.stderr)
    if run.nonfinite_in_a_row >= run.cfg.train.max_nonfinite_in_a_row:
        raise FloatingPointError(f"{run.nonfinite_in_a_row} non-finite steps in a row at step {run.step}; "
                                 "stopping (the last checkpoint is intact)")


def _roll_back(run: Run) -> None:
    """Back to the newest intact checkpoint (weights, optimisers, RNG, data position); the count of
    failed steps in a row carries over, so a fault that repeats still stops the run."""
    failed, seconds = run.nonfinite_in_a_row, run.train_seconds  # the time spent is not undone
    if not try_resume(run):
        raise FloatingPointError(f"weights became non-finite at step {run.step}, before the first checkpoint: "
                                 "nothing to roll back to")
    run.nonfinite_in_a_row, run.train_seconds = failed, seconds


def train_steps(run: Run, until: int, on_log=None, progress: bool = True, on_rewind=None, on_step=None) -> None:
    """Run steps until `run.step == until`: log, checkpoint and sample on the config's cadence.
    `on_rewind(step)`: called when a roll-back returns the run to an earlier step. `on_step(step)`:
    called once per finished optimisation step, before its logging (`repae bench loop` times there).

    A SIGINT or SIGTERM ends the loop at the next step boundary, the same step on every rank: the
    step is logged and checkpointed (rank 0 writes), then `Interrupted` is raised."""
    run.clock_since = time.perf_counter()
    try:
        with StopSignals() as signals:
            saved = _steps(run, until, signals, on_log, progress, on_rewind, on_step)
    finally:
        run.train_seconds, run.clock_since = training_seconds(run), None
    if signals.signum is not None and run.step < until:  # the stop came before the budget ran out
        raise Interrupted(signals.signum, run.step, saved)


def bar_label(cfg: RunConfig) -> str:
    """What a run trains, for its progress bar: REPA-E, E2E without REPA, or a SiT (REPA or
    vanilla) on a frozen VAE or on cached latents (`repae train-ldm`)."""
    if cfg.train.tune_vae:
        return "REPA-E" if uses_repa(cfg) else "E2E, no REPA"
    sit = "REPA SiT" if uses_repa(cfg) else "vanilla SiT"
    return f"{sit}, cached latents" if cfg.latents.path else f"{sit}, frozen VAE"


def _steps(run: Run, until: int, signals: StopSignals, on_log, progress: bool, on_rewind,
           on_step=None) -> Optional[Path]:
    """The loop of train_steps; returns the checkpoint it wrote last (None if none, or not rank 0)."""
    cfg = run.cfg
    sums: Dict[str, torch.Tensor] = {}
    count, step_seconds, saved, stop = 0, 0.0, None, False
    bar = tqdm(total=until, initial=run.step, desc=bar_label(cfg), unit="step", disable=not progress)
    while run.step < until:
        t0 = time.perf_counter()
        for opt, opt_cfg in ((run.m.sit_opt, cfg.optim_sit), (run.m.vae_opt, cfg.optim_vae),
                             (run.m.disc_opt, cfg.optim_disc)):
            set_lr(opt, opt_cfg, run.step, cfg.train.max_steps)  # a function of the step: resume-exact
        with _autocast(run):
            logs = repae_step(run.m, _micro_batches(run), cfg, run.step, run.gen)
        skipped, finite, stop = step_verdict(run.m, logs["skipped"], stop=signals.signum is not None)
        step_seconds += time.perf_counter() - t0  # training only: checkpoints and sample grids excluded
        if skipped or not finite:
            _count_nonfinite(run, "non-finite loss or gradient norm, update skipped" if skipped else
                             "non-finite weights after the update, rolled back to the newest checkpoint")
            if not skipped:  # an update cannot be undone in place: reload the newest intact checkpoint
                _roll_back(run)
                sums, count, step_seconds = {}, 0, 0.0
                bar.n = run.step
                if on_rewind:
                    on_rewind(run.step)
            if stop:
                saved = _checkpoint_after_failed_step(run, rolled_back=not skipped)
                break
            continue
        run.nonfinite_in_a_row = 0
        run.step += 1
        bar.update(1)
        if on_step:
            on_step(run.step)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        count += 1
        last = run.step == until or stop
        if run.step % cfg.train.log_every == 0 or last:
            # the only cross-rank metric traffic: one all-reduce per log line, not per step
            keys = sorted(sums)
            means = dist.all_reduce_sum(torch.stack([sums[k] for k in keys]).cpu()) / (count * dist.world_size())
            record = {"step": run.step, **{k: round(float(v), 6) for k, v in zip(keys, means)},
                      "images_per_s": round(count * cfg.train.global_batch_size / step_seconds, 2)}
            bar.set_postfix(diff=f"{record.get('diffusion', 0):.3f}", img_s=f"{record['images_per_s']:.0f}")
            if on_log:
                on_log(record)
            sums, count, step_seconds = {}, 0, 0.0
        if run.step % cfg.train.ckpt_every == 0 or last:
            if dist.is_main():
                saved = save(run)
            dist.barrier()
        if stop:  # no sample grid: the user asked to stop
            break
        if (run.step % cfg.train.sample_every == 0 or run.step == until) and dist.is_main():
            write_samples(run)
    bar.close()
    if stop and signals.signum is None:  # another rank got the signal: this one ends as under SIGTERM
        signals.signum = signal.SIGTERM
    return saved


def _checkpoint_after_failed_step(run: Run, rolled_back: bool) -> Optional[Path]:
    """The checkpoint a stop resumes from when it comes on a skipped or rolled-back update: after a
    roll-back, the checkpoint just reloaded; after a skip (weights untouched, data and RNG moved on)
    a new one at this step, unless one exists already (it is kept: never replaced in place)."""
    path = None
    if dist.is_main():
        path = checkpoint_dir(run.cfg.run_dir) / f"step-{run.step:07d}"
        if not rolled_back and not path.is_dir():
            path = save(run)
    dist.barrier()
    return path


def write_samples(run: Run) -> Path:
    """A class-ordered grid from the EMA model (column c = class c)."""
    cfg, ema = run.cfg, run.m.ema.model
    n = cfg.sample.num_samples
    labels = torch.arange(n) % cfg.model.num_classes
    images = generate_images(ema, run.m.vae, labels, batch_size=cfg.sample.batch_size, progress=False,
                             **sampler_settings(cfg, device=run.device))
    path = cfg.run_dir / "samples" / f"step-{run.step:07d}.png"
    save_image_grid(images, path, nrow=min(cfg.model.num_classes, n), upscale=max(1, 96 // images.shape[-1]))
    return path


# ------------------------------------------------------------------- entry point


@torch.no_grad()
def toy_summary(run: Run, progress: bool = False) -> dict:
    """Toy-world metrics of the finished run: the tuned VAE's PSNR and, for `eval.num_samples`
    class-balanced EMA samples (0: none), the toy evaluator's class accuracy and toy FID against
    the held-out set (`repae.evaluate.toy`), and the teacher's accuracy on them. `progress`: say that the
    final evaluation runs and show a bar while it samples (its longest part, after the training bar ended)."""
    from repae.evaluate.toy import score_samples
    from repae.toyworld import PSNR_DEFINITION, psnr

    cfg = run.cfg
    run.m.vae.eval()
    if progress:
        samples = f" and {cfg.eval.num_samples} EMA samples scored" if cfg.eval.num_samples > 0 else ""
        tqdm.write(f"final evaluation: VAE PSNR on {len(run.toy.heldout_images)} held-out images{samples}",
                   file=sys.stderr)
    summary = {
        # the whole held-out set, as `repae evaluate vae RUN --data toy` and the toy VAE's own report
        # (toy_vae_pretrained_psnr_db) take it: one image set, one definition (toyworld.PSNR_DEFINITION)
        "vae_heldout_psnr_db": round(psnr(run.m.vae, run.toy.heldout_images.to(run.device)), 3),
        "vae_heldout_psnr_images": len(run.toy.heldout_images),
        "vae_psnr_definition": PSNR_DEFINITION,
        "toy_vae_pretrained_psnr_db": run.toy.report.get("vae_heldout_psnr_db"),
        "teacher_heldout_accuracy": run.toy.report.get("teacher_heldout_accuracy"),
    }
    if cfg.eval.num_samples <= 0:
        return summary
    labels = torch.arange(cfg.eval.num_samples) % cfg.model.num_classes
    images = generate_images(run.m.ema.model, run.m.vae, labels, batch_size=100, progress=progress,
                             desc="final evaluation: sampling",
                             **sampler_settings(cfg, seed=cfg.sample.seed + 1, device=run.device))
    evaluator = run.toy.evaluator.to(run.device)  # built with the toy world (_toy_setup)
    scores = score_samples(evaluator, images, labels, run.toy.heldout_images)
    teacher_preds = run.toy.teacher.logits(images.to(run.device)).argmax(1).cpu()
    return summary | {
        "sample_class_accuracy": scores["sample_class_accuracy"],
        "sample_toy_fid": scores["sample_toy_fid"],
        "sample_teacher_accuracy": round((teacher_preds == labels).float().mean().item(), 4),
        "samples_scored": scores["samples_scored"],
        "evaluator_heldout_accuracy": run.toy.report.get("evaluator_heldout_accuracy"),
    }


def train(cfg: RunConfig, progress: bool = True) -> dict:
    """Train (or resume) the run described by `cfg`; returns its summary (also in summary.json).
    Before any work, the run directory must be writable and not in use by another process: rank 0
    holds `RUN/lock` until it returns or raises (other torchrun ranks follow rank 0)."""
    from repae.train.runlock import RunLock, check_writable

    if int(os.environ.get("RANK", "0")) != 0:
        return _train(cfg, progress)
    check_writable(cfg.run_dir)
    with RunLock(cfg.run_dir):
        return _train(cfg, progress)


def _median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _train(cfg: RunConfig, progress: bool) -> dict:
    from repae.train.report import MetricsLog, extra_sinks, plot_losses

    start = time.perf_counter()
    run = setup_run(cfg, progress and dist.is_main())
    resumed = try_resume(run)
    main = dist.is_main()  # only rank 0 writes files; every rank trains
    sinks: list = []
    if main:
        save_config(cfg, cfg.run_dir / "config.yaml")
        if resumed:
            tqdm.write(f"resuming {cfg.run_dir} from step {run.step}", file=sys.stderr)
        log = MetricsLog(cfg.run_dir / "metrics.jsonl", resumed_step=run.step if resumed else 0)
        sinks = [log, *extra_sinks(list(cfg.train.log_to), cfg.run_dir, to_dict(cfg))]
    first_step = run.step
    train_steps(run, cfg.train.max_steps, on_log=lambda record: [sink(record) for sink in sinks],
                progress=progress and main, on_rewind=log.rewind if main else None)
    bad = distinct_skipped(run.data)
    if not main:
        return {"steps": run.step, "rank": dist.rank()}
    records = log.read()
    summary = {"steps": run.step, "steps_this_invocation": run.step - first_step,
               "wall_seconds": round(time.perf_counter() - start, 1),
               # over every invocation (the checkpoints carry it), training only: what a run cost to train
               "train_seconds": None if run.train_seconds is None else round(run.train_seconds, 1),
               # the median of the log lines: the first and last intervals carry set-up and sampling
               "images_per_s": _median([r.get("images_per_s") for r in records]),
               # what train.precision=auto chose on this device: a run's speed is read against it
               "precision": resolve_precision(cfg.train.precision, run.device),
               "world_size": dist.world_size(), "final": records[-1] if records else {}}
    if hasattr(run.data, "bad_images"):
        summary["unreadable_images_skipped"] = bad
    if run.toy is not None:
        summary["toy"] = toy_summary(run, progress=progress)  # rank 0 only, as the training bar
    if records:
        summary["loss_curves"] = str(plot_losses(records, cfg.run_dir / "loss_curves.png"))
    summary["samples"] = str(cfg.run_dir / "samples" / f"step-{run.step:07d}.png")
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
