"""The toy VAE's pre-training (issue 21): why L1 alone gives a grey autoencoder, the colour
statistics that catch one, and (slow) the preset recipe trained in full to a colour VAE."""

import pytest
import torch

from repae import toyworld
from repae.build import vae_args
from repae.config import load_config
from repae.data.toy import toy_tensor
from repae.losses import reconstruction_loss


class _CopyVAE(torch.nn.Module):
    """encode/decode stand-in: z = x ([-1,1]); decode returns z, or its luminance on all three
    channels when grey=True (a perfect grey copy)."""

    def __init__(self, grey: bool = False):
        super().__init__()
        self.grey = grey
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return type("Posterior", (), {"mode": lambda self_: x})()

    def decode(self, z):
        if not self.grey:
            return z
        y = 0.299 * z[:, 0] + 0.587 * z[:, 1] + 0.114 * z[:, 2]
        return y.unsqueeze(1).expand(-1, 3, -1, -1)


def _chroma(v: torch.Tensor) -> torch.Tensor:
    """The part of per-pixel RGB vectors [..., 3] orthogonal to grey (1,1,1)."""
    return v - v.mean(-1, keepdim=True)


def test_l1_gradient_holds_no_colour_while_the_luminance_error_dominates():
    """The root cause of the grey plateau: d|e|/de = sign(e). Where a pixel's luminance error is
    larger than its colour error the three signs agree and the L1 gradient is pure grey; the MSE
    gradient is the error itself and keeps the colour part."""
    x = torch.tensor([[[[0.6]], [[0.1]], [[-0.3]]]])  # a coloured pixel [1,3,1,1] in [-1,1]
    grey_guess = torch.full_like(x, x.mean().item() - 0.5)  # grey, and too dark by more than the colour
    grads = {}
    for kind in ("l1", "mse"):
        recon = grey_guess.clone().requires_grad_(True)
        reconstruction_loss(x, recon, kind).backward()
        grads[kind] = recon.grad.reshape(3)
    assert torch.allclose(_chroma(grads["l1"]), torch.zeros(3))
    assert _chroma(grads["mse"]).abs().max() > 0.1
    # once the luminance error is below the colour error, L1's gradient carries colour too
    recon = torch.full_like(x, x.mean().item()).requires_grad_(True)
    reconstruction_loss(x, recon, "l1").backward()
    assert _chroma(recon.grad.reshape(3)).abs().max() > 0.1


def test_colour_statistics_pass_a_copy_and_fail_a_grey_copy():
    images, _ = toy_tensor(200, seed=3)
    exact = toyworld.colour_statistics(_CopyVAE(), images)
    assert max(abs(e) for e in exact["channel_mean_rel_err"] + exact["channel_std_rel_err"]) < 0.01
    assert exact["recon_rgb_spread"] == pytest.approx(exact["data_rgb_spread"], rel=0.02)
    assert toyworld.colours_are_faithful(exact)
    # latents already encoded are only decoded, with the same answer
    from repae.pixels import to_vae_range
    assert toyworld.colour_statistics(_CopyVAE(), images, latents=to_vae_range(images)) == exact

    grey = toyworld.colour_statistics(_CopyVAE(grey=True), images)
    assert grey["recon_rgb_spread"] < 0.02 * grey["data_rgb_spread"]  # ~0 up to uint8 rounding
    assert not toyworld.colours_are_faithful(grey)
    # the criterion alone catches it too, on the channel std
    assert max(abs(e) for e in grey["channel_std_rel_err"]) > 0.05
    assert not toyworld.colours_are_faithful(grey, min_spread_ratio=0.0)


def test_the_posterior_starts_narrow_and_the_model_comes_back_on_the_cpu():
    cfg = load_config("toy")
    images, _ = toy_tensor(64, seed=0)
    vae = toyworld.train_toy_vae(images, steps=1, batch=8, args=vae_args(cfg), progress=False)
    assert next(vae.parameters()).device.type == "cpu" and not vae.training
    posterior = vae.encode(torch.zeros(2, 3, 32, 32))
    # one step moves the bias by at most ~lr: the log-variance starts near VAE_LOGVAR_INIT, not 0
    assert posterior.logvar.mean().item() == pytest.approx(toyworld.VAE_LOGVAR_INIT, abs=1.0)


@pytest.mark.slow
def test_the_preset_recipe_pretrains_a_colour_vae(tmp_path):
    """Issue 21's bar for the toy VAE: held-out PSNR >= 28 dB and colours within 5% (plus the
    spread criterion), with the toy preset's recipe and sizes (minutes on 2 CPU cores)."""
    cfg = load_config("toy")
    spec = cfg.toy
    train, _, _ = toyworld._pool(tmp_path / "train.npz", spec.train_size, 0, "train", progress=False)
    held, _, _ = toyworld._pool(tmp_path / "held.npz", 1000, 1000, "held", progress=False)
    vae = toyworld.train_toy_vae(train, spec.vae_steps, spec.vae_batch_size, vae_args(cfg), progress=False)
    stats = toyworld.colour_statistics(vae, held)
    assert toyworld.psnr(vae, held) >= 28.0
    assert toyworld.colours_are_faithful(stats), stats


@pytest.mark.parametrize("which", ["vae", "teacher", "evaluator"])
def test_muon_takes_the_hidden_filters_and_adamw_the_rest(which):
    """The world's VAE and teacher (and evaluator) train every parameter once: Muon takes the hidden matrices and
    filters, AdamW the vectors and the first and last layers, as Muon's authors keep them."""
    if which == "vae":
        model, edge, hidden = toyworld.AutoencoderKL(vae_args(load_config("toy"))), toyworld.VAE_EDGE_PARAMS, (
            "decoder.mid.attn_1.q.weight", "encoder.down.0.block.0.conv1.weight")
        muon, adamw = toyworld._vae_optimisers(model)
    else:
        model = toyworld.ToyTeacher(layout=True) if which == "teacher" else toyworld.evaluator_network()
        hidden = ("attn.in_proj_weight", "stem.1.0.weight")
        muon, adamw = toyworld._teacher_optimisers(model)
        # the teacher has a layout head, the evaluator a factor head: each its own edge layers
        edge = [n for n in toyworld.TEACHER_EDGE_PARAMS if n in dict(model.named_parameters())]
        assert len(edge) == 3
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert set(edge) <= in_adamw and set(hidden) <= in_muon
    assert all(model.get_parameter(n).ndim == 1 for n in in_adamw - set(edge))
