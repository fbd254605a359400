"""No bad value gets past the config: every numeric field has a range, YAML input is bounded."""

import dataclasses
import time
import tracemalloc
import typing

import pytest

from repae import config as config_module
from repae.cli import main
from repae.config import PRESETS, RANGES, ConfigError, RunConfig, load_config, read_yaml

# (override, the dotted key the message must name)
REJECTED = [
    ("optim_sit.lr=nan", "optim_sit.lr"),
    ("optim_sit.lr=inf", "optim_sit.lr"),
    ("optim_sit.lr=-1", "optim_sit.lr"),
    ("optim_vae.lr=0", "optim_vae.lr"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("train.global_batch_size=-64", "train.global_batch_size"),
    ("train.max_steps=-5", "train.max_steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.ckpt_every=0", "train.ckpt_every"),
    ("train.sample_every=0", "train.sample_every"),
    ("train.keep_last=-1", "train.keep_last"),
    ("train.ema_decay=2", "train.ema_decay"),
    ("train.ema_decay=nan", "train.ema_decay"),
    ("optim_sit.betas=[2,2]", "optim_sit.betas"),
    ("optim_disc.betas=[0.9,1.0]", "optim_disc.betas"),
    ("optim_vae.betas=[0.9]", "optim_vae.betas"),
    ("optim_sit.max_grad_norm=-1", "optim_sit.max_grad_norm"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.image_size=0", "data.image_size"),
    ("data.image_size=100000", "data.image_size"),
    ("exp_name=../../etc", "exp_name"),
    ("exp_name=..", "exp_name"),
    ("exp_name=a/b", "exp_name"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("train.grad_accum_steps=-2", "train.grad_accum_steps"),
    # a sample of the others
    ("optim_sit.eps=0", "optim_sit.eps"),
    ("optim_vae.weight_decay=-0.1", "optim_vae.weight_decay"),
    ("model.mlp_ratio=0", "model.mlp_ratio"),
    ("model.hidden_size=-8", "model.hidden_size"),
    ("model.depth=100000", "model.depth"),
    ("model.class_dropout_prob=1.0", "model.class_dropout_prob"),
    ("model.time_scale=-inf", "model.time_scale"),
    ("vae.ch_mult=[1,0,2]", "vae.ch_mult"),
    ("vae.ch_mult=[1,1,1,1,1,1,1,1,1,1]", "vae.ch_mult"),
    ("vae.norm_groups=0", "vae.norm_groups"),
    ("vae.z_channels=-1", "vae.z_channels"),
    ("latent_norm.momentum=1.5", "latent_norm.momentum"),
    ("latent_norm.eps=0", "latent_norm.eps"),
    ("flow.lognormal_std=0", "flow.lognormal_std"),
    ("flow.lognormal_mean=nan", "flow.lognormal_mean"),
    ("loss.kl_weight=-1e-6", "loss.kl_weight"),
    ("loss.gan_weight=inf", "loss.gan_weight"),
    ("loss.disc_layers=0", "loss.disc_layers"),
    ("loss.lecam_ema_decay=1.1", "loss.lecam_ema_decay"),
    ("loss.scale_eq_factors=[0]", "loss.scale_eq_factors"),
    ("toy.batch_size=0", "toy.batch_size"),
    ("toy.train_size=-1", "toy.train_size"),
    ("train.seed=-1", "train.seed"),
    ("train.max_nonfinite_in_a_row=0", "train.max_nonfinite_in_a_row"),
    ("sample.num_steps=0", "sample.num_steps"),
    ("sample.batch_size=0", "sample.batch_size"),
    ("sample.cfg_scale=nan", "sample.cfg_scale"),
    ("sample.guidance_high=1.5", "sample.guidance_high"),
    ("eval.num_samples=-1", "eval.num_samples"),
]


@pytest.mark.parametrize("override,key", REJECTED, ids=[o for o, _ in REJECTED])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("toy", overrides=[override])
    assert f"{key}=" in str(info.value)


@pytest.mark.parametrize("override", ["train.keep_last=0", "eval.num_samples=0", "optim_sit.max_grad_norm=0",
                                      "loss.gan_weight=0", "data.num_workers=0", "exp_name=my-run.v2"])
def test_meaningful_zeros_and_names_are_accepted(override):
    load_config("toy", overrides=[override])


def test_all_range_errors_come_at_once_and_nothing_divides_by_zero():
    with pytest.raises(ConfigError) as info:
        load_config("toy", overrides=["train.grad_accum_steps=0", "train.global_batch_size=0", "optim_sit.lr=nan"])
    message = str(info.value)
    assert all(k in message for k in ("train.grad_accum_steps=0", "train.global_batch_size=0", "optim_sit.lr=nan"))


def _numeric_fields(cls, prefix=""):
    """Dotted keys of every int/float (or list/optional of them) field, nested dataclasses walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _numeric_fields(kind, f"{prefix}{f.name}.")
            continue
        inner = {kind}
        while any(typing.get_args(t) for t in inner):  # unwrap Optional[...] / List[...]
            inner = {a for t in inner for a in (typing.get_args(t) or (t,))}
        if inner & {int, float}:
            yield prefix + f.name


def test_every_numeric_field_has_a_range_rule():
    fields = set(_numeric_fields(RunConfig))
    assert len(fields) > 60  # the walk really finds the schema
    assert {"vae.ch_mult", "optim_disc.betas", "vae.attn_resolutions", "train.seed"} <= fields
    assert fields - set(RANGES) == set(), "numeric fields without a rule in config.RANGES"
    assert set(RANGES) - fields == set(), "rules for fields the schema does not have"


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_in_range(name):
    assert config_module.range_errors(config_module.preset(name)) == []
    assert main(["config", "--preset", name]) == 0


def test_cli_prints_range_errors_without_traceback(capsys):
    assert main(["config", "train.grad_accum_steps=0"]) == 2
    err = capsys.readouterr().err
    assert "train.grad_accum_steps=0 must be an integer" in err and "Traceback" not in err


def test_world_size_from_environment_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        load_config("toy")


# ------------------------------------------------------------------------------- YAML input

BILLION_LAUGHS = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    + ["train: {seed: *a9}"]
) + "\n"


def test_billion_laughs_is_refused_fast_with_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match="bomb.yaml.*expands to more than"):
            load_config("toy", [bomb])
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 20 * 2**20  # 10^9 expanded nodes: unbounded would be gigabytes


def test_cyclic_and_deep_yaml_are_refused(tmp_path):
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("train: &x {seed: [*x]}\n")
    with pytest.raises(ConfigError, match="cyclic.yaml.*cyclic"):
        load_config("toy", [cyclic])
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml.*deeper than"):
        load_config("toy", [deep])


def test_a_small_anchor_is_still_fine(tmp_path):
    f = tmp_path / "anchors.yaml"
    f.write_text("optim_sit: &opt {lr: 0.0005}\noptim_vae: *opt\n")
    cfg = load_config("toy", [f])
    assert cfg.optim_sit.lr == cfg.optim_vae.lr == 0.0005


@pytest.mark.parametrize("content,message", [
    (bytes(range(256)) * 4, "not UTF-8 text"),
    (b"train:\n  seed: \x00\x01\x02\n", "not valid YAML"),
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
    (b"- 1\n- 2\n", "mapping at top level"),
    (b"train: {seed: !!python/object:os.system [ls]}\n", "not valid YAML"),
    (b"train: {seed: " + b"9" * 10000 + b"}\n", "cannot be read"),
    # a second section of the same name dropped every key of the first without a word
    (b"train:\n  max_steps: 5\nmodel:\n  depth: 2\ntrain:\n  seed: 3\n", "duplicate key 'train' \\(first on line 1\\)"),
    (b"train: {seed: 1, seed: 2}\n", "duplicate key 'seed'"),
])
def test_unreadable_yaml_is_a_config_error_naming_the_file(tmp_path, content, message):
    f = tmp_path / "odd.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=f"odd.yaml.*{message}|{message}.*odd.yaml"):
        load_config("toy", [f])


def test_a_merge_key_may_still_be_overridden(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text("base: &b {max_steps: 5, seed: 1}\ntrain:\n  <<: *b\n  seed: 3\n")
    assert read_yaml(f)["train"] == {"max_steps": 5, "seed": 3}


def test_oversized_yaml_is_refused_before_parsing(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("# padding\n" * (config_module.MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="big.yaml is larger than 1 MiB"):
        read_yaml(f)


def test_cli_reports_a_binary_config_in_one_line(tmp_path, capsys):
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"\xff\xfe\x00\x00garbage\x89PNG")
    assert main(["config", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "binary.yaml" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_a_broken_saved_run_config_is_a_config_error(tmp_path):
    from repae.train.loop import check_same_config

    cfg = load_config("toy", overrides=[f"output_dir={tmp_path}"])
    saved = tmp_path / "config.yaml"
    for content in (b"", b"\x89PNG\r\n\x1a\n\x00\x00", b"a: &a [*a]\n"):
        saved.write_bytes(content)
        with pytest.raises(ConfigError, match="config.yaml"):
            check_same_config(cfg, saved)


@pytest.mark.parametrize("override, words", [
    ("model.depth=[1", "not valid YAML"), ("model.depth=!foo 3", "not valid YAML"), ("model.depth=*a", "not valid YAML"),
    ("sample.mode=!!python/name:os.system", "not valid YAML"),
    ("model.depth=" + "[" * 3000, "not valid YAML"),
])
def test_an_override_that_is_not_yaml_is_a_config_error(override, words):
    # overrides are parsed as YAML by OmegaConf: each was a yaml traceback
    with pytest.raises(ConfigError, match=f"override .*{words}") as err:
        load_config("toy", overrides=[override])
    assert len(str(err.value)) < 400  # the 3000 brackets are not echoed back whole
