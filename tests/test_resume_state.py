"""A checkpoint's plain state (state.pt) edited by hand, or written by something else, with its manifest
updated to match: every field is checked before any is applied, and the resume passes over that checkpoint
to an older intact one with one line naming the field. Unchecked, a data position outside the dataset made
the first batch loop forever, a numpy key position past 624 crashed the process, and a NaN beta or a step of
10**30 were taken as they came."""

import shutil

import pytest
import torch

from repae.config import load_config
from repae.data.sampler import ResumableOrder
from repae.train.checkpoint import _write_manifest
from repae.train.loop import setup_run, try_resume

from test_train_loop import TINY, tiny_cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4."""
    from repae.train.loop import train

    root = tmp_path_factory.mktemp("resume-state")
    train(tiny_cfg(root, "train.max_steps=4"), progress=False)
    return root


def _nan_moments(state):
    moments = next(iter(state["opt_sit"]["state"].values()))
    moments["exp_avg"].fill_(float("nan"))


def _set(path, value):
    def edit(state):
        *parents, last = path
        for key in parents:
            state = state[key]
        state[last] = value
    return edit


EDITS = {  # what is edited -> the words the skip line must hold
    "data position past the end": (_set(("data", "position"), 10**12), "data position is 1000000000000"),
    "negative data position": (_set(("data", "position"), -3), "data position is -3"),
    "astronomic epoch": (_set(("data", "epoch"), 10**30), "data epoch is"),
    "position as a float": (_set(("data", "position"), 2.0), "not a whole number"),
    "empty data state": (_set(("data",), {}), "lacks epoch, position, n, seed"),
    "another dataset size": (_set(("data", "n"), 7), "taken on 7 images"),
    "numpy key position past 624": (_set(("rng", "numpy_pos"), 10**6), "numpy key position"),
    "short numpy key": (_set(("rng", "numpy"), [1, 2, 3]), "numpy key"),
    "garbage torch state": (_set(("rng", "torch"), torch.full((5056,), 7, dtype=torch.uint8)), "torch state"),
    "torch state as a list": (_set(("rng", "step_generator"), [1, 2]), "step_generator state"),
    "Python state out of range": (_set(("rng", "python"), [0] * 624 + [625]), "Python random state"),
    "regulariser state short": (_set(("regulariser_rng",), [1]), "regulariser's random state"),
    "step as text": (_set(("step",), "4"), "step is '4'"),
    "step of 10**30": (_set(("step",), 10**30), "step is 1000000000000000000000000000000"),
    "negative step": (_set(("step",), -5), "step is -5"),
    "step as a bool": (_set(("step",), True), "step is True"),
    "nonfinite count as text": (_set(("nonfinite_in_a_row",), "0"), "nonfinite_in_a_row is '0'"),
    "NaN beta": (lambda s: s["opt_sit"]["param_groups"][0].update(betas=(float("nan"), 0.95)), "betas"),
    "inf eps": (lambda s: s["opt_vae"]["param_groups"][0].update(eps=float("inf")), "opt_vae has eps"),
    "NaN moments": (_nan_moments, "opt_sit holds moments that are not finite"),
    "missing optimiser": (lambda s: s.pop("opt_vae"), "lacks opt_vae"),
    "optimiser as text": (_set(("opt_sit",), "adam"), "opt_sit is not an optimiser state"),
    "not a mapping": (None, "holds a list"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_state_is_passed_over_for_the_older_checkpoint(finished, tmp_path, edit, capsys):
    shutil.copytree(finished / "runs", tmp_path / "runs")
    cfg = load_config("toy", overrides=TINY + [f"toy.cache_dir={finished / 'cache'}", f"output_dir={tmp_path / 'runs'}",
                                               "train.max_steps=6"])
    newest = cfg.run_dir / "checkpoints" / "step-0000004"
    change, words = EDITS[edit]
    state = torch.load(newest / "state.pt", weights_only=True)
    if change is None:
        state = [state]
    else:
        change(state)
    torch.save(state, newest / "state.pt")
    _write_manifest(newest, 4)  # edited with care: the hashes match, only the content is wrong
    run = setup_run(cfg, progress=False)
    assert try_resume(run) and run.step == 2
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err and words in err
    assert run.data.state_dict()["position"] < run.data.state_dict()["n"]


@pytest.mark.parametrize("position", [-1, 10, 10**12])
def test_an_order_refuses_a_position_outside_its_dataset_and_keeps_its_own(position):
    order = ResumableOrder(10, seed=3)
    order.take(4)
    with pytest.raises(ValueError, match="data position"):
        order.load_state_dict({"epoch": 0, "position": position, "n": 10, "seed": 3})
    assert order.state_dict() == {"epoch": 0, "position": 4, "n": 10, "seed": 3}
    assert len(order.take(25)) == 25  # and still takes
