"""The console tells the story of a toy run: what the toy world build measured (teacher accuracy, VAE
PSNR and colour, evaluator accuracy, times), a world loaded from its cache in one line, and each
progress bar named after what it trains."""

import re

from repae.cli import main
from repae.config import load_config
from repae.train.loop import bar_label
from test_train_loop import TINY


def test_a_toy_run_reports_its_world_and_labels_its_bars(tmp_path, capsys):
    args = [*TINY, f"toy.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}", "train.max_steps=2"]
    assert main(["train", *args]) == 0
    err = capsys.readouterr().err
    assert re.search(r"toy world: teacher \d+\.\d% held-out accuracy, layout IoU \d\.\d\d; trained in [\d.]+ s on cpu", err), err
    assert re.search(r"toy world: VAE \d+\.\d dB held-out PSNR; (true colour|colours off): R,G,B means within "
                     r"[\d.]+% and stds within [\d.]+% of the data's, per-pixel R,G,B spread [\d.]+ \(data [\d.]+\); "
                     r"trained in [\d.]+ s on cpu", err), err
    assert re.search(r"toy world: evaluator \d+\.\d% held-out accuracy, scene factors R\^2 -?\d\.\d\d; trained in [\d.]+ s", err), err
    bars = set(re.findall(r"(?:^|\r)([A-Za-z][\w ,-]*?):\s+\d+%\|", err, flags=re.M))
    assert bars == {"render toy train set", "render toy held-out set", "toy teacher", "toy VAE", "toy evaluator",
                    "REPA-E"}, bars

    report = next((tmp_path / "cache").glob("toyworld-*/report.json"))
    written = (report.stat().st_mtime_ns, report.stat().st_ino, report.read_bytes())
    assert main(["train", "--no-progress", *args[:-1], "train.max_steps=3", "exp_name=again"]) == 0
    err = capsys.readouterr().err  # built before: one line, and no bar under --no-progress
    # a cached world is only read: runs started side by side once read report.json while another rewrote it (empty)
    assert (report.stat().st_mtime_ns, report.stat().st_ino, report.read_bytes()) == written
    lines = [line for line in err.splitlines() if line.startswith("toy world:")]
    assert len(lines) == 1 and re.fullmatch(r"toy world: cached in .*toyworld-\S+ \(teacher \d+\.\d%, VAE \d+\.\d dB, "
                                            r"evaluator \d+\.\d% held-out; report.json there\)", lines[0]), err
    assert "%|" not in err


def test_each_kind_of_run_names_its_bar():
    def label(*overrides):
        return bar_label(load_config("toy", overrides=list(overrides), world_size=1))

    assert label() == "REPA-E"
    assert label("train.tune_vae=false", "latent_norm.mode=fixed") == "REPA SiT, frozen VAE"
    assert label("train.tune_vae=false", "latent_norm.mode=fixed", "loss.proj_coeff=0") == "vanilla SiT, frozen VAE"
    assert label("train.use_reg_loss=false", "loss.proj_coeff=0", "loss.vae_align_proj_coeff=0",
                 "train.stop_grad=false") == "E2E, no REPA"
    assert label("train.tune_vae=false", "latent_norm.mode=fixed", "latents.path=runs/latents") == \
        "REPA SiT, cached latents"  # repae train-ldm
