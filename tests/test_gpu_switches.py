"""The GPU speed switches: TF32 / cuDNN benchmark mode (train.tf32, train.cudnn_benchmark) and
compiled sampling (sample.compile). The flags are process-wide, so each test puts them back."""

import pytest
import torch
from torch import nn

from repae.generate import generate_images
from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL
from repae.nn_utils import compile_for_sampling, use_fast_gpu_kernels
from conftest import randomize, tiny_sit_args, tiny_vae_args


@pytest.fixture
def backend_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


def test_a_cuda_device_gets_the_switches_it_asks_for_both_ways(backend_flags):
    # setting the flags needs no GPU: only their effect does
    use_fast_gpu_kernels(torch.device("cuda"), tf32=True, cudnn_benchmark=True)
    assert _flags() == (True, True, True)
    use_fast_gpu_kernels(torch.device("cuda:0"), tf32=False, cudnn_benchmark=False)
    assert _flags() == (False, False, False)  # an earlier run's setting does not stick


def test_a_cpu_run_leaves_the_process_flags_alone(backend_flags):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = (
        False, False, False)
    use_fast_gpu_kernels(torch.device("cpu"), tf32=True, cudnn_benchmark=True)
    assert _flags() == (False, False, False)


def test_the_config_defaults_follow_the_reference(backend_flags):
    """The reference's train_repae.py defaults to --allow-tf32; ours does too."""
    from repae.config import load_config

    cfg = load_config("sit-xl2-f8d4", [], [])
    assert cfg.train.tf32 and cfg.train.cudnn_benchmark and not cfg.sample.compile
    cfg = load_config("sit-xl2-f8d4", [], ["train.tf32=false", "train.cudnn_benchmark=false", "sample.compile=true"])
    assert not cfg.train.tf32 and not cfg.train.cudnn_benchmark and cfg.sample.compile


@pytest.mark.slow
def test_compiled_sampling_compiles_sit_blocks_and_decoder_with_static_shapes_and_samples_the_same(monkeypatch):
    compiled = {}
    real = nn.Module.compile

    def recording(self, *args, **kwargs):
        compiled[id(self)] = kwargs
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", recording)
    torch.manual_seed(0)
    sit = randomize(SiT(tiny_sit_args(z_dims=[32], num_classes=10)), 0.02).eval()
    vae = AutoencoderKL(tiny_vae_args()).eval()
    labels = torch.tensor([0, 3, 7])
    # unguided and guided steps (batch 3 and 6): two static shapes
    kwargs = dict(mode="ode", num_steps=3, cfg_scale=2.0, guidance_high=0.5, batch_size=3, progress=False)
    eager = generate_images(sit, vae, labels, **kwargs)
    compile_for_sampling(sit, vae)
    assert {id(b) for b in sit.blocks} | {id(vae.decoder)} == set(compiled)
    assert all(k == {"dynamic": False, "mode": "default"} for k in compiled.values())
    assert id(vae.encoder) not in compiled  # sampling never encodes
    again = generate_images(sit, vae, labels, **kwargs)
    # uint8 images: compiled kernels may round a pixel the other way, no more
    assert (again.int() - eager.int()).abs().max() <= 1


def test_compile_defaults_on_for_a_gpu_as_the_reference_does_and_off_on_a_cpu_and_for_the_toy_preset():
    from repae.config import load_config
    from repae.train.setup import uses_compile

    xl = load_config("sit-xl2-f8d4", [], [])
    assert xl.train.compile is None  # auto
    assert uses_compile(xl, torch.device("cuda")) and not uses_compile(xl, torch.device("cpu"))
    off = load_config("sit-xl2-f8d4", [], ["train.compile=false"])
    assert not uses_compile(off, torch.device("cuda"))
    assert uses_compile(load_config("sit-xl2-f8d4", [], ["train.compile=true"]), torch.device("cpu"))
    assert not uses_compile(load_config("toy", [], []), torch.device("cuda"))  # the toy preset says false


def test_the_compile_modes_reach_every_compiled_region_and_training_refuses_cuda_graphs(monkeypatch):
    """train.compile_mode goes to each region make_trainables compiles, sample.compile_mode to each one
    compile_for_sampling compiles; CUDA-graph modes are refused for training (autograd, in-place updates)."""
    from repae.bench import random_trainables
    from repae.config import ConfigError, load_config

    compiled = {}
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: compiled.__setitem__(id(self), kwargs))
    tiny = ["model.depth=2", "model.hidden_size=48", "model.num_heads=2", "model.encoder_depth=1",
            "model.projector_dim=64", "train.compile=true"]
    m = random_trainables(load_config("toy", [], tiny + ["train.compile_mode=max-autotune-no-cudagraphs"]),
                          torch.device("cpu"))
    assert {id(b) for b in m.sit.blocks} | {id(m.vae.encoder), id(m.vae.decoder)} <= set(compiled)
    assert {k["mode"] for k in compiled.values()} == {"max-autotune-no-cudagraphs"}
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ConfigError, match="train.compile_mode"):
            load_config("toy", [], [f"train.compile_mode={mode}"])

    compiled.clear()
    cfg = load_config("toy", [], ["sample.compile=true", "sample.compile_mode=reduce-overhead"])
    compile_for_sampling(m.sit, m.vae, cfg.sample.compile_mode)
    assert set(compiled) == {id(b) for b in m.sit.blocks} | {id(m.vae.decoder)}
    assert all(k == {"dynamic": False, "mode": "reduce-overhead"} for k in compiled.values())


def test_init_device_applies_the_configs_switches_on_the_device_it_returns(backend_flags, monkeypatch):
    """train, sample and bench start with init_device: the device dist names, and cfg.train's switches on it."""
    from repae import dist
    from repae.config import load_config
    from repae.nn_utils import init_device

    monkeypatch.setattr(dist, "init_from_env", lambda name: torch.device("cuda"))  # no GPU needed to set flags
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = (
        True, True, True)
    cfg = load_config("sit-xl2-f8d4", [], ["train.tf32=false", "train.cudnn_benchmark=false"])
    assert init_device(cfg) == torch.device("cuda")
    assert _flags() == (False, False, False)


def test_bench_sample_uses_the_config_interval_and_warms_up_short_with_the_same_settings(monkeypatch):
    """Every generation call gets sample.guidance_low/high; where there is a warm-up (a GPU, or
    sample.compile) it is one WARMUP_SAMPLER_STEPS run before the timed full-length one."""
    from repae import bench
    from repae.config import load_config

    calls = []

    def fake_generate(sit, vae, labels, **kw):
        calls.append(kw)
        return torch.zeros(len(labels), 3, 32, 32, dtype=torch.uint8)

    monkeypatch.setattr("repae.generate.generate_images", fake_generate)
    monkeypatch.setattr(bench, "compile_for_sampling", lambda sit, vae, mode: None)
    cfg = load_config("toy", [], ["sample.guidance_low=0.1", "sample.guidance_high=0.65"])  # small models
    out = bench.bench_sample(cfg, torch.device("cpu"), 2, [("sde", 250, 2.2)])
    assert [c["num_steps"] for c in calls] == [250]  # a CPU, eager: no warm-up
    assert out["guidance_interval"] == [0.1, 0.65] and out["compile"] is False
    calls.clear()
    cfg.sample.compile = True
    bench.bench_sample(cfg, torch.device("cpu"), 2, [("ode", 50, 4.0)])
    assert [c["num_steps"] for c in calls] == [bench.WARMUP_SAMPLER_STEPS, 50]
    assert all((c["guidance_low"], c["guidance_high"], c["cfg_scale"]) == (0.1, 0.65, 4.0) for c in calls)
