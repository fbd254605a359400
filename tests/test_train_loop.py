"""The training loop on a tiny toy world: resume equals an uninterrupted run, and the CLI leaves
a checkpoint, samples and metrics."""

import json

import pytest
import torch

from repae.cli import main
from repae.config import load_config
from repae.train.checkpoint import latest_checkpoint
from repae.train.loop import train
from repae.weights import read_file

TINY = [
    "toy.train_size=120", "toy.heldout_size=40", "toy.teacher_steps=2", "toy.vae_steps=2", "toy.batch_size=8",
    "train.global_batch_size=8", "train.log_every=2", "train.ckpt_every=2", "train.sample_every=100",
    "sample.num_samples=10", "sample.batch_size=10", "sample.num_steps=3", "eval.num_samples=10",
    "model.depth=2", "model.hidden_size=48", "model.num_heads=2", "model.encoder_depth=1", "model.projector_dim=64",
    # The toy preset's SiT optimiser from before its lr schedule: a constant lr keeps a run split into two
    # budgets (2, then 4 steps) equal to one run of 4 steps, which the resume tests compare, and the DDP
    # tolerances were measured at 2e-3. The schedule itself is tested in test_lr_schedule.py.
    "optim_sit.lr=2e-3", "optim_sit.decay_fraction=0", "train.ema_decay=0.995",
    # and the VAE's from before the preset's VAE followed its SiT's lr (the tolerances were measured with it)
    "optim_vae.lr=1e-4", "optim_vae.decay_fraction=0",
]


def tiny_cfg(tmp_path, *extra):
    return load_config("toy", overrides=TINY + [f"toy.cache_dir={tmp_path / 'cache'}",
                                                 f"output_dir={tmp_path / 'runs'}", *extra])


def weights(run_dir):
    ckpt = latest_checkpoint(run_dir)
    return {name: read_file(ckpt / f"{name}.safetensors") for name in ("sit", "ema", "vae", "regulariser")}


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, accum):
    straight = tiny_cfg(tmp_path, "exp_name=straight", "train.max_steps=4", f"train.grad_accum_steps={accum}")
    train(straight, progress=False)
    split = tiny_cfg(tmp_path, "exp_name=split", "train.max_steps=2", f"train.grad_accum_steps={accum}")
    train(split, progress=False)
    split_more = tiny_cfg(tmp_path, "exp_name=split", "train.max_steps=4", f"train.grad_accum_steps={accum}")
    summary = train(split_more, progress=False)  # the same command with a larger budget resumes
    assert summary["steps_this_invocation"] == 2
    a, b = weights(straight.run_dir), weights(split_more.run_dir)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"
    steps = [r["step"] for r in map(json.loads, (split_more.run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == [2, 4]


def _checkpoint_state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step-{step:07d}" / "state.pt", weights_only=True)


def _store_training_time(run_dir, step, seconds):
    """Set (None: remove) the training time a checkpoint holds; its manifest goes, as the edit is not damage."""
    path = run_dir / "checkpoints" / f"step-{step:07d}"
    state = torch.load(path / "state.pt", weights_only=True)
    state.pop("train_seconds")
    if seconds is not None:
        state["train_seconds"] = seconds
    torch.save(state, path / "state.pt")
    (path / "manifest.json").unlink()


def test_a_runs_training_time_adds_up_over_its_invocations(tmp_path):
    run_dir = tiny_cfg(tmp_path).run_dir
    first = train(tiny_cfg(tmp_path, "train.max_steps=2"), progress=False)
    assert 0 < first["train_seconds"] <= first["wall_seconds"]  # the loop's time, not the set-up's
    saved = _checkpoint_state(run_dir, 2)["train_seconds"]
    assert 0 < saved <= first["train_seconds"]  # the last sample grid comes after the checkpoint
    _store_training_time(run_dir, 2, 1000.0)  # as if the first invocation had trained for 1000 s
    second = train(tiny_cfg(tmp_path, "train.max_steps=4"), progress=False)
    # the resumed total starts from the checkpoint's, not from zero: this invocation adds only its own loop time
    assert 1000.0 < second["train_seconds"] <= 1000.0 + second["wall_seconds"]
    assert 1000.0 < _checkpoint_state(run_dir, 4)["train_seconds"] <= second["train_seconds"]


@pytest.mark.parametrize("stored", [None, -3.0, float("nan"), "12", True])
def test_a_checkpoint_without_a_valid_training_time_makes_the_total_unknown_not_partial(tmp_path, stored):
    # a run resumed from a checkpoint written before the record existed (or a damaged value): counting only this
    # invocation would under-state what the run cost, as the reproduction's records once did
    run_dir = tiny_cfg(tmp_path).run_dir
    train(tiny_cfg(tmp_path, "train.max_steps=2"), progress=False)
    _store_training_time(run_dir, 2, stored)
    summary = train(tiny_cfg(tmp_path, "train.max_steps=4"), progress=False)
    assert summary["steps_this_invocation"] == 2 and summary["train_seconds"] is None
    assert "train_seconds" not in _checkpoint_state(run_dir, 4)


def test_resume_refuses_a_different_recipe(tmp_path):
    train(tiny_cfg(tmp_path, "train.max_steps=2"), progress=False)
    from repae.config import ConfigError

    with pytest.raises(ConfigError, match=r"different config \(loss.proj_coeff\)"):
        train(tiny_cfg(tmp_path, "train.max_steps=4", "loss.proj_coeff=0.7"), progress=False)
    # the train section holds recipe too (an ablation switch, the seed), not only the budget
    for change in ("train.stop_grad=false", "train.seed=1", "train.tune_vae=false"):
        with pytest.raises(ConfigError, match="different config"):
            train(tiny_cfg(tmp_path, "train.max_steps=4", change), progress=False)


def test_cli_train_leaves_checkpoint_samples_metrics_and_plot(tmp_path, capsys):
    args = TINY + [f"toy.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}", "train.max_steps=2"]
    assert main(["train", "--no-progress", *args]) == 0
    run = tmp_path / "runs" / "toy"
    assert (run / "checkpoints" / "latest").read_text() == "step-0000002"
    assert (run / "samples" / "step-0000002.png").is_file() and (run / "loss_curves.png").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(v == v and abs(v) != float("inf") for r in records for v in r.values())
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["toy"]["sample_class_accuracy"] <= 1
    assert (run / "config.yaml").is_file()
    out, err = capsys.readouterr()  # the toy world was built here: --no-progress covers its bars too
    assert "toy teacher" not in err and "toy VAE" not in err and "render toy" not in err
    assert json.loads(out)["steps"] == 2  # stdout stays the JSON summary; the story goes to stderr
    story = err[err.index("done: step 2"):]
    assert f"{100 * summary['toy']['sample_class_accuracy']:.1f}% of 10 (chance 10%)" in story
    assert "README" not in story  # a tiny recipe: the default run's figures would mislead
    assert f"files in {run}: summary.json, metrics.jsonl, loss_curves.png, samples/ (last grid step-0000002.png)" in story


def test_sample_from_a_training_run(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.max_steps=2")
    train(cfg, progress=False)
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(cfg.run_dir), "--out", str(out), "sample.num_samples=4",
                 "sample.num_steps=2", "--npz", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 32, 32, 3) and out.is_file()


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--no-progress", "data.source=folder", f"data.path={tmp_path / 'nope'}",
                 f"output_dir={tmp_path}", "loss.proj_coeff=0", "loss.vae_align_proj_coeff=0"]) == 2
    assert "data directory not found" in capsys.readouterr().err


def test_a_crash_mid_checkpoint_keeps_the_previous_latest(tmp_path, monkeypatch):
    from repae.train import checkpoint as ckpt_mod

    cfg = tiny_cfg(tmp_path, "train.max_steps=2")
    train(cfg, progress=False)
    calls = {"n": 0}
    real = ckpt_mod.save_weights

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut while writing a checkpoint")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_weights", dying)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path, "train.max_steps=4"), progress=False)
    assert latest_checkpoint(cfg.run_dir).name == "step-0000002"
    monkeypatch.setattr(ckpt_mod, "save_weights", real)
    summary = train(tiny_cfg(tmp_path, "train.max_steps=4"), progress=False)  # resumes from step 2
    assert summary["steps_this_invocation"] == 2 and latest_checkpoint(cfg.run_dir).name == "step-0000004"
    assert not list((cfg.run_dir / "checkpoints").glob("*.tmp"))


def test_vae_from_scratch_and_frozen_vae_modes_run(tmp_path):
    train(tiny_cfg(tmp_path, "exp_name=scratch", "train.max_steps=1", "vae.from_scratch=true"), progress=False)
    summary = train(tiny_cfg(tmp_path, "exp_name=repa", "train.max_steps=1", "train.tune_vae=false",
                             "latent_norm.mode=fixed"), progress=False)
    assert "reg_rec" not in summary["final"] and "repa_vae" not in summary["final"]


@pytest.mark.parametrize("value, fine", [(1.0, True), (1e19, True), (float("nan"), False), (float("inf"), False),
                                         (-float("inf"), False), (1e30, False), (-1e30, False)])
def test_the_weight_check_refuses_non_finite_or_overflowing_weights_in_any_trained_set(value, fine):
    from types import SimpleNamespace

    from repae.train.loop import step_verdict

    for where in ("sit", "vae", "disc"):
        sets = {k: [torch.nn.Parameter(torch.randn(50, 30)), torch.nn.Parameter(torch.randn(30))]
                for k in ("sit", "vae", "disc")}
        sets[where][1].data[7] = value
        m = SimpleNamespace(sit_params=sets["sit"], vae_params=sets["vae"], disc_opt=object(),
                            regulariser=SimpleNamespace(discriminator=torch.nn.ParameterList(sets["disc"])))
        assert step_verdict(m, torch.tensor(0.0), stop=False) == (False, fine, False), where
        # after a skipped update the weights are as they were: whatever the check finds, they count as fine
        assert step_verdict(m, torch.tensor(1.0), stop=True) == (True, True, True)


def test_the_weight_check_is_on_each_tensors_norm():
    # every weight within WEIGHT_LIMIT, but the tensor's sum of squares overflows float32: refused too
    from types import SimpleNamespace

    from repae.train.checkpoint import WEIGHT_LIMIT
    from repae.train.loop import step_verdict

    m = SimpleNamespace(sit_params=[torch.nn.Parameter(torch.full((4,), WEIGHT_LIMIT * 0.9))], vae_params=[],
                        disc_opt=None, regulariser=None)
    assert step_verdict(m, torch.tensor(0.0), stop=False) == (False, False, False)
    m.sit_params[0].data[1:] = 0  # one such weight alone is fine
    assert step_verdict(m, torch.tensor(0.0), stop=False) == (False, True, False)


class _ReadAlone(torch.Tensor):
    """A step's skip flag that counts each read of it on its own (ops on it give plain tensors)."""
    __torch_function__ = torch._C._disabled_torch_function_impl
    reads = 0

    def item(self):
        _ReadAlone.reads += 1
        return super().item()

    def __bool__(self):
        _ReadAlone.reads += 1
        return super().__bool__()


def test_the_loop_learns_of_a_skipped_update_in_the_weight_checks_read_back(tmp_path, monkeypatch):
    """On a GPU each read of a device value makes the host wait for every kernel queued before it. The step's
    skip flag rides in the weight check's one read back (step_verdict), not in a read of its own."""
    import repae.train.loop as loop

    real_step = loop.repae_step

    def flagged(*args, **kwargs):
        logs = real_step(*args, **kwargs)
        return {**logs, "skipped": logs["skipped"].as_subclass(_ReadAlone)}

    monkeypatch.setattr(loop, "repae_step", flagged)
    _ReadAlone.reads = 0
    summary = train(tiny_cfg(tmp_path, "train.max_steps=2"), progress=False)
    assert summary["steps_this_invocation"] == 2 and _ReadAlone.reads == 0
