"""Known answers for the analysis helpers of the scripts in benchmarks/ (they back figures in the README)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other by module name, as when run
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_mixture_gaussian_is_the_pooled_gaussian():
    # the mixture of per-class Gaussians, weighted by class counts, is the Gaussian of the pooled data (both with
    # the 1/N covariance; np.cov's 1/(N-1) differs by N/(N-1) per class, so compare with bias=True)
    mix = _load("class_mix_fid")
    rng = np.random.default_rng(0)
    groups = [rng.normal(loc, scale, size=(n, 3)) for loc, scale, n in ((0, 1, 50), (3, 0.5, 150), (-2, 2, 100))]
    means = np.stack([g.mean(0) for g in groups])
    covs = np.stack([np.cov(g, rowvar=False, bias=True) for g in groups])
    weights = np.array([len(g) for g in groups], dtype=float) / 300
    mean, cov = mix.mixture_gaussian(means, covs, weights)
    pooled = np.concatenate(groups)
    np.testing.assert_allclose(mean, pooled.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(pooled, rowvar=False, bias=True), atol=1e-12)


def _classes(seed: int, counts, spread: float):
    """Four well-separated classes in 8-d: real features (500 a class, unit spread) and "sample" features with
    `counts` per class and `spread`; (samples, their classes, real, real labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(4, 8))
    labels = np.repeat(np.arange(4), 500)
    real = centres[labels] + rng.normal(0, 1, size=(2000, 8))
    classes = np.repeat(np.arange(4), counts)
    return centres[classes] + rng.normal(0, spread, size=(len(classes), 8)), classes, real, labels


def test_split_fid_blames_the_mixture_not_the_drawing():
    # "samples" that are real images of a skewed class mixture: drawn perfectly, wrong mixture. Their toy FID
    # against the uniform reference is large; against a reference with their own mixture it is ~0, and so is
    # the within-class FID (up to the sampling noise of the few images, far below the mixture term)
    r = _load("class_mix_fid").split_fid(*_classes(1, [700, 700, 300, 300], 1.0), 4)
    assert r["toy_fid"] > 4
    assert r["toy_fid_own_class_mix"] < 0.1 * r["toy_fid"]
    assert r["mean_within_class_fid"] < 0.1 * r["toy_fid"]
    assert r["read_per_class"] == [700, 700, 300, 300]


def test_split_fid_sees_bad_drawing_with_the_right_mixture():
    # the converse: the right (uniform) mixture, every class drawn with twice the spread: the mixture-matched
    # FID stays as large as the plain one, and the within-class FID is large
    r = _load("class_mix_fid").split_fid(*_classes(2, 500, 2.0), 4)
    assert r["toy_fid"] > 5
    assert abs(r["toy_fid_own_class_mix"] - r["toy_fid"]) < 0.05 * r["toy_fid"]
    assert r["mean_within_class_fid"] > 5


def test_keep_latents_records_what_is_decoded():
    fd = _load("forgiving_decoder")

    class Halves(torch.nn.Module):
        def decode(self, z):
            return z / 2

    keeper = fd.KeepLatents(Halves())
    z = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert torch.equal(keeper.decode(z), z / 2)
    assert len(keeper.latents) == 1 and torch.equal(keeper.latents[0], z)


def test_world_build_reports_where_each_part_trained_and_refuses_a_built_world(tmp_path, capsys):
    world_build = _load("world_build")
    tiny = ["toy.train_size=40", "toy.heldout_size=20", "toy.teacher_steps=1", "toy.vae_steps=1", "toy.batch_size=8",
            "toy.vae_batch_size=4"]
    out = tmp_path / "world.json"
    assert world_build.main(["--cache", str(tmp_path / "cache"), "--device", "cpu", "--out", str(out), *tiny]) == 0
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["toy_spec"]["train_size"] == 40
    assert [record[f"{part}_build_device"] for part in ("teacher", "vae", "evaluator")] == ["cpu"] * 3
    parts = sum(record[f"{part}_train_seconds"] for part in ("teacher", "vae", "evaluator"))
    assert record["world_build_seconds"] >= parts - 0.15  # the wall time holds the parts (each rounded to 0.1 s)
    assert 0 <= record["evaluator_heldout_accuracy"] <= 1 and record["vae_heldout_psnr_db"] > 0
    with pytest.raises(SystemExit, match="not empty: a world already there would only be read"):
        world_build.main(["--cache", str(tmp_path / "cache"), "--device", "cpu", *tiny])


def test_bf16_ulps_counts_steps_between_neighbouring_bf16_values():
    ulps = _load("bf16_roundings").bf16_ulps
    one = torch.tensor([1.0, -3.0, 0.0, 0.5], dtype=torch.bfloat16)
    step = torch.tensor([2.0**-7, 2.0**-6, 0.0, 2.0**-8])  # bf16's spacing at 1, 3 (in [2, 4)), 0 and 0.5
    assert ulps(one, one).tolist() == [0.0] * 4
    assert ulps(one, (one.float() - step * one.float().sign()).bfloat16()).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert ulps(one, (one.float() + 3 * step).bfloat16())[0] == 3.0


def test_model_flops_differences_are_the_projector_and_the_upsample_taps():
    from repae.build import build_sit, vae_args
    from repae.config import load_config

    flops = _load("model_flops")
    args = build_sit(load_config("toy")).args
    tokens = (args.input_size // args.patch_size) ** 2
    d, p, (z,) = args.hidden_size, args.projector_dim, args.z_dims
    projector = 2 * tokens * (d * p + p * p + p * z)  # three linears, 2 FLOPs per multiply-add
    assert flops.forward_flops_per_image("toy", project=True) - flops.forward_flops_per_image("toy", False) == projector

    vae, size = vae_args(load_config("toy")), load_config("toy").data.image_size
    saved = 0
    for level in range(1, len(vae.ch_mult)):  # level L upsamples from size / 2^L, with ch * ch_mult[L] channels
        c, h = vae.ch * vae.ch_mult[level], size // 2**level
        official, phases = 2 * c * c * 9 * (2 * h) ** 2, 2 * (4 * c) * c * 4 * (h + 1) ** 2
        saved += 3 * (official - phases)  # forward, then the input's and the weight's gradients
    assert flops.vae_flops_per_image("toy", True) - flops.vae_flops_per_image("toy", False) == saved


def test_step_ceiling_replays_a_broadcast_input_with_its_strides():
    # an expanded tensor (stride 0) is an input of some of the step's ops; fresh tensors for its replay cannot be
    # filled through that view
    fresh = _load("step_ceiling")._fresh
    (t,), _ = fresh(((("T", torch.Size([3, 4]), (0, 1), torch.float32),), {}), torch.Generator().manual_seed(0))
    assert t.shape == (3, 4) and t.stride() == (0, 1)
    assert torch.equal(t[0], t[2]) and t[0].unique().numel() == 4


def test_step_ceiling_records_every_op_or_only_the_counted_ones():
    ceiling = _load("step_ceiling")
    x, w = torch.ones(2, 3), torch.ones(3, 4)

    def run():
        for _ in range(2):
            (x * 2).sum()
        x @ w

    counts = {}
    for every_op in (True, False):
        with ceiling.RecordOps(every_op=every_op) as recorder:
            run()
        counts[every_op] = {name: c for (name, _, _), (_, _, c) in recorder.ops.items()}
    assert counts[True] == {"aten.mul.Tensor": 2, "aten.sum.default": 2, "aten.mm.default": 1}
    assert counts[False] == {"aten.mm.default": 1}


def test_eager_floor_sums_each_op_less_the_cost_of_calling_it():
    floor = _load("step_ceiling").eager_floor([
        {"op": "aten.mm.default", "count": 2, "seconds_each": 5e-6},
        {"op": "aten.add.Tensor", "count": 3, "seconds_each": 1e-6},  # cheaper than a call: counts 0, not less
        {"op": "aten.add.Scalar", "count": 1, "seconds_each": 4e-6},
    ], call_seconds=2e-6)
    assert floor["seconds_alone"] == pytest.approx(6e-6 + 2e-6)
    assert floor["calls"] == 6
    assert list(floor["by_kind"]) == ["mm", "add"]
    assert floor["by_kind"]["add"] == {"calls": 4, "seconds_alone": pytest.approx(2e-6)}


def test_eager_bound_adds_the_small_batch_cost_outside_the_ops_to_the_floor():
    bound = _load("step_ceiling").eager_bound(
        {"every_op": {"floor_seconds": 0.120}, "matmul_conv_flops": 60e9, "matmul_peak_flops": 1e12},
        {"global_batch": 2, "step_seconds": 0.045, "every_op": {"floor_seconds": 0.025}})
    assert bound["outside_ops_seconds"] == pytest.approx(0.020)
    assert bound["seconds"] == pytest.approx(0.140)
    assert bound["fraction_of_peak"] == pytest.approx(60e9 / 0.140 / 1e12)


def test_step_profile_counts_each_op_per_step():
    from torch.profiler import ProfilerActivity, profile

    summarise = _load("step_profile").summarise
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):  # two "steps" of three products and two sums
            c = a @ b @ b @ b
            c + a + b
    r = summarise(prof, steps=2, wall_seconds=0.5, on_device=False)
    calls = {o["op"]: o["calls_per_step"] for o in r["top_ops"]}
    assert calls["aten::mm"] == 3 and calls["aten::add"] == 2
    assert r["step_seconds"] == 0.25 and r["device_busy_seconds_per_step"] is None and r["top_kernels"] == []
    mm = next(o for o in r["top_ops"] if o["op"] == "aten::mm")
    assert mm["share_of_step"] == pytest.approx(mm["seconds_per_step"] / 0.25)


def test_step_profile_on_a_gpu_counts_kernels_as_device_time_and_ops_by_their_kernels():
    # what key_averages gives on a GPU, written out: aten ops carry their kernels' time (microseconds), kernels
    # come as entries of device type CUDA; the device was busy for the kernels' sum
    from types import SimpleNamespace

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    entries = [SimpleNamespace(key="aten::convolution", count=4, device_type=cpu, self_cpu_time_total=50.0,
                               self_device_time_total=6000.0),
               SimpleNamespace(key="aten::add", count=6, device_type=cpu, self_cpu_time_total=30.0,
                               self_device_time_total=1000.0),
               SimpleNamespace(key="aten::view", count=8, device_type=cpu, self_cpu_time_total=9.0,
                               self_device_time_total=0.0),
               SimpleNamespace(key="ProfilerStep", count=2, device_type=cpu, self_cpu_time_total=99.0,
                               self_device_time_total=0.0),
               SimpleNamespace(key="sm90_xmma_fprop", count=4, device_type=cuda, self_cpu_time_total=0.0,
                               self_device_time_total=6000.0),
               SimpleNamespace(key="elementwise_kernel", count=6, device_type=cuda, self_cpu_time_total=0.0,
                               self_device_time_total=1000.0)]
    prof = SimpleNamespace(key_averages=lambda: entries)
    r = _load("step_profile").summarise(prof, steps=2, wall_seconds=0.010, on_device=True)
    assert [o["op"] for o in r["top_ops"]] == ["aten::convolution", "aten::add"]  # no device time: not listed
    assert r["top_ops"][0]["seconds_per_step"] == pytest.approx(0.003) and r["top_ops"][0]["calls_per_step"] == 2
    assert [k["kernel"] for k in r["top_kernels"]] == ["sm90_xmma_fprop", "elementwise_kernel"]
    assert r["device_busy_seconds_per_step"] == pytest.approx(0.0035)
    assert r["device_idle_share"] == pytest.approx(1 - 0.0035 / 0.005)


def test_step_profile_lists_compiled_graphs_and_their_kernels_among_the_ops():
    # a compiled region's work runs in its generated kernels, not in aten ops: without these rows a compiled
    # step's ops would leave most of its time out. Known entries, then a real compiled function on this CPU
    # (the record-function names of the installed torch).
    from types import SimpleNamespace

    from torch.profiler import ProfilerActivity, profile

    step_profile = _load("step_profile")
    cpu = torch.autograd.DeviceType.CPU
    entries = [SimpleNamespace(key=k, count=c, device_type=cpu, self_cpu_time_total=us, self_device_time_total=0.0)
               for k, c, us in (("## Call CompiledFxGraph fabcdefghijklmnop ##", 2, 400.0),
                                ("graph_0_cpp_fused_add_mul_0", 2, 3000.0), ("aten::mm", 4, 1000.0),
                                ("Torch-Compiled Region: 0/0", 2, 50.0), ("TorchDynamo Cache Lookup", 2, 20.0))]
    r = step_profile.summarise(SimpleNamespace(key_averages=lambda: entries), steps=2, wall_seconds=0.01,
                               on_device=False)
    assert [(o["op"], o["seconds_per_step"]) for o in r["top_ops"]] == [
        ("graph_0_cpp_fused_add_mul_0", pytest.approx(0.0015)), ("aten::mm", pytest.approx(0.0005)),
        ("compiled graph fabcdefgh", pytest.approx(0.0002))]

    import torch._inductor.config as inductor

    with inductor.patch({"cpp.enable_kernel_profile": True}):
        f = torch.compile(lambda x: (x.sin() * 2 + 1).relu().sum(1))
        x = torch.randn(256, 256)
        f(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                f(x)
    names = {o["op"] for o in step_profile.summarise(prof, steps=2, wall_seconds=1.0, on_device=False)["top_ops"]}
    assert any(n.startswith("compiled graph ") for n in names)
    # inductor numbers its graphs per process: graph_0 here only if this is the process's first compile
    assert any(re.match(r"graph_\d+_cpp_fused_", n) and "sin" in n for n in names)


def test_step_profile_names_inductor_cpp_kernels_on_a_cpu_only(monkeypatch):
    # the setting is part of inductor's cache key: on a GPU it would recompile every graph that the suite's
    # compiled loop left in the cache, and a GPU's kernels are Triton's anyway
    import torch._inductor.config as inductor

    step_profile = _load("step_profile")
    seen = {}
    monkeypatch.setattr(step_profile, "_profile_step", lambda cfg, device, steps, warmup, top: seen.setdefault(
        device.type, inductor.cpp.enable_kernel_profile))
    for device in ("cpu", "cuda"):
        step_profile.profile_step(None, torch.device(device))
    assert seen == {"cpu": True, "cuda": False}
    assert inductor.cpp.enable_kernel_profile is False  # restored after


def test_a_sync_site_is_the_calling_line_then_its_nearest_callers_outside_torch():
    import traceback

    site = _load("step_profile").sync_site
    torch_dir = str(Path(torch.__file__).parent)
    stack = [traceback.FrameSummary("/x/src/repae/train/loop.py", 10, "train_steps"),
             traceback.FrameSummary("/x/src/repae/train/step.py", 20, "repae_step"),
             traceback.FrameSummary(f"{torch_dir}/_tensor.py", 30, "backward"),
             traceback.FrameSummary(f"{torch_dir}/autograd/__init__.py", 40, "backward"),
             traceback.FrameSummary("/usr/lib/python3/warnings.py", 50, "_showwarnmsg")]
    # a sync in torch's own code (backward) is named with the repae lines that called it
    assert site(f"{torch_dir}/autograd/__init__.py", 40, stack) == (
        "torch/autograd/__init__.py:40 backward < repae/train/step.py:20 repae_step < repae/train/loop.py:10 train_steps")
    assert site("/x/src/repae/train/step.py", 20, stack) == (
        "repae/train/step.py:20 repae_step < repae/train/loop.py:10 train_steps")
    assert site("/elsewhere/a.py", 7, stack) == "/elsewhere/a.py:7"  # not on the stack: the line alone


def test_host_syncs_counts_cuda_sync_warnings_by_site_and_lets_other_warnings_through(monkeypatch):
    import warnings

    step_profile = _load("step_profile")
    modes = ["disabled"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))

    def syncing_op():  # what torch's warning looks like, raised from the line that called the op
        warnings.warn(f"{step_profile.SYNC_WARNING} (Triggered internally at CUDAFunctions.cpp:1)", UserWarning)

    with step_profile.host_syncs(torch.device("cuda")) as sites:
        assert modes[-1] == "warn"
        for _ in range(3):  # counted each time, not once per line as Python's default filter would
            syncing_op()
        warnings.warn("something else", UserWarning)
    assert modes[-1] == "disabled"  # the mode it found
    assert list(sites.values()) == [3]
    [where] = sites
    assert where.startswith("tests/test_benchmark_analyses.py:") and "syncing_op" in where
    assert "test_host_syncs_counts_cuda_sync_warnings" in where  # its caller
    assert shown == ["something else"]
    with step_profile.host_syncs(torch.device("cpu")) as none:
        assert none is None
    assert modes == ["disabled", "warn", "disabled"]  # nothing set for a CPU


def test_step_profile_of_the_training_loop_adds_what_the_loop_does_around_the_step(tmp_path):
    step_profile = _load("step_profile")
    from repae.config import load_config

    cfg = load_config("toy", overrides=["model.depth=2", "model.hidden_size=48", "model.num_heads=2",
                                        "model.encoder_depth=1", "model.projector_dim=64", "vae.ch=32",
                                        "vae.ch_mult=[1,2,2]", "train.global_batch_size=4", "data.num_workers=0"])
    cpu = torch.device("cpu")
    loop = step_profile.profile_step(cfg, cpu, steps=2, warmup=1, loop=True, data_dir=str(tmp_path), top=10**6)
    step = step_profile.profile_step(cfg, cpu, steps=2, warmup=1, top=10**6)
    assert (loop["loop"], step["loop"]) == (True, False) and loop["steps_profiled"] == 2
    norms = {r["loop"]: {o["op"]: o["calls_per_step"] for o in r["top_ops"]}["aten::_foreach_norm"] for r in (loop, step)}
    # the step's gradient norms (SiT, VAE: the discriminator starts later), and in the loop the weight check after
    # each step
    assert norms == {False: 2, True: 3}
    assert loop["host_syncs_per_step"] is None and loop["host_sync_sites"] is None  # no device to wait for
    assert any(p.name.startswith("packed-") for p in tmp_path.iterdir())  # the store was made where asked


def test_cpu_kernels_compares_ways_of_computing_one_function(monkeypatch):
    cpu_kernels = _load("cpu_kernels")
    assert cpu_kernels.difference(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.5, 3.0])) == {
        "elements_differing": 1, "max_abs_difference": 0.5}
    # every GroupNorm + SiLU way is the same function: apart by bf16 rounding (one step at |y| < 4: 1/64) only
    rows = cpu_kernels.group_norm_rows(iters=1)
    assert len(rows) == 4 * len(cpu_kernels.GN_SHAPES)
    for r in rows:
        assert r["max_abs_difference"] <= 1 / 32 and r["elements_differing"] <= 1e-3 * np.prod(r["shape"]), r
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # inductor's C++ build is too slow for a unit test
    gelu = {r["what"]: r for r in cpu_kernels.gelu_rows(iters=1)}
    sigmoid_form = gelu["x * sigmoid(2u), torch ops"]
    assert sigmoid_form["elements_differing"] <= 1e-3 * np.prod(cpu_kernels.GELU_SHAPE)
    assert sigmoid_form["max_abs_difference"] < 1e-3
    assert gelu["gelu erf (another function)"]["max_abs_difference"] > 1e-3  # a different function: it shows


def test_device_gaps_are_found_on_the_device_timeline_and_named_by_the_launching_op():
    from types import SimpleNamespace

    step_profile = _load("step_profile")
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def op(i, name, parent=None):
        return SimpleNamespace(id=i, name=name, device_type=cpu, is_async=False, linked_correlation_id=0,
                               cpu_parent=parent, time_range=SimpleNamespace(start=0, end=0))

    def kernel(name, start, end, launched_by):  # times in microseconds, as the profiler keeps them
        return SimpleNamespace(id=0, name=name, device_type=cuda, is_async=False, linked_correlation_id=launched_by,
                               cpu_parent=None, time_range=SimpleNamespace(start=start, end=end))

    linear = op(1, "aten::linear")
    events = [linear, op(2, "aten::mm", linear), op(3, "aten::copy_"),
              # the launch record of a kernel (a CPU runtime event linked to the op) is not a launching op
              SimpleNamespace(id=9, name="cudaLaunchKernel", device_type=cpu, is_async=False, linked_correlation_id=2,
                              cpu_parent=None, time_range=SimpleNamespace(start=0, end=0)),
              kernel("gemm_a", 0, 300, 2), kernel("gemm_b", 50, 100, 2),  # within gemm_a (another stream)
              kernel("memcpy", 1300, 1400, 3),  # waited 1000 us for the copy's launch
              kernel("gemm_c", 1400, 1500, 2),  # back to back: no gap
              kernel("gemm_d", 1700, 1800, 2),  # 200 us
              kernel("gemm_e", 3800, 4000, 2)]  # 2000 us
    r = step_profile.device_gaps(events, steps=2)
    assert r["gap_seconds_per_step"] == pytest.approx(3200e-6 / 2) and r["gaps_per_step"] == 1.5
    assert r["span_seconds_per_step"] == pytest.approx(4000e-6 / 2)
    assert r["by_launching_op"] == [
        {"launched_by": "aten::mm < aten::linear", "seconds_per_step": pytest.approx(1100e-6), "gaps_per_step": 1.0},
        {"launched_by": "aten::copy_", "seconds_per_step": pytest.approx(500e-6), "gaps_per_step": 0.5}]
    largest = r["largest"][0]
    assert (largest["seconds"], largest["at_seconds"], largest["after_kernel"], largest["before_kernel"]) == (
        pytest.approx(2000e-6), pytest.approx(1800e-6), "gemm_d", "gemm_e")
    assert r["largest"][1]["after_kernel"] == "gemm_a"  # the kernel that ended last before the gap
    assert step_profile.device_gaps([op(1, "aten::mm")], steps=1) is None  # a CPU profile has no device timeline
