import pytest
import torch

from repae.models.vae import AutoencoderKL, DiagonalGaussian, VAEArgs
from repae.weights import load_latent_stats, load_model, save_model, vae_args_from_state
from conftest import randomize, tiny_vae_args


def official_ldm_vae_keys(ch, ch_mult, nrb, z, attn_levels):
    """Key -> shape of a CompVis/REPA-E AutoencoderKL, written from that code's structure."""
    keys = {}

    def conv(name, cin, cout, k):
        keys[name + ".weight"], keys[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[name + ".weight"], keys[name + ".bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin); conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout); conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(name + ".norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(side, c):
        resnet(f"{side}.mid.block_1", c, c); attn(f"{side}.mid.attn_1", c); resnet(f"{side}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if attn_levels[i]:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder", cin); norm("encoder.norm_out", cin); conv("encoder.conv_out", cin, 2 * z, 3)
    conv("quant_conv", 2 * z, 2 * z, 1); conv("post_quant_conv", z, z, 1)
    cin = ch * ch_mult[-1]
    conv("decoder.conv_in", z, cin, 3); mid("decoder", cin)
    for i in reversed(range(len(ch_mult))):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
            if attn_levels[i]:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin); conv("decoder.conv_out", cin, 3, 3)
    return keys


@pytest.mark.parametrize("name,ch_mult,z,attn", [
    ("f8d4", [1, 2, 4, 4], 4, [False] * 4),
    ("f16d32", [1, 1, 2, 2, 4], 32, [False, False, False, False, True]),  # attention at 16px of 256
])
def test_paper_vae_keys_equal_official_layout(name, ch_mult, z, attn):
    with torch.device("meta"):
        ours = AutoencoderKL(VAEArgs(ch=128, ch_mult=ch_mult, num_res_blocks=2, z_channels=z)).state_dict()
    official = official_ldm_vae_keys(128, ch_mult, 2, z, attn)
    assert set(ours) == set(official)
    assert all(tuple(ours[k].shape) == official[k] for k in ours)


def test_official_pt_state_dict_loads_strictly_and_layout_is_inferred(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.05
             for k, s in official_ldm_vae_keys(32, [1, 2, 2], 1, 4, [False, False, True]).items()}
    torch.save(state, tmp_path / "vae.pt")
    # widths 32/64 fit 1..32 groups and a bare state dict does not say which: the count is passed
    # (without it the load is refused: tests/test_vae_export_roundtrip.py)
    vae = load_model(tmp_path / "vae.pt", kind="vae", norm_groups=32)
    assert (vae.args.ch, list(vae.args.ch_mult), vae.args.num_res_blocks, vae.args.z_channels) == (32, [1, 2, 2], 1, 4)
    assert vae.args.attn_levels() == [False, False, True]
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())


def test_full_repae_checkpoint_yields_its_vae(tmp_path, tiny_vae):
    torch.save({"vae": tiny_vae.state_dict(), "ema": {}, "model": {}}, tmp_path / "ckpt.pt")
    vae = load_model(tmp_path / "ckpt.pt", kind="vae", args=tiny_vae.args)
    assert all(torch.equal(v, tiny_vae.state_dict()[k]) for k, v in vae.state_dict().items())


def test_safetensors_round_trip_decodes_bit_identically(tmp_path):
    vae = randomize(AutoencoderKL(tiny_vae_args(attn_resolutions=[64])), 0.02).eval()
    loaded = load_model(save_model(vae, tmp_path / "vae.safetensors")).eval()
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(vae.decode(z), loaded.decode(z))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(vae.encode(x).mean, loaded.encode(x).mean)


def test_shapes_and_downsampling():
    vae = AutoencoderKL(tiny_vae_args())
    posterior, z, recon = vae(torch.zeros(2, 3, 32, 32))
    assert z.shape == (2, 4, 8, 8) and recon.shape == (2, 3, 32, 32) and vae.downsample_factor == 4


def test_kl_of_standard_normal_is_zero_and_matches_closed_form():
    zero = DiagonalGaussian(torch.zeros(2, 8, 3, 3))  # mean 0, logvar 0
    assert torch.equal(zero.kl(), torch.zeros(2))
    moments = torch.randn(2, 8, 3, 3)
    mean, logvar = moments.chunk(2, dim=1)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=[1, 2, 3])
    torch.testing.assert_close(DiagonalGaussian(moments).kl(), expected)


def test_official_latent_stats_file(tmp_path):
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 4.0, 5.0, 1.0])
    torch.save({"latents_scale": (1 / std).view(1, 4, 1, 1), "latents_bias": mean.view(1, 4, 1, 1)},
               tmp_path / "sdvae-f8d4-latents-stats.pt")
    m, v = load_latent_stats(tmp_path / "sdvae-f8d4-latents-stats.pt")
    torch.testing.assert_close(m, mean)
    torch.testing.assert_close(v, std**2)


def test_layout_inference_from_state():
    args = vae_args_from_state(AutoencoderKL(tiny_vae_args(attn_resolutions=[128])).state_dict())
    assert args.attn_levels() == [False, True, False]



def _norm_input():
    from repae.models.vae import GroupNorm
    torch.manual_seed(0)
    norm = GroupNorm(8, 16, eps=1e-6)
    with torch.no_grad():  # weights off (1, 0): bf16 rounding of them would show
        norm.weight.normal_()
        norm.bias.normal_()
    return norm, (torch.randn(4, 16, 8, 8) * 3 + 1).bfloat16()


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_on_a_cpu_gives_what_nn_group_norm_gives_under_cpu_autocast(channels_last):
    """The official VAE's nn.GroupNorm under CPU bf16 autocast: bf16 input, fp32 affine, bf16 out. Ours gives
    the same numbers in both layouts; a channels-last input (normalised in fp32 there: PyTorch's kernel for it is
    several times slower) keeps its layout, and gradients reach the input and the fp32 weights."""
    norm, x = _norm_input()
    official = torch.nn.GroupNorm(8, 16, eps=1e-6)
    official.load_state_dict(norm.state_dict())
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = norm(x), official(x.detach())
    assert y.dtype == expected.dtype == torch.bfloat16 and torch.equal(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.abs().sum() > 0


def test_group_norm_off_a_cpu_keeps_bf16_with_bf16_affine(monkeypatch):
    """On a GPU (here the meta device, which autocast does not know: its context is stubbed) the input's bf16 goes
    through with bf16 affine weights, where autocast would have run fp32: the memory saving."""
    import contextlib

    import torch.nn.functional as F
    from repae.models.vae import GroupNorm

    seen = []
    real = F.group_norm
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(F, "group_norm", lambda x, g, w, b, eps: seen.append((x.dtype, w.dtype, b.dtype)) or
                        real(x, g, w, b, eps))
    y = GroupNorm(8, 16).to("meta")(torch.empty(4, 16, 8, 8, dtype=torch.bfloat16, device="meta"))
    assert y.dtype == torch.bfloat16 and seen == [(torch.bfloat16,) * 3]


def _official_attn_block(m, x):
    """The official (LDM/REPA-E) AttnBlock.forward, written from that code: bmm, scale, softmax, bmm."""
    hn = m.norm(x)
    q, k, v = m.q(hn), m.k(hn), m.v(hn)
    b, c, h, w = q.shape
    weights = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
    weights = torch.nn.functional.softmax(weights, dim=2).permute(0, 2, 1)
    return x + m.proj_out(torch.bmm(v.reshape(b, c, h * w), weights).reshape(b, c, h, w))


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_under_cpu_autocast_gives_the_official_numbers(channels_last):
    """Under CPU bf16 autocast the VAE's attention takes the official code's products (SDPA's CPU kernel is
    slower at these sizes and rounds elsewhere): the same output and input gradient, to the bit; without
    autocast (SDPA) the two agree to fp32 rounding."""
    from repae.models.vae import AttnBlock

    torch.manual_seed(0)
    block = randomize(AttnBlock(16, 8))
    x = torch.randn(2, 16, 4, 4) * 2
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for fn in (block, lambda t: _official_attn_block(block, t)):
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xg)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y)
        grads.append(xg.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    torch.testing.assert_close(block(x), _official_attn_block(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 4, 1, 2)])
def test_upsample_in_phases_is_the_official_upsample_then_conv(shape, channels_last):
    """The sub-pixel form (four 2x2 convs, interleaved) against nearest 2x then the 3x3 conv, in float64: the
    output and the gradients of input, weight and bias agree to rounding; the output keeps the input's layout.
    The tensor-op form that torch.compile traces gives the same."""
    from repae.models import vae as vae_module

    torch.manual_seed(0)
    up = randomize(vae_module.Upsample(shape[1]), scale=1.0).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=torch.float64)
    results = []
    for fn in (up, up.reference):
        xg = x.clone().requires_grad_()
        y = fn(xg)
        grads = torch.autograd.grad((y * weight).sum(), (xg, up.conv.weight, up.conv.bias))
        results.append((y, *grads))
    for ours, official in zip(*results):
        torch.testing.assert_close(ours, official, atol=1e-12, rtol=1e-12)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert results[0][0].abs().sum() > 0
    with pytest.MonkeyPatch.context() as mp:  # the branch torch.compile traces
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        torch.testing.assert_close(up(x), results[0][0], atol=1e-12, rtol=1e-12)


def test_upsample_in_phases_takes_16_multiply_adds_per_input_pixel_not_36():
    from torch.utils.flop_counter import FlopCounterMode

    from repae.models.vae import Upsample

    up, x = Upsample(8), torch.randn(2, 8, 6, 6)
    counts = []
    for fn in (up, up.reference):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn(x)
        counts.append(counter.get_total_flops())
    assert counts == [2 * 2 * (4 * 8) * 8 * 4 * 7 * 7, 2 * 2 * 8 * 8 * 9 * 12 * 12]  # 2 FLOPs per multiply-add


def test_upsample_in_phases_rounds_like_the_official_form_under_bf16():
    """Under CPU bf16 autocast both forms differ from the float64 value by bf16 rounding (of the output, mostly);
    the sub-pixel form's summed taps round once where the official form rounds each: its mean error is within
    5% of the official form's (0.5% larger, seed 0)."""
    from repae.models.vae import Upsample

    torch.manual_seed(0)
    up = randomize(Upsample(32), scale=0.1)
    x = torch.randn(4, 32, 8, 8)
    exact = up.double().reference(x.double()).float()
    up.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors = [(fn(x).float() - exact).abs().mean().item() for fn in (up, up.reference)]
    assert 0 < errors[0] <= errors[1] * 1.05
