"""Faults a run must survive without losing more than the damaged part: damaged or missing
checkpoints, a torn metrics log, a second process on the same run, an unwritable output
directory, non-finite weights, and a run directory that was moved."""

import json
import shutil

import pytest
import torch
from torch import nn

from repae.config import load_config
from repae.train.checkpoint import latest_checkpoint, save_checkpoint, step_dirs
from repae.train.loop import train
from repae.weights import CheckpointError, read_file

from test_train_loop import TINY

MODULES = ("sit", "ema", "vae", "regulariser")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")


def cfg_for(out, cache, *extra):
    return load_config("toy", overrides=TINY + [f"toy.cache_dir={cache}", f"output_dir={out}", *extra])


def weights_of(ckpt):
    return {name: read_file(ckpt / f"{name}.safetensors") for name in MODULES}


def assert_same_weights(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """An uninterrupted 6-step run: what every recovered run must end equal to."""
    cfg = cfg_for(tmp_path_factory.mktemp("straight"), cache, "train.max_steps=6")
    train(cfg, progress=False)
    return weights_of(latest_checkpoint(cfg.run_dir))


# ------------------------------------------------------------------ damaged checkpoints


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_in_the_middle(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 10240] = bytes((i * 37 + 11) % 256 for i in range(10240))[: len(data[mid:mid + 10240])]
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage,file", [(_truncate, "sit.safetensors"), (_garbage_in_the_middle, "state.pt"),
                                         (_garbage_in_the_middle, "vae.safetensors")])
def test_a_damaged_newest_checkpoint_falls_back_to_an_older_intact_one(tmp_path, cache, straight, damage, file,
                                                                         capsys):
    train(cfg_for(tmp_path, cache, "train.max_steps=4"), progress=False)
    cfg = cfg_for(tmp_path, cache, "train.max_steps=6")
    damage(cfg.run_dir / "checkpoints" / "step-0000004" / file)
    summary = train(cfg, progress=False)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-0000004" in err and file in err
    assert summary["steps_this_invocation"] == 4  # from step 2, the newest intact one
    assert_same_weights(straight, weights_of(latest_checkpoint(cfg.run_dir)))
    assert logged_steps(cfg.run_dir) == [2, 4, 6]


@pytest.mark.slow
def test_a_deleted_latest_pointer_resumes_from_the_newest_checkpoint(tmp_path, cache):
    train(cfg_for(tmp_path, cache, "train.max_steps=4"), progress=False)
    cfg = cfg_for(tmp_path, cache, "train.max_steps=6")
    (cfg.run_dir / "checkpoints" / "latest").unlink()
    summary = train(cfg, progress=False)
    assert summary["steps_this_invocation"] == 2
    assert logged_steps(cfg.run_dir) == [2, 4, 6]
    assert (cfg.run_dir / "checkpoints" / "latest").read_text() == "step-0000006"


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_not_restarted(tmp_path):
    cfg = load_config("toy", overrides=[f"output_dir={tmp_path}"])
    save_checkpoint(cfg.run_dir, 1, {"m": nn.Linear(2, 2)}, {"step": 1}, cfg)
    _truncate(cfg.run_dir / "checkpoints" / "step-0000001" / "m.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        latest_checkpoint(cfg.run_dir)
    # sample, evaluate and export-vae read it too: restoring comes first, training afresh is the other way out
    assert "until one is restored from a copy" in str(err.value)


def _save_tiny(cfg, step, keep_last):
    torch.manual_seed(step)
    mods = {name: nn.Linear(2, 2) for name in ("sit", "ema", "vae")}
    return save_checkpoint(cfg.run_dir, step, mods, {"step": step}, cfg, keep_last=keep_last)


def test_pruning_keeps_intact_checkpoints_and_never_counts_damaged_ones(tmp_path):
    cfg = load_config("toy", overrides=[f"output_dir={tmp_path}"])
    for step in (1, 2, 3):
        _save_tiny(cfg, step, keep_last=2)
    assert [p.name for p in step_dirs(cfg.run_dir)] == ["step-0000003", "step-0000002"]
    _garbage_in_the_middle(cfg.run_dir / "checkpoints" / "step-0000003" / "state.pt")
    _save_tiny(cfg, 4, keep_last=2)  # 4 and 2 are the two newest intact ones; damaged 3 is left for people to see
    assert [p.name for p in step_dirs(cfg.run_dir)] == ["step-0000004", "step-0000003", "step-0000002"]
    _save_tiny(cfg, 5, keep_last=2)  # now 5 and 4: damaged 3 and intact 2 are older than both
    assert [p.name for p in step_dirs(cfg.run_dir)] == ["step-0000005", "step-0000004"]
    manifest = json.loads((cfg.run_dir / "checkpoints" / "step-0000005" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"sit.safetensors", "ema.safetensors", "vae.safetensors", "state.pt",
                                      "config.yaml"}


def test_a_checkpoint_without_a_manifest_still_loads_with_a_warning(tmp_path, capsys):
    cfg = load_config("toy", overrides=[f"output_dir={tmp_path}"])
    path = _save_tiny(cfg, 1, keep_last=3)
    (path / "manifest.json").unlink()  # as written before manifests existed
    assert latest_checkpoint(cfg.run_dir) == path
    assert "cannot be verified" in capsys.readouterr().err


# ------------------------------------------------------------------ metrics.jsonl


@pytest.mark.slow
def test_a_torn_metrics_log_is_repaired_on_resume_each_step_once(tmp_path, cache, capsys):
    train(cfg_for(tmp_path, cache, "train.max_steps=4"), progress=False)
    cfg = cfg_for(tmp_path, cache, "train.max_steps=6")
    shutil.rmtree(cfg.run_dir / "checkpoints" / "step-0000004")  # the crash came before this checkpoint...
    with (cfg.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "diffusion": 0.3')  # ...and tore the log mid-line
    summary = train(cfg, progress=False)
    assert summary["steps_this_invocation"] == 4
    assert "dropped unreadable line 3" in capsys.readouterr().err
    assert logged_steps(cfg.run_dir) == [2, 4, 6]


def test_the_metrics_log_keeps_each_step_once_up_to_the_resumed_step(tmp_path):
    from repae.train.report import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": i}) + "\n" for i, s in enumerate([2, 4, 2, 4, 6])) + "{\"st")
    log = MetricsLog(path, resumed_step=4)
    assert [(r["step"], r["loss"]) for r in log.read()] == [(2, 2), (4, 3)]


def test_a_deeply_nested_line_in_the_metrics_log_is_dropped_like_a_torn_one(tmp_path, capsys):
    from repae.train.report import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 2}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    log = MetricsLog(path, resumed_step=2)  # undefended: RecursionError, the resume crashes
    assert log.read() == [{"step": 2}]
    assert "dropped unreadable line 2" in capsys.readouterr().err


def test_a_lock_file_of_deeply_nested_json_is_a_torn_lock_and_is_taken_over(tmp_path):
    import os

    from repae.train.runlock import RunLock

    (tmp_path / "lock").write_text("[" * 100_000 + "]" * 100_000)
    os.utime(tmp_path / "lock", (0, 0))  # written long ago: no creator is still writing it
    with RunLock(tmp_path) as lock:  # undefended: RecursionError
        assert lock.held and json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


# ------------------------------------------------------------------ one process per run directory


def _lock_of(pid, host=None):
    import socket

    from repae.train.runlock import _start_time

    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "start_time": _start_time(pid),
                       "since": "earlier"})


def _train_cli(tmp_path, cache, *extra):
    from repae.cli import main

    return main(["train", "--no-progress", *TINY, f"toy.cache_dir={cache}", f"output_dir={tmp_path}", *extra])


@pytest.mark.parametrize("remote", [False, True])
def test_a_run_locked_by_a_live_process_or_another_host_is_refused(tmp_path, capsys, remote):
    import subprocess

    holder = subprocess.Popen(["sleep", "60"]) if not remote else subprocess.Popen(["true"])
    try:
        if remote:
            holder.wait()  # a dead PID, but on another host: it may be alive there, so never taken over
        run = tmp_path / "toy"
        run.mkdir()
        (run / "lock").write_text(_lock_of(holder.pid, "elsewhere" if remote else None))
        assert _train_cli(tmp_path, tmp_path / "cache", "train.max_steps=1") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {holder.pid}" in err[0] and "in use" in err[0]
        assert not (tmp_path / "cache").exists()  # refused before any work
        assert (run / "lock").is_file()  # not ours to remove
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_the_lock_released_on_exit(tmp_path, cache, capsys):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    cfg = cfg_for(tmp_path, cache, "train.max_steps=1")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "lock").write_text(_lock_of(gone.pid))
    train(cfg, progress=False)
    assert f"took over a stale lock of PID {gone.pid}" in capsys.readouterr().err
    assert not (cfg.run_dir / "lock").exists()


def test_the_lock_is_released_when_training_raises(tmp_path, monkeypatch):
    from repae.train import loop

    def boom(*args, **kwargs):
        assert (tmp_path / "toy" / "lock").is_file()  # held while the run works
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "setup_run", boom)
    with pytest.raises(RuntimeError, match="boom"):
        train(load_config("toy", overrides=[f"output_dir={tmp_path}"]), progress=False)
    assert not (tmp_path / "toy" / "lock").exists()


# ------------------------------------------------------------------ an unwritable output directory


@pytest.mark.parametrize("how", ["output_dir is a file", "checkpoints is a file", "read-only checkpoints"])
def test_an_unwritable_output_directory_is_one_line_before_any_work(tmp_path, capsys, how):
    import os

    out = tmp_path / "runs"
    if how == "output_dir is a file":
        out.write_text("")
    elif how == "checkpoints is a file":
        (out / "toy").mkdir(parents=True)
        (out / "toy" / "checkpoints").write_text("")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes through read-only permissions")
        (out / "toy" / "checkpoints").mkdir(parents=True)
        (out / "toy" / "checkpoints").chmod(0o555)
    assert _train_cli(out, tmp_path / "cache", "train.max_steps=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0]
    assert not (tmp_path / "cache").exists()  # nothing was built


# ------------------------------------------------------------------ a moved run directory


@pytest.mark.slow
def test_a_moved_and_renamed_run_directory_resumes(tmp_path, cache):
    first = cfg_for(tmp_path / "a", cache, "train.max_steps=2")
    train(first, progress=False)
    moved = cfg_for(tmp_path / "b", cache, "exp_name=renamed", "train.max_steps=4")
    shutil.move(str(first.run_dir), str(moved.run_dir))
    summary = train(moved, progress=False)
    assert summary["steps_this_invocation"] == 2 and logged_steps(moved.run_dir) == [2, 4]


# ------------------------------------------------------------------ non-finite weights and gradients


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e30])
def test_an_update_that_breaks_the_weights_is_rolled_back_and_never_saved(tmp_path, cache, straight, monkeypatch,
                                                                          value, capsys):
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def faulty_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:  # once, in the fourth step (after the step-2 checkpoint)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = value
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", faulty_step)
    cfg = cfg_for(tmp_path, cache, "train.max_steps=6")
    train(cfg, progress=False)
    said = capsys.readouterr()
    assert calls["n"] > 8 and "non-finite weights after the update, rolled back" in said.out + said.err
    # replayed from the step-2 checkpoint: the same weights as the run that never failed
    assert_same_weights(straight, weights_of(latest_checkpoint(cfg.run_dir)))
    assert logged_steps(cfg.run_dir) == [2, 4, 6]


@pytest.mark.slow
def test_a_non_finite_gradient_norm_skips_the_step(tmp_path, cache, monkeypatch, capsys):
    from repae.train import loop

    real, calls = loop.make_trainables, {"n": 0}

    def poisoning(*args, **kwargs):
        m = real(*args, **kwargs)

        def hook(grad):
            calls["n"] += 1
            return torch.full_like(grad, float("nan")) if calls["n"] == 3 else grad

        m.sit_params[-1].register_hook(hook)
        return m

    monkeypatch.setattr(loop, "make_trainables", poisoning)
    cfg = cfg_for(tmp_path, cache, "train.max_steps=4")
    summary = train(cfg, progress=False)
    said = capsys.readouterr()
    assert "non-finite loss or gradient norm, update skipped" in said.out + said.err
    assert summary["steps"] == 4
    for state in weights_of(latest_checkpoint(cfg.run_dir)).values():
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_checkpoint_with_non_finite_or_overflowing_weights_is_refused(tmp_path):
    cfg = load_config("toy", overrides=[f"output_dir={tmp_path}"])
    for step, value in ((1, float("nan")), (2, 1e30)):
        bad = nn.Linear(2, 2)
        with torch.no_grad():
            bad.weight[0, 0] = value
        with pytest.raises(CheckpointError, match="refusing to save checkpoint.*sit.weight"):
            save_checkpoint(cfg.run_dir, step, {"sit": bad}, {"step": step}, cfg)
    assert step_dirs(cfg.run_dir) == []
