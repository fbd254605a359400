"""The end-of-run lines (repae.train.report.run_story): the default toy run is compared with the
README's figures, and only the default recipe at its default budget is."""

from pathlib import Path

from repae.config import load_config
from repae.train.report import DEFAULT_TOY_RUN, is_default_toy_run, run_story

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_reference_figures_are_the_readmes():
    text = " ".join(README.split())  # the README wraps its lines
    steps = DEFAULT_TOY_RUN["steps"]
    assert f"Then {steps} REPA-E steps" in text
    assert f"recognises the intended class in {100 * DEFAULT_TOY_RUN['sample_class_accuracy']:.1f}%" in text
    assert f"toy FID {DEFAULT_TOY_RUN['sample_toy_fid']}," in text
    assert f"tuned VAE reconstructs at {DEFAULT_TOY_RUN['vae_heldout_psnr_db']:.1f} dB" in text
    assert load_config("toy").train.max_steps == steps


def _summary(steps: int) -> dict:
    return {"steps": steps, "steps_this_invocation": steps, "wall_seconds": 90.0, "images_per_s": 75.0,
            "samples": f"runs/toy/samples/step-{steps:07d}.png",
            "toy": {"sample_class_accuracy": 0.8133, "samples_scored": 300, "sample_toy_fid": 5.1,
                    "vae_heldout_psnr_db": 29.94, "toy_vae_pretrained_psnr_db": 29.57}}


def test_the_default_run_is_compared_with_the_readme(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    lines = run_story(_summary(1000), tmp_path, default_toy_run=True)
    assert lines[0] == "done: step 1000 (1000 this time) in 1.5 min, median 75.0 images/s"
    assert f"81.3% of 300 (chance 10%; the README's default run: {100 * DEFAULT_TOY_RUN['sample_class_accuracy']:.1f}%)" in lines[1]
    assert lines[2].endswith(f"toy FID 5.1 against the held-out images (lower is better; the README's default run: {DEFAULT_TOY_RUN['sample_toy_fid']})")
    assert lines[3].endswith("29.9 dB held-out PSNR (pre-trained: 29.6 dB; the README's default run: "
                             f"{DEFAULT_TOY_RUN['vae_heldout_psnr_db']:.1f} dB)")
    assert lines[4].startswith(f"  files in {tmp_path}: summary.json, samples/")  # only the files that exist


def test_the_speed_line_is_rounded_names_the_precision_and_survives_no_log_line(tmp_path):
    summary = dict(_summary(1000), images_per_s=73.63499999999999, precision="fp32")  # a median of two
    assert run_story(summary, tmp_path)[0] == "done: step 1000 (1000 this time) in 1.5 min, median 73.6 images/s in fp32"
    summary.update(images_per_s=None, steps_this_invocation=0)  # already at max_steps: nothing logged
    assert run_story(summary, tmp_path)[0] == "done: step 1000 (0 this time) in 1.5 min in fp32"


def test_a_frozen_vae_is_not_called_tuned(tmp_path):
    lines = run_story(_summary(1200), tmp_path, vae_tuned=False)
    assert "  frozen VAE: 29.9 dB held-out PSNR" in lines and not any("tuned" in line for line in lines)


def test_other_budgets_and_recipes_get_no_reference(tmp_path):
    assert not any("README" in line for line in run_story(_summary(600), tmp_path, default_toy_run=True))
    assert not any("README" in line for line in run_story(_summary(1000), tmp_path, default_toy_run=False))


def test_which_configs_are_the_default_recipe():
    assert is_default_toy_run(load_config("toy"))
    # where it runs and for how long change no result
    assert is_default_toy_run(load_config("toy", overrides=["output_dir=/tmp/x", "exp_name=mine",
                                                             "train.max_steps=4000", "train.num_threads=1"]))
    for change in ("train.tune_vae=false", "vae.ch=32", "sample.cfg_scale=2", "toy.vae_steps=10"):
        assert not is_default_toy_run(load_config("toy", overrides=[change])), change


def test_cknna_references_only_for_the_toy_sit_at_the_commands_defaults():
    from repae.config import load_config
    from repae.train.report import TOY_CKNNA, TOY_CKNNA_SETTINGS, toy_cknna_comparison

    toy, settings = load_config("toy"), dict(TOY_CKNNA_SETTINGS)
    line = toy_cknna_comparison(toy, settings)
    assert line is not None and all(f"{name} {value:.3f}" in line for name, value in TOY_CKNNA.items())
    assert toy_cknna_comparison(load_config("toy", overrides=["train.tune_vae=false"]), settings) == line  # any toy arm
    for key, other in (("depth", 1), ("t", 0.3), ("num_images", 24), ("encoder", "dinov2-vit-b"), ("labels", "null class")):
        assert toy_cknna_comparison(toy, {**settings, key: other}) is None, key
    assert toy_cknna_comparison(load_config("toy", overrides=["model.depth=2"]), settings) is None  # another SiT
    text = " ".join(README.split())
    for name, value in TOY_CKNNA.items():  # the README gives the same references
        assert f"{value:.3f}" in text, name


def test_repae_train_compares_the_default_run_although_training_names_the_toy_vae(tmp_path, monkeypatch, capsys):
    from repae import cli
    from repae.train import loop

    def fake_train(cfg, progress=True):  # as the real one: the toy world's VAE files go into the config
        loop.use_toy_vae(cfg, tmp_path / "vae.safetensors", tmp_path / "stats.pt")
        return _summary(cfg.train.max_steps)

    monkeypatch.setattr(loop, "train", fake_train)
    assert cli.main(["train", f"output_dir={tmp_path}", "--no-progress"]) == 0
    assert f"the README's default run: {100 * DEFAULT_TOY_RUN['sample_class_accuracy']:.1f}%" in capsys.readouterr().err
