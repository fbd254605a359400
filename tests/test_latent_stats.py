"""Latent spatial variance / total variation known answers, raw vs BN-normalised, PCA-RGB."""

import numpy as np
import pytest
import torch
from PIL import Image

from repae.evaluate.latents import (
    latent_pca_rgb,
    latent_structure,
    measure_latent_structure,
    posterior_means,
    save_latent_pca_figure,
    spatial_variance,
    total_variation,
)
from repae.models.latent_norm import LatentNorm
from repae.models.vae import AutoencoderKL
from repae.pixels import to_vae_range

from conftest import tiny_vae_args


def _checkerboard(h, w, amp):
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return amp * (1 - 2 * ((ii + jj) % 2)).double()  # +amp / -amp alternating


def test_constant_latent_has_zero_variance_and_tv():
    z = torch.full((3, 4, 6, 5), 2.5)
    z[1] = -7.0
    assert torch.equal(spatial_variance(z), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(total_variation(z), torch.zeros(3, dtype=torch.float64))


def test_checkerboard_known_values():
    # channel k is a +-a_k checkerboard on 4x6: variance a_k^2 (even count of +a and -a);
    # TV: 4*5 horizontal + 3*6 vertical neighbour pairs, each |2 a_k|  ->  38 * 2 a_k
    amps = (1.0, 2.0, 3.0)
    z = torch.stack([_checkerboard(4, 6, a) for a in amps])[None]
    assert spatial_variance(z).item() == pytest.approx(np.mean([a * a for a in amps]))
    assert total_variation(z).item() == pytest.approx(sum(38 * 2 * a for a in amps))
    # a horizontal ramp 0..5 in every row: TV = 4 rows * 5 steps; population variance of 0..5
    ramp = torch.arange(6.0).expand(4, 6)[None, None]
    assert total_variation(ramp).item() == pytest.approx(20.0)
    assert spatial_variance(ramp).item() == pytest.approx(np.var(np.arange(6.0)))


def test_statistics_are_per_image_then_averaged():
    a = torch.stack([_checkerboard(4, 4, 1.0)] * 2)[None]  # var 1, TV 2*24*2 = 96
    b = torch.full((1, 2, 4, 4), 9.0)  # var 0, TV 0 (its offset from image a must not count)
    out = latent_structure(torch.cat([a, b]))
    assert out["raw/spatial_variance"] == pytest.approx(0.5)
    assert out["raw/total_variation"] == pytest.approx(48.0)
    assert set(out) == {"raw/spatial_variance", "raw/total_variation"}


def test_raw_and_normalized_keys_follow_the_batchnorm_scale():
    mean = torch.tensor([1.0, -2.0])
    var = torch.tensor([4.0, 0.25])
    norm = LatentNorm(2, eps=1e-4)
    norm.init_from_stats(mean, var)
    z = torch.stack([_checkerboard(4, 6, 3.0), _checkerboard(4, 6, 0.5)])[None].float() + mean.view(1, 2, 1, 1)
    out = latent_structure(z, norm)
    std = (var.double() + 1e-4).sqrt()
    # raw: channel variances 9 and 0.25; TV 76*3 + 76*0.5
    assert out["raw/spatial_variance"] == pytest.approx((9 + 0.25) / 2)
    assert out["raw/total_variation"] == pytest.approx(76 * 3.5)
    # normalised: each channel divided by sqrt(var_c + eps); the shift by the mean drops out
    assert out["normalized/spatial_variance"] == pytest.approx(((9 / std[0] ** 2) + (0.25 / std[1] ** 2)).item() / 2, rel=1e-6)
    assert out["normalized/total_variation"] == pytest.approx((76 * 3 / std[0] + 76 * 0.5 / std[1]).item(), rel=1e-6)


def test_measure_latent_structure_streams_posterior_means():
    vae = AutoencoderKL(tiny_vae_args()).eval()
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    norm = LatentNorm(4)
    norm.init_from_stats(torch.zeros(4), torch.full((4,), 2.0))
    out = measure_latent_structure(vae, [(x[:2], None), (x[2:], None)], latent_norm=norm)
    with torch.no_grad():
        z = vae.encode(to_vae_range(x)).mode()
    ref = latent_structure(z, norm)
    assert out["num_images"] == 5
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, rel=1e-6)
    assert out["normalized/spatial_variance"] == pytest.approx(out["raw/spatial_variance"] / (2.0 + 1e-4), rel=1e-5)


def test_posterior_means_batches_in_order_to_float32_on_the_cpu():
    vae = AutoencoderKL(tiny_vae_args()).eval()
    x = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        whole = vae.encode(to_vae_range(x)).mode()
    z = posterior_means(vae, x, batch_size=3)  # 3 + 3 + 1: a ragged last batch
    assert z.dtype == torch.float32 and z.device.type == "cpu" and z.shape == whole.shape
    torch.testing.assert_close(z, whole, rtol=1e-5, atol=1e-6)
    # each image's own latent, not its neighbour's: the images differ, so a shifted batch would show
    assert (z[1:] - z[:-1]).abs().amax() > 1e-3
    torch.testing.assert_close(posterior_means(vae, x[4:5]), whole[4:5], rtol=1e-5, atol=1e-6)


# ------------------------------------------------ PCA to RGB

def test_pca_rgb_first_component_is_monotone_in_the_dominant_direction():
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 6, 5, 7
    s = torch.randn(b, h, w, generator=g, dtype=torch.float64)  # the signal along one direction
    direction = torch.randn(c, generator=g, dtype=torch.float64)
    direction /= direction.norm()
    z = s[:, None] * direction[None, :, None, None] * 10 + 0.01 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    rgb = latent_pca_rgb(z)
    assert rgb.dtype == torch.uint8 and rgb.shape == (b, 3, h, w)
    red = rgb[:, 0].double().flatten()
    order = s.flatten().argsort()
    steps = red[order].diff()
    # monotone in s (increasing or decreasing) up to the rounding to 256 levels
    assert (steps >= -1).all() or (steps <= 1).all()
    corr = np.corrcoef(red.numpy(), s.flatten().numpy())[0, 1]
    assert abs(corr) > 0.999
    # min-max scaled over the batch: every channel uses the full range
    for k in range(3):
        assert rgb[:, k].min().item() == 0 and rgb[:, k].max().item() == 255


def test_pca_rgb_edge_cases():
    z = torch.zeros(1, 2, 3, 3)
    z[0, 0] = torch.arange(9.0).view(3, 3)
    rgb = latent_pca_rgb(z)  # one varying direction, C=2 < 3
    assert rgb[0, 0].min() == 0 and rgb[0, 0].max() == 255
    assert (rgb[0, 1:] == 0).all()  # no spread / missing components are black
    assert (latent_pca_rgb(torch.ones(2, 4, 3, 3)) == 0).all()
    # sign rule: the largest loading is positive, so red grows with channel 0 here ...
    assert rgb[0, 0, 0, 0] == 0 and rgb[0, 0, 2, 2] == 255
    # ... and negating the latent reverses the colour ramp instead of being absorbed by the sign
    flipped = latent_pca_rgb(-z)[0, 0].int()
    assert (flipped - (255 - rgb[0, 0].int())).abs().max() <= 1  # up to round-half-to-even


def test_save_latent_pca_figure(tmp_path):
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    latents = [torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)]
    path = save_latent_pca_figure(tmp_path / "pca.png", images, latents)
    arr = np.asarray(Image.open(path))
    pad = 2
    assert arr.shape == (3 * (16 + pad) + pad, 3 * (16 + pad) + pad, 3)  # 3 rows: images + 2 PCA rows
    assert np.array_equal(arr[pad : pad + 16, pad : pad + 16], images[0].permute(1, 2, 0).numpy())
    pca0 = latent_pca_rgb(latents[0])[0]
    top_left = arr[pad + 18 : pad + 18 + 4, pad : pad + 4]  # 4x nearest upsampling: first latent pixel
    assert (top_left == pca0[:, 0, 0].numpy()).all()
    with pytest.raises(ValueError):
        save_latent_pca_figure(tmp_path / "bad.png", images, torch.randn(2, 4, 4, 4))
