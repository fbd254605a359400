import pytest
import torch
import torch.nn.functional as F

from repae.config import LossConfig
from repae.losses import (LeCam, SpatialTransform, VAERegulariser, adaptive_weight, equivariance_loss,
                          hinge_d_loss, kl_loss, reconstruction_loss, repa_loss, vf_loss_terms)
from repae.models.discriminator import NLayerDiscriminator
from repae.models.lpips import LPIPS, LPIPSWeightsError
from repae.models.vae import AutoencoderKL, DiagonalGaussian
from repae.weights import CheckpointError
from conftest import tiny_vae_args


# ------------------------------------------------------------------------ REPA

def test_repa_loss_of_identical_features_is_minus_one():
    f = torch.randn(2, 16, 8)
    assert repa_loss([f], [f]).item() == pytest.approx(-1.0)
    assert repa_loss([3 * f, f], [f, f]).item() == pytest.approx(-1.0)  # scale-invariant, averaged over encoders


def test_repa_loss_known_values():
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])  # cos 0 and -1 -> mean -0.5 -> loss 0.5
    assert repa_loss([a], [b]).item() == pytest.approx(0.5)


# --------------------------------------------------------------- reconstruction, KL

def test_reconstruction_losses_known_values():
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), -2.0)
    assert reconstruction_loss(x, y, "l1").item() == 2.0 and reconstruction_loss(x, y, "mse").item() == 4.0
    with pytest.raises(ValueError):
        reconstruction_loss(x, y, "huber")


def test_kl_is_summed_over_chw_and_averaged_over_batch():
    moments = torch.zeros(2, 4, 3, 3)
    moments[0, :2] = 1.0  # mean 1 on 2 channels of sample 0 -> KL 0.5 * 1 * 18 = 9
    assert kl_loss(DiagonalGaussian(moments)).item() == pytest.approx(9.0 / 2)


# ------------------------------------------------------------------------- GAN

def test_hinge_loss_at_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    la, lb = (w * a).sum(), (w * b).sum()  # gradients are a and b
    expected = a.norm() / (b.norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(la, lb, w), expected)


def test_lecam_known_value_and_ema_update():
    lecam = LeCam(decay=0.9)
    lecam.ema_real.fill_(1.0)
    lecam.ema_fake.fill_(-1.0)
    loss = lecam(torch.tensor([2.0]), torch.tensor([0.5]))
    # relu(2 - (-1))^2 + relu(1 - 0.5)^2
    assert loss.item() == pytest.approx(9.0 + 0.25)
    assert lecam.ema_real.item() == pytest.approx(0.9 * 1 + 0.1 * 2)


def official_discriminator_shapes(ndf=64):
    shapes = {"main.0.weight": (ndf, 3, 4, 4), "main.0.bias": (ndf,)}
    for conv, bn, cin, cout in ((2, 3, ndf, 2 * ndf), (5, 6, 2 * ndf, 4 * ndf), (8, 9, 4 * ndf, 8 * ndf)):
        shapes[f"main.{conv}.weight"] = (cout, cin, 4, 4)
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"main.{bn}.{k}"] = (cout,)
        shapes[f"main.{bn}.num_batches_tracked"] = ()
    shapes.update({"main.11.weight": (1, 8 * ndf, 4, 4), "main.11.bias": (1,)})
    return shapes


def test_discriminator_loads_official_checkpoint_strictly(tmp_path):
    shapes = official_discriminator_shapes()
    state = {k: torch.randn(s) if s else torch.tensor(3) for k, s in shapes.items()}
    torch.save(state, tmp_path / "sdvae-f8d4-discriminator-ckpt.pt")
    reg = VAERegulariser(LossConfig(lpips_weight=0))
    reg.load_discriminator(tmp_path / "sdvae-f8d4-discriminator-ckpt.pt")
    assert torch.equal(reg.discriminator.main[11].weight, state["main.11.weight"])
    del state["main.9.running_var"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing keys: main.9.running_var"):
        reg.load_discriminator(tmp_path / "bad.pt")
    assert NLayerDiscriminator()(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


# ------------------------------------------------------------------------ LPIPS

def _random_lpips_files(tmp_path):
    """Files with the exact layouts of torchvision's vgg16 (incl. classifier) and LPIPS vgg.pth."""
    g = torch.Generator().manual_seed(0)
    vgg = {}
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    idx, cin = 0, 3
    for item in cfg:
        if item == "M":
            idx += 1
            continue
        vgg[f"features.{idx}.weight"] = torch.randn(item, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.randn(item, generator=g) * 0.01
        idx, cin = idx + 2, item
    for i, (o, n) in {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}.items():
        vgg[f"classifier.{i}.weight"], vgg[f"classifier.{i}.bias"] = torch.zeros(o, n), torch.zeros(o)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    return vgg, lin


def _lpips_by_hand(vgg, lin, x, y):
    """LPIPS written out from its definition: scaling layer on [-1,1] input, VGG16 relu taps,
    channel-unit-normalise, squared difference, 1x1 linear head, spatial mean, sum of layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}

    def feats(img):
        h, out = (img - shift) / scale, []
        for i in range(30):
            if f"features.{i}.weight" in vgg:
                h = F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)
            elif i in (4, 9, 16, 23):
                h = F.max_pool2d(h, 2)
            else:
                h = F.relu(h)
            if i in taps:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        total = total + ((a - b) ** 2 * lin[f"lin{k}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_hand_computation_and_is_a_distance(tmp_path):
    vgg, lin = _random_lpips_files(tmp_path)
    lpips = LPIPS.from_files(tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = lpips(x, y)
    torch.testing.assert_close(d, _lpips_by_hand(vgg, lin, x, y), rtol=1e-4, atol=1e-6)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    torch.testing.assert_close(d, lpips(y, x))
    assert (d > 0).all()


def test_lpips_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="vgg16-397923af.pth .* loss.vgg_path"):
        LPIPS.from_files(None, tmp_path / "vgg.pth")
    with pytest.raises(LPIPSWeightsError, match=r"vgg.pth .*not found: .*nope.pth.*lpips_weight=0"):
        LPIPS.from_files(*_paths_with_vgg_only(tmp_path))
    with pytest.raises(LPIPSWeightsError):
        VAERegulariser(LossConfig(lpips_weight=1.0))  # never silently without LPIPS


def _paths_with_vgg_only(tmp_path):
    _random_lpips_files(tmp_path)
    return tmp_path / "vgg16-397923af.pth", tmp_path / "nope.pth"


def test_lpips_wrong_file_names_keys(tmp_path):
    _random_lpips_files(tmp_path)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys: lin1.model.1.weight"):
        LPIPS.from_files(tmp_path / "vgg16-397923af.pth", tmp_path / "partial.pth")


# --------------------------------------------------------------- VA-VAE, EQ-VAE

def test_vf_loss_zero_within_margins_and_known_outside():
    f = torch.randn(2, 16, 8)
    z_same = (3 * f).transpose(1, 2).reshape(2, 8, 4, 4)  # same direction: cos 1
    terms = vf_loss_terms(z_same, f)
    assert terms["vf_mcos"].item() == 0 and terms["vf_mdms"].item() == pytest.approx(0, abs=1e-6)
    z_flip = (-f).transpose(1, 2).reshape(2, 8, 4, 4)  # cos -1 everywhere, same pairwise geometry
    terms = vf_loss_terms(z_flip, f, margin_cos=0.5)
    assert terms["vf_mcos"].item() == pytest.approx(1.5)
    assert terms["vf_mdms"].item() == pytest.approx(0, abs=1e-6)


class PointwiseVAE(torch.nn.Module):
    """encode = invertible 1x1 conv, decode = its inverse: exactly equivariant to any spatial map."""

    def __init__(self):
        super().__init__()
        a = torch.randn(3, 3) + 3 * torch.eye(3)
        self.a, self.b = a, torch.randn(3)

    def encode(self, x):
        return torch.einsum("ij,bjhw->bihw", self.a, x) + self.b.view(1, 3, 1, 1)

    def decode(self, z):
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.a), z - self.b.view(1, 3, 1, 1))


@pytest.mark.parametrize("t", [SpatialTransform(rot90=1), SpatialTransform(hflip=True), SpatialTransform(scale=2),
                               SpatialTransform(rot90=3, scale=4)])
def test_equivariance_terms_vanish_for_an_equivariant_autoencoder(t):
    vae = PointwiseVAE()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert equivariance_loss(vae.decode, vae.encode(x), x, t).item() < 1e-5


def test_equivariance_terms_see_a_perfect_but_position_aware_autoencoder():
    # encode adds a horizontal ramp, decode removes it: reconstruction is exact, equivariance is not
    vae = PointwiseVAE()

    def ramp(t):
        return torch.linspace(0, 1, t.shape[-1]).view(1, 1, 1, -1)

    encode = lambda x: vae.encode(x) + ramp(x)
    decode = lambda z: vae.decode(z - ramp(z))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert equivariance_loss(decode, encode(x), x, SpatialTransform()).item() < 1e-5
    for t in (SpatialTransform(rot90=1), SpatialTransform(hflip=True), SpatialTransform(scale=2)):
        assert equivariance_loss(decode, encode(x), x, t).item() > 1e-3  # vs < 1e-5 when equivariant


# --------------------------------------------------------- gradients and dtypes

def _setup(**cfg):
    vae = AutoencoderKL(tiny_vae_args())
    reg = VAERegulariser(LossConfig(lpips_weight=0, **cfg), feat_dim=16, z_channels=4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior, z, recon = vae(x)
    return vae, reg, x, posterior, z, recon


def test_generator_terms_train_the_vae_not_the_discriminator():
    vae, reg, x, posterior, z, recon = _setup(gan_adaptive_weight=True, eq_weight=1.0, scale_eq_weight=1.0)
    terms = reg.generator_terms(x, recon, posterior, step=0, decoder_last=vae.decoder.conv_out.weight, z=z,
                                decode=vae.decode)
    assert {"rec", "kl", "gan", "eq", "scale_eq", "total"} <= set(terms)
    torch.testing.assert_close(terms["total"], sum(v for k, v in terms.items() if k != "total"))
    terms["total"].backward()
    assert all(p.grad is None for p in reg.discriminator.parameters())
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.requires_grad for p in reg.discriminator.parameters())  # flags restored


def test_discriminator_loss_trains_only_the_discriminator():
    vae, reg, x, posterior, z, recon = _setup(lecam_weight=0.1)
    terms = reg.discriminator_terms(x, recon)
    terms["total"].backward()
    assert all(p.grad is None for p in vae.parameters())
    assert reg.discriminator.main[0].weight.grad.abs().sum() > 0
    assert terms["lecam"].item() >= 0


def test_gan_term_waits_for_start_step():
    vae, reg, x, posterior, z, recon = _setup(gan_start_step=100)
    assert "gan" not in reg.generator_terms(x, recon, posterior, step=99)
    assert "gan" in reg.generator_terms(x, recon, posterior, step=100)


def test_vf_term_trains_vae_and_projection():
    vae, reg, x, posterior, z, recon = _setup(vf_weight=0.1)
    feats = torch.randn(2, 64, 16)
    terms = reg.generator_terms(x, recon, posterior, step=0, z=z, feats=feats,
                                encoder_last=vae.encoder.conv_out.weight, decoder_last=None)
    assert terms["vf"].item() > 0
    terms["total"].backward()
    assert reg.vf_proj.weight.grad is not None


def test_terms_are_fp32_under_bf16_autocast():
    vae, reg, x, posterior, z, recon = _setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        posterior, z, recon = vae(x)
        terms = reg.generator_terms(x, recon, posterior, step=0)
        d_terms = reg.discriminator_terms(x, recon)
    assert all(v.dtype == torch.float32 for v in list(terms.values()) + list(d_terms.values()))


def test_default_weights_match_official_config():
    c = LossConfig()
    assert (c.recon_type, c.recon_weight, c.lpips_weight, c.kl_weight, c.gan_weight, c.gan_start_step,
            c.gan_adaptive_weight) == ("l1", 1.0, 1.0, 1e-6, 0.1, 0, False)
