"""compat=official: each behaviour where repae deliberately differs from the official REPA-E code,
against a direct computation of the official rule; and compat=repae changes nothing."""

import math

import pytest
import torch

from repae.build import compat_sit_fields, sit_args
from repae.config import ConfigError, LossConfig, load_config
from repae.generate import sampler_settings
from repae.losses import VAERegulariser
from repae.models.latent_norm import LatentNorm
from repae.models.lpips import _TAPS, LPIPS
from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL, DiagonalGaussian
from repae.sample import Guidance, euler_ode
from repae.train.setup import make_trainables
from repae.train.step import repae_step
from repae.weights import load_model, load_strict, save_model
from conftest import randomize, tiny_sit_args, tiny_vae_args
from test_repae_step import PatchTeacher, batch

# the toy preset's SiT lr and EMA decay when BEFORE_COMPAT was recorded (the preset has since moved to 4e-3, 0.99)
# optim_vae.lr=1e-4: the VAE's lr when BEFORE_COMPAT was measured (the toy preset's VAE now trains at its SiT's lr)
STEP_OVERRIDES = ["model.class_dropout_prob=0.1", "loss.gan_weight=0.1", "optim_sit.lr=2e-3", "optim_vae.lr=1e-4",
                  "train.ema_decay=0.995"]


def make(compat: str, lpips: bool = False):
    """test_repae_step's tiny trainables, with the SiT and regulariser built as `compat` asks."""
    torch.manual_seed(0)
    extra = ["loss.lpips_weight=1.0"] if lpips else []
    cfg = load_config("toy", overrides=[*STEP_OVERRIDES, *extra, f"compat={compat}"])
    sit = randomize(SiT(tiny_sit_args(z_dims=[32], num_classes=10, **compat_sit_fields(cfg.compat))), 0.02)
    sit.bn.init_from_stats(torch.zeros(4), torch.ones(4))
    vae = AutoencoderKL(tiny_vae_args())
    reg = VAERegulariser(cfg.loss, lpips=LPIPS() if lpips else None,
                         official_lpips_range=cfg.compat == "official")
    return cfg, make_trainables(cfg, sit, vae, [PatchTeacher()], reg)


def test_config_maps_compat_onto_the_sit():
    for compat, official in (("repae", False), ("official", True)):
        args = sit_args(load_config("toy", overrides=[f"compat={compat}"]))
        assert args.pos_embed_trainable is official and args.bn_denorm_eps is (not official)
    with pytest.raises(ConfigError, match="compat"):
        load_config("toy", overrides=["compat=reference"])
    with pytest.raises(ConfigError, match="heun_cfg_at"):
        load_config("toy", overrides=["compat=official", "sample.heun_cfg_at=t_next"])


# ------------------------------------------------------------------------------ 1. pos_embed


@pytest.mark.parametrize("compat", ["repae", "official"])
def test_pos_embed_trains_only_under_official(compat):
    cfg, m = make(compat)
    official = compat == "official"
    before, ema_before = m.sit.pos_embed.detach().clone(), m.ema.model.pos_embed.detach().clone()
    in_opt = any(p is m.sit.pos_embed for g in m.sit_opt.param_groups for p in g["params"])
    assert in_opt is official and any(p is m.sit.pos_embed for p in m.sit_params) is official
    repae_step(m, [batch()], cfg, step=0, gen=torch.Generator().manual_seed(0))
    after = m.sit.pos_embed.detach()
    if not official:
        assert not isinstance(m.sit.pos_embed, torch.nn.Parameter)
        assert torch.equal(after, before) and torch.equal(m.ema.model.pos_embed, ema_before)
        return
    # the official loop: pos_embed is an ordinary AdamW parameter of the SiT optimiser. AdamW's first
    # step (wd 0) moves each weight by -lr * g / (|g| + eps), g its (clipped) gradient
    g = m.sit.pos_embed.grad
    assert g is not None and g.abs().sum() > 0
    lr, eps = cfg.optim_sit.lr, cfg.optim_sit.eps
    torch.testing.assert_close(after, before - lr * g / (g.abs() + eps), rtol=0, atol=1e-6)
    assert not torch.equal(m.ema.model.pos_embed, ema_before)  # the EMA follows it, as the official EMA does


def test_pos_embed_key_is_official_and_weights_load_across_modes(tmp_path):
    torch.manual_seed(0)
    official = randomize(SiT(tiny_sit_args(**compat_sit_fields("official"))))
    ours = SiT(tiny_sit_args(**compat_sit_fields("repae")))
    for model in (official, ours):
        assert "pos_embed" in model.state_dict()
    with torch.no_grad():
        official.pos_embed.add_(0.5)  # a trained embedding
    load_strict(ours, official.state_dict())
    assert torch.equal(ours.pos_embed, official.pos_embed) and "pos_embed" not in dict(ours.named_parameters())
    back = SiT(tiny_sit_args(**compat_sit_fields("official")))
    load_strict(back, ours.state_dict())
    assert torch.equal(back.pos_embed, official.pos_embed)
    loaded = load_model(save_model(official, tmp_path / "sit.safetensors"), kind="sit")  # args from metadata
    assert loaded.args.pos_embed_trainable and not loaded.args.bn_denorm_eps
    assert torch.equal(loaded.pos_embed, official.pos_embed)


# ----------------------------------------------------------------------------------- 2. LPIPS


def official_lpips_by_hand(lp: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The official LPIPS of images it is handed: scale [0,1] -> [-1,1] (x*2-1), its scaling layer,
    VGG16 taps unit-normalised over channels, squared difference, linear heads, spatial mean, sum."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    total = 0.0
    ha, hb = (((im * 2.0 - 1.0) - shift) / scale for im in (x, y))
    k = 0
    for i, layer in enumerate(lp.features[: _TAPS[-1] + 1]):
        ha, hb = layer(ha), layer(hb)
        if i in _TAPS:
            na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = getattr(lp, f"lin{k}").model[1].weight  # [1,C,1,1]
            total = total + ((na - nb).pow(2) * w).sum(1).mean(dim=(1, 2))
            k += 1
    return total


@torch.no_grad()
def test_lpips_term_under_official_feeds_the_vae_range_as_if_it_were_0_1():
    torch.manual_seed(0)
    lp = LPIPS()
    x = torch.rand(2, 3, 16, 16) * 2 - 1  # the VAE range, which the official code hands its LPIPS
    recon = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    posterior = DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    cfg = LossConfig(lpips_weight=1.0, gan_weight=0.0)
    official = VAERegulariser(cfg, lpips=lp, official_lpips_range=True).generator_terms(x, recon, posterior, 0)
    ours = VAERegulariser(cfg, lpips=lp).generator_terms(x, recon, posterior, 0)
    torch.testing.assert_close(official["lpips"], official_lpips_by_hand(lp, x, recon).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours["lpips"], lp(x, recon).mean())  # repae: LPIPS sees [-1,1] as trained
    assert not torch.allclose(official["lpips"], ours["lpips"], rtol=1e-3)


# ---------------------------------------------------------------------------- 3. denormalize


def test_denormalize_official_uses_sqrt_var_ours_sqrt_var_plus_eps():
    mean, var, eps = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([0.04, 1.0, 9.0, 0.25]), 1e-2
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    shape = (1, 4, 1, 1)
    for compat in ("repae", "official"):
        sit = SiT(tiny_sit_args(bn_eps=eps, **compat_sit_fields(compat)))
        sit.bn.init_from_stats(mean, var)
        added = 0.0 if compat == "official" else eps
        expected = z * (var + added).sqrt().view(shape) + mean.view(shape)
        torch.testing.assert_close(sit.bn.denormalize(z), expected, rtol=0, atol=1e-6)
    plain = LatentNorm(4, eps=eps)  # the default is ours, the exact inverse of normalize
    plain.init_from_stats(mean, var)
    torch.testing.assert_close(plain.denormalize(plain.normalize(z)), z, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- 4. Heun CFG

NULL, SCALE = 10, 3.0


def velocity(x, t, y):
    """Analytic field: v = x/2 + t for a class, v = -x - t for the null label. [B,...]."""
    cond = (y != NULL).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return cond * (0.5 * x + t) + (1 - cond) * (-x - t)


def heun_by_hand(x0, y, low, high, decide_at_t_cur: bool):
    """Two Heun steps on [1, 0.5, 0] (corrector on the first only); CFG where low <= t <= high."""
    def guided(x, t, on):
        tt = torch.full((x.shape[0],), t, dtype=x.dtype)
        vc, vu = velocity(x, tt, y), velocity(x, tt, torch.full_like(y, NULL))
        return vu + SCALE * (vc - vu) if on else vc

    def on(t):
        return low <= t <= high

    d_cur = guided(x0, 1.0, on(1.0))
    x_pred = x0 + (0.5 - 1.0) * d_cur
    d_next = guided(x_pred, 0.5, on(1.0 if decide_at_t_cur else 0.5))
    x1 = x0 + (0.5 - 1.0) * 0.5 * (d_cur + d_next)
    return x1 + (0.0 - 0.5) * guided(x1, 0.5, on(0.5))


@pytest.mark.parametrize("low,high", [(0.6, 1.0), (0.0, 0.7)])  # a boundary inside (0.5, 1) either way
def test_heun_corrector_decides_cfg_at_t_cur_by_default_and_at_t_next_on_request(low, high):
    x0 = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    guidance = Guidance(SCALE, low, high, NULL)
    run = dict(num_steps=2, heun=True, guidance=guidance, model_dtype=torch.float64)
    default = euler_ode(velocity, x0, y, **run)
    at_next = euler_ode(velocity, x0, y, heun_cfg_at="t_next", **run)
    torch.testing.assert_close(default, heun_by_hand(x0, y, low, high, decide_at_t_cur=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(at_next, heun_by_hand(x0, y, low, high, decide_at_t_cur=False), rtol=0, atol=1e-12)
    assert (default - at_next).abs().max() > 1e-3
    cfg = load_config("toy")
    assert cfg.sample.heun_cfg_at == "t_cur" and sampler_settings(cfg)["heun_cfg_at"] == "t_cur"
    assert sampler_settings(load_config("toy", overrides=["sample.heun_cfg_at=t_next"]))["heun_cfg_at"] == "t_next"


# ----------------------------------------------------------------- compat=repae changes nothing

# One step of the fixture above with a random LPIPS (loss.lpips_weight=1), measured with the code before
# compat existed (commit 5ad610b, fp32, OMP_NUM_THREADS=1); *_sum are sums of |weights| after the step.
BEFORE_COMPAT = {
    "diffusion": 2.031060218811035, "disc": 0.9461270570755005, "grad_norm_disc": 17.503278732299805,
    "grad_norm_sit": 3.7326228618621826, "grad_norm_vae": 4.801229476928711, "logits_fake": -0.389445960521698,
    "logits_real": -0.12461186945438385, "reg_gan": 0.03894459828734398, "reg_kl": 1.4581590221496299e-05,
    "reg_lpips": -0.0032279479783028364, "reg_rec": 0.5541287660598755, "reg_total": 0.5898600220680237,
    "repa_sit": -0.011130413971841335, "repa_vae": -0.022138483822345734, "vae_loss": 0.556652307510376,
    "sit_sum": 5586.051039747037, "vae_sum": 24024.08576409031, "ema_sum": 5566.997339717873,
}


def test_compat_repae_reproduces_the_step_from_before_compat_existed():
    cfg, m = make("repae", lpips=True)
    assert cfg.compat == "repae" and m.regulariser.official_lpips_range is False
    logs = repae_step(m, [batch()], cfg, step=0, gen=torch.Generator().manual_seed(0))
    got = {k: float(v) for k, v in logs.items() if k != "skipped"}
    for name, module in (("sit", m.sit), ("vae", m.vae), ("ema", m.ema.model)):
        got[f"{name}_sum"] = sum(float(p.detach().double().abs().sum()) for p in module.parameters())
    assert set(got) == set(BEFORE_COMPAT)
    for key, value in BEFORE_COMPAT.items():
        assert math.isclose(got[key], value, rel_tol=1e-4, abs_tol=1e-7), (key, got[key], value)


def test_lpips_range_benchmark_measures_what_the_compat_switch_changes():
    """benchmarks/lpips_range.py (the README's measured effect of the LPIPS input range) compares exactly the
    two LPIPS terms the regulariser computes under compat=repae and compat=official, with their gradients."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lpips_range.py"
    spec = importlib.util.spec_from_file_location("lpips_range", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    lp = LPIPS()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    recon = bench.distortions()["noise 0.1"](x)
    posterior = DiagonalGaussian(torch.zeros(1, 8, 4, 4))
    cfg = LossConfig(lpips_weight=1.0, gan_weight=0.0)
    r = bench.measure_pair(lp, x, recon)
    grads = {}
    for name, official in (("repae", False), ("official", True)):
        y = recon.clone().requires_grad_(True)
        term = VAERegulariser(cfg, lpips=lp, official_lpips_range=official).generator_terms(x, y, posterior, 0)["lpips"]
        assert abs(float(term) - r[name]) <= 1e-5 * abs(r[name])
        (grads[name],) = torch.autograd.grad(term, y)
    assert abs(r["grad_ratio"] - float(grads["official"].norm() / grads["repae"].norm())) < 1e-4
    cosine = float(torch.nn.functional.cosine_similarity(grads["official"].flatten(), grads["repae"].flatten(), dim=0))
    assert abs(r["grad_cosine"] - cosine) < 1e-4 and r["value_ratio"] == r["official"] / r["repae"]
