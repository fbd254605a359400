"""Run every arm of the reproduction with the same seeds, budget and data, measure each
checkpoint, and collect the results (`results.json`) for the report.

Each arm is a plain `repae train` in its own process, `jobs` at a time with the machine's cores
split between them (on this 2-core CPU two 1-thread runs give more images/s than one 2-thread
run). Everything is resumable: re-running the same command continues unfinished runs (they
resume from their checkpoints), measures only checkpoints not yet measured, and starts no process
for a run that is trained and measured already.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from repae import dist
from repae.config import ConfigError, RunConfig, load_config
from repae.fileio import JsonFileError, is_number, read_json_object, write_json_atomic
from repae.reproduce.arms import CFG_SWEEP_ARMS, Arm, arms_for, select_arms
from repae.reproduce.judges import HELDOUT_IMAGES, Judges, build_real_judges, load_real_judges, save_real_judges, toy_judges
from repae.reproduce.measure import image_spectrum_metrics, measure_run, needs_measuring, real_image_rows, vae_metrics


@dataclass
class Plan:
    """The budget: the same for every arm."""

    steps: int
    eval_every: int  # a checkpoint (and a measurement) every this many steps
    seeds: List[int] = field(default_factory=lambda: [0])
    samples: int = 250  # class-balanced samples per measurement
    final_samples: Optional[int] = None  # samples at the last step, where the verdicts are read (None: `samples`)
    jobs: int = 2  # runs at once
    arms: Optional[List[str]] = None  # arm names to train, in this order (None: every arm of the config)
    # CFG scales the last step of CFG_SWEEP_ARMS is measured at too: a guidance sweep, as papers tune the scale
    cfg_scales: List[float] = field(default_factory=list)

    def scales_for(self, arm: str) -> Sequence[float]:
        """The CFG scales the arm's last step is measured at (none for an arm no guided verdict reads)."""
        return self.cfg_scales if arm in CFG_SWEEP_ARMS else ()


# --quick, a check that the whole pipeline runs (its budget is too small for the generation claims): one
# measurement per arm at 150 steps. 300 steps with three measurements took over 30 minutes on a 2-core
# AVX2-only CPU (toy world v5: one of eight arms done after 20.6 min). With 200 samples per measurement
# (with and without CFG: 49.3 s and 25.8 s on one thread) it took 30.6 min on toy world v6, so it draws 100:
# 10 per class, enough to tell a collapsed arm from a working one, which is all this budget can judge.
# The time of this plan: README
QUICK = Plan(steps=150, eval_every=150, seeds=[0], samples=100, jobs=2)
# the default. Toy world v7 on a 2-core Xeon, two runs at once with one thread each: training 1196-1230 s per
# REPA-E run, 376-546 s per frozen-VAE run, 497-556 s per diffusion-only run, 6.7-8.3 min measuring each run (4
# checkpoints x 500 samples with and without CFG); every arm with 3 seeds took 275.8 min (docs/reproduction/v7/
# REPRODUCTION.md; toy world v8's, with the 2000-sample last step and the sweep: REPRODUCTION.md).
# Re-running the same command after an interruption continues where it stopped
# The last step is measured with 2000 samples: at 500 the toy FID of one checkpoint moved by 0.7 (std) between
# sampler seeds (toy world v7, REPA at step 1200, without CFG: 6.4-8.4 over five), as much as the arms differ by.
# The guidance sweep: the toy preset's CFG 4 was chosen at ad90d20 (before toy world v3) on that day's default run by
# the teacher's class accuracy of 200 samples (repae.config's toy preset), not by FID; on toy world v8 a first sweep (benchmarks/class_mix_fid.py, seeds 0 and 1, 1000 samples) put both REPA-E's
# and REPA's lowest toy FID between 1.5 and 2.5. The grid is the scales between 1 (the unguided samples) and the run's.
FULL = Plan(steps=1200, eval_every=300, seeds=[0, 1], samples=500, final_samples=2000, jobs=2,
            cfg_scales=[1.5, 2.0, 2.5, 3.0])


# The toy world's guided verdicts ((c), (d) with CFG) are read at the CFG scale they were defined with: 4, the
# toy preset's scale from ad90d20 (chosen then by class accuracy on that day's default run). Once the VAE trained
# at the paper's lr ratio the preset's default run moved to 2.5 (its class accuracy: repae.config's note); the
# reproduction keeps 4, as a criterion is not moved after its results are seen. The guidance sweep
# (Plan.cfg_scales) reads every arm at the other scales.
TOY_GUIDED_SCALE = 4.0


def guided_scale_pin(preset: str) -> List[str]:
    """The override that draws a toy reproduction's guided samples at TOY_GUIDED_SCALE (an explicit
    `sample.cfg_scale=` given after it still wins)."""
    return [f"sample.cfg_scale={TOY_GUIDED_SCALE}"] if preset == "toy" else []


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


def train_overrides(arm: Arm, seed: int, plan: Plan, overrides: Sequence[str], out: Path,
                    preset: str) -> List[str]:
    """The `a.b=value` overrides of one arm x seed's `repae train`, after the preset and config files."""
    # The arms are compared along their learning curves, at a checkpoint every plan.eval_every steps: at the
    # paper's constant lr each is a mid-run state, not the end of a schedule decayed to that step (the toy
    # preset's decay is for its single default run). An explicit override still wins.
    constant_lr = [f"optim_{part}.decay_fraction=0" for part in ("sit", "vae", "disc")]
    args = [*constant_lr, *guided_scale_pin(preset), *overrides,
            *arm.overrides, f"output_dir={out / 'runs'}", f"exp_name={run_name(arm, seed)}", f"train.seed={seed}",
            f"train.max_steps={plan.steps}", f"train.ckpt_every={plan.eval_every}", "train.keep_last=0",
            f"train.sample_every={plan.steps}", "eval.num_samples=0"]  # the runner measures; no end-of-run eval
    if arm.vae_from:
        vae = out / "runs" / run_name(Arm(arm.vae_from, "", ()), seed) / "e2e-vae"
        args += [f"vae.path={vae / 'vae.safetensors'}", f"vae.latent_stats_path={vae / 'latent_stats.safetensors'}"]
    return args


def train_command(arm: Arm, seed: int, plan: Plan, preset: str, overrides: Sequence[str], out: Path,
                  config_files: Sequence[str] = ()) -> List[str]:
    files = [a for f in config_files for a in ("--config", str(Path(f).resolve()))]
    return [sys.executable, "-m", "repae.cli", "train", "--preset", preset, *files, "--no-progress",
            *train_overrides(arm, seed, plan, overrides, out, preset)]


def planned_config(arm: Arm, seed: int, plan: Plan, preset: str, overrides: Sequence[str],
                   config_files: Sequence[str], out: Path) -> RunConfig:
    """The config one arm x seed's `repae train` runs with, its toy-world files resolved as `repae train` resolves
    them before comparing it with a run directory's saved config (the world's files are named, not built)."""
    from repae.build import vae_args
    from repae.toyworld import toy_vae_files
    from repae.train.loop import use_toy_vae

    cfg = load_config(preset, list(config_files), train_overrides(arm, seed, plan, overrides, out, preset),
                      world_size=1)
    if cfg.data.source == "toy":
        use_toy_vae(cfg, *toy_vae_files(vae_args(cfg), cfg.toy))
    return cfg


def check_existing_runs(arms: Sequence[Arm], plan: Plan, preset: str, overrides: Sequence[str],
                        config_files: Sequence[str], out: Path) -> None:
    """ConfigError, before anything is built or trained, when a run directory in `out` holds a run of another
    recipe than this invocation would train there: `repae train` would refuse each of them, and the refusals
    would stand in results.json in place of the finished runs' records (seen: the same command under another
    REPAE_CACHE, whose world's VAE files the saved configs do not name)."""
    from repae.train.loop import check_same_config

    clashes = []
    for arm in arms:
        for seed in plan.seeds:
            saved = out / "runs" / run_name(arm, seed) / "config.yaml"
            if saved.is_file():
                try:
                    check_same_config(planned_config(arm, seed, plan, preset, overrides, config_files, out), saved)
                except ConfigError as err:
                    clashes.append(str(err).split("; use a new")[0])
    if clashes:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise ConfigError(f"{clashes[0]}{more}: this invocation would train another recipe there, so nothing was "
                          f"built, trained or recorded. Run it with the overrides, config files and toy-world cache "
                          f"(REPAE_CACHE, toy.cache_dir) the runs in {out} were trained with, or give another --dir")


class _Runner:
    def __init__(self, plan: Plan, preset: str, overrides: Sequence[str], config_files: Sequence[str], out: Path,
                 threads: int, earlier_runs: Dict[str, dict], on_record: Callable[[], None] = lambda: None,
                 judges_dir: Optional[Path] = None):
        self.plan, self.preset, self.overrides, self.config_files, self.out = plan, preset, list(overrides), config_files, out
        self.judges_dir = judges_dir  # real-data judges saved for the measuring processes (None: the toy world's)
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.lock = threading.Lock()
        self.runs: Dict[str, dict] = {}
        self.earlier = earlier_runs  # records of earlier invocations: training time adds up over resumes
        self.children: set = set()
        self.stopping = False
        self.on_record = on_record  # called (under the lock) after each run's training

    def stop(self) -> None:
        """Ctrl-C or a failure: no new run starts, running ones are terminated."""
        with self.lock:
            self.stopping = True
            for child in list(self.children):
                child.terminate()

    def _log(self, msg: str) -> None:
        with self.lock:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def _call(self, cmd: List[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            with self.lock:
                if self.stopping:
                    raise RuntimeError("reproduction stopped")
                child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
                self.children.add(child)
            try:
                return child.wait()
            finally:
                with self.lock:
                    self.children.discard(child)

    def run(self, arm: Arm, seed: int, wait_for: Dict[str, Future]) -> dict:
        name = run_name(arm, seed)
        if arm.vae_from:
            wait_for[run_name(Arm(arm.vae_from, "", ()), seed)].result()
        run_dir = self.out / "runs" / name
        log = self.out / "logs" / f"{name}.log"
        trained = self._trained_already(arm, seed, run_dir)
        if trained:
            self._log(f"{name}: trained already ({self.plan.steps} steps)")
            code, seconds = 0, self.earlier[name]["train_seconds"]
        else:
            self._log(f"train {name}")
            start = time.perf_counter()
            code = self._call(train_command(arm, seed, self.plan, self.preset, self.overrides, self.out,
                                            self.config_files), log)
            seconds = time.perf_counter() - start + self.earlier.get(name, {}).get("train_seconds", 0.0)
        record = {"arm": arm.name, "seed": seed, "train_seconds": round(seconds, 1), "exit_code": code, "log": str(log)}
        own = _own_training_seconds(run_dir, self.plan.steps) if code == 0 else None
        if own is not None:  # the run's own total over its invocations: it survives an invocation's lost record
            record.update(train_seconds=own, train_seconds_from="run")
        if code != 0:  # e.g. the no-stop-grad arm aborting on non-finite losses: a result, not a crash
            record["failed"] = _last_line(log)
            self._log(f"{name} stopped with exit code {code}: {record['failed']}")
        with self.lock:  # the training is recorded before measuring: a failed measurement keeps it
            self.runs[name] = record
            self.on_record()
        if self.stopping:  # stopped from outside (Ctrl-C, SIGTERM): neither measured nor done
            self._log(f"{name}: stopped at the runner's request")
            return record
        from repae.train.checkpoint import has_checkpoints

        if has_checkpoints(run_dir):
            if arm.name == "repae" and not (trained and _exported(run_dir, self.plan.steps)):
                from repae.stage2.export import export_vae

                export_vae(run_dir)  # its tuned VAE is stage 2's frozen VAE
            scales = self.plan.scales_for(arm.name)
            if needs_measuring(run_dir, self.plan.samples, self.plan.eval_every, self.plan.steps, self.plan.final_samples,
                               scales):
                self._log(f"measure {name}")
                measure = [sys.executable, "-m", "repae.reproduce.measure", str(run_dir), "--samples",
                           str(self.plan.samples), "--every", str(self.plan.eval_every), "--final-step", str(self.plan.steps)]
                if self.plan.final_samples is not None:
                    measure += ["--final-samples", str(self.plan.final_samples)]
                if scales:
                    measure += ["--cfg-scales", *map(str, scales)]
                if self.judges_dir is not None:
                    measure += ["--judges", str(self.judges_dir)]
                if self._call(measure, log) != 0:
                    raise RuntimeError(f"measuring {run_dir} failed; see {log}")
        self._log(f"done {name} ({record['train_seconds']:.0f} s training)")
        return record

    def _trained_already(self, arm: Arm, seed: int, run_dir: Path) -> bool:
        """Whether an earlier invocation trained this run to the plan's last step with this very recipe:
        the same `repae train` would only load it and exit, at the cost of a process that imports torch
        and loads the world (~10-20 s here). A different recipe still goes to `repae train`, which refuses it."""
        from repae.train.loop import check_same_config

        earlier = self.earlier.get(run_name(arm, seed), {})
        if earlier.get("exit_code") != 0 or "train_seconds" not in earlier:
            return False
        try:
            steps = read_json_object(run_dir / "summary.json").get("steps")
        except JsonFileError:
            return False
        if steps != self.plan.steps:
            return False
        try:
            check_same_config(planned_config(arm, seed, self.plan, self.preset, self.overrides, self.config_files,
                                             self.out), run_dir / "config.yaml")
        except ConfigError:
            return False
        return True


def _read_previous(path: Path) -> dict:
    """An earlier invocation's results.json ({} when there is none), checked where this one builds on it:
    `runs` (name -> record with a numeric train_seconds and an integer exit_code) and `invocations` (a list).
    ConfigError with the remedy otherwise: the file is a record, and its runs are kept without it."""
    if not path.is_file():
        return {}
    remedy = ("move it away or delete it to go on: the runs under runs/ are kept and not trained again, only "
              "the training time of earlier invocations goes uncounted")
    try:
        previous = read_json_object(path)
    except JsonFileError as err:
        raise ConfigError(f"{err}; {remedy}") from None

    runs = previous.get("runs", {})
    ok = (isinstance(runs, dict) and isinstance(previous.get("invocations", []), list)
          and all(isinstance(r, dict) and is_number(r.get("train_seconds", 0.0))
                  and is_number(r.get("exit_code", 0), int) for r in runs.values()))
    if not ok:
        raise ConfigError(f"{path} is not a results record this reproduction can continue (runs must map names to "
                          f"records with numeric train_seconds and exit_code, invocations be a list); {remedy}")
    return previous


def _exported(run_dir: Path, step: int) -> bool:
    """Whether RUN/e2e-vae already holds the VAE of the checkpoint at `step`."""
    try:
        return read_json_object(run_dir / "e2e-vae" / "export.json").get("step") == step
    except JsonFileError:
        return False


def _own_training_seconds(run_dir: Path, steps: int) -> Optional[float]:
    """The training time over all its invocations that a `repae train` finished at `steps` wrote in its
    summary.json; None where there is none: the summary is of another budget, or the run's checkpoints
    predate the record."""
    try:
        summary = read_json_object(run_dir / "summary.json")
    except JsonFileError:
        return None
    seconds = summary.get("train_seconds")
    if summary.get("steps") != steps or not is_number(seconds) or seconds < 0:
        return None
    return float(seconds)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def judges_for_plan(base: RunConfig, out: Path, heldout: Optional[str] = None,
                    heldout_images: Optional[int] = None) -> Tuple[Judges, Optional[Path]]:
    """(judges, the directory they are saved in for the measuring processes, None for the toy world's).

    Real-data judges are built once per output directory and reused when the command is re-run:
    the measurements already made there were made against them."""
    check_named_files(base)
    if base.data.source == "toy":
        if heldout or heldout_images:
            raise ConfigError("--heldout and --heldout-images are for real data: the toy world has its own held-out set")
        return toy_judges(base), None  # builds the toy world and evaluator once, with every core
    if heldout_images is not None and heldout_images < 2:
        raise ConfigError(f"--heldout-images {heldout_images}: FID and CKNNA need at least 2 images")
    saved = out / "judges"
    if (saved / "judges.json").is_file():
        judges = load_real_judges(saved, base.train.device)
        wanted, had = str(heldout or base.data.path), judges.info.get("data")
        if had != wanted or heldout_images not in (None, judges.info.get("heldout_images")):
            raise ConfigError(f"{out} was measured against {judges.info.get('heldout_images')} held-out images from "
                              f"{had}: use another --dir (or delete {saved} and every run's reproduce-metrics.json)")
        return judges, saved
    judges = build_real_judges(base, heldout, heldout_images or HELDOUT_IMAGES)
    return judges, save_real_judges(judges, saved)


_HUB_KINDS = {"vae.path": "vae", "vae.latent_stats_path": "latent_stats", "loss.lpips_path": "lpips",
              "loss.vgg_path": "vgg", "loss.discriminator_path": "discriminator",
              "eval.inception_path": "inception", "encoder.paths": "encoder"}


def check_named_files(cfg: RunConfig) -> None:
    """Every local file the config names must exist: a wrong path fails here, not in each arm's process.
    A hub id is resolved here (downloaded once, or found in the cache), with the same early failure."""
    from repae import hub

    named = {"vae.path": cfg.vae.path, "vae.latent_stats_path": cfg.vae.latent_stats_path,
             "loss.lpips_path": cfg.loss.lpips_path, "loss.vgg_path": cfg.loss.vgg_path,
             "loss.discriminator_path": cfg.loss.discriminator_path, "eval.inception_path": cfg.eval.inception_path,
             "eval.ref_batch": cfg.eval.ref_batch, "data.path": cfg.data.path,
             **{f"encoder.paths[{i}]": p for i, p in enumerate(cfg.encoder.paths)}}
    for key, path in named.items():
        if hub.is_hub_id(path):
            hub.resolve(path, _HUB_KINDS.get(key.split("[")[0], "file"))
    missing = [f"{key}={path}" for key, path in named.items()
               if path and not hub.is_hub_id(path) and not Path(path).exists()]
    if missing:
        raise ConfigError("not found: " + ", ".join(missing))


def starting_vae(base: RunConfig, judges: Judges):
    """The VAE every arm starts from, on the device the runs use."""
    from repae.build import vae_args
    from repae.weights import load_model

    return load_model(judges.starting_vae, kind="vae", args=vae_args(base)).to(dist.device_named(base.train.device))


class Terminated(SystemExit):
    """SIGTERM reached the runner (`kill`, a scheduler): its runs are stopped, not left running without it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(128 + signum)


def _stop_on_sigterm():
    """SIGTERM's default kills the runner at once and leaves its training processes running (each holding its
    run's lock, so the next invocation cannot resume them): raise instead, so the runner stops them (they save a
    checkpoint on SIGTERM) and records its progress. Returns the handler replaced (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def run_reproduction(out: Path, plan: Plan, preset: str = "toy", overrides: Sequence[str] = (),
                     config_files: Sequence[str] = (), invocation: Optional[dict] = None,
                     heldout: Optional[str] = None, heldout_images: Optional[int] = None) -> dict:
    """Train and measure every arm x seed; returns (and writes to OUT/results.json) the results.

    `heldout`, `heldout_images`: real data only, a folder of labelled images to measure against
    (default: the training data) and how many of its images (spread evenly; default 1000).
    `invocation` (command, commit, machine) is appended to the invocations that results.json
    lists. After each finished run results.json is rewritten as partial, so an invocation that
    stops (Ctrl-C, a crash) still counts its training time and wall time in the next one's report."""
    start = time.perf_counter()
    base: RunConfig = load_config(preset, list(config_files), [*guided_scale_pin(preset), *overrides], world_size=1)
    arms = select_arms(arms_for(base), plan.arms)  # before the world is built: a wrong name fails at once
    if plan.cfg_scales:  # the sweep's ends, scale 1 (unguided) and the run's own, are measured anyway: reused
        plan = replace(plan, cfg_scales=sorted({*map(float, plan.cfg_scales), 1.0, float(base.sample.cfg_scale)}))
    check_existing_runs(arms, plan, preset, overrides, config_files, out)
    out.mkdir(parents=True, exist_ok=True)
    judges, judges_dir = judges_for_plan(base, out, heldout, heldout_images)
    # the starting VAE, and the held-out images' own DCT spectrum that the latents' are drawn against
    vae = starting_vae(base, judges)
    initial = {**vae_metrics(vae, judges), **image_spectrum_metrics(judges.heldout_images)}
    # where real images stand, for the report: as many as the verdicts' step is measured with
    real = real_image_rows(base, judges, vae, plan.final_samples or plan.samples)
    del vae
    threads = max(1, dist.usable_cores() // plan.jobs)
    previous = _read_previous(out / "results.json")
    earlier, invocations = previous.get("runs", {}), previous.get("invocations", [])

    def this_invocation(**extra) -> list:
        return [{**invocation, "wall_seconds": round(time.perf_counter() - start, 1), **extra}] if invocation else []

    def save_progress() -> None:
        write_json_atomic(out / "results.json", {**previous, "partial": True, "runs": {**earlier, **runner.runs},
                                                 "invocations": invocations + this_invocation(interrupted=True)})

    runner = _Runner(plan, preset, overrides, config_files, out, threads, earlier, save_progress, judges_dir)
    futures: Dict[str, Future] = {}
    pool = ThreadPoolExecutor(max_workers=plan.jobs)
    previous_term = _stop_on_sigterm()
    try:
        # stage-2 arms last: they wait for the REPA-E run whose VAE they use
        for arm in sorted(arms, key=lambda a: a.vae_from is not None):
            for seed in plan.seeds:
                futures[run_name(arm, seed)] = pool.submit(runner.run, arm, seed, futures)
        for f in futures.values():
            f.result()
    except BaseException:  # Ctrl-C or a failed measurement: stop everything now, keep what is done
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        with runner.lock:
            save_progress()  # this invocation's wall time up to the stop
        raise
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    pool.shutdown()
    metrics = {arm.name: {str(seed): measure_run(out / "runs" / run_name(arm, seed), plan.samples, judges,
                                                 every=plan.eval_every, final_step=plan.steps,
                                                 final_samples=plan.final_samples,
                                                 cfg_scales=plan.scales_for(arm.name))
                          for seed in plan.seeds} for arm in arms}
    results = {
        "plan": asdict(plan), "preset": preset, "overrides": list(overrides), "num_classes": base.model.num_classes,
        "arms": [asdict(a) for a in arms], "initial_vae": initial, "real_images": real, "judges": judges.info,
        "runs": runner.runs, "metrics": metrics, "threads_per_run": threads,
        "wall_seconds": round(time.perf_counter() - start, 1), "invocations": invocations + this_invocation(),
    }
    write_json_atomic(out / "results.json", results)
    return results
