import numpy as np
from PIL import Image

from repae.cli import main


def test_sample_random_init_writes_grid_npz_and_config(tmp_path):
    out, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    rc = main(["sample", "--random-init", "--out", str(out), "--npz", str(npz),
               "sample.num_samples=20", "sample.num_steps=4", "sample.batch_size=8"])
    assert rc == 0
    grid = Image.open(out)
    # 10 classes per row, 2 rows of 32px images with 2px padding, upscaled 4x
    assert grid.size == ((10 * 34 + 2) * 4, (2 * 34 + 2) * 4)
    arr = np.load(npz)
    assert arr["arr_0"].shape == (20, 32, 32, 3) and arr["arr_0"].dtype == np.uint8
    assert arr["labels"].tolist() == [i % 10 for i in range(20)]
    assert (tmp_path / "grid.config.yaml").is_file()


def test_config_errors_exit_2_with_message(capsys):
    assert main(["config", "data.image_size=30"]) == 2
    assert "not divisible by the VAE downsampling factor" in capsys.readouterr().err


def test_sample_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_overrides_may_stand_between_and_after_options(tmp_path, capsys):
    import yaml

    (tmp_path / "c.yaml").write_text("sample:\n  guidance_high: 0.7\n")
    assert main(["config", "--preset", "toy", "sample.num_steps=7", "--config", str(tmp_path / "c.yaml"),
                 "sample.cfg_scale=2.5", "sample.num_steps=9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sample"]["num_steps"] == 9 and printed["sample"]["cfg_scale"] == 2.5  # later ones win
    assert printed["sample"]["guidance_high"] == 0.7


def test_an_unknown_flag_is_still_an_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["config", "sample.num_steps=7", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
