"""`repae evaluate` records under their default names, and the evaluations' progress bars.

A record written without --out (RUN/eval/<command>-stepN.json, eval-<command>.json) must never replace
the record of another measurement: the README measures one checkpoint with CFG and then with
`sample.cfg_scale=1`, and both results have to survive. The long loops (drawing samples, reading and
encoding a thousand images) show a tqdm bar on stderr unless --no-progress."""

import json
import shutil

import pytest

from repae.evaluate import cli as evaluate_cli
from repae.evaluate.report import environment, make_record, measurement_key, record_path
from test_train_loop import tiny_cfg


def run_cli(*argv):
    return evaluate_cli.main(["evaluate", *map(str, argv)])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A toy-world training run of 2 steps (tiny models), shared by the tests of this module."""
    from repae.train.loop import train

    cfg = tiny_cfg(tmp_path_factory.mktemp("recordrun"), "train.max_steps=2")
    train(cfg, progress=False)
    return cfg


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the run, so each test starts with an empty RUN/eval."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, copy, ignore=shutil.ignore_patterns("eval"))
    return copy


def records(run):
    return {p.name: json.loads(p.read_text()) for p in sorted((run / "eval").glob("*.json"))}


# ----------------------------------------------------------------------------- records


def test_samples_with_and_without_cfg_keep_both_records(run, capsys):
    """The README's workflow: a checkpoint with CFG, then `sample.cfg_scale=1`. Before, the second
    silently replaced RUN/eval/samples-stepN.json."""
    assert run_cli("samples", run, "--no-progress", "eval.num_samples=10", "sample.cfg_scale=4") == 0
    first = records(run)
    assert list(first) == ["samples-step0000002.json"]
    capsys.readouterr()

    assert run_cli("samples", run, "--no-progress", "eval.num_samples=10", "sample.cfg_scale=1") == 0
    err = capsys.readouterr().err
    got = records(run)
    assert len(got) == 2 and got["samples-step0000002.json"] == first["samples-step0000002.json"]  # kept as it was
    (new_name,) = set(got) - set(first)
    assert new_name.startswith("samples-step0000002-") and got[new_name]["settings"]["sampler"]["cfg_scale"] == 1.0
    assert f"wrote {run / 'eval' / new_name}" in err  # the command says where its record went
    assert "settings.sampler.cfg_scale: 4.0 -> 1.0" in err  # and why it is not the plain name

    # the same settings again, however the checkpoint is spelled, replace their own record: no third file
    assert run_cli("samples", run / "checkpoints" / "step-0000002", "--no-progress", "eval.num_samples=10",
                   "sample.cfg_scale=1") == 0
    assert run_cli("samples", f"{run}/", "--no-progress", "eval.num_samples=10", "sample.cfg_scale=4") == 0
    again = records(run)
    assert set(again) == set(got)
    for name in got:  # the numbers of a measurement do not change when it is rerun
        assert again[name]["metrics"] == got[name]["metrics"], name


@pytest.mark.parametrize("command, first, second", [
    ("vae", ["--num-images", "8"], ["--num-images", "16"]),
    ("cknna", ["--num-images", "8", "--topk", "3"], ["--num-images", "8", "--topk", "3", "--t", "0.9"]),
])
def test_other_evaluations_of_a_run_keep_records_of_other_settings(run, command, first, second):
    where = ["--vae", run] if command == "vae" else ["--ckpt", run]
    assert run_cli(command, *where, "--no-progress", *first) == 0
    assert run_cli(command, *where, "--no-progress", *second) == 0
    got = records(run)
    assert len(got) == 2 and f"{command}-step0000002.json" in got
    assert len({json.dumps(r["settings"], sort_keys=True) for r in got.values()}) == 2


def _record(**settings):
    env = environment(["repae"], "cpu", 1)
    files = {"sit": {"path": "/a/ema.safetensors", "sha256": "ab" * 32, "bytes": 3}}
    return make_record("samples", {"toy_fid": 1.0}, {"source": {"kind": "checkpoint", "path": "runs/x", "step": 4},
                                                     **settings}, files, env)


def test_record_path_keeps_what_is_not_this_measurement(tmp_path):
    default = tmp_path / "eval" / "samples-step0000004.json"
    a, b = _record(cfg_scale=4.0), _record(cfg_scale=1.0)
    assert record_path(default, a) == (default, None)  # nothing there: the plain name
    default.parent.mkdir()
    default.write_text(json.dumps(a))
    assert record_path(default, a) == (default, None)  # the same measurement: a rerun replaces it
    moved = dict(a, settings={**a["settings"], "source": {"kind": "checkpoint", "path": "/abs/runs/x", "step": 4}},
                 environment={**a["environment"], "world_size": 8})
    assert record_path(default, moved) == (default, None)  # another spelling of the run, more processes: the same
    other_file = dict(a, files={"sit": {"path": "/a/ema.safetensors", "sha256": "cd" * 32, "bytes": 3}})
    assert record_path(default, other_file)[0] != default  # other weights under the same name: not the same

    path, why = record_path(default, b)
    assert path == default.with_name(f"samples-step0000004-{measurement_key(b)[:8]}.json")
    assert "settings.cfg_scale: 4.0 -> 1.0" in why
    path.write_text(json.dumps(b))
    assert record_path(default, b) == (path, why)  # the same settings find their own file again

    default.write_text("notes, not a record")  # a file that is not a record is never replaced
    path_c, why_c = record_path(default, _record(cfg_scale=2.0))
    assert path_c != default and "not a record" in why_c


# ----------------------------------------------------------------------------- progress bars


@pytest.mark.parametrize("command, bars", [
    (["samples", "{run}", "eval.num_samples=10"], ["samples: sampling"]),
    (["spectrum", "--vae", "{run}", "--num-images", "8"], ["spectrum: read images", "spectrum: {run}"]),
    (["cknna", "--ckpt", "{run}", "--num-images", "8", "--topk", "3"],
     ["cknna: read images", "cknna: VAE + encoder", "cknna: SiT"]),
])
def test_long_evaluations_show_a_bar_on_stderr_unless_no_progress(run, capsys, command, bars):
    argv = [a.format(run=run) for a in command]
    bars = [b.format(run=run) for b in bars]
    assert run_cli(*argv, "--out", run / "a.json") == 0
    captured = capsys.readouterr()
    for bar in bars:
        assert f"{bar}: 100%" in captured.err, bar
        assert bar not in captured.out  # stdout holds the JSON record only
    json.loads(captured.out)

    assert run_cli(*argv, "--out", run / "b.json", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "%|" not in err and not any(bar in err for bar in bars)
    # the bars change nothing measured
    assert (json.loads((run / "a.json").read_text())["metrics"] == json.loads((run / "b.json").read_text())["metrics"])


def test_bars_only_on_the_main_process(monkeypatch, capsys):
    from repae import dist
    from repae.evaluate.pipeline import progress_bar

    assert list(progress_bar(range(3), "x", progress=True)) == [0, 1, 2]
    assert "x: 100%" in capsys.readouterr().err
    monkeypatch.setattr(dist, "is_main", lambda: False)
    assert list(progress_bar(range(3), "x", progress=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
