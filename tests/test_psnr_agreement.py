"""A toy run's summary.json VAE PSNR and `repae evaluate vae RUN --data toy` are one number:
same held-out images (all of them), same definition (toyworld.PSNR_DEFINITION)."""

import json

import pytest

from repae.evaluate import cli as evaluate_cli
from repae.train.loop import train
from test_train_loop import tiny_cfg


# 1010 held-out images: more than the first 1000 the summary used to take (slow: ~1.5 min here)
@pytest.mark.parametrize("heldout", [40, pytest.param(1010, marks=pytest.mark.slow)])
def test_summary_psnr_equals_evaluate_vae_psnr_on_the_same_run(tmp_path, heldout):
    cfg = tiny_cfg(tmp_path, "train.max_steps=1", "train.ckpt_every=1", f"toy.heldout_size={heldout}",
                   "eval.num_samples=0")
    summary = train(cfg, progress=False)["toy"]
    assert summary["vae_heldout_psnr_images"] == heldout and "uint8" in summary["vae_psnr_definition"]
    out = tmp_path / "vae.json"
    assert evaluate_cli.main(["evaluate", "vae", "--vae", str(cfg.run_dir), "--data", "toy", "--batch-size", "250",
                              "--out", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["metrics"]["num_images"] == heldout
    assert round(record["metrics"]["psnr"], 3) == summary["vae_heldout_psnr_db"]
    assert "summary.json" in record["notes"]["psnr"]
