"""Faults a run must survive without losing more than the damaged part: damaged or missing
checkpoints, a torn metrics log, a second process on the same run, an unwritable output
directory, non-finite weights, and a run directory that was moved."""

import json
import shutil

import pytest
import torch
from torch import nn

from repae.config import load_config
from repae.train import checkpoint as ckpt_mod
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
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        latest_checkpoint(cfg.run_dir)


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
