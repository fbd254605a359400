"""`repae bench reproduce` on real data and weights: an image folder, a VAE file, an alignment
encoder and the FID Inception network, all local files (random weights written by the tests)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from repae.build import build_vae
from repae.cli import main
from repae.config import ConfigError, load_config
from repae.evaluate.stats import frechet_distance_to_features
from repae.models.encoders import build_network, encoder_spec
from repae.models.inception import InceptionV3
from repae.reproduce.judges import build_real_judges, class_means, load_real_judges, nearest_class, save_real_judges
from repae.reproduce.runner import judges_for_plan
from repae.weights import save_model

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (40, 50, 210)}


def colour_folder(root, per_class=6, size=64):
    """Class sub-folders of noisy single-colour images: classes any feature extractor tells apart."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-20, 21, (size, size, 3))
            Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(VAE file, DINOv2-S file, Inception file) with random weights, and the config overrides that use them."""
    root = tmp_path_factory.mktemp("real")
    inception = InceptionV3()
    for m in inception.modules():  # He init keeps activations alive through 94 convs
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    torch.save(inception.state_dict(), root / "inception.pth")
    torch.save(build_network(encoder_spec("dinov2-vit-s"), 518).state_dict(), root / "dinov2_vits14_pretrain.pth")
    data = colour_folder(root / "data")
    overrides = [
        "data.source=folder", f"data.path={data}", "data.image_size=64", "data.num_workers=0", "model.num_classes=3",
        "model.arch=SiT-T/4", "model.depth=2", "model.hidden_size=48", "model.num_heads=2", "model.encoder_depth=1",
        "model.projector_dim=64", "encoder.names=[dinov2-vit-s]",
        f"encoder.paths=[{root / 'dinov2_vits14_pretrain.pth'}]", f"eval.inception_path={root / 'inception.pth'}",
        "train.global_batch_size=6", "train.log_every=1", "train.sample_every=100", "sample.num_steps=3",
    ]
    torch.manual_seed(0)
    save_model(build_vae(load_config("toy", overrides=overrides)), root / "vae.safetensors")
    return root, overrides + [f"vae.path={root / 'vae.safetensors'}"]


def test_nearest_class_mean_is_cosine_and_ignores_scale():
    feats = torch.tensor([[1.0, 0.1], [2.0, -0.1], [0.1, 1.0], [-0.1, 3.0]])
    labels = torch.tensor([7, 7, 2, 2])
    means, classes = class_means(feats, labels)
    assert classes.tolist() == [2, 7] and torch.allclose(means.norm(dim=1), torch.ones(2))
    queries = torch.tensor([[10.0, 0.0], [0.0, 0.01], [1.0, 0.9]])  # far, tiny, nearer class 7's direction
    assert nearest_class(queries, means, classes).tolist() == [7, 2, 7]


def test_real_judges_recognise_the_held_out_classes_and_survive_saving(tmp_path, weights):
    root, overrides = weights
    cfg = load_config("toy", overrides=overrides)
    judges = build_real_judges(cfg, n=7)  # 7 of 18 images, spread over the three classes
    assert judges.info["kind"] == "real" and judges.info["heldout_images"] == 7
    assert judges.info["classes_in_heldout"] == 3 and judges.info["chance_accuracy"] == pytest.approx(1 / 3)
    assert sorted(set(judges.heldout_labels.tolist())) == [0, 1, 2]
    assert judges.alignment_feats.shape == (7, 384)  # DINOv2-S tokens, mean-pooled
    # the held-out images themselves: their own class, at FID 0 against their own statistics
    feats, predicted = judges.score(judges.heldout_images)
    assert torch.equal(predicted, judges.heldout_labels)
    assert abs(frechet_distance_to_features(feats, *judges.reference)) < 1e-6 * np.trace(judges.reference.sigma)
    # another class's colour is recognised as that class
    blue = torch.tensor(COLOURS["blue"], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 64, 64).contiguous()
    assert judges.score(blue)[1].tolist() == [0, 0]  # sorted class folders: blue, green, red
    loaded = load_real_judges(save_real_judges(judges, tmp_path / "judges"), "cpu")
    assert torch.equal(loaded.heldout_images, judges.heldout_images) and loaded.info == judges.info
    again, predicted_again = loaded.score(judges.heldout_images)
    assert np.allclose(again, feats) and torch.equal(predicted_again, predicted)


def test_missing_weights_and_a_changed_heldout_set_are_config_errors(tmp_path, weights, monkeypatch):
    root, overrides = weights
    monkeypatch.setenv("REPAE_WEIGHTS", str(tmp_path))  # no Inception file to fall back on
    no_inception = load_config("toy", overrides=overrides + ["eval.inception_path=null"])
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05"):
        judges_for_plan(no_inception, tmp_path / "out")
    wrong = load_config("toy", overrides=overrides + [f"loss.lpips_path={tmp_path / 'vgg.pth'}",
                                                      f"vae.latent_stats_path={tmp_path / 'stats.pt'}"])
    with pytest.raises(ConfigError, match=f"not found: vae.latent_stats_path={tmp_path / 'stats.pt'}, "
                                          f"loss.lpips_path={tmp_path / 'vgg.pth'}"):
        judges_for_plan(wrong, tmp_path / "out")
    no_vae = load_config("toy", overrides=overrides + ["vae.path=null"])
    with pytest.raises(ConfigError, match="vae.path"):
        judges_for_plan(no_vae, tmp_path / "out")
    cfg = load_config("toy", overrides=overrides)
    judges, saved = judges_for_plan(cfg, tmp_path / "out")
    assert saved == tmp_path / "out" / "judges"
    reused, _ = judges_for_plan(cfg, tmp_path / "out")  # a re-run measures against the same images
    assert torch.equal(reused.heldout_images, judges.heldout_images)
    other = colour_folder(tmp_path / "other", per_class=2)
    with pytest.raises(ConfigError, match="another --dir"):
        judges_for_plan(cfg, tmp_path / "out", str(other))
    with pytest.raises(ConfigError, match="another --dir"):
        judges_for_plan(cfg, tmp_path / "out", heldout_images=5)
    assert len(judges_for_plan(cfg, tmp_path / "out5", heldout_images=5)[0].heldout_images) == 5
    with pytest.raises(ConfigError, match="--heldout and --heldout-images are for real data"):
        judges_for_plan(load_config("toy"), tmp_path / "toy-out", str(other))


def test_reproduce_on_a_folder_with_local_weights(tmp_path, weights):
    root, overrides = weights
    out, report = tmp_path / "out", tmp_path / "site" / "REPRODUCTION.md"
    argv = ["bench", "reproduce", "--dir", str(out), "--report", str(report), "--steps", "2", "--eval-every", "2",
            "--samples", "6", "--jobs", "2", "--quick", *overrides]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["judges"]["kind"] == "real" and results["judges"]["heldout_images"] == 18
    names = [a["name"] for a in results["arms"]]
    assert names == ["repae", "repa", "vanilla", "e2e-diffusion", "no-stopgrad", "no-bn", "no-reg", "stage2-e2e-vae"]
    for arm in names:
        m = results["metrics"][arm]["0"]["2"]
        assert "error" not in m, (arm, m)
        for key in ("fid", "class_accuracy", "cknna", "latent_spatial_variance", "vae_psnr_db"):
            assert math.isfinite(m[key]), (arm, key)
    # the frozen-VAE arms measure the very VAE file every arm starts from, on the same held-out images
    start = results["initial_vae"]
    for arm in ("repa", "vanilla"):
        assert results["metrics"][arm]["0"]["2"]["vae_psnr_db"] == pytest.approx(start["vae_psnr_db"], rel=1e-6)
    assert results["metrics"]["repae"]["0"]["2"]["vae_psnr_db"] != pytest.approx(start["vae_psnr_db"], rel=1e-6)
    text = report.read_text()
    assert text.startswith(f"# Reproducing REPA-E's claims on {root / 'data'}")
    # nothing of the toy world in it (the command line is this test process's: skipped, it may name test files)
    told = "\n".join(line for line in text.splitlines() if not line.startswith("- command: "))
    assert "- judges: 18 held-out images of 3 classes" in text and "| FID ↓ |" in text and "toy" not in told.lower()
    for claim in "abcde":
        assert f"| ({claim}) |" in text
    assert (report.parent / "docs" / "reproduction" / "grid-repae.png").is_file()
