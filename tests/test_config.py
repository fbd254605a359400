import pytest
import yaml

from repae.build import build_sit, build_vae, sit_args
from repae.config import PRESETS, ConfigError, from_dict, load_config, preset, save_config, to_dict


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    load_config(name)


def test_paper_preset_matches_the_recipe():
    cfg = load_config("sit-xl2-f8d4")
    assert (cfg.model.arch, cfg.vae.arch, cfg.encoder.names, cfg.model.encoder_depth) == (
        "SiT-XL/2", "f8d4", ["dinov2-vit-b"], 8)
    assert (cfg.loss.proj_coeff, cfg.loss.vae_align_proj_coeff) == (0.5, 1.5)
    assert (cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.ema_decay) == (256, 400_000, 0.9999)
    assert (cfg.optim_sit.lr, cfg.optim_vae.lr, cfg.optim_disc.lr) == (1e-4, 1e-4, 1e-4)
    args = sit_args(cfg)
    assert (args.input_size, args.patch_size, args.depth, args.hidden_size, list(args.z_dims)) == (32, 2, 28, 1152, [768])
    f16 = sit_args(load_config("sit-xl1-f16d32"))
    assert (f16.input_size, f16.patch_size, f16.in_channels) == (16, 1, 32)


def test_the_toy_preset_trains_its_vae_at_its_sits_lr_and_samples_at_cfg_2_5():
    """The paper's one lr for VAE and SiT, kept as the toy preset raises the SiT's; an override of the SiT's lr
    alone leaves the VAE's where the preset put it (they are two settings, not one)."""
    cfg = load_config("toy")
    assert (cfg.optim_vae.lr, cfg.optim_vae.decay_fraction) == (cfg.optim_sit.lr, cfg.optim_sit.decay_fraction)
    assert (cfg.optim_sit.lr, cfg.optim_sit.decay_fraction) == (4e-3, 0.5)
    assert cfg.sample.cfg_scale == 2.5
    assert load_config("toy", overrides=["optim_sit.lr=1e-3"]).optim_vae.lr == 4e-3


def test_overrides_are_typed():
    cfg = load_config("toy", overrides=["sample.cfg_scale=4", "model.qk_norm=true", "encoder.names=[toy-teacher]"])
    assert cfg.sample.cfg_scale == 4.0 and cfg.model.qk_norm is True
    with pytest.raises(ConfigError, match="model.depth"):
        load_config("toy", overrides=["model.depth=deep"])


@pytest.mark.parametrize("override,message", [
    ("modle.depth=3", "modle"),
    ("model.dpth=3", "dpth"),
    ("data.image_size=30", "not divisible by the VAE downsampling factor 4"),
    ("model.encoder_depth=7", r"encoder_depth=7 must be in \[1, SiT depth 6\]"),
    ("model.arch=SiT-T/1", "SiT token grid 8x8 .* != encoder 'toy-teacher' patch grid 4x4"),
    ("train.grad_accum_steps=5", "not divisible by world size 1 x grad_accum_steps 5"),
    ("flow.path_type=edm", "flow.path_type='edm' must be one of"),
    ("encoder.names=[dinov7]", "unknown encoder 'dinov7'"),
    ("model.arch=ViT-B/2", "not a SiT architecture"),
    ("sample.guidance_low=-0.1", r"sample.guidance_low=-0.1 must be a finite number in \[0, 1\]"),
    ("sample.guidance_low=0.9", "guidance_low <= sample.guidance_high"),
    ("vae.norm_groups=3", r"vae.norm_groups=3 must divide every VAE width \[16, 32, 64\]"),
    ("sample.cfg_scale=2", "needs a null class"),
    ("train.device=gpu", "train.device='gpu' must be auto, cpu, mps, cuda or cuda:N"),
    ("train.log_to=[tensorbord]", r"train.log_to has unknown sink\(s\) \['tensorbord'\]: use tensorboard or wandb"),
    ("train.max_steps=abc", "bad value for train.max_steps: Value 'abc'"),
    ("encoder.names=dinov2-vit-b", r"encoder.names expects a list, e.g. encoder.names=\[a,b\]"),
    ("train.max_steps=", "train.max_steps has no value"),
])
def test_impossible_configs_are_clear_errors(override, message):
    extra = ["model.class_dropout_prob=0"] if "cfg_scale" in override else []
    extra += ["sample.guidance_high=0.5"] if "guidance_low=0.9" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config("toy", overrides=[override] + extra)


def test_batch_must_divide_world_size():
    load_config("toy", world_size=2)
    with pytest.raises(ConfigError, match="world size 3"):
        load_config("toy", world_size=3)


def test_yaml_files_merge_in_order_then_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  max_steps: 10\n  seed: 3\n")
    b.write_text("train:\n  max_steps: 20\n")
    cfg = load_config("toy", [a, b], ["train.seed=5"])
    assert (cfg.train.max_steps, cfg.train.seed) == (20, 5)
    with pytest.raises(ConfigError, match="not found"):
        load_config("toy", [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("toy", [bad])


def test_saved_config_is_plain_data_and_reloads_equal(tmp_path):
    cfg = load_config("toy", overrides=["train.seed=9"])
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["train"]["seed"] == 9
    assert from_dict(data) == cfg
    assert to_dict(load_config(None, [tmp_path / "config.yaml"])) == to_dict(cfg)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="toy"):
        preset("sit-huge")


def test_toy_models_build_with_matching_shapes():
    cfg = load_config("toy")
    sit, vae = build_sit(cfg), build_vae(cfg)
    assert sit.args.input_size * vae.downsample_factor == cfg.data.image_size
    assert sit.args.in_channels == vae.z_channels


REAL_DATA_SMALL = ["data.source=folder", "data.path=/data/imagenet/train", "data.image_size=64", "model.arch=SiT-T/4",
                   "model.num_classes=1000", "vae.from_scratch=true", "encoder.names=[dinov2-vit-b]",
                   "encoder.paths=[weights/dinov2_vitb14_pretrain.pth]"]


def test_toy_teacher_on_real_data_names_the_overrides(capsys):
    """The toy preset on folder data: one line of error (exit 2, no traceback) naming what to set;
    the README's small real-data override set validates."""
    from pathlib import Path

    from repae.cli import main

    with pytest.raises(ConfigError, match=r"encoder.names=\[dinov2-vit-b\] encoder.paths=\[.*model.arch=SiT-T/4"):
        load_config("toy", overrides=["data.source=folder", "data.path=/data/x"], world_size=1)
    assert main(["train", "data.source=folder", "data.path=/data/x"]) == 2
    err = capsys.readouterr().err
    assert "toy-teacher" in err and "encoder.names=[dinov2-vit-b]" in err and "Traceback" not in err
    cfg = load_config("toy", overrides=REAL_DATA_SMALL, world_size=1)
    assert cfg.encoder.names == ["dinov2-vit-b"] and cfg.data.source == "folder"
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert " ".join(REAL_DATA_SMALL) in readme.replace("\n", " ")


def test_config_differences_names_dotted_keys_and_skips_what_it_is_told():
    from repae.config import config_differences, to_dict

    a = to_dict(load_config("toy"))
    b = to_dict(load_config("toy", overrides=["loss.proj_coeff=0.7", "sample.cfg_scale=2", "train.max_steps=5"]))
    assert config_differences(a, a) == []
    assert config_differences(a, b) == ["loss.proj_coeff", "sample.cfg_scale", "train.max_steps"]
    assert config_differences(a, b, ignore=("sample", "train.max_steps")) == ["loss.proj_coeff"]
    assert config_differences(a, b, ignore=("train.max",)) == ["loss.proj_coeff", "sample.cfg_scale", "train.max_steps"]
    del b["loss"]["proj_coeff"]  # a key only one side has differs
    assert config_differences(a, b, ignore=("sample", "train")) == ["loss.proj_coeff"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch that sees no GPU")
def test_a_cuda_device_without_a_gpu_is_refused_before_any_work(monkeypatch, tmp_path):
    """On a CPU-only torch, train.device=cuda failed mid-setup with torch's AttributeError
    (torch._C has no _cuda_setDevice); now a ConfigError before the toy world is looked at."""
    from repae import dist
    from repae.train import loop

    monkeypatch.setattr(loop, "_toy_setup", lambda *a, **k: pytest.fail("the toy world was loaded"))
    with pytest.raises(ConfigError, match="train.device=cuda: this torch sees no CUDA device"):
        dist.init_from_env("cuda")
    cfg = load_config("toy", overrides=["train.device=cuda:1", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.device=cuda:1: this torch sees no CUDA device"):
        loop.train(cfg, progress=False)
    assert dist.init_from_env("cpu").type == "cpu" and dist.device_named("cuda:1").index == 1  # named, not checked
