"""The lr schedule: constant by default (the paper's), else a linear fall to zero over the budget's tail,
applied by the training loop to each optimiser from its own config."""

import pytest

import repae.train.loop as loop
from repae.train.schedule import lr_factor
from test_train_loop import tiny_cfg


def test_constant_unless_a_decay_is_asked_for():
    assert [lr_factor(s, 10, 0.0) for s in (0, 5, 9, 10, 50)] == [1.0] * 5


@pytest.mark.parametrize("fraction, expected", [
    (0.5, [1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2]),  # the last 5 of 10 updates fall by 1/5 each
    (1.0, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]),
    (0.01, [1] * 9 + [1.0]),  # a tail shorter than one step still leaves the last update its full lr
])
def test_linear_decay_over_the_tail_of_the_budget(fraction, expected):
    assert [lr_factor(s, 10, fraction) for s in range(10)] == pytest.approx(expected)
    assert lr_factor(10, 10, fraction) == 0.0 and lr_factor(12, 10, fraction) == 0.0  # past the budget


def test_the_loop_sets_each_optimisers_scheduled_lr_before_its_update(tmp_path, monkeypatch):
    seen = []
    step_fn = loop.repae_step

    def recording_step(m, batches, cfg, step, gen):
        seen.append((step, m.sit_opt.param_groups[0]["lr"], m.vae_opt.param_groups[-1]["lr"]))
        return step_fn(m, batches, cfg, step, gen)

    monkeypatch.setattr(loop, "repae_step", recording_step)
    cfg = tiny_cfg(tmp_path, "train.max_steps=4", "optim_sit.lr=2e-3", "optim_sit.decay_fraction=0.5",
                   "optim_vae.lr=1e-4", "optim_vae.decay_fraction=0")
    loop.train(cfg, progress=False)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]
    assert [lr for _, lr, _ in seen] == pytest.approx([2e-3, 2e-3, 2e-3, 1e-3])
    assert [lr for _, _, lr in seen] == pytest.approx([1e-4] * 4)  # the VAE's own config: no decay


def test_a_run_stopped_mid_decay_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The lr is a function of the step and the budget, not of the invocation: a run stopped by Ctrl-C in its
    decay and run again ends bit-identical to one that never stopped."""
    import os
    import signal

    import torch

    from repae.interrupt import Interrupted
    from test_train_loop import weights

    recipe = ["train.max_steps=4", "optim_sit.decay_fraction=1.0", "optim_vae.decay_fraction=0.5"]
    straight = tiny_cfg(tmp_path, "exp_name=straight", *recipe)
    loop.train(straight, progress=False)
    stopped = tiny_cfg(tmp_path, "exp_name=stopped", *recipe)
    step_fn = loop.repae_step
    monkeypatch.setattr(loop, "repae_step", lambda m, batches, c, step, gen: (
        os.kill(os.getpid(), signal.SIGINT) if step == 1 else None, step_fn(m, batches, c, step, gen))[1])
    with pytest.raises(Interrupted):
        loop.train(stopped, progress=False)  # the loop finishes step 1's update, saves step 2 and stops
    monkeypatch.undo()
    assert loop.train(stopped, progress=False)["steps_this_invocation"] == 2
    a, b = weights(straight.run_dir), weights(stopped.run_dir)
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"
