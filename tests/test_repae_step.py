"""Gradient-flow invariants of the REPA-E step on tiny models."""

import torch

from repae.config import load_config
from repae.losses import VAERegulariser
from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL
from repae.pixels import to_vae_range
from repae.train import step as step_mod
from repae.train.setup import make_trainables
from repae.train.step import alignment_loss_for_vae, repae_step, sit_losses
from conftest import randomize, tiny_sit_args, tiny_vae_args


class PatchTeacher(torch.nn.Module):
    """Frozen random patch embedding: 32px images -> 4x4 tokens of width 32 (a stand-in encoder)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 32, 8, 8).requires_grad_(False)

    def forward(self, images):
        return self.proj(images.float() / 255).flatten(2).transpose(1, 2)


def make(overrides=(), seed=0):
    torch.manual_seed(seed)
    cfg = load_config("toy", overrides=["model.class_dropout_prob=0.1", "loss.gan_weight=0.1", *overrides])
    sit = randomize(SiT(tiny_sit_args(z_dims=[32], num_classes=10)), 0.02)
    sit.bn.init_from_stats(torch.zeros(4), torch.ones(4))
    vae = AutoencoderKL(tiny_vae_args())
    reg = VAERegulariser(cfg.loss)
    m = make_trainables(cfg, sit, vae, [PatchTeacher()], reg)
    return cfg, m


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_vae_alignment_pass_gives_no_sit_gradient_and_keeps_bn_stats():
    cfg, m = make()
    images, y = batch()
    z = m.vae.encode(to_vae_range(images)).sample()
    stats = (m.sit.bn.running_mean.clone(), m.sit.bn.running_var.clone())
    loss = alignment_loss_for_vae(m.sit, z, torch.rand(4), torch.randn_like(z), y, [m.encoders[0](images)], cfg)
    loss.backward()
    assert all(p.grad is None for p in m.sit.parameters())
    assert m.vae.encoder.conv_in.weight.grad.abs().sum() > 0  # REPA reaches the encoder through frozen blocks
    assert torch.equal(m.sit.bn.running_mean, stats[0]) and torch.equal(m.sit.bn.running_var, stats[1])
    assert all(p.requires_grad for p in m.sit_params)  # flags restored after the pass


def test_sit_pass_on_detached_latents_gives_no_vae_gradient_and_updates_bn():
    cfg, m = make()
    images, y = batch()
    z = m.vae.encode(to_vae_range(images)).sample()
    stats = m.sit.bn.running_mean.clone()
    terms = sit_losses(m.sit, z.detach(), torch.rand(4), torch.randn_like(z), y, [m.encoders[0](images)], cfg)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in m.vae.parameters())
    assert m.sit.final_layer.linear.weight.grad.abs().sum() > 0 and m.sit.projectors[0][0].weight.grad is not None
    assert not torch.equal(m.sit.bn.running_mean, stats)


def test_full_step_updates_each_set_with_its_own_optimiser():
    cfg, m = make()
    before = {name: p.detach().clone() for name, p in [("sit", m.sit.blocks[0].attn.qkv.weight),
                                                       ("vae", m.vae.encoder.conv_in.weight),
                                                       ("disc", m.regulariser.discriminator.main[0].weight)]}
    pos = m.sit.pos_embed.clone()
    ema_before = m.ema.model.blocks[0].attn.qkv.weight.clone()
    logs = repae_step(m, [batch()], cfg, step=0, gen=torch.Generator().manual_seed(0))
    assert logs["skipped"].item() == 0
    assert not torch.equal(before["sit"], m.sit.blocks[0].attn.qkv.weight)
    assert not torch.equal(before["vae"], m.vae.encoder.conv_in.weight)
    assert not torch.equal(before["disc"], m.regulariser.discriminator.main[0].weight)
    assert not torch.equal(ema_before, m.ema.model.blocks[0].attn.qkv.weight)
    assert torch.equal(pos, m.sit.pos_embed)
    sets = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in (m.sit_opt, m.vae_opt, m.disc_opt)]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])  # disjoint
    assert sets[0] == {id(p) for p in m.sit.parameters()}
    assert sets[1] == {id(p) for p in m.vae.parameters()}
    assert sets[2] == {id(p) for p in m.regulariser.discriminator.parameters()}
    for key in ("diffusion", "repa_sit", "repa_vae", "reg_rec", "reg_kl", "reg_gan", "disc"):
        assert torch.isfinite(logs[key]), key


def test_both_passes_share_time_and_noise(monkeypatch):
    seen = []
    original = step_mod.interpolate

    def spy(x0, noise, t, path):
        seen.append((noise, t))
        return original(x0, noise, t, path)

    monkeypatch.setattr(step_mod, "interpolate", spy)
    cfg, m = make()
    repae_step(m, [batch()], cfg, step=0, gen=torch.Generator().manual_seed(0))
    assert len(seen) == 2 and seen[0][0] is seen[1][0] and seen[0][1] is seen[1][1]


def _vae_grad_from_sit_loss(stop_grad: bool) -> float:
    cfg, m = make([f"train.stop_grad={stop_grad}", "train.use_reg_loss=false", "loss.vae_align_proj_coeff=0"])
    images, y = batch()
    step_mod.micro_step(m, images, y, cfg, 0, 1.0, torch.Generator().manual_seed(0))
    grads = [p.grad for p in m.vae.parameters() if p.grad is not None]
    return sum(g.abs().sum().item() for g in grads)


def test_stop_grad_keeps_diffusion_loss_out_of_the_vae_and_the_ablation_lets_it_in():
    assert _vae_grad_from_sit_loss(stop_grad=True) == 0
    assert _vae_grad_from_sit_loss(stop_grad=False) > 0


def _grads_when_sit_forward_starts(cfg, m):
    """Micro-step; returns whether the VAE had its gradients when the SiT's training forward began,
    and all gradients afterwards."""
    seen = {}

    def note(module, args):  # the first SiT forward that trains it (the alignment pass is frozen)
        if any(p.requires_grad for p in module.parameters()):
            seen.setdefault("vae_grads_ready", m.vae.decoder.conv_out.weight.grad is not None)

    hook = m.sit_train.register_forward_pre_hook(note)
    images, y = batch()
    step_mod.micro_step(m, images, y, cfg, 0, 1.0, torch.Generator().manual_seed(0))
    hook.remove()
    grads = {n: p.grad.clone() for n, p in [*m.vae.named_parameters(), *m.sit.named_parameters()] if p.grad is not None}
    return seen["vae_grads_ready"], grads


def test_vae_backward_runs_before_the_sit_forward_with_the_gradients_of_one_backward(monkeypatch):
    # the VAE's graph (the step's largest) must be freed before the SiT's is built: at paper scale
    # holding both ran out of 80 GB at batch 32; the split must not change a single gradient
    cfg, m = make()
    ready, split = _grads_when_sit_forward_starts(cfg, m)
    assert ready
    real_backward = torch.Tensor.backward
    pending = []

    def one_backward(self, *a, **k):  # defer the VAE loss's backward and add it to the SiT's
        if not pending:
            pending.append(self)
            return None
        return real_backward(self + pending.pop(), *a, **k)

    cfg, m = make()
    monkeypatch.setattr(torch.Tensor, "backward", one_backward)
    ready, joint = _grads_when_sit_forward_starts(cfg, m)
    assert not ready and split.keys() == joint.keys() and len(split) > 10
    for name in split:
        torch.testing.assert_close(split[name], joint[name], rtol=1e-5, atol=1e-7, msg=name)
    cfg, m = make(["train.stop_grad=false"])
    monkeypatch.setattr(torch.Tensor, "backward", real_backward)
    assert not _grads_when_sit_forward_starts(cfg, m)[0]  # the ablation needs the VAE graph for the SiT loss


def test_frozen_vae_mode_has_no_vae_optimiser_and_fixed_bn():
    cfg, m = make(["train.tune_vae=false", "latent_norm.mode=fixed"])
    assert m.vae_opt is None and m.disc_opt is None
    stats = m.sit.bn.running_mean.clone()
    vae_w = m.vae.encoder.conv_in.weight.clone()
    repae_step(m, [batch()], cfg, step=0, gen=torch.Generator().manual_seed(0))
    assert torch.equal(stats, m.sit.bn.running_mean) and torch.equal(vae_w, m.vae.encoder.conv_in.weight)


def test_nonfinite_loss_skips_the_update():
    cfg, m = make()
    w = m.sit.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        m.vae.decoder.conv_out.bias.fill_(float("nan"))
    logs = repae_step(m, [batch()], cfg, step=0, gen=torch.Generator().manual_seed(0))
    assert logs["skipped"].item() == 1 and torch.equal(w, m.sit.blocks[0].attn.qkv.weight)


def test_ema_known_answers_with_and_without_warmup():
    from repae.train.ema import EMA

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    plain, warm = EMA(model, decay=0.99), EMA(model, decay=0.99, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    plain.update(model, step=0)
    warm.update(model, step=0)  # decay min(0.99, 1/10) = 0.1: the EMA moves 90% of the way
    assert torch.allclose(plain.model.weight, torch.full((1, 2), 0.01))
    assert torch.allclose(warm.model.weight, torch.full((1, 2), 0.9))
    assert warm.decay_at(10_000) == 0.99 and warm.decay_at(90) == 91 / 100


def test_channels_last_auto_picks_the_measured_layout():
    from repae.train.setup import uses_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = load_config("toy")
    assert uses_channels_last(auto, cpu) and not uses_channels_last(auto, cuda)
    assert not uses_channels_last(load_config("toy", overrides=["train.channels_last=false"]), cpu)
    assert uses_channels_last(load_config("toy", overrides=["train.channels_last=true"]), cuda)
    _, m = make()  # built on the CPU: NHWC convolutions
    assert m.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_regulariser_nets_take_their_own_layout():
    nhwc = torch.channels_last
    for overrides, vae_nhwc, reg_nhwc in ((["train.channels_last=false"], False, False),  # null follows the VAE's
                                          (["train.channels_last=false", "train.regulariser_channels_last=true"],
                                           False, True),
                                          (["train.regulariser_channels_last=false"], True, False)):
        _, m = make(overrides)
        first_disc_conv = next(p for p in m.regulariser.discriminator.parameters() if p.dim() == 4)
        assert m.vae.encoder.conv_in.weight.is_contiguous(memory_format=nhwc) == vae_nhwc, overrides
        assert first_disc_conv.is_contiguous(memory_format=nhwc) == reg_nhwc, overrides


def test_compiled_regions_keep_names_and_outputs():
    from repae.nn_utils import compile_regions

    torch.manual_seed(0)
    sit = randomize(SiT(tiny_sit_args(z_dims=[32], num_classes=10)), 0.02).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    names = list(sit.state_dict())
    with torch.no_grad():
        eager = sit(x, t, y).velocity
        compile_regions(sit)
        compiled = sit(x, t, y).velocity
    assert list(sit.state_dict()) == names  # checkpoints load either way
    assert all(block._compiled_call_impl is not None for block in sit.blocks)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_a_non_finite_discriminator_gradient_skips_the_step(monkeypatch):
    """The discriminator's gradient norm is checked with the losses before anything steps: an exploding
    discriminator neither poisons its own weights nor moves the SiT and the VAE."""
    cfg, m = make()
    real = m.regulariser.discriminator_terms

    def exploding(*args, **kwargs):
        terms = real(*args, **kwargs)
        return {**terms, "total": terms["total"] * float("inf")}  # the loss logs stay finite, the gradients do not

    monkeypatch.setattr(m.regulariser, "discriminator_terms", exploding)
    params = {"disc": m.regulariser.discriminator.main[0].weight, "sit": m.sit.blocks[0].attn.qkv.weight,
              "vae": m.vae.encoder.conv_in.weight}
    before = {k: p.detach().clone() for k, p in params.items()}
    logs = repae_step(m, [batch()], cfg, step=0, gen=torch.Generator().manual_seed(0))
    assert logs["skipped"].item() == 1 and not torch.isfinite(logs["grad_norm_disc"])
    assert torch.isfinite(logs["disc"]) and torch.isfinite(logs["grad_norm_sit"])
    for k, p in params.items():
        assert torch.equal(before[k], p), k
    assert all(p.grad is None for p in m.regulariser.discriminator.parameters())


def test_a_step_makes_the_host_wait_for_the_device_once():
    # On a GPU each read of a value back to the host (.item(), bool(), a data-dependent size) waits for every
    # kernel queued before it. The step reads one: the finite check of its losses and gradient norms, before the
    # updates. Counted here as the ops that read back, on the CPU, where the same ops run.
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    reads_back = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2",
                  "unique_dim", "unique_consecutive", "repeat_interleave", "bincount"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in reads_back:
                self.seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    cfg, m = make()
    gen = torch.Generator().manual_seed(0)
    repae_step(m, [batch()], cfg, step=0, gen=gen)  # lazy state (optimiser moments) first
    with Count() as count:
        logs = repae_step(m, [batch(seed=1)], cfg, step=1, gen=gen)
    assert "disc" in logs and "repa_vae" in logs  # every part of the step ran
    assert count.seen == {"_local_scalar_dense": 1}
