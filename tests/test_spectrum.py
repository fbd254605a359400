"""Blockwise DCT spectra (repae.evaluate.spectrum) with known answers, and `repae evaluate spectrum`."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.fft import dctn

from repae.evaluate.spectrum import (
    band_energy_sums, band_index, blockwise_dct, crop_to_blocks, dct_matrix, energy_spectrum, latent_spectra,
    plot_spectra,
)


def block_cosine(u0: int, v0: int, block: int, tiles: int = 3) -> torch.Tensor:
    """The DCT basis function (u0, v0), repeated over tiles x tiles blocks: [1,1,tiles*b,tiles*b]."""
    d = dct_matrix(block)
    basis = torch.outer(d[u0], d[v0])
    return basis.repeat(tiles, tiles)[None, None]


def test_dct_matrix_is_orthonormal_and_matches_scipy_on_random_blocks():
    for b in (2, 4, 8):
        d = dct_matrix(b)
        assert torch.allclose(d @ d.T, torch.eye(b, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = blockwise_dct(x, 8)  # [2,3,2,3,8,8]
    for i in range(2):
        for j in range(3):
            block = x[1, 2, 8 * i:8 * i + 8, 8 * j:8 * j + 8].numpy()
            np.testing.assert_allclose(ours[1, 2, i, j].numpy(), dctn(block, norm="ortho"), atol=1e-12)


def test_parseval_energy_is_preserved():
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sums, count = band_energy_sums(x, 4, remove_mean=False)
    assert math.isclose(sums.sum().item(), x.double().pow(2).sum().item(), rel_tol=1e-10)
    assert count == 3 * 4 * 4 * 4


@pytest.mark.parametrize("u0,v0", [(0, 1), (1, 0), (2, 3), (7, 7), (5, 0)])
def test_one_aligned_cosine_puts_all_its_energy_in_band_u_plus_v(u0, v0):
    s = energy_spectrum(block_cosine(u0, v0, 8), 8, remove_mean=True)
    assert s.fractions[u0 + v0] > 1 - 1e-6
    assert sum(f for k, f in enumerate(s.fractions) if k != u0 + v0) < 1e-6
    assert math.isclose(sum(s.fractions), 1.0, rel_tol=1e-12)
    assert (s.high_frequency_fraction > 1 - 1e-6) == (u0 + v0 >= 8)


def test_a_constant_is_all_dc_and_vanishes_once_the_mean_is_removed():
    x = torch.full((2, 3, 16, 16), 0.7)
    s = energy_spectrum(x, 8, remove_mean=False)
    assert s.dc_fraction > 1 - 1e-12 and s.high_frequency_fraction < 1e-12
    gone = energy_spectrum(x, 8, remove_mean=True)
    assert all(math.isnan(f) for f in gone.fractions)
    assert energy_spectrum(torch.randn(2, 3, 8, 8), 8).dc_fraction == 0.0  # one block: DC is the removed mean
    assert energy_spectrum(torch.randn(2, 3, 16, 16), 8).dc_fraction > 0  # block means still vary
    # a constant offset on top of a cosine changes nothing once means are removed
    cos = block_cosine(2, 1, 8)
    assert np.allclose(energy_spectrum(cos + 5.0, 8).fractions, energy_spectrum(cos, 8).fractions, atol=1e-12)


def test_white_noise_spreads_energy_in_proportion_to_coefficients_per_band():
    block = 8
    x = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    s = energy_spectrum(x, block, remove_mean=False)
    counts = torch.bincount(band_index(block).flatten()).double()
    expected = (counts / counts.sum()).numpy()
    assert counts.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 7, 6, 5, 4, 3, 2, 1]
    np.testing.assert_allclose(s.fractions, expected, rtol=0.08)
    assert math.isclose(s.high_frequency_fraction, 28 / 64, rel_tol=0.03)  # bands 8..14 hold 28 of 64


def test_crop_is_central_to_a_multiple_of_the_block():
    x = torch.arange(11 * 13, dtype=torch.float32).reshape(1, 1, 11, 13)
    c = crop_to_blocks(x, 4)
    assert c.shape == (1, 1, 8, 12) and c[0, 0, 0, 0] == x[0, 0, 1, 0]
    s = energy_spectrum(torch.randn(1, 2, 11, 13), 4)
    assert s.shape == [2, 8, 12] and s.num_blocks == 2 * 2 * 3
    with pytest.raises(ValueError, match="smaller than one"):
        energy_spectrum(torch.randn(1, 1, 4, 4), 8)


class ScaledIdentityVAE(torch.nn.Module):
    """encode: 2x average pooling, times 3, plus 1 (the latent of a known linear map)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        z = torch.nn.functional.avg_pool2d(x, 2) * 3 + 1

        class Posterior:
            def mode(self):
                return z

            sample = mode
        return Posterior()


def test_latent_spectra_of_images_raw_and_normalized_latents():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    vae = ScaledIdentityVAE()
    mean, var = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([9.0, 9.0, 9.0])
    got = latent_spectra(vae, images, (mean, var), block=4, batch_size=2)
    assert set(got) == {"images", "raw", "normalized"}
    x = images.float() / 127.5 - 1
    z = torch.nn.functional.avg_pool2d(x, 2)
    assert np.allclose(got["images"].fractions, energy_spectrum(x, 4).fractions, atol=1e-9)
    assert np.allclose(got["raw"].fractions, energy_spectrum(z, 4).fractions, atol=1e-9)
    assert np.allclose(got["normalized"].fractions, got["raw"].fractions, atol=1e-9)  # equal scale per channel
    assert got["raw"].num_images == 5 and got["raw"].shape == [3, 16, 16]
    assert set(latent_spectra(vae, images, None, block=4)) == {"images", "raw"}


def test_plot_spectra_writes_a_png(tmp_path):
    s = energy_spectrum(torch.randn(2, 3, 16, 16), 8)
    path = plot_spectra({"noise": s, "list": s.fractions}, tmp_path / "sub" / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- repae evaluate spectrum


def test_evaluate_spectrum_cli_compares_two_vaes(tmp_path):
    from PIL import Image

    from conftest import tiny_vae_args
    from repae.evaluate import cli as evaluate_cli
    from repae.models.vae import AutoencoderKL
    from repae.weights import save_latent_stats, save_model

    rng = np.random.default_rng(0)
    (tmp_path / "png").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "png" / f"{i}.png")
    torch.manual_seed(0)
    save_model(AutoencoderKL(tiny_vae_args()), tmp_path / "start.safetensors")
    (tmp_path / "e2e").mkdir()  # an export-vae directory: the VAE and its latent statistics
    save_model(AutoencoderKL(tiny_vae_args()), tmp_path / "e2e" / "vae.safetensors")
    save_latent_stats(torch.zeros(4), torch.tensor([1.0, 4.0, 9.0, 16.0]),
                      tmp_path / "e2e" / "latent_stats.safetensors")

    out, fig = tmp_path / "spectrum.json", tmp_path / "spectrum.png"
    argv = ["evaluate", "spectrum", "--vae", tmp_path / "start.safetensors", "--vae", tmp_path / "e2e",
            "--label", "start", "--label", "e2e", "--data", tmp_path / "png", "--image-size", 32,
            "--num-images", 5, "--batch-size", 2, "--block", 4, "--figure", fig, "--out", out, "--no-progress"]
    assert evaluate_cli.main([str(a) for a in argv]) == 0
    rec = json.loads(out.read_text())
    spectra = rec["metrics"]["spectra"]
    assert set(spectra) == {"images", "start/raw", "e2e/raw", "e2e/normalized"}
    for s in spectra.values():
        assert len(s["band_fractions"]) == 7 and math.isclose(sum(s["band_fractions"]), 1.0, rel_tol=1e-9)
        assert s["num_images"] == 5 and s["high_frequency_fraction"] == pytest.approx(sum(s["band_fractions"][4:]))
    assert spectra["images"]["analysed_shape"] == [3, 32, 32] and spectra["e2e/raw"]["analysed_shape"] == [4, 8, 8]
    assert spectra["e2e/normalized"]["band_fractions"] != spectra["e2e/raw"]["band_fractions"]  # channels reweighted
    assert rec["settings"]["vaes"] == ["start", "e2e"] and rec["files"]["e2e/latent_stats"]["sha256"]
    assert fig.read_bytes()[:4] == b"\x89PNG" and rec["metrics"]["figure"] == str(fig)

    bad = ["evaluate", "spectrum", "--vae", str(tmp_path / "start.safetensors"), "--label", "a", "--label", "b",
           "--data", str(tmp_path / "png"), "--out", str(tmp_path / "x.json")]
    assert evaluate_cli.main(bad) == 2 and not (tmp_path / "x.json").exists()
    assert evaluate_cli.main(["evaluate", "spectrum", "--data", str(tmp_path / "png")]) == 2  # which VAE?
