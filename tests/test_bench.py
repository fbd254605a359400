"""`repae bench`: the numbers it prints are consistent with each other and with known FLOP counts."""

import pytest
import torch

from repae.bench import bench_step, count_flops, median_seconds, step_parts
from repae.cli import main
from repae.config import load_config

TINY = ["model.depth=2", "model.hidden_size=48", "model.num_heads=2", "model.encoder_depth=1",
        "model.projector_dim=64", "train.global_batch_size=4"]


def test_flop_counter_known_answer():
    layer = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(5, 16)
    assert count_flops(lambda: layer(x)) == 2 * 5 * 16 * 8
    x.requires_grad_(True)
    # backward: grad wrt input and wrt weight, each another 2*n*a*b
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 5 * 16 * 8


class _CompiledOrNot(torch.nn.Module):
    """Adds 1 in compiled code, 2 when run eagerly: which one ran, seen from its output."""

    def forward(self, x):
        return x + (1 if torch.compiler.is_compiling() else 2)


def test_count_flops_leaves_compiled_modules_compiled():
    """A compiled module that dynamo meets under the FLOP counter's dispatch mode is otherwise skipped for
    good: it ran eagerly from then on, so a timing after a FLOP count (bench loop's bare step) timed eager code."""
    module = _CompiledOrNot()
    module.compile()
    x = torch.zeros(2)
    assert module(x).tolist() == [1, 1]
    assert count_flops(lambda: module(x)) == 0  # counted on eager code
    assert module(x).tolist() == [1, 1] and module(torch.zeros(3)).tolist() == [1, 1, 1]  # still compiled
    torch._dynamo.reset()


def test_bench_step_numbers_agree(tmp_path):
    cfg = load_config("toy", overrides=TINY + ["train.regulariser_channels_last=false"])
    r = bench_step(cfg, torch.device("cpu"), iters=1, warmup=0)
    assert abs(r["images_per_s"] - r["global_batch"] / r["step_seconds"]) < 1e-6 * r["images_per_s"]
    assert r["layout"] == {"vae": "NHWC", "regulariser": "NCHW"} and r["compile"] is False  # what ran, recorded
    assert abs(r["achieved_flops"] - r["flops_per_image"] * r["global_batch"] / r["step_seconds"]) < 1e-3 * r["achieved_flops"]
    assert 0 < r["fraction_of_peak"] and r["peak_memory_bytes"] > 0
    # the toy preset trains no GAN and has no LPIPS: those parts are not timed
    assert set(r["parts_seconds_per_micro_batch"]) == {"encoder (no grad)", "VAE fwd+bwd", "alignment pass fwd+bwd",
                                                       "SiT fwd+bwd", "optimisers", "EMA update"}


def test_bench_step_gives_each_step_and_part_call_an_autocast_context_of_its_own(monkeypatch):
    """Inside one autocast context torch keeps its bf16 casts of the weights: steps sharing one would skip
    the casts the training loop pays each step, and compute with the weights from before the updates."""
    import contextlib

    import repae.bench as bench
    import repae.train.step as step_module

    outermost, seen = [], []  # the open context's identity; (what ran, its context) per call
    real_autocast, real_step, real_parts = bench.autocast, step_module.repae_step, bench.step_parts

    @contextlib.contextmanager
    def tracked_autocast(precision, device):
        with real_autocast(precision, device):
            outermost.append(outermost[-1] if outermost else object())  # nested: the same context
            try:
                yield
            finally:
                outermost.pop()

    def spy(name, fn):
        def run(*args, **kwargs):
            assert torch.is_autocast_enabled("cpu")
            seen.append((name, outermost[0]))
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(bench, "autocast", tracked_autocast)
    monkeypatch.setattr(step_module, "repae_step", spy("step", real_step))
    monkeypatch.setattr(bench, "step_parts", lambda *a: {k: spy(k, f) for k, f in real_parts(*a).items()})
    cfg = load_config("toy", overrides=TINY + ["train.precision=bf16"])
    bench_step(cfg, torch.device("cpu"), iters=2, warmup=1)
    assert sum(name == "step" for name, _ in seen) >= 3 and sum(name == "SiT fwd+bwd" for name, _ in seen) == 3
    assert len({id(context) for _, context in seen}) == len(seen)  # no two calls shared a context


def test_parts_follow_the_training_mode():
    from repae.bench import _batch, random_trainables

    cfg = load_config("toy", overrides=TINY + ["train.tune_vae=false", "latent_norm.mode=fixed"])
    m = random_trainables(cfg, torch.device("cpu"))
    images, labels = _batch(cfg, torch.device("cpu"), 4)
    parts = step_parts(m, cfg, images, labels, torch.Generator().manual_seed(0))
    assert "VAE fwd+bwd" not in parts and "alignment pass fwd+bwd" not in parts and "SiT fwd+bwd" in parts
    cfg = load_config("toy", overrides=TINY + ["loss.gan_weight=0.1"])
    m = random_trainables(cfg, torch.device("cpu"))
    assert "discriminator fwd+bwd" in step_parts(m, cfg, images, labels, torch.Generator().manual_seed(0))


def test_median_seconds_is_the_median():
    calls = iter([0.0, 0.03, 0.01, 0.02])  # warm-up, then three timed runs: median 0.02
    import time

    assert 0.015 < median_seconds(lambda: time.sleep(next(calls)), torch.device("cpu"), iters=3, warmup=1) < 0.03


def test_cli_bench_step_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "step", *TINY, "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0
    assert "images/s" in capsys.readouterr().out and out.exists()


def test_bench_loop_times_the_training_loop(tmp_path, capsys):
    """`repae bench loop` runs the real loop on a packed store it makes, times steps after the untimed ones."""
    import json

    out = tmp_path / "loop.json"
    assert main(["bench", "loop", *TINY, "--steps", "3", "--warmup", "1", "--iters", "1", "--step-iters", "2",
                 "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images/s median" in printed and "bare step" in printed
    r = json.loads(out.read_text())
    assert r["steps"] == 3 and r["skipped_steps"] == 1 and r["timed_steps"] == len(r["step_seconds"]) == 2
    assert r["images_per_s"] > 0 and r["images_per_s_total"] > 0 and r["peak_memory_bytes"] > 0
    assert abs(r["images_per_s_total"] - 4 * 2 / sum(r["step_seconds"])) < 1e-6 * r["images_per_s_total"]
    assert set(r["parts_seconds_per_micro_batch"]) == {"encoder (no grad)", "VAE fwd+bwd", "alignment pass fwd+bwd",
                                                       "SiT fwd+bwd", "optimisers", "EMA update"}
    assert 0 < r["fraction_of_peak"] and r["data"]["format"] == "packed"
    assert r["layout"] == {"vae": "NHWC", "regulariser": "NHWC"}  # on a CPU, both follow channels_last's NHWC
    assert (tmp_path / "data" / "packed-32px-256" / "manifest.json").exists()  # reused by a second run
    # --step-iters: bench step's figure on the same trainables, FLOPs counted once for both
    bare = r["bare_step"]
    assert bare["iters"] == 2 and bare["images_per_s"] == pytest.approx(4 / bare["step_seconds_median"])
    assert bare["achieved_flops"] == pytest.approx(r["flops_per_image"] * 4 / bare["step_seconds_median"])
    assert bare["fraction_of_peak"] == pytest.approx(bare["achieved_flops"] / r["matmul_peak_flops"])


def test_bench_loop_times_the_bare_step_only_when_asked(tmp_path, monkeypatch):
    """Without --step-iters no step runs after the FLOP count; with it, that many + 1 untimed, continuing the
    loop's trainables and step count (the graphs a compiled loop made are the ones timed)."""
    import repae.train.step as step_module
    from repae.bench_loop import bench_loop
    from repae.config import load_config

    steps_seen = []
    real = step_module.repae_step
    monkeypatch.setattr(step_module, "repae_step", lambda m, b, cfg, step, gen: steps_seen.append(step) or real(m, b, cfg, step, gen))
    cfg = load_config("toy", overrides=TINY)
    r = bench_loop(cfg, torch.device("cpu"), steps=2, skip=1, parts_iters=0, data_dir=str(tmp_path / "d"))
    assert "bare_step" not in r and steps_seen == [2]  # the FLOP count's one step, after the loop's 2
    steps_seen.clear()
    r = bench_loop(cfg, torch.device("cpu"), steps=2, skip=1, parts_iters=0, data_dir=str(tmp_path / "d"), step_iters=3)
    assert r["bare_step"]["iters"] == 3 and steps_seen == [2, 2, 3, 4, 5]


def test_step_iters_is_for_bench_loop_only(capsys):
    assert main(["bench", "step", *TINY, "--iters", "1", "--step-iters", "2"]) == 2
    assert "--step-iters is for bench loop" in capsys.readouterr().err


def test_sample_modes_parse():
    from repae.bench import parse_modes

    assert parse_modes(["ode-50:1", "sde-250:4", "ode-8", "sde-250:2.2:0-0.65"]) == [
        ("ode", 50, 1.0, None), ("sde", 250, 4.0, None), ("ode", 8, 1.0, None), ("sde", 250, 2.2, (0.0, 0.65))]


@pytest.mark.parametrize("bad", ["sde-250:2.2:0.65", "sde-250:2.2:0.7-0.2", "sde-250:2.2:0-1.5", "sde-250:2:0-1:3",
                                 "euler-50:1", "ode-0:1"])
def test_sample_modes_refuse_what_they_cannot_mean(bad):
    from repae.bench import parse_modes
    from repae.cli import UsageError

    with pytest.raises(UsageError, match="LOW-HIGH"):
        parse_modes([bad])


def test_bench_sample_gives_a_mode_its_own_guidance_interval(monkeypatch):
    """The FID protocol (CFG 2.2 on t in [0, 0.65]) runs in the same process as the other modes, so a compiled
    sampler compiles once; a mode without an interval keeps sample.guidance_low/high."""
    from repae import bench

    calls = []

    def fake_generate(sit, vae, labels, **kw):
        calls.append((kw["guidance_low"], kw["guidance_high"]))
        return torch.zeros(len(labels), 3, 32, 32, dtype=torch.uint8)

    def fake_peak(device):  # read once, after the last mode (the largest may come last)
        calls.append("peak")
        return 12345

    monkeypatch.setattr("repae.generate.generate_images", fake_generate)
    monkeypatch.setattr(bench, "peak_memory_bytes", fake_peak)
    cfg = load_config("toy", [], ["sample.guidance_low=0.1", "sample.guidance_high=0.9"])
    out = bench.bench_sample(cfg, torch.device("cpu"), 2, bench.parse_modes(["sde-250:4", "sde-250:2.2:0-0.65"]))
    assert calls == [(0.1, 0.9), (0.0, 0.65), "peak"]
    assert list(out["images_per_s"]) == ["sde-250 cfg 4", "sde-250 cfg 2.2 interval 0-0.65"]
    assert out["peak_memory_bytes"] == 12345


@pytest.mark.slow
def test_gpu_suite_cpu_smoke(tmp_path):
    """benchmarks/gpu_suite.sh --cpu-smoke: every step runs toy-sized (~2 min on one core), the reference is
    recorded as skipped, and the FID-50K estimate and the summary are computed from the JSON files."""
    import json
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "REPAE_BENCH_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "PYTHONPATH": str(root / "src")}
    env.pop("REPAE_REFERENCE", None)
    subprocess.run(["bash", str(root / "benchmarks/gpu_suite.sh"), "--cpu-smoke"], env=env, check=True, timeout=600)
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["steps"]["ref_eager_b16"]["status"] == "skipped"
    assert all(e["status"] == "ok" for name, e in summary["steps"].items() if not name.startswith("ref_"))
    fid = json.loads((tmp_path / "out/fid50k_estimate.json").read_text())
    assert fid["status"] == "ok" and abs(fid["seconds"] - 50000 / fid["images_per_s"]) < 1e-6 * fid["seconds"]
    # the FID protocol's guidance interval is a mode of sample_b128's process (here toy-sized: not the protocol)
    b128 = json.loads((tmp_path / "out/sample_b128.json").read_text())
    assert "sde-6 cfg 2.2 interval 0-0.65" in b128["images_per_s"] and fid["published_protocol"] is False
    assert "sample_fid_protocol" not in summary["steps"]
    assert json.loads((tmp_path / "out/loop_eager_b32.json").read_text())["global_batch"] == 4
    # the compiled step's figure comes from the compiled loop's process (--step-iters), not a bench step of its own
    for b in (16, 32):
        assert summary["steps"][f"loop_compile_b{b}"]["bare_step"]["fraction_of_peak"] > 0
        assert f"step_compile_b{b}" not in summary["steps"]
    # sampling at the largest batch: ODE alone, with the memory it took (whether a larger batch still fits)
    b512 = json.loads((tmp_path / "out/sample_b512.json").read_text())
    assert b512["samples"] == 8 and list(b512["images_per_s"]) == ["ode-4 cfg 1"]
    assert summary["steps"]["sample_b512"]["peak_memory_gib"] == b512["peak_memory_bytes"] / 2**30 > 0
    world = summary["steps"]["toy_world_build"]
    assert world["status"] == "ok" and world["vae_build_device"] == "cpu" and world["world_build_seconds"] > 0
    graphs = json.loads((tmp_path / "out/sample_b128_compile_cudagraphs.json").read_text())
    assert graphs["compile"] is True and graphs["compile_mode"] == "reduce-overhead"
    profiled = json.loads((tmp_path / "out/profile_eager_b32.json").read_text())
    assert profiled["global_batch"] == 4 and profiled["compile"] is False and profiled["compile_mode"] is None
    assert profiled["loop"] is True and profiled["host_syncs_per_step"] is None  # the loop's steps; no GPU here
    assert "aten::convolution_backward" in {o["op"] for o in profiled["top_ops"]}
    # ops' self times are measured inside the timed steps: together no more than their wall time
    assert 0 < profiled["ops_self_seconds_per_step"] <= profiled["step_seconds"]
    assert summary["steps"]["profile_eager_b32"]["top_op"]["op"] == profiled["top_ops"][0]["op"]
    with tarfile.open(tmp_path / "out/all-files.tar.gz") as archive:  # everything in one file, written last
        names = {n.removeprefix("./") for n in archive.getnames()}
    on_disk = {str(f.relative_to(tmp_path / "out")) for f in (tmp_path / "out").rglob("*")}
    assert names - {"."} == on_disk - {"all-files.tar.gz"}
    assert {"summary.json", "fid50k_estimate.json", "profile_eager_b32.json", "logs/status.tsv"} <= names


@pytest.mark.slow
def test_gpu_suite_runs_only_the_steps_named(tmp_path):
    """SUITE_STEPS: the named steps run (here the regulariser-layout one, which records its layout); every other
    step is recorded as skipped with the reason, so a short GPU session can rerun part of the suite."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "REPAE_BENCH_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "PYTHONPATH": str(root / "src"), "SUITE_STEPS": "loop_eager_b16_regnhwc, nothing"}
    printed = subprocess.run(["bash", str(root / "benchmarks/gpu_suite.sh"), "--cpu-smoke"], env=env, check=True,
                             timeout=600, capture_output=True, text=True).stdout.splitlines()
    steps = json.loads((tmp_path / "out/summary.json").read_text())["steps"]
    # the printed table: each step's status under the header's, however long the step's name
    header = next(i for i, line in enumerate(printed) if line.startswith("step "))
    column = printed[header].index("status")
    rows = {line.split()[0]: line[column:].split()[0] for line in printed[header + 1:header + 1 + len(steps)]}
    assert rows == {name: e["status"] for name, e in steps.items()}
    assert steps.pop("loop_eager_b16_regnhwc")["status"] == "ok" and len(steps) >= 15
    assert all(e == {"status": "skipped", "reason": "not in SUITE_STEPS"} for e in steps.values())
    ran = json.loads((tmp_path / "out/loop_eager_b16_regnhwc.json").read_text())
    assert ran["layout"]["regulariser"] == "NHWC" and ran["compile"] is False


@pytest.mark.slow
def test_gpu_reproduce_probes_run_side_by_side_on_their_own_cores(tmp_path):
    """benchmarks/gpu_reproduce_probes.sh: each probe is a bench reproduce on its own cores, a probe that wants more
    cores than are left is not started, and the runs' records and the rendered world's hashes come back in OUT."""
    import hashlib
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from test_train_loop import TINY

    root = Path(__file__).resolve().parents[1]
    cores = len(os.sched_getaffinity(0))
    tiny = " ".join(TINY + ["train.precision=fp32"])
    run = "--steps 2 --eval-every 2 --samples 4 --final-samples 4 --seeds 0 --cfg-scales"
    spec = [f"a 1 {tiny} --arms repa {run}", f"greedy {cores} {tiny} --arms repa {run}"]
    if cores >= 2:
        spec.insert(1, f"b 1 {tiny} --arms vanilla {run}")
    (tmp_path / "spec").write_text("# two probes and one too many\n" + "\n".join(spec) + "\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SPEC": str(tmp_path / "spec"), "WORK": str(tmp_path / "work"),
           "REPAE_CACHE": str(tmp_path / "cache"), "WORLD_OVERRIDES": " ".join(TINY), "PYTHON": sys.executable,
           "PYTHONPATH": str(root / "src")}
    subprocess.run(["bash", str(root / "benchmarks/gpu_reproduce_probes.sh")], env=env, check=True, timeout=600,
                   capture_output=True)
    out = tmp_path / "out"
    said = (out / "probes.txt").read_text()
    assert "a: cores 0-0" in said and f"greedy: {cores} cores wanted, {cores - len(spec) + 1} left" in said
    assert not (out / "greedy").exists()
    for name, arm in [("a", "repa"), ("b", "vanilla")][: len(spec) - 1]:
        results = json.loads((out / name / "results.json").read_text())
        assert list(results["metrics"]) == [arm] and list(results["metrics"][arm]["0"]) == ["2"]
        assert results["threads_per_run"] == 1  # its own core, one run on it
        assert (out / name / "runs" / f"{arm}-s0" / "reproduce-metrics.json").is_file()
    if cores >= 2:
        assert "b: cores 1-1" in said
    world = json.loads((out / "world.json").read_text())
    with np.load(Path(world["cache"]) / "train.npz") as pool:
        assert world["train.npz"]["images"] == hashlib.sha256(np.ascontiguousarray(pool["images"]).tobytes()).hexdigest()
    # a budget spent before a probe would start (here by loading the world) starts none: no unlimited `timeout 0`
    late = {**env, "OUT": str(tmp_path / "late"), "WORK": str(tmp_path / "late-work"), "PROBE_BUDGET_S": "0"}
    subprocess.run(["bash", str(root / "benchmarks/gpu_reproduce_probes.sh")], env=late, check=True, timeout=600,
                   capture_output=True)
    assert "a: the budget of 0 s is spent: not started" in (tmp_path / "late" / "probes.txt").read_text()
    assert not (tmp_path / "late-work" / "a").exists()


@pytest.mark.slow
def test_a_compiled_loops_bare_step_compiles_nothing_new(tmp_path, monkeypatch):
    """The reason --step-iters exists: after a compiled loop (and its FLOP count), the bare step runs on graphs
    already compiled (a separate `bench step` took 91 s more on the H200, compiling again). ~1 min on a CPU."""
    import repae.bench_loop as bench_loop_module
    from torch._dynamo.utils import counters

    graphs = {}
    real = bench_loop_module._time_bare_step

    def counted(*args, **kwargs):
        graphs["before"] = counters["stats"]["unique_graphs"]
        result = real(*args, **kwargs)
        graphs["after"] = counters["stats"]["unique_graphs"]
        return result

    monkeypatch.setattr(bench_loop_module, "_time_bare_step", counted)
    cfg = load_config("toy", overrides=TINY + ["train.compile=true", "train.precision=bf16"])
    try:
        r = bench_loop_module.bench_loop(cfg, torch.device("cpu"), steps=3, skip=1, parts_iters=0,
                                         data_dir=str(tmp_path / "d"), step_iters=2)
    finally:
        torch._dynamo.reset()  # compiled regions hold the models; later tests start clean
    assert r["compile"] is True and r["bare_step"]["iters"] == 2
    assert graphs["before"] > 0 and graphs["after"] == graphs["before"]
