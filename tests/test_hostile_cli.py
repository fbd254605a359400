"""Bad command-line values stop a command with one `error:` line and exit status 2 before any work, and
directories given where another thing is expected are named. Every test calls `repae.cli.main` in
process; where the undefended path would start real work (training, sampling, building the toy world),
that work is replaced by a stub that fails at once, so a missing check fails the test quickly."""

import json

import pytest

from repae.cli import main


def _parse_error(argv, capsys) -> str:
    """argparse's usage error: SystemExit(2) and the `error:` line naming the argument."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err
    return err


def _refused(argv, capsys) -> str:
    """The command's own user error: exit code 2 and one `error:` line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


def _boom(*args, **kwargs):
    raise AssertionError("expensive work started before the arguments were checked")


@pytest.fixture
def dirs(tmp_path):
    """Fake repae directories, recognisable from the files repae writes into them (nothing is loadable)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000004").mkdir(parents=True)
    (run / "checkpoints" / "step-0000004" / "state.pt").write_bytes(b"")
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "manifest.json").write_text(json.dumps({"format": "repae-latents", "version": 1}, indent=1))
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "manifest.json").write_text(json.dumps({"format": "repae-packed", "version": 1}, indent=1))
    export = tmp_path / "export"
    export.mkdir()
    (export / "vae.safetensors").write_bytes(b"")
    (export / "export.json").write_text(json.dumps({"format": "repae-e2e-vae"}))
    return {"run": str(run), "latents": str(latents), "packed": str(packed), "export": str(export),
            "missing": str(tmp_path / "missing.safetensors"), "npz": str(tmp_path / "missing.npz"),
            "tmp": tmp_path}


# ----------------------------------------------------------------------------- numbers (items 1, 2, 11)


@pytest.mark.parametrize("argv, flag", [
    (["sample", "--ckpt", "{missing}", "--num-samples", "0"], "--num-samples"),  # was: 0 -> the default 10
    (["evaluate", "samples", "{npz}", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "samples", "{npz}", "--num-images", "-1"], "--num-images"),
    (["evaluate", "samples", "{npz}", "--num-images", "0"], "--num-images"),  # was: 0 -> every image
    (["evaluate", "vae", "--vae", "{missing}", "--num-images", "-2"], "--num-images"),
    (["evaluate", "vae", "--vae", "{missing}", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "spectrum", "--vae", "{missing}", "--num-images", "0"], "--num-images"),
    (["evaluate", "spectrum", "--vae", "{missing}", "--block", "0"], "--block"),
    (["evaluate", "latents", "--vae", "{missing}", "--pca-images", "0"], "--pca-images"),
    (["evaluate", "cknna", "--ckpt", "{missing}", "--topk", "0"], "--topk"),
    (["evaluate", "cknna", "--ckpt", "{missing}", "--t", "1.5"], "--t"),
    (["evaluate", "cknna", "--ckpt", "{missing}", "--depth", "0"], "--depth"),
    (["evaluate", "samples", "{npz}", "--device", "gpu"], "--device"),
    (["cache-latents", "--vae", "{missing}", "--data", "toy", "--out", "{tmp}/c", "--batch-size", "0"],
     "--batch-size"),
    (["info", "{missing}", "--norm-groups", "0"], "--norm-groups"),
    # as data.image_size, at most 4096: 100000 was a 100000^2 crop per image, and the process was killed for memory
    (["evaluate", "vae", "--vae", "{missing}", "--image-size", "100000"], "--image-size"),
    (["evaluate", "latents", "--vae", "{missing}", "--image-size", "4097"], "--image-size"),
    (["evaluate", "ref-stats", "{tmp}", "--out", "{tmp}/r.npz", "--image-size", "100000"], "--image-size"),
    (["evaluate", "cknna", "--ckpt", "{missing}", "--image-size", "100000"], "--image-size"),
    (["prepare-data", "{tmp}", "{tmp}/store", "--image-size", "100000"], "--image-size"),
    (["cache-latents", "--vae", "{missing}", "--data", "{tmp}", "--out", "{tmp}/c", "--image-size", "100000"],
     "--image-size"),
])
def test_bad_numbers_are_argparse_errors(argv, flag, dirs, capsys):
    err = _parse_error([a.format(**dirs) for a in argv], capsys)
    assert f"argument {flag}:" in err


@pytest.mark.parametrize("flags", [["--jobs", "-1"], ["--jobs", "0"], ["--steps", "0"], ["--steps", "-150"],
                                   ["--eval-every", "0"], ["--samples", "0"]])
def test_bench_reproduce_refuses_zero_and_negative_before_training(flags, tmp_path, monkeypatch, capsys):
    # 0 used to mean "the plan's default" and start hours of training; -150 launched every arm
    monkeypatch.setattr("repae.reproduce.cli.run_reproduction", _boom)
    err = _parse_error(["bench", "reproduce", "--quick", "--dir", str(tmp_path / "r"), *flags], capsys)
    assert f"argument {flags[0]}:" in err


def test_bench_reproduce_step_mismatch_is_an_error_on_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("repae.reproduce.cli.run_reproduction", _boom)
    assert main(["bench", "reproduce", "--quick", "--dir", str(tmp_path), "--steps", "100", "--eval-every", "30"]) == 2
    out, err = capsys.readouterr()
    assert "not a multiple of --eval-every 30" in err and out == ""


def test_bench_checks_iters_loop_steps_and_modes_before_building_models(monkeypatch, capsys):
    monkeypatch.setattr("repae.bench.bench_step", _boom)
    monkeypatch.setattr("repae.bench.bench_sample", _boom)
    monkeypatch.setattr("repae.bench_loop.bench_loop", _boom)
    assert "--iters >= 1" in _refused(["bench", "step", "--iters", "0"], capsys)  # was: StatisticsError
    assert "--warmup 2" in _refused(["bench", "loop", "--steps", "2", "--warmup", "2"], capsys)
    assert "--modes 'ode-0'" in _refused(["bench", "sample", "--modes", "ode-0"], capsys)


def test_evaluate_samples_with_eval_num_samples_zero(tmp_path, tiny_sit, tiny_vae, monkeypatch, capsys):
    from repae.weights import save_model

    sit, vae = save_model(tiny_sit, tmp_path / "sit.safetensors"), save_model(tiny_vae, tmp_path / "vae.safetensors")
    monkeypatch.setattr("repae.evaluate.loading.toy_world", _boom)  # the undefended path goes on to the toy judge
    err = _refused(["evaluate", "samples", str(sit), "--vae", str(vae), "eval.num_samples=0"], capsys)
    assert "eval.num_samples=0" in err and "--num-images" in err  # was: torch.cat of an empty list


def test_cknna_depth_and_topk_checked_before_the_data(tmp_path, tiny_sit, tiny_vae, capsys):
    from repae.weights import save_model

    sit, vae = save_model(tiny_sit, tmp_path / "sit.safetensors"), save_model(tiny_vae, tmp_path / "vae.safetensors")
    common = ["evaluate", "cknna", "--ckpt", str(sit), "--vae", str(vae), "--data", str(tmp_path / "no-data")]
    # the tiny SiT has 4 blocks; the undefended path reads --data first (here: "data folder not found")
    assert "--depth 9: this SiT has blocks 1..4" in _refused([*common, "--depth", "9"], capsys)
    assert "--topk 20 must be below --num-images 10" in _refused([*common, "--topk", "20", "--num-images", "10"],
                                                                  capsys)
    # the toy teacher is the toy world's own: an --encoder-path beside it was silently ignored
    err = _refused([*common, "--encoder", "toy-teacher", "--encoder-path", str(tmp_path / "dino.pth")], capsys)
    assert "--encoder-path" in err and "toy teacher is the toy world's own" in err


def test_cuda_device_refused_on_a_cpu_only_torch(dirs, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU")
    err = _parse_error(["evaluate", "samples", dirs["npz"], "--device", "cuda"], capsys)
    assert "argument --device:" in err and "no CUDA device" in err


# ----------------------------------------------------------------------------- output paths (items 1, 11)


@pytest.mark.parametrize("argv, flag", [
    (["sample", "--ckpt", "{missing}", "--out", "{tmp}/grid"], "--out"),  # was: ValueError after sampling
    (["sample", "--ckpt", "{missing}", "--out", "{tmp}"], "--out"),  # a directory
    (["sample", "--ckpt", "{missing}", "--npz", "{tmp}/samples"], "--npz"),  # was: a file evaluate rejects
    (["evaluate", "latents", "--vae", "{missing}", "--pca-figure", "{tmp}/pca"], "--pca-figure"),
    (["evaluate", "spectrum", "--vae", "{missing}", "--figure", "{tmp}/spectrum"], "--figure"),
    (["evaluate", "vae", "--vae", "{missing}", "--out", "{tmp}"], "--out"),
    (["export-vae", "{run}", "--out", "{tmp}/file.txt"], "--out"),  # was: FileExistsError
    (["prepare-data", "{tmp}", "{tmp}/file.txt"], "OUT"),
    (["cache-latents", "--vae", "{missing}", "--data", "toy", "--out", "{tmp}/file.txt"], "--out"),
])
def test_output_paths_checked_before_any_work(argv, flag, dirs, capsys):
    (dirs["tmp"] / "file.txt").write_text("not a directory")
    err = _parse_error([a.format(**dirs) for a in argv], capsys)
    assert f"argument {flag}:" in err


def test_a_file_where_a_directory_goes_is_a_user_error(dirs, monkeypatch, capsys):
    """The safety net under the explicit checks: FileExistsError is one line and exit 2, not a traceback."""
    def exists(*args, **kwargs):
        raise FileExistsError(17, "File exists", "out/x")

    monkeypatch.setattr("repae.stage2.export.export_vae", exists)
    assert "out/x is a file" in _refused(["export-vae", dirs["run"]], capsys)


# ----------------------------------------------------------------------------- sample arguments (items 4, 11)


def test_sample_without_ckpt_or_random_init_is_a_usage_error(tmp_path, capsys):
    err = _parse_error(["sample", "--out", str(tmp_path / "g.png")], capsys)  # was: exit 1, no "error:"
    assert "--ckpt" in err and "--random-init" in err


def test_sample_refuses_vae_with_a_training_run(dirs, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"")
    for vae in (str(other), dirs["missing"]):  # whatever --vae names: it would be ignored
        err = _refused(["sample", "--ckpt", dirs["run"], "--vae", vae, "--out", str(tmp_path / "g.png")], capsys)
        assert "--vae is not used with a training run" in err  # as `repae evaluate samples RUN --vae X` says


def test_missing_weight_files_are_reported_as_missing(dirs, capsys):
    for argv, said in ((["info", dirs["missing"]], "weight file not found"),
                       (["sample", "--ckpt", dirs["missing"]], "checkpoint not found")):
        err = _refused(argv, capsys)
        assert said in err and "not a valid safetensors" not in err


# ----------------------------------------------------------------------------- directories (item 5)


@pytest.mark.parametrize("argv, words", [
    (["sample", "--ckpt", "{latents}"], ["latent cache", "train-ldm latents.path="]),
    (["sample", "--ckpt", "{export}"], ["exported VAE", "--vae"]),
    (["info", "{run}"], ["training run", "repae export-vae"]),
    (["info", "{latents}"], ["latent cache"]),
    (["info", "{packed}"], ["packed image store", "--data"]),
    (["cache-latents", "--vae", "{run}", "--data", "toy", "--out", "{tmp}/c"], ["training run", "repae export-vae"]),
    (["cache-latents", "--vae", "{packed}", "--data", "toy", "--out", "{tmp}/c"], ["packed image store"]),
    (["evaluate", "vae", "--vae", "{latents}", "--data", "toy"], ["latent cache"]),
    (["evaluate", "spectrum", "--vae", "{latents}", "--data", "toy"], ["latent cache"]),
    (["evaluate", "samples", "{latents}"], ["latent cache"]),
    (["evaluate", "cknna", "--ckpt", "{export}"], ["exported VAE"]),
    (["evaluate", "latents", "--ckpt", "{packed}", "--data", "toy"], ["packed image store"]),
])
def test_directories_are_named_with_what_to_run(argv, words, dirs, monkeypatch, capsys):
    monkeypatch.setattr("repae.evaluate.loading.toy_world", _boom)
    err = _refused([a.format(**dirs) for a in argv], capsys)
    assert "no config.json" not in err and "damaged" not in err
    for word in words:
        assert word in err


def test_info_reads_an_export_vae_directory(tmp_path, tiny_vae, capsys):
    from repae.weights import save_model

    (tmp_path / "e2e-vae").mkdir()
    save_model(tiny_vae, tmp_path / "e2e-vae" / "vae.safetensors")
    assert main(["info", str(tmp_path / "e2e-vae")]) == 0  # was: "diffusers VAE directory ... no config.json"
    assert "AutoencoderKL" in capsys.readouterr().out


# ----------------------------------------------------------------------------- wording and help (item 11)


def test_a_config_flag_hints_at_its_key(capsys):
    err = _parse_error(["train", "--max-steps", "3"], capsys)
    assert "train.max_steps=VALUE" in err


@pytest.mark.parametrize("argv, missing", [(["evaluate", "samples"], "source"), (["bench"], "what")])
def test_a_missing_positional_is_not_listed_with_key_value(argv, missing, capsys):
    err = _parse_error(argv, capsys)
    line = next(x for x in err.splitlines() if "required" in x)
    assert line.endswith(f"required: {missing}")  # not "..., key=value": the overrides are optional


def test_ref_stats_missing_source_is_not_called_a_sample_source(tmp_path, capsys):
    err = _refused(["evaluate", "ref-stats", str(tmp_path / "nope"), "--out", str(tmp_path / "s.npz")], capsys)
    assert "image source not found" in err and "to sample from" not in err


def test_train_past_its_budget_says_so(tmp_path, monkeypatch, capsys):
    summary = {"steps": 4, "steps_this_invocation": 0, "wall_seconds": 1.0}
    monkeypatch.setattr("repae.train.loop.train", lambda cfg, progress: summary)
    monkeypatch.setattr("repae.train.report.run_story", lambda *a: ["done: step 4 (0 this time)"])
    assert main(["train", "train.max_steps=2", f"output_dir={tmp_path}", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "already at step 4, past train.max_steps=2" in err


@pytest.mark.parametrize("argv, phrases", [
    (["info", "--help"], ["a SiT or VAE weight file", "what the file holds"]),
    (["bench", "--help"], ["one REPA-E training step", "starting preset", "YAML file(s)", "dotted config overrides"]),
    (["cache-latents", "--help"], ["no progress bar"]),
])
def test_help_describes_every_argument(argv, phrases, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in phrases:
        assert phrase in text


# ----------------------------------------------------------------------------- data a measurement cannot use


@pytest.fixture
def vae_and_folders(tmp_path):
    """A tiny VAE file (downsampling by 4), a folder of 32-px images and a folder of only unreadable ones."""
    import numpy as np
    import torch
    from PIL import Image

    from conftest import tiny_vae_args
    from repae.models.vae import AutoencoderKL
    from repae.weights import save_model

    torch.manual_seed(0)
    save_model(AutoencoderKL(tiny_vae_args()), tmp_path / "vae.safetensors")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "good" / cls).mkdir(parents=True)
        (tmp_path / "bad" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "good" / cls / f"{i}.png")
            (tmp_path / "bad" / cls / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return tmp_path


@pytest.mark.parametrize("name", ["images.npz", "notes.txt"])
def test_a_data_file_of_no_readable_kind_is_called_a_file_not_a_missing_folder(name, vae_and_folders, capsys):
    (vae_and_folders / name).write_bytes(b"PK\x03\x04 not an archive of images")
    err = _refused(["evaluate", "vae", "--vae", str(vae_and_folders / "vae.safetensors"), "--data",
                    str(vae_and_folders / name), "--no-progress"], capsys)
    assert "is a file of no kind it reads" in err and "not found" not in err
    assert ("repae evaluate samples" in err) == name.endswith(".npz")


@pytest.mark.parametrize("argv, words", [
    # every image unreadable: was a ValueError traceback ("no images were evaluated", "no batches")
    (["evaluate", "vae", "--data", "{d}/bad", "--image-size", "32"], "no readable images in the data"),
    (["evaluate", "latents", "--data", "{d}/bad", "--image-size", "32"], "no readable images in the data"),
    # 33 px through a VAE that downsamples by 4 decodes to 32 px: was a shape-mismatch traceback in the PSNR
    (["evaluate", "vae", "--data", "{d}/good", "--image-size", "33"], "multiple of its downsampling factor"),
    # DCT blocks larger than what they tile: was a ValueError traceback after every VAE had run
    (["evaluate", "spectrum", "--data", "{d}/good", "--image-size", "32", "--block", "100000"], "32 px"),
    (["evaluate", "spectrum", "--data", "{d}/good", "--image-size", "32", "--block", "9"], "--block 8 or less"),
    (["evaluate", "spectrum", "--data", "{d}/good", "--image-size", "32", "--image-block", "64"], "--image-block"),
])
def test_measurements_refuse_data_they_cannot_use_with_one_line(argv, words, vae_and_folders, capsys):
    out = vae_and_folders / "record.json"
    argv = [a.format(d=vae_and_folders) for a in argv]
    err = _refused([*argv[:2], "--vae", str(vae_and_folders / "vae.safetensors"), *argv[2:], "--out", str(out),
                    "--no-progress"], capsys)
    assert words in err and not out.exists()


def test_a_dct_block_of_one_is_an_argparse_error(dirs, capsys):
    assert "must be an integer >= 2" in _parse_error(["evaluate", "spectrum", "--vae", dirs["missing"], "--block", "1"],
                                                     capsys)
