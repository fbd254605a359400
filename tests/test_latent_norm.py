import torch

from repae.models.latent_norm import LatentNorm, measure_latent_stats
from repae.models.vae import DiagonalGaussian


def test_normalize_then_denormalize_is_identity():
    bn = LatentNorm(4)
    bn.init_from_stats(torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([4.0, 0.25, 9.0, 1.0]))
    z = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(bn.denormalize(bn.normalize(z)), z)
    torch.testing.assert_close(bn.normalize(bn.denormalize(z)), z)


def test_eval_mode_normalises_with_running_stats_and_never_updates_them():
    bn = LatentNorm(2)
    bn.init_from_scale_bias(latents_scale=torch.tensor([0.5, 2.0]), latents_bias=torch.tensor([1.0, -1.0]))
    bn.eval()
    before = (bn.running_mean.clone(), bn.running_var.clone())
    z = torch.randn(8, 2, 3, 3) * 5 + 3
    out = bn(z)
    expected = (z - torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)) / (torch.tensor([4.0, 0.25]) + 1e-4).sqrt().view(1, 2, 1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, bn.normalize(z))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def test_train_mode_uses_batch_stats_and_moves_running_stats_by_momentum():
    bn = LatentNorm(1, momentum=0.1)
    bn.init_from_stats(torch.zeros(1), torch.ones(1))
    z = torch.randn(16, 1, 4, 4) * 3 + 2
    out = bn.train()(z)
    assert abs(out.mean().item()) < 1e-5
    torch.testing.assert_close(bn.running_mean, 0.1 * z.mean().reshape(1))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * z.var(unbiased=True).reshape(1))


def test_bf16_autocast_keeps_bn_in_fp32():
    bn = LatentNorm(2).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(torch.randn(4, 2, 3, 3))
    assert out.dtype == torch.float32 and bn.running_mean.dtype == torch.float32


def test_scale_bias_round_trip_official_convention():
    bn = LatentNorm(3)
    bn.init_from_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 16.0, 0.25]))
    stats = bn.scale_bias()
    assert stats["latents_scale"].shape == (1, 3, 1, 1)
    torch.testing.assert_close(stats["latents_scale"].flatten(), torch.tensor([0.5, 0.25, 2.0]))
    torch.testing.assert_close(stats["latents_bias"].flatten(), torch.tensor([1.0, 2.0, 3.0]))


class ShiftVAE(torch.nn.Module):
    """encode(x) = posterior with mean x[:, :2] * 3 + [1, -2] and zero spread (deterministic)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        mean = x[:, :2] * 3 + torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
        return DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))


def test_measure_latent_stats_equals_direct_computation():
    images = [torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8) for _ in range(3)]
    mean, var = measure_latent_stats(ShiftVAE(), [(b, torch.zeros(5)) for b in images], sample_posterior=False)
    z = torch.cat([(b.float() / 127.5 - 1)[:, :2] * 3 + torch.tensor([1.0, -2.0]).view(1, 2, 1, 1) for b in images])
    torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, z.var(dim=(0, 2, 3), unbiased=False))
