"""Stopping cleanly: SIGINT/SIGTERM during `repae train` save the current step and exit 130/143
with one line and no traceback; a second signal while saving leaves no damaged checkpoint; user
mistakes print one line and exit 2 (`--debug` adds the traceback)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import repae
from repae import cli
from repae.cli import main
from repae.config import load_config
from repae.data.folder import UnreadableImagesError
from repae.train import checkpoint as ckpt_mod
from repae.train.checkpoint import check_checkpoint, step_dirs
from repae.train.loop import train

from test_train_loop import TINY

SRC = str(Path(repae.__file__).resolve().parents[1])
LONG = ["train.max_steps=100000", "train.ckpt_every=100000", "train.sample_every=100000", "train.log_every=1",
        "eval.num_samples=0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny toy world, built once for the module (each run below only loads it)."""
    path = tmp_path_factory.mktemp("toy-cache")
    train(load_config("toy", overrides=TINY + [f"toy.cache_dir={path}", "eval.num_samples=0", "train.max_steps=1",
                                               f"output_dir={tmp_path_factory.mktemp('warm')}"]), progress=False)
    return path


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def interrupt_a_run(tmp_path, cache, signum):
    """Start `repae train` for a long budget, send `signum` once it has logged 2 steps; returns
    (return code, stderr, run dir)."""
    args = [*TINY, *LONG, f"toy.cache_dir={cache}", f"output_dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "repae.cli", "train", "--no-progress", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = load_config("toy", overrides=args).run_dir
    deadline = time.monotonic() + 60
    while len(logged_steps(run_dir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err, run_dir


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_current_step_and_the_rerun_resumes_there(tmp_path, cache, signum, code, capsys):
    rc, err, run_dir = interrupt_a_run(tmp_path, cache, signum)
    assert rc == code, err
    assert "Traceback" not in err
    # the toy world's one line (cached here: repae.toyworld_console), then the interruption's one line; on a
    # machine busy with other work, a note on shared cores may come first (repae.dist.oversubscription_note)
    lines = [line for line in err.strip().splitlines()
             if not line.startswith("toy world: cached in ") and "expect a large slowdown" not in line]
    assert len(lines) == 1, err
    step = logged_steps(run_dir)[-1]
    ckpt = run_dir / "checkpoints" / f"step-{step:07d}"
    assert lines[0] == f"interrupted at step {step}: saved {ckpt}; run the same command to resume"
    assert step_dirs(run_dir) == [ckpt] and check_checkpoint(ckpt)[0] == "intact"
    assert logged_steps(run_dir) == list(range(1, step + 1))

    args = [*TINY, *LONG, f"toy.cache_dir={cache}", f"output_dir={tmp_path}", f"train.max_steps={step + 1}"]
    assert main(["train", "--no-progress", *args]) == 0
    assert f"resuming {run_dir} from step {step}" in capsys.readouterr().err
    assert logged_steps(run_dir) == list(range(1, step + 2))  # the log continues, each step once



def test_a_second_repae_train_on_a_run_in_use_is_refused_and_the_first_goes_on(tmp_path, cache):
    """Two real `repae train` processes on one run directory (issue 17): the second exits 2 with one
    line naming the first's PID before touching anything; the first's log keeps each step once."""
    args = [*TINY, *LONG, f"toy.cache_dir={cache}", f"output_dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "repae.cli", "train", "--no-progress", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = load_config("toy", overrides=args).run_dir
        deadline = time.monotonic() + 60
        while len(logged_steps(run_dir)) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        second = subprocess.run([sys.executable, "-m", "repae.cli", "train", "--no-progress", *args], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        err = [line for line in second.stderr.strip().splitlines() if not line.startswith("toy world: ")]
        assert len(err) == 1 and f"PID {first.pid}" in err[0] and "in use" in err[0], second.stderr
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 143, first_err
    steps = logged_steps(run_dir)
    assert steps == list(range(1, steps[-1] + 1))  # one writer: each step once, in order
    assert not (run_dir / "lock").exists()

def test_a_second_signal_while_saving_leaves_no_damaged_checkpoint(tmp_path, cache, monkeypatch, request):
    """First SIGINT at step 3 -> the loop saves step 3; a second SIGINT in the middle of writing it
    stops at once (KeyboardInterrupt); the half-written checkpoint is never taken for one."""
    cfg = load_config("toy", overrides=TINY + [f"toy.cache_dir={cache}", f"output_dir={tmp_path}",
                                               "train.max_steps=100", "train.ckpt_every=2", "eval.num_samples=0"])
    import repae.train.loop as loop

    # a process started in the background (as CI may start this suite) inherits SIGINT ignored, and
    # then the second Ctrl-C is ignored too, rightly: give this test the interactive disposition
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    real_step, real_save = loop.repae_step, ckpt_mod.save_weights
    monkeypatch.setattr(loop, "repae_step", lambda m, batches, c, step, gen: (
        os.kill(os.getpid(), signal.SIGINT) if step == 2 else None, real_step(m, batches, c, step, gen))[1])

    def save_weights(module, path, metadata=None):
        real_save(module, path, metadata)
        if "step-0000003" in str(path):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, mid-checkpoint

    monkeypatch.setattr(ckpt_mod, "save_weights", save_weights)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert step_dirs(cfg.run_dir) == [cfg.run_dir / "checkpoints" / "step-0000002"]
    monkeypatch.undo()
    summary = train(load_config("toy", overrides=TINY + [f"toy.cache_dir={cache}", f"output_dir={tmp_path}",
                                                         "train.max_steps=4", "train.ckpt_every=2",
                                                         "eval.num_samples=0"]), progress=False)
    assert summary["steps"] == 4 and summary["steps_this_invocation"] == 2


# ------------------------------------------------------------------ the command line's error handling


def test_a_config_error_is_one_line_and_exit_2_and_debug_shows_the_traceback(capsys):
    assert main(["config", "train.max_steps=abc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("repae config: error: ")
    for argv in (["--debug", "config", "train.max_steps=abc"], ["config", "--debug", "train.max_steps=abc"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "ConfigError" in err
        assert err.strip().splitlines()[-1].startswith("repae config: error: ")


def _raising(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc,line", [
    (FileNotFoundError(2, "No such file or directory", "/data/imagenet"),
     "repae config: error: no such file or directory: /data/imagenet"),
    # as a DataLoader worker re-raises it: the worker's traceback inside the message
    (UnreadableImagesError(
        "Caught UnreadableImagesError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n  File \"x.py\", line 1, in f\nrepae.data.folder.UnreadableImagesError: 100 unreadable images "
        "in a row from /d/a.png: is this an image folder?\n"),
     "repae config: error: 100 unreadable images in a row from /d/a.png: is this an image folder?"),
    (KeyboardInterrupt(), "repae config: interrupted"),
    # the user's disk or permissions (were tracebacks, often after all the work): one line naming the file
    (OSError(28, "No space left on device", "runs/toy/checkpoints/step-0000002.tmp/vae.safetensors"),
     "repae config: error: No space left on device: runs/toy/checkpoints/step-0000002.tmp/vae.safetensors"),
    (OSError(30, "Read-only file system", "ro/x.png"), "repae config: error: Read-only file system: ro/x.png"),
    (PermissionError(13, "Permission denied", "/data/out"), "repae config: error: Permission denied: /data/out"),
    # a run that diverged: its message says where and that the last checkpoint is intact (was a traceback)
    (FloatingPointError("10 non-finite steps in a row at step 0; stopping (the last checkpoint is intact)"),
     "repae config: error: 10 non-finite steps in a row at step 0; stopping (the last checkpoint is intact)"),
])
def test_user_errors_and_ctrl_c_outside_training_print_one_line(monkeypatch, capsys, exc, line):
    monkeypatch.setattr(cli, "cmd_config", _raising(exc))
    assert main(["config"]) == (130 if isinstance(exc, KeyboardInterrupt) else 2)
    assert capsys.readouterr().err == line + "\n"


def test_other_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "cmd_config", _raising(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        main(["config"])
    monkeypatch.setattr(cli, "cmd_config", _raising(OSError(5, "Input/output error", "x")))  # not the user's to fix
    with pytest.raises(OSError):
        main(["config"])


@pytest.mark.parametrize("argv, flag", [
    (["sample", "--random-init", "--out", "{ro}/grid.png"], "--out"),
    (["sample", "--random-init", "--npz", "{ro}/deeper/s.npz"], "--npz"),
    (["prepare-data", "{tmp}", "{ro}/packed"], "OUT"),
    (["evaluate", "samples", "{tmp}/s.npz", "--out", "{ro}/r.json"], "--out"),
])
def test_an_output_where_nothing_can_be_written_is_refused_with_the_arguments(tmp_path, monkeypatch, capsys, argv,
                                                                               flag):
    # was: the work done, then a traceback on saving (a read-only mount, another user's folder). os.access is
    # faked for one directory: this test runs as root too, which may write anywhere
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    with pytest.raises(SystemExit) as exc:
        main([a.format(ro=ro, tmp=tmp_path) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: cannot write {ro}" in err and f"{ro} is not writable" in err



@pytest.mark.slow
def test_kill_9_at_random_moments_then_the_same_command_ends_bit_identical(tmp_path, cache):
    """SIGKILL (no handler runs) of `repae train` at seeded random moments (while it imports, trains, writes a
    checkpoint or its log), then the same command again, until one finishes: the weights equal an
    uninterrupted run's bit for bit and the log holds each step once (issue 17)."""
    import random

    from repae.train.checkpoint import latest_checkpoint
    from repae.weights import read_file

    steps = 40  # enough that most kills land mid-run, though every restart pays the imports again
    budget = [f"train.max_steps={steps}", "train.ckpt_every=1", "train.log_every=1", "train.keep_last=2",
              "train.sample_every=100000", "eval.num_samples=0"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

    def command(out):
        return [sys.executable, "-m", "repae.cli", "train", "--no-progress", *TINY, *budget,
                f"toy.cache_dir={cache}", f"output_dir={out}"]

    start = time.monotonic()
    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True, timeout=300)
    whole = time.monotonic() - start
    rng, kills, progress = random.Random(17), 0, []
    killed_dir = load_config("toy", overrides=TINY + [f"output_dir={tmp_path / 'killed'}"]).run_dir
    for _ in range(6):
        proc = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, whole / 2))  # from the imports to well into the run
        if proc.poll() is not None:  # it finished first
            break
        proc.kill()
        proc.wait()
        kills += 1
        progress.append(len(logged_steps(killed_dir)))
    print(f"uninterrupted run {whole:.1f} s; steps logged at each kill: {progress}")
    done = subprocess.run(command(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert kills >= 3 and sum(0 < n < steps for n in progress) >= 2, progress  # kills landed mid-run
    assert logged_steps(killed_dir) == list(range(1, steps + 1))
    straight_dir = load_config("toy", overrides=TINY + [f"output_dir={tmp_path / 'straight'}"]).run_dir
    for name in ("sit", "ema", "vae", "regulariser"):
        a = read_file(latest_checkpoint(straight_dir) / f"{name}.safetensors")
        b = read_file(latest_checkpoint(killed_dir) / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
