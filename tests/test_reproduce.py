"""`repae bench reproduce`: verdicts from known numbers, and the whole command on a tiny toy world."""

import json
import math
import types
from pathlib import Path

import pytest

from repae.cli import main
from repae.reproduce import report as rep

from test_train_loop import TINY


def _results(fid, sv=None, cknna=None, failed=(), reason="FloatingPointError: 10 non-finite steps in a row", sv_norm=None):
    """A results dict with one seed and two measured steps per arm: fid[arm] = (step 1, step 2).
    sv / sv_norm: raw / normalised latent spatial variance per arm (TV is 10x it); start 1.0 / 0.5."""
    sv, cknna, sv_norm = sv or {}, cknna or {}, sv_norm or {}
    metrics = {arm: {"0": {str(step): {"fid": values[step - 1], "class_accuracy": 0.5,
                                        "latent_spatial_variance": sv.get(arm, 1.0), "latent_total_variation": sv.get(arm, 1.0) * 10,
                                        "latent_spatial_variance_normalized": sv_norm.get(arm, 0.5),
                                        "latent_total_variation_normalized": sv_norm.get(arm, 0.5) * 10,
                                        "cknna": cknna.get(arm, (0.1, 0.1))[step - 1], "vae_psnr_db": 20.0}
                           for step in (1, 2)}}
               for arm, values in fid.items()}
    runs = {f"{arm}-s0": {"arm": arm, "seed": 0, "train_seconds": 1.0, **({"failed": reason} if arm in failed else {})}
            for arm in fid}
    return {"metrics": metrics, "runs": runs, "initial_vae": {"latent_spatial_variance": 1.0, "latent_total_variation": 10.0,
                                                             "latent_spatial_variance_normalized": 0.5,
                                                             "latent_total_variation_normalized": 5.0,
                                                             "vae_psnr_db": 20.0}}


def test_e2e_diffusion_arm_is_the_papers_naive_setting():
    """Claim (a)'s arm: diffusion loss into the VAE (no stop-grad, no REPA term on either side,
    no L_REG) through a fixed normaliser, which lets the raw latent scale matter to the loss."""
    from repae.config import load_config
    from repae.reproduce.arms import arms_for

    base = load_config("toy", overrides=TINY)
    assert base.latent_norm.mode == "batch"  # the preset's own is BatchNorm: the arm must change it
    arm = {a.name: a for a in arms_for(base)}["e2e-diffusion"]
    cfg = load_config("toy", overrides=TINY + list(arm.overrides))
    assert cfg.latent_norm.mode == "fixed"
    assert cfg.train.tune_vae and not cfg.train.stop_grad and not cfg.train.use_reg_loss
    assert cfg.loss.proj_coeff == 0 and cfg.loss.vae_align_proj_coeff == 0


def test_a_fixed_normaliser_shows_a_shrunk_latent_and_its_own_statistics_hide_it():
    import torch

    from repae.evaluate.latents import latent_structure
    from repae.reproduce.measure import own_normalizer, sit_normalizer

    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    fixed = own_normalizer(z)  # the starting VAE's statistics, kept
    before, after = latent_structure(z, fixed), latent_structure(0.01 * z, fixed)
    assert after["raw/spatial_variance"] == pytest.approx(1e-4 * before["raw/spatial_variance"], rel=1e-6)
    assert after["normalized/spatial_variance"] < 1e-3 * before["normalized/spatial_variance"]
    # normalised by the shrunk latents' own statistics (as BatchNorm's batch statistics do) nothing changed
    # (up to BatchNorm's eps of 1e-4 beside a variance of ~0.09)
    own = latent_structure(0.1 * z, own_normalizer(0.1 * z))
    assert own["normalized/spatial_variance"] == pytest.approx(before["normalized/spatial_variance"], rel=2e-3)
    # a SiT without a latent normaliser sees the raw latents
    identity = sit_normalizer(types.SimpleNamespace(bn=None, out_channels=4))
    assert torch.equal(identity.normalize(z), z)


def test_claim_a_reports_raw_and_normalised_latents_and_judges_the_raw_ones():
    r = _results({"repae": (15, 10), "e2e-diffusion": (90, 80)}, sv={"e2e-diffusion": 0.05, "repae": 1.2},
                 sv_norm={"e2e-diffusion": 0.8})
    verdict, evidence = rep.claim_a(r)
    assert verdict == "reproduces"  # raw 1.0 -> 0.05, though the normalised latents barely moved
    assert "raw latents (as the paper measured): spatial variance 1 → 0.05 (×0.05)" in evidence
    assert "normalised latents (what the SiT sees): spatial variance 0.5 → 0.8 (×1.6)" in evidence
    # collapsed only after normalisation: the raw criterion decides
    r = _results({"repae": (15, 10), "e2e-diffusion": (90, 80)}, sv={"e2e-diffusion": 0.9},
                 sv_norm={"e2e-diffusion": 0.001})
    verdict, evidence = rep.claim_a(r)
    assert verdict == "does not reproduce" and "spatial variance 0.5 → 0.001 (×0.002)" in evidence
    # results measured before the normalised latents were: raw verdict stands, normalised not measured
    for m in r["metrics"]["e2e-diffusion"]["0"].values():
        del m["latent_spatial_variance_normalized"], m["latent_total_variation_normalized"]
    assert "what the SiT sees): not measured" in rep.claim_a(r)[1]


def test_verdicts_follow_the_stated_criteria():
    r = _results({"repae": (15, 10), "repa": (40, 20), "e2e-diffusion": (90, 80), "no-stopgrad": (50, 25),
                  "stage2-e2e-vae": (35, 15)},
                 sv={"e2e-diffusion": 0.05, "repae": 1.2},
                 cknna={"repae": (0.3, 0.5), "repa": (0.2, 0.3), "e2e-diffusion": (0.0, 0.01),
                        "no-stopgrad": (0.1, 0.2), "stage2-e2e-vae": (0.25, 0.4)})
    assert rep.claim_a(r)[0] == "reproduces"  # 1.0 -> 0.05 and 10 -> 0.5: both ratios 0.05
    assert rep.claim_b(r)[0] == "reproduces"  # 25 > 2 x 10
    verdict, evidence = rep.claim_c(r)
    assert verdict == "reproduces" and "at step 1 (2× fewer steps)" in evidence  # 15 <= REPA's final 20
    assert rep.claim_d(r)[0] == "reproduces"
    assert rep.claim_e(r, list(r["metrics"]))[0] == "reproduces"


def test_claim_e_reads_alignment_against_fid_without_cfg_and_on_the_training_arms_beside_its_criterion():
    cknna = {"repae": (0.3, 0.5), "repa": (0.2, 0.3), "vanilla": (0.05, 0.1), "stage2-e2e-vae": (0.25, 0.4),
             "no-reg": (0.5, 0.6)}
    r = _results({"repae": (15, 10), "repa": (40, 20), "vanilla": (45, 30), "stage2-e2e-vae": (35, 15),
                  "no-reg": (95, 90)}, cknna=cknna)
    assert "Beside the criterion" not in rep.claim_e(r, list(r["metrics"]))[1]  # results without unguided samples
    unguided = {"repae": 30, "repa": 20, "vanilla": 10, "stage2-e2e-vae": 25, "no-reg": 90}
    for arm, fid in unguided.items():
        r["metrics"][arm]["0"]["2"]["fid_unguided"] = fid
    verdict, evidence = rep.claim_e(r, list(r["metrics"]))
    assert verdict == "partly"  # the criterion's ρ (with the run's sampler, every run) is 0.00: unchanged
    assert "across the 5 finished runs at their last step: 0.00" in evidence
    assert "without CFG ρ 1.00 (5 runs)" in evidence
    assert "the 4 runs of REPA-E, REPA, vanilla and stage 2 alone -1.00 with the run's sampler, 1.00 without CFG" in evidence


def test_verdicts_say_when_a_claim_fails():
    r = _results({"repae": (30, 22), "repa": (40, 20), "e2e-diffusion": (90, 80), "no-stopgrad": (25, 21),
                  "stage2-e2e-vae": (35, 25)}, sv={"e2e-diffusion": 0.9})
    assert rep.claim_a(r)[0] == "does not reproduce"
    assert rep.claim_b(r)[0] == "does not reproduce"
    assert rep.claim_c(r)[0] == "does not reproduce"
    assert rep.claim_d(r)[0] == "does not reproduce"
    # a run that diverged (non-finite losses) is the paper's failure, whatever its last FID
    assert rep.claim_b(_results({"repae": (30, 22), "no-stopgrad": (25, 21)}, failed=["no-stopgrad"]))[0] == "reproduces"
    # a crash or Ctrl-C is not: the FIDs decide
    crashed = _results({"repae": (30, 22), "no-stopgrad": (25, 21)}, failed=["no-stopgrad"], reason="Killed")
    assert rep.claim_b(crashed)[0] == "does not reproduce"


def test_unguided_claims_judge_the_samples_without_cfg_and_show_the_guided_ones():
    # REPA-E ahead with the run's sampler (CFG) but behind without CFG, the paper's protocol; REPA
    # ahead of vanilla without CFG in one seed of two, and on the mean
    r = _results({"repae": (15, 10), "repa": (40, 20), "vanilla": (45, 25)})
    unguided = {"repae": [30.0, 26.0], "repa": [24.0, 25.0], "vanilla": [23.0, 31.0]}  # per seed, last step
    for arm, values in unguided.items():
        r["metrics"][arm]["1"] = {step: dict(m) for step, m in r["metrics"][arm]["0"].items()}
        for seed, value in enumerate(values):
            r["metrics"][arm][str(seed)]["2"].update(fid_unguided=value, class_accuracy_unguided=0.1 * (seed + 1))
    assert rep.claim_c(r)[0] == "reproduces"  # 10 < 20 in both seeds, with CFG
    verdict, evidence = rep.claim_c_unguided(r)
    assert verdict == "does not reproduce"  # 28 > 24.5
    assert "REPA 24.5 ± 0.71, REPA-E 28 ± 2.8 (REPA-E lower in 0 of 2 seeds)" in evidence
    assert "with the run's sampler: toy FID REPA 20 ± 0, REPA-E 10 ± 0" in evidence
    verdict, evidence = rep.claim_f(r)
    assert verdict == "partly"  # 24.5 < 27 on the mean, but 24 > 23 in seed 0
    assert "vanilla 27 ± 5.7, REPA 24.5 ± 0.71 (REPA lower in 1 of 2 seeds)" in evidence
    # the lead over training, seed by seed: step 1 has no samples without CFG, so only step 2 counts
    assert "REPA lower without CFG, by step (seeds): 2: 1 of 2." in evidence
    r["metrics"]["repa"]["0"]["2"]["fid_unguided"] = 22.0
    assert rep.claim_f(r)[0] == "reproduces"
    r["metrics"]["repa"]["0"]["1"]["fid_unguided"], r["metrics"]["vanilla"]["0"]["1"]["fid_unguided"] = 30.0, 40.0
    assert "by step (seeds): 1: 1 of 1, 2: 2 of 2." in rep.claim_f(r)[1]
    assert "Sampling noise" not in rep.claim_f(r)[1]  # measured before the noise was
    for arm, noise in (("repa", 0.31), ("vanilla", 0.52)):
        r["metrics"][arm]["1"]["2"]["fid_noise_unguided"] = noise
    assert "Sampling noise of one measurement (bootstrap std of its FID): 0.31-0.52. Criterion" in rep.claim_f(r)[1]
    # results measured before samples without CFG were: not measured, not refuted
    old = _results({"repae": (15, 10), "repa": (40, 20), "vanilla": (45, 25)})
    assert rep.claim_c_unguided(old)[0] == rep.claim_f(old)[0] == "not measured"


def test_claim_a_judges_the_last_step_and_names_an_earlier_collapse():
    r = _results({"repae": (15, 10), "e2e-diffusion": (90, 80)}, sv={"e2e-diffusion": 1.5})
    r["metrics"]["e2e-diffusion"]["0"]["1"]["latent_spatial_variance"] = 0.3  # shrank, then grew back
    verdict, evidence = rep.claim_a(r)
    assert verdict == "does not reproduce" and "lowest at step 1: 0.3, ×0.3" in evidence


def test_an_arm_without_measurements_is_not_measured_rather_than_refuted():
    r = _results({"repae": (15, 10), "repa": (40, 20), "no-stopgrad": (50, 25)})  # no e2e-diffusion, no stage 2
    assert rep.claim_a(r)[0] == "not measured"
    assert rep.claim_d(r)[0] == "not measured"
    del r["metrics"]["repa"]
    assert rep.claim_e(r, list(r["metrics"]))[0] == "not measured"
    assert rep.claim_c(r)[0] == "not measured"


def test_reach_step_and_mean_over_seeds():
    r = _results({"repae": (30, 10), "repa": (40, 20)})
    r["metrics"]["repae"]["1"] = {"1": {"fid": 10.0}, "2": {"fid": 14.0}}
    assert rep.final(r, "repae", "fid") == [10.0, 14.0]
    assert rep.fmt([10.0, 14.0]) == "12 ± 2.8"
    assert rep.steps_to_reach(r, "repae", 20.0) == 1  # mean of (30, 10) at step 1 is 20


def test_latent_spectrum_metrics_put_a_dct_basis_function_in_its_band():
    """Known answer: each channel of each latent is one 8x8 DCT basis function (plus an offset), so all
    its energy is in that basis function's band u+v; the normaliser reweighs the channels."""
    import torch

    from repae.evaluate.spectrum import dct_matrix
    from repae.models.latent_norm import LatentNorm
    from repae.reproduce.measure import latent_spectrum_metrics

    d = dct_matrix(8, torch.float32)
    low, high = torch.outer(d[1], d[2]), torch.outer(d[5], d[4])  # bands 3 and 9 (>= 8: high frequency)
    signs = torch.tensor([1.0, -1.0, 2.0])[:, None, None]
    z = torch.stack([7 + 10 * signs * low, signs * high], dim=1)  # [3,2,8,8]: channel 0 energy 100x channel 1's
    norm = LatentNorm(2, eps=0.0)
    norm.init_from_stats(torch.tensor([7.0, 0.0]), torch.tensor([100.0, 1.0]))  # equalises the two channels
    m = latent_spectrum_metrics(z, norm.eval(), batch_size=2)  # two batches: accumulated across them
    assert m["latent_spectrum_block"] == 8 and len(m["latent_band_fractions"]) == 15
    expected_raw = [0.0] * 15
    expected_raw[3], expected_raw[9] = 100 / 101, 1 / 101
    assert m["latent_band_fractions"] == pytest.approx(expected_raw, abs=1e-9)
    assert m["latent_high_frequency_fraction"] == pytest.approx(1 / 101, rel=1e-6)
    expected_norm = [0.0] * 15
    expected_norm[3] = expected_norm[9] = 0.5
    assert m["latent_band_fractions_normalized"] == pytest.approx(expected_norm, abs=1e-6)  # normalised in fp32
    assert m["latent_high_frequency_fraction_normalized"] == pytest.approx(0.5, rel=1e-6)
    # latents smaller than a block: the block is the latent itself
    assert latent_spectrum_metrics(z[..., :4, :4], norm)["latent_spectrum_block"] == 4


def _report_ready(r):
    """What write_report needs beside the metrics: arms (repa frozen), plan, judges."""
    frozen = ["train.tune_vae=false", "latent_norm.mode=fixed"]
    r.update(arms=[{"name": a, "label": {"repae": "REPA-E", "e2e-diffusion": "E2E, diffusion loss only"}.get(a, a),
                    "overrides": frozen if a == "repa" else []} for a in r["metrics"]],
             plan={"seeds": [0], "jobs": 1, "steps": 2, "eval_every": 1, "samples": 10}, threads_per_run=1,
             wall_seconds=60.0, judges={"kind": "toy"}, num_classes=10)
    return r


def _with_spectra(r, hf):
    """Band fractions whose high-frequency part (bands >= 8 of 15) is hf[arm]; the images' 0.3, the start's 0.2."""
    def fractions(h):
        return [(1 - h) / 8] * 8 + [h / 7] * 7

    for arm, per_seed in r["metrics"].items():
        for m in per_seed["0"].values():
            for suffix in ("", "_normalized"):
                m["latent_band_fractions" + suffix] = fractions(hf.get(arm, 0.2))
                m["latent_high_frequency_fraction" + suffix] = hf.get(arm, 0.2)
            m["latent_spectrum_block"] = 8
    for suffix in ("", "_normalized"):
        r["initial_vae"]["latent_band_fractions" + suffix] = fractions(0.2)
        r["initial_vae"]["latent_high_frequency_fraction" + suffix] = 0.2
    r["initial_vae"].update(latent_spectrum_block=8, image_spectrum_block=8, image_band_fractions=fractions(0.3),
                            image_high_frequency_fraction=0.3)
    return r


def test_report_shows_the_latent_spectra_when_measured_and_renders_without_them(tmp_path):
    context = {"command": "repae bench reproduce", "commit": "abc", "machine": "m", "method_note": ""}
    fid = {"repae": (15, 10), "repa": (40, 20), "e2e-diffusion": (90, 80), "no-stopgrad": (50, 25)}
    r = _with_spectra(_report_ready(_results(fid)), {"repae": 0.1, "e2e-diffusion": 0.4, "no-stopgrad": 0.25})
    text = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text()
    figure = tmp_path / "docs" / "reproduction" / "latent_spectra.png"
    assert figure.is_file() and "![latent spectra](docs/reproduction/latent_spectra.png)" in text
    assert "## Latent spectra" in text and "no verdict above rests on it" in text
    assert ("REPA-E's E2E-VAE 0.1 (×0.5: less than the starting VAE's 0.2); the diffusion-loss-only E2E-VAE 0.4 "
            "(×2: more than the starting VAE's 0.2); the held-out images' pixels 0.3.") in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| held-out images (pixels in [-1,1])"].endswith("| 0.3 | — |")
    assert rows["| starting VAE"].endswith("| 0.2 | 0.2 |")
    assert rows["| REPA-E"].endswith("| 0.1 | 0.1 |") and rows["| no-stopgrad"].endswith("| 0.25 | 0.25 |")
    assert "| repa |" not in text.split("## Latent spectra")[1]  # frozen VAE: the starting VAE's latents
    # the figure draws the band fractions (the last step's), not something else
    assert rep.final_fractions(r, "e2e-diffusion", "latent_band_fractions_normalized")[8] == pytest.approx(0.4 / 7)
    # results measured before the spectra existed still render, without the section or figure
    old = _report_ready(_results(fid))
    figure.unlink()
    text = rep.write_report(old, tmp_path, tmp_path / "R.md", context).read_text()
    assert "## Latent spectra" not in text and not figure.exists() and "| (a) |" in text


def test_reproduce_command_runs_every_arm_measures_and_reports(tmp_path, monkeypatch):
    out, report = tmp_path / "out", tmp_path / "site" / "REPRODUCTION.md"
    argv = ["bench", "reproduce", "--quick", "--dir", str(out), "--report", str(report), "--steps", "2", "--eval-every", "1",
            "--samples", "10", "--final-samples", "12", "--jobs", "2", *TINY, f"toy.cache_dir={tmp_path / 'cache'}",
            # fp32 on every CPU: where precision=auto picks bf16 (AMX), the 2-step SiTs' samples round to the same
            # uint8 images with and without CFG, and the check that both were drawn below could not tell
            "train.precision=fp32"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    names = [a["name"] for a in results["arms"]]
    assert names == ["repae", "repa", "vanilla", "e2e-diffusion", "no-stopgrad", "no-bn", "no-reg", "stage2-e2e-vae"]
    for arm in names:
        steps = results["metrics"][arm]["0"]
        assert list(steps) == ["1", "2"], arm
        for key, value in steps["2"].items():  # numbers, and the band fractions of the latent spectra
            assert all(map(math.isfinite, value if isinstance(value, list) else [value])), (arm, key)
        assert sum(steps["2"]["latent_band_fractions_normalized"]) == pytest.approx(1.0), arm
        # the last step, where the verdicts are read, with --final-samples; each FID with its sampling noise
        assert (steps["1"]["num_samples"], steps["2"]["num_samples"]) == (10, 12), arm
        assert steps["2"]["fid_noise"] > 0 and steps["2"]["fid_noise_unguided"] > 0, arm
    # stage 2 trained on the VAE the REPA-E run exported, frozen
    stage2 = (out / "runs" / "stage2-e2e-vae-s0" / "config.yaml").read_text()
    assert str(out / "runs" / "repae-s0" / "e2e-vae" / "vae.safetensors") in stage2
    frozen = results["metrics"]["stage2-e2e-vae"]["0"]
    assert frozen["1"]["vae_psnr_db"] == frozen["2"]["vae_psnr_db"]
    # frozen-VAE arms keep the starting VAE's latents; REPA-E moves them
    for arm in names:  # raw and normalised latents, both measured
        assert {"latent_spatial_variance_normalized", "latent_total_variation_normalized"} <= set(results["metrics"][arm]["0"]["2"])
    assert {"latent_spatial_variance_normalized", "latent_high_frequency_fraction_normalized",
            "image_high_frequency_fraction"} <= set(results["initial_vae"])
    start = results["initial_vae"]["latent_spatial_variance"]
    assert results["metrics"]["repa"]["0"]["2"]["latent_spatial_variance"] == pytest.approx(start, rel=1e-5)
    assert results["metrics"]["repae"]["0"]["2"]["latent_spatial_variance"] != pytest.approx(start, rel=1e-5)
    # samples without CFG beside the run's own (the toy preset samples with CFG 4): drawn, not copied
    from repae.reproduce.measure import UNGUIDED_KEYS, measure_run

    for arm in names:
        assert set(UNGUIDED_KEYS) <= set(results["metrics"][arm]["0"]["2"]), arm
    # the same samples under toy world v7's class-only evaluator too (the report's second opinion): another judge,
    # other numbers
    for arm in names:
        m = results["metrics"][arm]["0"]["2"]
        for key in ("fid_v7judge", "fid_v7judge_unguided", "class_accuracy_v7judge", "class_accuracy_v7judge_unguided"):
            assert math.isfinite(m[key]), (arm, key)
        assert m["fid_v7judge"] != m["fid"], arm
    # (copied, they would equal the guided FID in every arm; the tiny world's evaluator is nearly blind, so
    # one arm's two FIDs can agree to every digit: seen for repae on a 2-core Xeon)
    assert any(results["metrics"][arm]["0"]["2"]["fid_unguided"] != results["metrics"][arm]["0"]["2"]["fid"]
               for arm in names)
    text = report.read_text()
    for claim in ["a", "b", "c", "c w/o CFG", "d", "e", "f"]:
        assert f"| ({claim}) |" in text
    assert "## The same samples, judged by toy world v7's evaluator" in text
    # where real images stand with the same judges and sample count: the training images and their reconstructions
    real = results["real_images"]
    assert list(real) == ["real images", "starting VAE reconstructions"]
    assert all(row["num_images"] == 12 and math.isfinite(row["fid"]) and 0 <= row["class_accuracy"] <= 1
               for row in real.values())
    assert real["real images"]["fid"] != real["starting VAE reconstructions"]["fid"]  # reconstructed, not copied
    assert "| real images (12) | " in text and "| starting VAE reconstructions (12) | " in text
    assert "10 class-balanced samples per measurement, 12 at step 2 (where the verdicts are read)" in text
    assert "Sampling noise of one measurement (bootstrap std of its FID): " in text
    assert (report.parent / "docs" / "reproduction" / "fid_vs_steps.png").is_file()
    assert (report.parent / "docs" / "reproduction" / "grid-repae.png").is_file()
    assert (report.parent / "docs" / "reproduction" / "latent_spectra.png").is_file() and "## Latent spectra" in text
    # the same command again: nothing retrained (no new log lines), nothing re-measured, and no process
    # started to find that out (the runner's logs get each command it starts)
    files = [*(out / "runs").glob("*/reproduce-metrics.json"), *(out / "runs").glob("*/metrics.jsonl"),
             *(out / "logs").glob("*.log")]
    assert len(files) == 3 * len(names)
    before = {p: p.read_bytes() for p in files}
    assert main(argv) == 0
    assert {p: p.read_bytes() for p in files} == before
    again = json.loads((out / "results.json").read_text())
    assert len(again["invocations"]) == 2 and "over 2 invocations" in report.read_text()
    for name, run in again["runs"].items():  # a finished run's training time is its first invocation's
        assert run["train_seconds"] == results["runs"][name]["train_seconds"] and run["exit_code"] == 0
    # a measurement made before samples without CFG and latent spectra were: only those are added, the rest is kept
    run_dir = out / "runs" / "repa-s0"
    stored = json.loads((run_dir / "reproduce-metrics.json").read_text())
    for m in stored.values():
        for key in (*UNGUIDED_KEYS, "latent_high_frequency_fraction_normalized"):
            del m[key]
    (run_dir / "reproduce-metrics.json").write_text(json.dumps(stored))
    from repae.reproduce import measure

    unguided_passes, sample_metrics = [], measure.sample_metrics

    def spy(*args, guided=True, **kwargs):
        got = sample_metrics(*args, guided=guided, **kwargs)
        if not guided:
            unguided_passes.append(got)
        return got

    monkeypatch.setattr(measure, "sample_metrics", spy)
    filled = measure_run(run_dir, 10, final_step=2, final_samples=12)  # sampled again here, with this process's threads (the runner's differ)
    # the unguided keys come from a pass without CFG, not a copy: after 2 steps the class embedding can move the
    # samples by less than a uint8 level, so their values may equal the guided ones (seen for repa at af55e30)
    assert len(unguided_passes) == len(stored)  # one per measured step
    assert ({tuple(filled[step][k] for k in UNGUIDED_KEYS) for step in stored}
            == {tuple(got[k] for k in UNGUIDED_KEYS) for got in unguided_passes})
    assert math.isfinite(filled["2"]["fid_unguided"])
    assert filled["2"]["fid"] == results["metrics"]["repa"]["0"]["2"]["fid"]
    before = results["metrics"]["repa"]["0"]["2"]["latent_high_frequency_fraction_normalized"]
    assert filled["2"]["latent_high_frequency_fraction_normalized"] == pytest.approx(before, rel=1e-4)


def test_generation_verdicts_are_inconclusive_when_no_arm_beats_chance(tmp_path):
    r = _results({"repae": (15, 10), "repa": (40, 20), "e2e-diffusion": (90, 80), "no-stopgrad": (50, 25),
                  "stage2-e2e-vae": (35, 15)}, sv={"e2e-diffusion": 0.05})
    for per_seed in r["metrics"].values():  # every sample at chance: 1 in 10 classes right
        for m in per_seed["0"].values():
            m["class_accuracy"] = 0.1
    r.update(arms=[{"name": a, "label": a} for a in r["metrics"]], plan={"seeds": [0], "jobs": 1, "steps": 2,
             "eval_every": 1, "samples": 10}, threads_per_run=1, wall_seconds=60.0, judges={"kind": "toy"}, num_classes=10)
    context = {"command": "repae bench reproduce", "commit": "abc", "machine": "m", "method_note": ""}
    text = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| (")}
    assert "**reproduces**" in rows["| (a)"]  # about latents: stands
    assert "raw latents (as the paper measured)" in rows["| (a)"] and "normalised latents" in rows["| (a)"]
    header = next(line for line in text.splitlines() if line.startswith("| arm |"))
    assert "latent spatial var. (raw)" in header and "latent spatial var. (normalised)" in header
    start = next(line for line in text.splitlines() if line.startswith("| starting VAE"))
    assert start.split(" | ")[3:7] == ["1", "10", "0.5", "5"]  # raw SV, raw TV, normalised SV, normalised TV
    e2e = next(line for line in text.splitlines() if line.startswith("| e2e-diffusion |"))
    assert e2e.split(" | ")[3:7] == ["0.05", "0.5", "0.5", "5"]
    for claim in "bcde":
        assert "inconclusive at this budget" in rows[f"| ({claim})"], claim
    assert "below 2x chance" in text


def test_the_budget_check_reads_the_arms_that_train_normally():
    """An ablation whose samples beat chance (the --quick plan's arm without L_REG: 0.23 at 150 steps while REPA-E,
    REPA and vanilla sat at chance) does not make the comparisons of the others conclusive."""
    r = _results({"repae": (15, 10), "repa": (40, 20), "vanilla": (45, 30), "no-reg": (60, 50)})
    for arm, per_seed in r["metrics"].items():
        for m in per_seed["0"].values():
            m["class_accuracy"] = 0.23 if arm == "no-reg" else 0.12
    ok, note = rep.samples_carry_classes(r)
    assert not ok and "of REPA-E, REPA, vanilla SiT or stage 2 0.12" in note and "ablations included, 0.23" in note
    r["metrics"]["repa"]["0"]["2"]["class_accuracy"] = 0.2  # 2x chance: conclusive
    assert rep.samples_carry_classes(r)[0]
    only_ablations = _results({"no-reg": (60, 50), "e2e-diffusion": (90, 80)})  # no training arm: any arm counts
    only_ablations["metrics"]["no-reg"]["0"]["2"]["class_accuracy"] = 0.3
    only_ablations["metrics"]["e2e-diffusion"]["0"]["2"]["class_accuracy"] = 0.05
    ok, note = rep.samples_carry_classes(only_ablations)
    assert ok and "of any arm 0.3" in note


SIGTERM_RUNNER = """
import sys, types
from pathlib import Path
from repae.reproduce import runner as rr
out = Path(sys.argv[1])
rr.judges_for_plan = lambda cfg, out, heldout, n: (types.SimpleNamespace(info={}, heldout_images=None), None)
rr.starting_vae = lambda cfg, judges: None
rr.vae_metrics = lambda vae, judges: {}
rr.image_spectrum_metrics = lambda images: {}
rr.real_image_rows = lambda cfg, judges, vae, n: {}
# a training run that writes its pid and then takes long
rr.train_command = lambda arm, *a: [sys.executable, "-c", "import os, time; open(%r, 'w').write(str(os.getpid())); "
                                    "time.sleep(120)" % str(out / "child.pid")]
rr.run_reproduction(out, rr.Plan(steps=2, eval_every=1, seeds=[0], samples=1, jobs=1))
"""


def test_sigterm_to_the_runner_stops_its_training_runs_too(tmp_path):
    """`kill RUNNER` (or a scheduler's SIGTERM to it alone) used to end the runner and leave its training processes
    running, each holding its run's lock; the runner now stops them and records its progress before it exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    runner = subprocess.Popen([sys.executable, "-c", SIGTERM_RUNNER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    runner.send_signal(signal.SIGTERM)
    output, _ = runner.communicate(timeout=30)
    code = runner.returncode
    time.sleep(0.5)
    try:
        os.kill(child, 0)
        alive = True
        os.kill(child, signal.SIGKILL)  # no orphan left behind by a failing test either
    except ProcessLookupError:
        alive = False
    assert not alive, "the training process outlived its runner"
    assert code == 128 + signal.SIGTERM
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["partial"] and saved["runs"]["repae-s0"]["exit_code"] != 0
    # the stopped run is said to be stopped, not "done" (nor measured) as the log used to say
    assert "repae-s0: stopped at the runner's request" in output
    assert "done repae-s0" not in output and "measure repae-s0" not in output


def _no_world(monkeypatch, rr) -> None:
    """The runner without the toy world: no judges, starting VAE or real-image rows are built."""
    monkeypatch.setattr(rr, "judges_for_plan", lambda cfg, out, heldout, n: (types.SimpleNamespace(info={}, heldout_images=None), None))
    monkeypatch.setattr(rr, "starting_vae", lambda cfg, judges: None)
    monkeypatch.setattr(rr, "vae_metrics", lambda vae, judges: {})
    monkeypatch.setattr(rr, "image_spectrum_metrics", lambda images: {})
    monkeypatch.setattr(rr, "real_image_rows", lambda cfg, judges, vae, n: {})


def test_a_stopped_reproduction_keeps_its_training_and_wall_time(tmp_path, monkeypatch):
    # a crash or Ctrl-C mid-way used to lose the finished runs' training time and the invocation
    # itself from results.json: the next invocation's report under-counted both
    import sys

    from repae.reproduce import runner as rr

    _no_world(monkeypatch, rr)
    monkeypatch.setattr(rr, "measure_run", lambda run_dir, samples, judges, every=None, **final: {})
    monkeypatch.setattr(rr, "train_command", lambda arm, *a: [sys.executable, "-c", "import time; time.sleep(0.2)"])
    plan = rr.Plan(steps=2, eval_every=1, seeds=[0], samples=1, jobs=1)
    first = {"command": "repae bench reproduce", "commit": "abc", "machine": "here"}
    real_run = rr._Runner.run

    def stop_at_the_second_arm(self, arm, seed, wait_for):
        if self.runs:
            raise KeyboardInterrupt
        return real_run(self, arm, seed, wait_for)

    monkeypatch.setattr(rr._Runner, "run", stop_at_the_second_arm)
    with pytest.raises(KeyboardInterrupt):
        rr.run_reproduction(tmp_path, plan, invocation=first)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["partial"] and list(saved["runs"]) == ["repae-s0"] and saved["runs"]["repae-s0"]["train_seconds"] >= 0.2
    assert saved["invocations"][0]["interrupted"] and saved["invocations"][0]["wall_seconds"] >= 0.2

    # a measurement that fails (as in a broken environment) stops the plan but keeps the training
    (tmp_path / "runs" / "repa-s0" / "checkpoints" / "step-0000002").mkdir(parents=True)  # not yet measured
    monkeypatch.setattr(rr._Runner, "run", real_run)
    real_call = rr._Runner._call
    monkeypatch.setattr(rr._Runner, "_call", lambda self, cmd, log: 1 if "repae.reproduce.measure" in cmd
                        else real_call(self, cmd, log))
    with pytest.raises(RuntimeError, match="measuring"):
        rr.run_reproduction(tmp_path, plan, invocation={**first, "commit": "abd"})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["repa-s0"]["train_seconds"] >= 0.2 and len(saved["invocations"]) == 2
    (tmp_path / "runs" / "repa-s0" / "checkpoints" / "step-0000002").rmdir()
    monkeypatch.setattr(rr._Runner, "_call", real_call)
    results = rr.run_reproduction(tmp_path, plan, invocation={**first, "commit": "def"})
    assert [x["commit"] for x in results["invocations"]] == ["abc", "abd", "def"] and "partial" not in results
    assert results["invocations"][1]["interrupted"] and not results["invocations"][2].get("interrupted")
    assert results["runs"]["repae-s0"]["train_seconds"] >= 0.6  # every invocation's training counted
    assert json.loads((tmp_path / "results.json").read_text())["invocations"] == results["invocations"]


def test_a_run_records_its_own_training_time_which_survives_a_lost_record(tmp_path, monkeypatch):
    # v8's full plan: an invocation stopped after REPA's runs finished training but before results.json held their
    # records; the next one found them trained, and recorded the ~9 s of a `repae train` that only loads a
    # finished run as their training time (REPRODUCTION.md: REPA 9.47 s against REPA-E's 696 s). A run's own
    # total (summary.json, kept in its checkpoints over resumes) is recorded instead, and the report shows it.
    import sys

    from repae.reproduce import runner as rr

    _no_world(monkeypatch, rr)
    monkeypatch.setattr(rr, "measure_run", lambda run_dir, samples, judges, every=None, **final: {})
    own = {"repae": 123.4, "repa": 45.6}
    write_summary = ("import json, pathlib, sys, time; time.sleep(0.2); d = pathlib.Path(sys.argv[1]); "
                     "d.mkdir(parents=True, exist_ok=True); (d / 'summary.json').write_text(json.dumps("
                     "{'steps': int(sys.argv[2]), 'train_seconds': float(sys.argv[3])}))")

    def command(arm, seed, plan, preset, overrides, out, config_files):
        steps = plan.steps if arm.name == "repae" else plan.steps - 1  # repa's summary is of another budget
        return [sys.executable, "-c", write_summary, str(out / "runs" / f"{arm.name}-s{seed}"), str(steps),
                str(own[arm.name])]

    monkeypatch.setattr(rr, "train_command", command)
    plan = rr.Plan(steps=2, eval_every=1, seeds=[0], samples=1, jobs=1, arms=["repae", "repa"])
    results = rr.run_reproduction(tmp_path, plan, invocation={"command": "c", "commit": "abc", "machine": "m"})
    assert results["runs"]["repae-s0"]["train_seconds"] == 123.4
    assert results["runs"]["repae-s0"]["train_seconds_from"] == "run"
    # a summary of another budget is not this run's: the runner's own stopwatch stands, marked as such
    assert 0.2 <= results["runs"]["repa-s0"]["train_seconds"] < 45.6
    assert "train_seconds_from" not in results["runs"]["repa-s0"]


def test_runs_of_another_world_are_refused_before_anything_is_built_or_recorded(tmp_path, monkeypatch):
    # seen: the v8 plan's report re-made under another REPAE_CACHE built a second world, then every `repae train`
    # refused its run (other VAE files) and results.json recorded 24 failures over the finished runs' records
    from repae.config import ConfigError, save_config
    from repae.reproduce import runner as rr

    plan = rr.Plan(steps=2, eval_every=1, seeds=[0], samples=1, jobs=1, arms=["repae", "repa"])
    arms = rr.select_arms(rr.arms_for(rr.load_config("toy", overrides=TINY)), plan.arms)
    monkeypatch.setenv("REPAE_CACHE", str(tmp_path / "world-a"))
    cfg = rr.planned_config(arms[1], 0, plan, "toy", TINY, (), tmp_path)
    save_config(cfg, (tmp_path / "runs" / "repa-s0").mkdir(parents=True) or tmp_path / "runs" / "repa-s0" / "config.yaml")
    (tmp_path / "results.json").write_text('{"runs": {"repa-s0": {"train_seconds": 9.5, "exit_code": 0}}, "invocations": []}')
    before = (tmp_path / "results.json").read_bytes()
    rr.check_existing_runs(arms, plan, "toy", TINY, (), tmp_path)  # the world it was trained with: nothing to say

    monkeypatch.setenv("REPAE_CACHE", str(tmp_path / "world-b"))
    monkeypatch.setattr(rr, "judges_for_plan", lambda *a: pytest.fail("a world was built before the check"))
    with pytest.raises(ConfigError, match=r"repa-s0 holds a run with a different config \(vae.latent_stats_path, "
                                          r"vae.path\): this invocation would train another recipe there"):
        rr.run_reproduction(tmp_path, plan, overrides=TINY)
    assert (tmp_path / "results.json").read_bytes() == before and not (tmp_path / "world-b").exists()


def test_the_report_shows_training_time_only_where_every_seed_recorded_its_own(tmp_path):
    context = {"command": "repae bench reproduce", "commit": "abc", "machine": "m", "method_note": ""}
    r = _report_ready(_results({"repae": (15, 10), "repa": (40, 20)}))
    r["runs"]["repae-s0"].update(train_seconds=700.0, train_seconds_from="run")
    r["runs"]["repa-s0"]["train_seconds"] = 9.3  # a runner's stopwatch over a run it only reloaded
    text = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| REPA-E"].endswith(" | 700 |") and rows["| repa"].endswith(" | — |")


def test_the_arms_train_at_a_constant_lr_whatever_the_preset_decays(tmp_path):
    """The arms are compared at checkpoints along their learning curves: the toy preset's lr decay (for its
    single default run) would make every checkpoint the end of a different schedule. Their guided samples are
    drawn at the scale the guided verdicts were defined with, not at the default run's."""
    from repae.config import load_config
    from repae.reproduce.arms import arms_for
    from repae.reproduce.runner import TOY_GUIDED_SCALE, Plan, train_command

    assert load_config("toy").optim_sit.decay_fraction > 0
    plan = Plan(steps=8, eval_every=4)
    for arm in arms_for(load_config("toy")):
        cmd = train_command(arm, 0, plan, "toy", [], tmp_path)
        cfg = load_config("toy", overrides=[a for a in cmd[cmd.index("--no-progress") + 1:] if "=" in a])
        assert (cfg.optim_sit.decay_fraction, cfg.optim_vae.decay_fraction, cfg.optim_disc.decay_fraction) == (0, 0, 0)
        # the guided verdicts keep the scale they were defined at, whatever the preset's default run samples at
        assert cfg.sample.cfg_scale == TOY_GUIDED_SCALE == 4.0 != load_config("toy").sample.cfg_scale
    # an explicit override still wins
    cmd = train_command(arms_for(load_config("toy"))[0], 0, plan, "toy", ["optim_sit.decay_fraction=0.25"], tmp_path)
    assert load_config("toy", overrides=cmd[cmd.index("--no-progress") + 1:]).optim_sit.decay_fraction == 0.25


def test_a_finished_run_is_skipped_only_with_the_same_recipe_and_budget(tmp_path):
    """The runner starts no `repae train` for a run an earlier invocation finished with this recipe; a
    changed recipe, a longer budget, a failed or unrecorded run still go to `repae train`."""
    from repae.build import vae_args
    from repae.config import load_config, save_config
    from repae.reproduce.arms import Arm
    from repae.reproduce.runner import Plan, _Runner, run_name, train_overrides
    from repae.toyworld import toy_vae_files
    from repae.train.loop import use_toy_vae

    plan, arm, seed = Plan(steps=4, eval_every=2), Arm("repae", "REPA-E", ()), 0
    run_dir = tmp_path / "runs" / run_name(arm, seed)
    saved = load_config("toy", overrides=train_overrides(arm, seed, plan, TINY, tmp_path, "toy"), world_size=1)
    use_toy_vae(saved, *toy_vae_files(vae_args(saved), saved.toy))  # as `repae train` saves it
    save_config(saved, run_dir / "config.yaml")
    (run_dir / "summary.json").write_text(json.dumps({"steps": 4}))

    def skipped(overrides=TINY, steps=4, earlier=None):
        earlier = {"repae-s0": {"exit_code": 0, "train_seconds": 9.0}} if earlier is None else earlier
        runner = _Runner(Plan(steps=steps, eval_every=2), "toy", overrides, (), tmp_path, 1, earlier)
        return runner._trained_already(arm, seed, run_dir)

    assert skipped()
    assert not skipped(overrides=[*TINY, "loss.proj_coeff=0.7"])  # `repae train` refuses it, as before
    assert not skipped(steps=6)  # a larger budget resumes the run
    assert not skipped(earlier={})  # no training time on record to carry over
    assert not skipped(earlier={"repae-s0": {"exit_code": 1, "train_seconds": 9.0}})
    (run_dir / "summary.json").write_text("{")  # torn
    assert not skipped()
    (run_dir / "summary.json").write_text(json.dumps({"steps": 4}))
    saved.vae.path = str(tmp_path / "another-world" / "vae.safetensors")  # trained from another world's VAE
    save_config(saved, run_dir / "config.yaml")
    assert not skipped()


def test_arms_named_are_the_arms_trained_in_that_order_and_a_stage2_arm_needs_its_vae():
    from repae.config import ConfigError, load_config
    from repae.reproduce.arms import arms_for, select_arms

    every = arms_for(load_config("toy"))
    assert select_arms(every, None) == every
    chosen = select_arms(every, ["vanilla", "repae", "vanilla", "stage2-e2e-vae"])
    assert [a.name for a in chosen] == ["vanilla", "repae", "stage2-e2e-vae"]  # as named, once each
    with pytest.raises(ConfigError, match=r"unknown arm\(s\) no-gan, repea; this config's arms: repae, repa, vanilla"):
        select_arms(every, ["repa", "no-gan", "repea"])  # the toy preset has no GAN term, so no no-gan arm
    with pytest.raises(ConfigError, match="stage2-e2e-vae trains on the VAE that arm repae tunes"):
        select_arms(every, ["repa", "stage2-e2e-vae"])


def test_reproduce_trains_and_measures_only_the_named_arms(tmp_path, monkeypatch):
    import sys

    from repae.reproduce import runner as rr

    _no_world(monkeypatch, rr)
    measured = []
    monkeypatch.setattr(rr, "measure_run", lambda run_dir, samples, judges, every=None, **final: measured.append(run_dir.name) or {})
    started = []
    monkeypatch.setattr(rr, "train_command", lambda arm, seed, *a: started.append(f"{arm.name}-s{seed}")
                        or [sys.executable, "-c", "pass"])
    plan = rr.Plan(steps=2, eval_every=1, seeds=[0, 1], samples=1, jobs=1, arms=["vanilla", "repae"])
    results = rr.run_reproduction(tmp_path, plan)
    assert started == ["vanilla-s0", "vanilla-s1", "repae-s0", "repae-s1"]  # one job: exactly the plan's order
    assert [a["name"] for a in results["arms"]] == ["vanilla", "repae"] and list(results["metrics"]) == ["vanilla", "repae"]
    assert sorted(measured) == sorted(started) and sorted(results["runs"]) == sorted(started)


def test_an_unknown_arm_is_refused_before_the_world_is_built(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["bench", "reproduce", "--dir", str(tmp_path / "out"), *TINY, f"toy.cache_dir={cache}", "--arms", "repae",
            "repa-e"]
    assert main(argv) != 0
    assert "unknown arm(s) repa-e; this config's arms: repae, repa" in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / "out").exists()
    # overrides after --arms would be taken for arm names: refused with the remedy
    with pytest.raises(SystemExit):
        main(["bench", "reproduce", "--arms", "repae", f"toy.cache_dir={cache}"])
    err = capsys.readouterr().err
    assert f"'toy.cache_dir={cache}' is not an arm name: put key=value overrides before --arms" in err


def test_only_checkpoints_on_the_plans_grid_are_measured(tmp_path):
    """An interrupted run leaves a checkpoint where it stopped (step 36, say): measured, it added a one-seed
    point to the curves of the full plan (seen: steps 80 and 81 beside 300, 600, 900, 1200)."""
    from repae.reproduce.measure import LATENT_KEYS, METRICS_FILE, UNGUIDED_KEYS, measure_run, needs_measuring

    for step in (2, 4, 8):
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    record = {"num_samples": 10, "fid": 1.0, **{k: 0.5 for k in LATENT_KEYS + UNGUIDED_KEYS}}
    (tmp_path / METRICS_FILE).write_text(json.dumps({"4": record, "8": record}))
    assert needs_measuring(tmp_path, 10)  # every checkpoint: step 2 is not measured
    assert not needs_measuring(tmp_path, 10, every=4)
    (tmp_path / METRICS_FILE).write_text(json.dumps({"2": record, "4": record, "8": record}))
    assert list(measure_run(tmp_path, 10, every=4)) == ["4", "8"]  # a stored off-grid one is left out too
    assert list(measure_run(tmp_path, 10)) == ["2", "4", "8"]


def test_the_last_step_is_measured_with_the_plans_final_samples(tmp_path, monkeypatch):
    """The verdicts are read at the last step: measured there with `final_samples` (a record made with
    fewer is measured again), every other step with `samples`; and the runner asks for it."""
    from repae.reproduce import measure
    from repae.reproduce.measure import LATENT_KEYS, METRICS_FILE, UNGUIDED_KEYS, measure_run, needs_measuring

    for step in (4, 8):
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    record = {"num_samples": 10, "fid": 1.0, **{k: 0.5 for k in LATENT_KEYS + UNGUIDED_KEYS}}
    (tmp_path / METRICS_FILE).write_text(json.dumps({"4": record, "8": record}))
    assert not needs_measuring(tmp_path, 10, every=4)
    assert needs_measuring(tmp_path, 10, every=4, final_step=8, final_samples=40)
    asked = []
    monkeypatch.setattr(measure, "checkpoint_metrics",
                        lambda ckpt, judges, n, grid: asked.append((ckpt.name, n)) or {**record, "num_samples": n})
    got = measure_run(tmp_path, 10, judges=object(), every=4, final_step=8, final_samples=40)
    assert asked == [("step-0000008", 40)] and got["8"]["num_samples"] == 40 and got["4"]["num_samples"] == 10
    assert not needs_measuring(tmp_path, 10, every=4, final_step=8, final_samples=40)
    # the full plan's default, and the command the runner starts to measure a run
    from repae.reproduce.runner import FULL, QUICK

    assert FULL.final_samples == 2000 > FULL.samples and QUICK.final_samples is None


def test_the_runner_measures_the_last_step_with_the_final_samples(tmp_path, monkeypatch):
    import sys

    from repae.reproduce import runner as rr

    _no_world(monkeypatch, rr)
    (tmp_path / "runs" / "e2e-diffusion-s0" / "checkpoints" / "step-0000002").mkdir(parents=True)  # not yet measured
    collected, commands = [], []
    monkeypatch.setattr(rr, "measure_run", lambda run_dir, samples, judges, every=None, **final: collected.append(final) or {})
    monkeypatch.setattr(rr, "train_command", lambda arm, *a: [sys.executable, "-c", "pass"])
    real_call = rr._Runner._call
    monkeypatch.setattr(rr._Runner, "_call", lambda self, cmd, log: commands.append(cmd) or 0 if "repae.reproduce.measure"
                        in cmd else real_call(self, cmd, log))
    plan = rr.Plan(steps=2, eval_every=1, seeds=[0], samples=3, final_samples=7, jobs=1, arms=["e2e-diffusion"])
    rr.run_reproduction(tmp_path, plan)
    assert len(commands) == 1 and commands[0][-4:] == ["--final-step", "2", "--final-samples", "7"]
    assert collected == [{"final_step": 2, "final_samples": 7, "cfg_scales": ()}]


def test_the_runner_sweeps_the_guidance_scale_only_for_the_arms_a_guided_verdict_compares(tmp_path, monkeypatch):
    import sys

    from repae.reproduce import runner as rr

    _no_world(monkeypatch, rr)
    for name in ("e2e-diffusion-s0", "repa-s0"):
        (tmp_path / "runs" / name / "checkpoints" / "step-0000002").mkdir(parents=True)
    collected, commands = {}, {}
    monkeypatch.setattr(rr, "measure_run", lambda run_dir, samples, judges, every=None, **final:
                        collected.__setitem__(run_dir.name, final) or {})
    monkeypatch.setattr(rr, "train_command", lambda arm, *a: [sys.executable, "-c", "pass"])
    real_call = rr._Runner._call
    monkeypatch.setattr(rr._Runner, "_call", lambda self, cmd, log: commands.__setitem__(Path(cmd[3]).name, cmd) or 0
                        if "repae.reproduce.measure" in cmd else real_call(self, cmd, log))
    plan = rr.Plan(steps=2, eval_every=1, seeds=[0], samples=3, jobs=1, arms=["e2e-diffusion", "repa"], cfg_scales=[1.5, 2.5])
    rr.run_reproduction(tmp_path, plan)
    # with scale 1 (the unguided samples) and the run's own (the toy preset's 4), which cost nothing more
    assert commands["repa-s0"][-7:] == ["--final-step", "2", "--cfg-scales", "1.0", "1.5", "2.5", "4.0"]
    assert "--cfg-scales" not in commands["e2e-diffusion-s0"]
    assert collected["repa-s0"]["cfg_scales"] == [1.0, 1.5, 2.5, 4.0] and collected["e2e-diffusion-s0"]["cfg_scales"] == ()
    from repae.reproduce.runner import CFG_SWEEP_ARMS, FULL, QUICK

    assert set(CFG_SWEEP_ARMS) == {"repae", "repa", "stage2-e2e-vae", "vanilla"}
    assert FULL.cfg_scales == [1.5, 2.0, 2.5, 3.0] and QUICK.cfg_scales == []


def test_the_guidance_sweep_measures_the_last_step_once_reusing_the_runs_own_samples(tmp_path, monkeypatch):
    """At the last step each scale of the sweep is measured once: the run's own scale and scale 1 are the
    samples already measured (copied, not drawn again), the others drawn; a finished sweep is not redone;
    a failed sweep keeps the run's own measurement."""
    from repae.reproduce import measure
    from repae.reproduce.measure import LATENT_KEYS, METRICS_FILE, UNGUIDED_KEYS, measure_run, needs_measuring

    (tmp_path / "checkpoints" / "step-0000008").mkdir(parents=True)
    record = {"num_samples": 10, "fid": 4.0, "fid_noise": 0.4, "class_accuracy": 0.9,
              **{k: 0.5 for k in LATENT_KEYS + UNGUIDED_KEYS}, "fid_unguided": 7.0}
    (tmp_path / METRICS_FILE).write_text(json.dumps({"8": record}))
    assert not needs_measuring(tmp_path, 10, final_step=8) and needs_measuring(tmp_path, 10, final_step=8, cfg_scales=[2.0])
    drawn = []

    def sample_metrics(cfg, sit, vae, judges, n, device, cfg_scale=None):
        drawn.append(cfg_scale)
        return {f"fid_cfg{cfg_scale:g}": 10 + cfg_scale, f"class_accuracy_cfg{cfg_scale:g}": 0.5}

    loaded = types.SimpleNamespace(sample=types.SimpleNamespace(cfg_scale=4.0), train=types.SimpleNamespace(device="cpu"))
    module = types.SimpleNamespace(to=lambda device: module)
    monkeypatch.setattr(measure, "sample_metrics", sample_metrics)
    monkeypatch.setattr("repae.train.checkpoint.load_for_sampling", lambda ckpt: (loaded, module, module))
    judges = types.SimpleNamespace(second_opinion=None)
    got = measure_run(tmp_path, 10, judges=judges, final_step=8, cfg_scales=[1.0, 2.0, 4.0])["8"]
    assert drawn == [2.0]  # 1 and 4 are the run's unguided and guided samples
    assert (got["fid_cfg1"], got["fid_cfg2"], got["fid_cfg4"], got["fid_noise_cfg4"]) == (7.0, 12.0, 4.0, 0.4)
    assert got["fid"] == 4.0 and json.loads((tmp_path / METRICS_FILE).read_text())["8"]["fid_cfg2"] == 12.0
    assert not needs_measuring(tmp_path, 10, final_step=8, cfg_scales=[1.0, 2.0, 4.0])
    measure_run(tmp_path, 10, judges=judges, final_step=8, cfg_scales=[1.0, 2.0, 4.0])
    assert drawn == [2.0]  # not drawn again

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(measure, "sample_metrics", broken)
    got = measure_run(tmp_path, 10, judges=judges, final_step=8, cfg_scales=[3.0])["8"]
    assert got["error_cfg_sweep"] == "RuntimeError: out of memory" and got["fid"] == 4.0 and got["fid_cfg2"] == 12.0
    assert needs_measuring(tmp_path, 10, final_step=8, cfg_scales=[3.0])  # retried next time


def test_the_report_judges_the_same_samples_again_with_v7s_evaluator():
    """Where the measurements carry v7's evaluator's numbers, every claim an FID decides is judged again with
    them, by the same criteria: here REPA-E wins under the report's judge and loses under v7's."""
    from repae.reproduce.report import claim_c, second_judge_section, under_second_judge

    r = _results({"repae": (15, 5), "repa": (20, 10), "vanilla": (30, 12), "stage2-e2e-vae": (25, 9),
                  "no-stopgrad": (40, 30)})
    assert under_second_judge(r) is None and second_judge_section(r, {}, list(r["metrics"])) == []
    for arm, v7 in {"repae": 12.0, "repa": 8.0, "vanilla": 9.0, "stage2-e2e-vae": 7.0, "no-stopgrad": 30.0}.items():
        m = r["metrics"][arm]["0"]["2"]
        m.update(fid_v7judge=v7, class_accuracy_v7judge=0.25, fid_noise=0.3)
    other = under_second_judge(r)
    m = other["metrics"]["repae"]["0"]["2"]
    assert m["fid"] == 12.0 and m["class_accuracy"] == 0.25 and "fid_noise" not in m
    assert r["metrics"]["repae"]["0"]["2"]["fid"] == 5  # the results themselves untouched
    verdicts = {k: ("stub", "") for k in ("b", "c w/o CFG", "d", "e", "f")}
    verdicts["c"] = claim_c(r)
    assert verdicts["c"][0] == "reproduces"
    lines = second_judge_section(r, verdicts, list(r["metrics"]))
    row = next(line for line in lines if line.startswith("| (c) |"))
    assert row.startswith("| (c) | reproduces | does not reproduce | toy FID at step 2: REPA 8, REPA-E 12")
    assert {line.split(" | ")[0] for line in lines if line.startswith("| (")} == {
        "| (b)", "| (c)", "| (c w/o CFG)", "| (d)", "| (e)", "| (f)"}


def test_the_second_judge_is_held_to_the_same_budget_check():
    """Below 2x chance class accuracy under v7's evaluator, its verdicts about samples read inconclusive too, as
    the report's own do (seen on the --quick plan: the v7 column said "does not reproduce" at 150 steps)."""
    from repae.reproduce.report import second_judge_section

    r = _results({"repae": (15, 5), "repa": (20, 10), "vanilla": (30, 12)})
    for arm in r["metrics"]:
        r["metrics"][arm]["0"]["2"].update(fid_v7judge=9.0, class_accuracy_v7judge=0.12)
    lines = second_judge_section(r, {k: ("stub", "") for k in ("b", "c", "c w/o CFG", "d", "e", "f")},
                                 list(r["metrics"]))
    row = next(line for line in lines if line.startswith("| (c) |"))
    assert row.split(" | ")[2] == "inconclusive at this budget (the numbers alone: does not reproduce)"


# ------------------------------------------------ (c) at a longer budget


def _longer(fid, unguided=None, steps=4):
    """A longer reproduction of REPA-E and REPA: fid[arm] / unguided[arm] = values at steps 1..steps, one seed."""
    unguided = unguided or {}
    metrics = {arm: {"0": {str(step): {"fid": fid[arm][step - 1], "class_accuracy": 0.5,
                                        **({"fid_unguided": unguided[arm][step - 1], "class_accuracy_unguided": 0.3}
                                           if arm in unguided else {})}
                           for step in range(1, steps + 1)}} for arm in fid}
    return {"metrics": metrics, "plan": {"seeds": [0], "jobs": 1, "steps": steps, "eval_every": 1, "samples": 10,
                                         "final_samples": 20},
            "judges": {"kind": "toy"}, "invocations": [{"command": "repae bench reproduce --arms repae repa --steps 4",
                                                        "commit": "def", "machine": "m", "wall_seconds": 120.0}]}


def test_the_report_shows_c_at_a_longer_budget_and_keeps_the_plans_verdicts(tmp_path):
    """REPA-E ahead at the plan's budget (step 2) and behind at step 4 of the longer run: the claims table keeps
    the plan's verdict, the longer section reads the same criterion at step 4 and shows every step."""
    context = {"command": "repae bench reproduce", "commit": "abc", "machine": "m", "method_note": ""}
    r = _report_ready(_results({"repae": (15, 10), "repa": (40, 20)}))
    longer = _longer({"repae": (15, 10, 9, 12), "repa": (40, 20, 10, 8)},
                     unguided={"repae": (30, 25, 20, 15), "repa": (35, 30, 25, 16)})
    assert rep.malformed_results(longer) is None and rep.longer_problem(r, longer) is None
    text = rep.write_report(r, tmp_path, tmp_path / "R.md", context, longer=longer).read_text()
    claims, section = text.split("## (c) at a longer budget")
    assert "| (c) |" in claims and claims.split("| (c) |")[1].split("\n")[0].endswith("| **reproduces** |")
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}
    assert rows["| 3"] == "| 3 | 10 | 9 | 1 of 1 | 25 | 20 | 1 of 1 | 0.3 | 0.3 |"
    assert rows["| 4"] == "| 4 | 8 | 12 | 0 of 1 | 16 | 15 | 1 of 1 | 0.3 | 0.3 |"
    assert "Read at step 4 with the criteria above: (c) **does not reproduce**, (c w/o CFG) **reproduces**." in section
    assert "- command: `repae bench reproduce --arms repae repa --steps 4`\n- commit: `def`" in section
    figure = tmp_path / "docs" / "reproduction" / "longer_budget_fid.png"
    assert figure.is_file() and "(docs/reproduction/longer_budget_fid.png)" in section
    # without --longer: no section, the same claims
    plain = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text()
    assert "## (c) at a longer budget" not in plain and plain.split("## Every arm")[0] == claims.split("## Every arm")[0]


def test_a_longer_run_must_share_the_judges_and_go_past_the_budget():
    r = _report_ready(_results({"repae": (15, 10), "repa": (40, 20)}))
    r["judges"] = {"kind": "toy", "spec": {"train_size": 20000}, "evaluator_version": "v8"}
    longer = _longer({"repae": (15, 10, 9, 12), "repa": (40, 20, 10, 8)})
    longer["judges"] = {**r["judges"], "teacher_train_seconds": 3.0}  # build times do not make other judges
    assert rep.longer_problem(r, longer) is None
    longer["judges"] = {**r["judges"], "spec": {"train_size": 5000}}
    assert rep.longer_problem(r, longer) == "its judges differ (spec): another world or other data"
    longer["judges"] = r["judges"]
    assert "not past this plan's 2 steps" in rep.longer_problem(r, _longer({"repae": (1, 2), "repa": (1, 2)}, steps=2)
                                                                 | {"judges": r["judges"]})
    assert rep.longer_problem(r, {**longer, "metrics": {"repae": longer["metrics"]["repae"]}}) == (
        "it has no measurement of REPA-E or of REPA")


@pytest.mark.parametrize("change, named", [
    (lambda x: x.update(plan=None), "plan must give"),
    (lambda x: x["plan"].update(steps="4"), "plan must give"),
    (lambda x: x.update(metrics=[1, 2]), "metrics must map"),
    (lambda x: x["metrics"]["repae"]["0"].update({"step-5": {}}), "metrics must map"),
    (lambda x: x["metrics"]["repae"]["0"]["1"].update(fid="9.5"), "metrics must map"),
    (lambda x: x["metrics"]["repae"]["0"]["1"].update(fid=True), "metrics must map"),
    (lambda x: x["metrics"]["repae"].update({"0": None}), "metrics must map"),
    (lambda x: x.update(invocations={"command": "x"}), "invocations must be"),
    (lambda x: x["invocations"][0].pop("wall_seconds"), "invocations must be"),
    (lambda x: x.update(judges=["toy"]), "judges must be a record"),
    # each passed the check and then crashed the report after the reproduction had run, or misled it
    (lambda x: x["plan"].update(steps=True), "plan must give"),
    (lambda x: x["plan"].update(steps=10**400), "plan must give"),
    (lambda x: x["plan"].update(samples=-10), "plan must give"),
    (lambda x: x["plan"].update(samples=float("nan")), "plan must give"),
    (lambda x: x["plan"].update(final_samples=2.5), "plan must give"),
    (lambda x: x["plan"].update(seeds=["zero", None]), "plan must give"),
    (lambda x: x["plan"].update(seeds=[-1]), "plan must give"),
    (lambda x: x["metrics"]["repae"]["0"].update({"1" * 5000: {}}), "metrics must map"),
    (lambda x: x["metrics"]["repae"]["0"].update({"²": {}}), "metrics must map"),
    (lambda x: x["metrics"]["repae"]["0"]["1"].update(fid=float("nan")), "metrics must map"),
    (lambda x: x["metrics"]["repae"]["0"]["1"].update(fid=float("inf")), "metrics must map"),
    (lambda x: x["invocations"][0].update(wall_seconds=float("nan")), "invocations must be"),
])
def test_a_malformed_longer_results_file_is_named_not_crashed_on(change, named):
    longer = _longer({"repae": (15, 10, 9, 12), "repa": (40, 20, 10, 8)})
    assert rep.malformed_results(longer) is None
    change(longer)
    assert named in rep.malformed_results(longer)


def test_a_bad_longer_file_is_refused_before_the_world_is_built(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["bench", "reproduce", "--dir", str(tmp_path / "out"), *TINY, f"toy.cache_dir={cache}", "--longer"]
    assert main(argv + [str(tmp_path / "nowhere")]) != 0
    assert "--longer: cannot read" in capsys.readouterr().err
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "results.json").write_text(json.dumps({"plan": {"steps": 4}, "metrics": {}}))
    assert main(argv + [str(tmp_path / "long")]) != 0
    assert "is not a results record of `repae bench reproduce`: plan must give" in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / "out").exists()


def _with_sweep(sweep):
    """Report-ready results of two seeds whose last step (2) holds sweep[arm][scale] = (FID seed 0, seed 1), the
    run's own scale 4 as its guided FID, and class accuracy 0.5 + 0.1 x scale."""
    r = _report_ready(_results({arm: (40, by_scale[4][0]) for arm, by_scale in sweep.items()}))
    for arm, by_scale in sweep.items():
        r["metrics"][arm]["1"] = {step: dict(m) for step, m in r["metrics"][arm]["0"].items()}
        for seed in (0, 1):
            last = r["metrics"][arm][str(seed)]["2"]
            last.update({f"fid_cfg{s}": v[seed] for s, v in by_scale.items()}, fid=by_scale[4][seed])
            last.update({f"class_accuracy_cfg{s}": 0.5 + 0.1 * s for s in by_scale})
    return r


def test_the_sweep_reads_f_at_each_arms_best_scale_where_vanilla_was_swept(tmp_path):
    """REPA against vanilla across the scales and at each one's best, with (f)'s criterion; the margin in units
    of the larger sampling noise at those scales."""
    context = {"command": "repae bench reproduce", "commit": "abc", "machine": "m", "method_note": ""}
    r = _with_sweep({"repa": {1: (8, 9), 2: (6, 6.5), 4: (7, 7)}, "repae": {1: (9, 9.5), 2: (5, 6), 4: (8, 9)},
                     "vanilla": {1: (9, 9), 2: (7.5, 7.0), 4: (8, 8)}})
    for arm in ("repa", "repae", "vanilla"):
        for seed in (0, 1):
            r["metrics"][arm][str(seed)]["2"].update({f"fid_noise_cfg{s}": 0.25 for s in (1, 2, 4)})
    text = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text()
    section = text.split("## (c), (d) and (f) across guidance scales")[1]
    assert "the last step of REPA, REPA-E, stage 2 and vanilla was also sampled" in section
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}
    assert rows["| CFG scale"].startswith("| CFG scale | FID REPA ↓ | FID REPA-E ↓ | FID stage 2 ↓ | "
                                          "FID vanilla ↓ | REPA-E lower (seeds) | stage 2 lower than REPA (seeds) | "
                                          "REPA lower than vanilla (seeds) |")
    assert rows["| 2"].startswith("| 2 | 6.25 ± 0.35 | 5.5 ± 0.71 | — | 7.25 ± 0.35 | 2 of 2 | — | 2 of 2 |")
    assert ("Vanilla SiT at its best scale 2: 7.25 ± 0.35 against REPA's 6.25 ± 0.35, REPA lower in 2 of 2 seeds: with "
            "(f)'s criterion (lower mean FID and lower in every seed) **reproduces**; REPA's lead, 1, is 4x the larger "
            "sampling noise of the two.") in section
    # vanilla better than REPA in one seed at their best: partly, and no margin is claimed for a REPA behind
    r["metrics"]["vanilla"]["1"]["2"]["fid_cfg2"] = 6.0
    section = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text().split("guidance scales")[1]
    assert "REPA lower in 1 of 2 seeds: with (f)'s criterion (lower mean FID and lower in every seed) **partly**; REPA's lead" in section
    r["metrics"]["vanilla"]["0"]["2"]["fid_cfg2"] = 5.0
    section = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text().split("guidance scales")[1]
    assert "**does not reproduce**." in section and "REPA's lead" not in section


def test_the_report_reads_c_and_d_across_guidance_scales_and_at_each_arms_best(tmp_path):
    """A sweep where REPA-E loses at the run's scale (4) and wins at both arms' best (2): the claims table keeps
    the run's scale's verdict, the sweep section shows every scale and reads (c) and (d) at each arm's best."""
    context = {"command": "repae bench reproduce", "commit": "abc", "machine": "m", "method_note": ""}
    r = _with_sweep({"repa": {1: (8, 9), 2: (6, 6.5), 4: (7, 7)}, "repae": {1: (9, 9.5), 2: (5, 6), 4: (8, 9)},
                     "stage2-e2e-vae": {1: (9, 9), 2: (7, 7.5), 4: (9, 9)}})
    assert rep.swept_scales(r) == [1.0, 2.0, 4.0] and rep.best_scale(r, "repae") == (2.0, [5, 6])
    text = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text()
    claims, section = text.split("## (c) and (d) across guidance scales")
    assert claims.split("| (c) |")[1].split("\n")[0].endswith("| **does not reproduce** |")  # 8.5 > 7 at scale 4
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}
    assert rows["| 2"] == "| 2 | 6.25 ± 0.35 | 5.5 ± 0.71 | 7.25 ± 0.35 | 2 of 2 | 0 of 2 | 0.7 ± 0 | 0.7 ± 0 |"
    assert rows["| 4"].startswith("| 4 | 7 ± 0 | 8.5 ± 0.71 | 9 ± 0 | 0 of 2 |")
    assert ("REPA at 2 6.25 ± 0.35, REPA-E at 2 5.5 ± 0.71, REPA-E lower in 2 of 2 seeds: with (c)'s criterion "
            "(lower mean FID and lower in every seed) **reproduces**") in section
    assert "Stage 2 at its best scale 2: 7.25 ± 0.35 against REPA's 6.25 ± 0.35: with (d)'s criterion" in section
    assert "(lower mean FID) **does not reproduce**" in section
    assert (tmp_path / "docs" / "reproduction" / "cfg_sweep.png").is_file()
    assert "by an amount not measured here. These readings" in section  # no noise recorded: no range given
    for arm, noise in (("repa", (0.3, 0.2)), ("repae", (0.25, 0.4))):  # the noise where each arm's best scale is
        for seed in (0, 1):
            r["metrics"][arm][str(seed)]["2"].update({"fid_noise_cfg2": noise[seed], "fid_noise_cfg4": 9.0})
    section = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text().split("guidance scales")[1]
    assert ("one measurement's sampling noise at the chosen scales is 0.2-0.4 (bootstrap std of its FID)") in section
    # REPA-E best in one seed only: the criterion asks every seed
    r["metrics"]["repae"]["1"]["2"]["fid_cfg2"] = 7.0
    section = rep.write_report(r, tmp_path, tmp_path / "R.md", context).read_text().split("guidance scales")[1]
    assert "REPA-E at 2 6 ± 1.4, REPA-E lower in 1 of 2 seeds" in section and "**partly**" in section
    # results without a sweep: no section
    plain = _report_ready(_results({"repae": (15, 8), "repa": (40, 7)}))
    assert "across guidance scales" not in rep.write_report(plain, tmp_path, tmp_path / "R.md", context).read_text()
