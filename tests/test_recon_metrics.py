"""Reconstruction metrics: PSNR / SSIM known answers, an independent NumPy SSIM, streaming."""

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from repae.evaluate.recon import (
    PSNR_CAP_DB,
    iter_reconstructions,
    psnr,
    reconstruct,
    reconstruction_metrics,
    ssim,
)
from repae.models.lpips import LPIPS
from repae.models.vae import AutoencoderKL
from repae.pixels import from_vae_range, to_vae_range

from conftest import tiny_vae_args


def _images(n=4, h=20, w=24, lo=0, hi=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 3, h, w), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- PSNR

def test_psnr_identical_is_the_documented_cap():
    x = _images()
    assert PSNR_CAP_DB == pytest.approx(100.0)
    assert torch.allclose(psnr(x, x), torch.full((4,), 100.0, dtype=torch.float64))


@pytest.mark.parametrize("e", [1, 5, 20])
def test_psnr_constant_error(e):
    x = _images(hi=200)
    y = x + e  # no overflow: x < 200
    expected = 10 * math.log10(255.0**2 / e**2)
    assert torch.allclose(psnr(x, y), torch.full((4,), expected, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(psnr(y, x), psnr(x, y))


def test_psnr_is_per_image_not_pooled():
    x = _images(n=2, hi=200)
    y = x.clone()
    y[0] += 2
    y[1] += 10
    p = psnr(x, y)
    assert p[0].item() == pytest.approx(10 * math.log10(255.0**2 / 4))
    assert p[1].item() == pytest.approx(10 * math.log10(255.0**2 / 100))


# ---------------------------------------------------------------- SSIM

def _numpy_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 written from the formula: 11x11 Gaussian (sigma 1.5) window, valid positions,
    K1=0.01, K2=0.03, L=255, per channel, mean over channels and positions. a, b: [C,H,W]."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    win = np.outer(g, g)
    win /= win.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        mx, my = convolve2d(x, win, mode="valid"), convolve2d(y, win, mode="valid")
        sxx = convolve2d(x * x, win, mode="valid") - mx**2
        syy = convolve2d(y * y, win, mode="valid") - my**2
        sxy = convolve2d(x * y, win, mode="valid") - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        vals.append(m.mean())
    return float(np.mean(vals))


def test_ssim_identical_is_one():
    x = _images()
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_ssim_matches_independent_numpy_implementation():
    x = _images(n=3, h=23, w=19, seed=1)
    noise = torch.randint(-40, 41, x.shape, generator=torch.Generator().manual_seed(2))
    y = (x.int() + noise).clamp(0, 255).to(torch.uint8)
    got = ssim(x, y)
    for i in range(3):
        assert got[i].item() == pytest.approx(_numpy_ssim(x[i].numpy(), y[i].numpy()), abs=1e-10)
    assert torch.allclose(ssim(y, x), got)  # symmetric
    assert (got < 0.99).all()


def test_ssim_constant_shift_is_the_luminance_term():
    # constant channels c_k shifted by d: variances/covariance are 0, the contrast-structure term is
    # exactly 1 and SSIM = mean_k (2 c (c+d) + C1) / (c^2 + (c+d)^2 + C1)
    consts, d = (40.0, 100.0, 180.0), 30
    x = torch.stack([torch.full((16, 16), c) for c in consts]).to(torch.uint8)[None]
    y = x + d
    c1 = (0.01 * 255) ** 2
    expected = np.mean([(2 * c * (c + d) + c1) / (c**2 + (c + d) ** 2 + c1) for c in consts])
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-12)


def test_ssim_textured_shift_has_unit_structure_term():
    # a textured image shifted by d: local variances equal and covariance = variance, so SSIM equals
    # the mean luminance term computed from the local (Gaussian-window) means alone
    x = _images(n=1, h=18, w=18, hi=200, seed=3)
    d = 25
    y = x + d
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1 = (0.01 * 255) ** 2
    lum = []
    for ch in x[0].numpy().astype(np.float64):
        mu = convolve2d(ch, win, mode="valid")
        lum.append(((2 * mu * (mu + d) + c1) / (mu**2 + (mu + d) ** 2 + c1)).mean())
    assert ssim(x, y).item() == pytest.approx(float(np.mean(lum)), abs=1e-10)


def test_ssim_rejects_too_small_images():
    x = _images(h=10, w=30)
    with pytest.raises(ValueError):
        ssim(x, x)


# ---------------------------------------------------------------- streaming reconstruction

class _Posterior:
    def __init__(self, mean, noise_scale=0.0):
        self.mean, self.noise_scale = mean, noise_scale

    def mode(self):
        return self.mean

    def sample(self, generator=None):
        return self.mean + self.noise_scale * torch.randn(self.mean.shape, generator=generator)


class IdentityVAE:
    """encode = decode = identity on [-1,1] pixels; the posterior sample is noisy."""

    def encode(self, x):
        return _Posterior(x, noise_scale=0.2)

    def decode(self, z):
        return z


class LossyVAE(IdentityVAE):
    """A deterministic, imperfect reconstruction (contrast loss plus a per-pixel ripple)."""

    def decode(self, z):
        return 0.8 * z + 0.05 * torch.sin(7 * z)


def test_identity_vae_is_perfect_and_lpips_zero():
    x = _images(n=5, h=16, w=16)
    lpips = LPIPS()  # random VGG weights are fine: identical inputs give exactly 0
    out = reconstruction_metrics(IdentityVAE(), [x[:2], x[2:]], lpips=lpips, progress=False)
    assert out["num_images"] == 5
    assert out["psnr"] == pytest.approx(100.0)
    assert out["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert out["lpips"] == pytest.approx(0.0, abs=1e-7)


def test_posterior_sample_is_used_only_when_asked():
    x = _images(n=4, h=16, w=16)
    g = torch.Generator().manual_seed(0)
    noisy = reconstruction_metrics(IdentityVAE(), [x], use_mean=False, generator=g, progress=False)
    # sample noise std 0.2 in [-1,1] units = 25.5 levels -> PSNR about 20 dB (clipping lowers the error)
    assert 18.0 < noisy["psnr"] < 23.0 and noisy["ssim"] < 0.99
    clean = reconstruction_metrics(IdentityVAE(), [x], use_mean=True, progress=False)
    assert clean["psnr"] == pytest.approx(100.0)


def test_streaming_uneven_batches_equals_one_batch():
    x = _images(n=8, h=16, w=16, seed=5)
    lpips = LPIPS()
    whole = reconstruction_metrics(LossyVAE(), [x], lpips=lpips, progress=False)
    parts = reconstruction_metrics(LossyVAE(), [x[:3], x[3:4], x[4:]], lpips=lpips, progress=False)
    assert whole["num_images"] == parts["num_images"] == 8
    for key in ("psnr", "ssim"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-12)
    assert parts["lpips"] == pytest.approx(whole["lpips"], rel=1e-5)
    # and the mean is the mean of per-image values (not a pooled-MSE PSNR)
    recon = from_vae_range(LossyVAE().decode(to_vae_range(x)))
    assert whole["psnr"] == pytest.approx(psnr(x, recon).mean().item(), rel=1e-12)
    assert whole["ssim"] == pytest.approx(ssim(x, recon).mean().item(), rel=1e-12)
    assert whole["psnr"] < 60


def test_callback_receives_uint8_pairs_for_rfid():
    x = _images(n=6, h=16, w=16)
    labels = torch.arange(6)
    seen = []
    reconstruction_metrics(
        LossyVAE(), [(x[:4], labels[:4]), (x[4:], labels[4:])],
        on_batch=lambda a, b: seen.append((a, b)), progress=False,
    )
    originals = torch.cat([a for a, _ in seen])
    recons = torch.cat([b for _, b in seen])
    assert originals.dtype == recons.dtype == torch.uint8
    assert torch.equal(originals, x)
    assert torch.equal(recons, from_vae_range(LossyVAE().decode(to_vae_range(x))))


def test_real_vae_uses_posterior_mean():
    vae = AutoencoderKL(tiny_vae_args()).eval()
    x = _images(n=2, h=16, w=16)
    with torch.no_grad():
        expected = from_vae_range(vae.decode(vae.encode(to_vae_range(x)).mode()))
    assert torch.equal(reconstruct(vae, x), expected)
    # same batch shapes as `expected` (a different batch split may move a pixel by one level)
    pairs = list(iter_reconstructions(vae, [(x, torch.zeros(2))], progress=False))
    assert torch.equal(pairs[0][0], x) and torch.equal(pairs[0][1], expected)
    out = reconstruction_metrics(vae, [x], progress=False)
    assert out["psnr"] == pytest.approx(psnr(x, expected).mean().item(), rel=1e-12)


def test_non_uint8_batches_are_refused():
    with pytest.raises(TypeError):
        reconstruction_metrics(IdentityVAE(), [torch.rand(2, 3, 16, 16)], progress=False)
