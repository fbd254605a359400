"""Interop with diffusers (a test extra): our export loads in diffusers and decodes the same pixels."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from repae.models.vae import AutoencoderKL
from repae.models.vae_diffusers import export_diffusers
from repae.weights import load_model
from conftest import randomize, tiny_vae_args


@pytest.mark.parametrize("attn", [[], [64]], ids=["no-level-attention", "attention-at-a-level"])
def test_export_loads_in_diffusers_and_decodes_same_pixels(tmp_path, attn):
    ours = randomize(AutoencoderKL(tiny_vae_args(attn_resolutions=attn, norm_groups=32)), 0.03).eval()
    mean, std = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.5, 2.0, 2.5, 3.0])
    export_diffusers(ours, tmp_path / "vae", latents_mean=mean, latents_std=std, sample_size=32)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert list(theirs.config.latents_mean) == pytest.approx(mean.tolist())
    z = torch.randn(2, 4, 8, 8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, ours.encode(x).mean, atol=1e-5, rtol=1e-4)


def test_import_diffusers_directory_made_by_diffusers(tmp_path):
    theirs = diffusers.AutoencoderKL(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=32,
    ).eval()
    randomize(theirs, 0.03)
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_model(tmp_path / "vae").eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-4)


def test_adapter_wraps_any_diffusers_vae_for_end_to_end_tuning():
    from repae.models.vae_diffusers import DiffusersVAEAdapter

    # a FLUX-like layout: 16 latent channels, no quant convs
    theirs = diffusers.AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    vae = DiffusersVAEAdapter(theirs)
    assert (vae.z_channels, vae.downsample_factor) == (16, 2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(x)
    torch.testing.assert_close(posterior.mean, theirs.encode(x).latent_dist.mean)
    _, z, recon = vae(x)
    assert z.shape == (2, 16, 8, 8)
    (recon.pow(2).mean() + posterior.kl().mean()).backward()
    assert theirs.encoder.conv_in.weight.grad is not None and theirs.decoder.conv_out.weight.grad is not None
