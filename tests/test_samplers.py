import torch

from repae.generate import sample_noise
from repae.sample import Guidance, euler_maruyama, euler_ode, guided_velocity, sde_time_grid

S = 0.5  # data std of the analytic Gaussian world


def gaussian_velocity(x, t, y):
    """Exact flow-matching velocity for data N(0, S^2) on the linear path (t=0 data)."""
    t = t.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
    var = (1 - t) ** 2 * S**2 + t**2
    return ((t - (1 - t) * S**2) / var * x.double()).to(x.dtype)


def test_euler_constant_field_is_exact():
    x1 = torch.randn(3, 2, 4, 4)
    out = euler_ode(lambda x, t, y: torch.ones_like(x) * 2.0, x1, torch.zeros(3, dtype=torch.long), num_steps=7)
    torch.testing.assert_close(out, x1.double() - 2.0)


def test_euler_and_heun_reach_closed_form_flow_map():
    # the probability-flow ODE of a Gaussian scales x: x_0 = S * x_1 exactly
    x1 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    exact = S * x1
    scale = x1.abs().max().item()
    err = {n: (euler_ode(gaussian_velocity, x1, y, n, model_dtype=torch.float64) - exact).abs().max().item() / scale
           for n in (25, 50, 100)}
    assert err[100] < 0.01
    assert 1.7 < err[50] / err[100] < 2.3  # first order
    heun = euler_ode(gaussian_velocity, x1, y, 25, heun=True, model_dtype=torch.float64)
    # Heun (second order; its last step to t=0 is plain Euler) with 25 steps beats Euler with 100
    assert (heun - exact).abs().max().item() / scale < err[100] / 3


def test_sde_without_diffusion_equals_ode_on_same_grid():
    x1 = torch.randn(4, 2, 3, 3)
    y = torch.zeros(4, dtype=torch.long)
    sde = euler_maruyama(gaussian_velocity, x1, y, num_steps=30, diffusion=lambda t: 0.0)
    ode = euler_ode(gaussian_velocity, x1, y, time_grid=sde_time_grid(30))
    torch.testing.assert_close(sde, ode)


def test_sde_samples_the_data_distribution():
    x1 = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(4000, dtype=torch.long)
    out = euler_maruyama(gaussian_velocity, x1, y, num_steps=250, generator=torch.Generator().manual_seed(2),
                         model_dtype=torch.float64)
    assert abs(out.std().item() - S) < 0.03 and abs(out.mean().item()) < 0.03


def label_model(x, t, y):
    """Velocity that depends on the label: v = y (broadcast)."""
    return y.to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone()


def test_cfg_scale_one_equals_conditional_and_uses_one_forward():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return label_model(x, t, y)

    x = torch.randn(3, 1, 2, 2)
    y = torch.tensor([1, 2, 3])
    v = guided_velocity(model, x.double(), 0.5, y, Guidance(scale=1.0, null_class=10))
    torch.testing.assert_close(v, label_model(x, None, y).double())
    assert calls == [3]


def test_cfg_formula_inside_interval_only():
    seen = []

    def model(x, t, y):
        seen.append((round(float(t[0]), 6), x.shape[0]))
        return label_model(x, t, y)

    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([1, 3])
    g = Guidance(scale=4.0, low=0.3, high=0.6, null_class=10)
    # v_u + s (v_c - v_u) with v_c = y, v_u = 10
    torch.testing.assert_close(guided_velocity(model, x, 0.5, y, g)[:, 0, 0, 0],
                               torch.tensor([10 + 4 * (1 - 10.0), 10 + 4 * (3 - 10.0)], dtype=torch.float64))
    seen.clear()
    euler_ode(model, torch.zeros(2, 1, 2, 2), y, num_steps=10, guidance=g)
    for t, batch in seen:
        assert batch == (4 if 0.3 <= t <= 0.6 else 2), (t, batch)
    assert {t for t, b in seen if b == 4} == {0.6, 0.5, 0.4, 0.3}


def test_noise_depends_only_on_seed_and_index():
    a = sample_noise(range(6), (2, 3, 3), seed=5)
    b = torch.cat([sample_noise(range(0, 4), (2, 3, 3), 5), sample_noise(range(4, 6), (2, 3, 3), 5)])
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_noise(range(6), (2, 3, 3), seed=6))


def test_sde_sample_does_not_depend_on_its_batch():
    """Per-index Brownian streams: generating 4 samples in one batch or in batches of 1 and 3 gives
    the same samples (the model here acts on each row alone)."""
    from repae.generate import _seed_for

    def model(x, t, y):
        return -x + 0.1 * y.view(-1, 1, 1, 1).double()

    noise = sample_noise(range(4), (1, 2, 2), seed=3).double()
    y = torch.arange(4)
    gens = lambda idx: [torch.Generator().manual_seed(_seed_for(3, i, stream=1)) for i in idx]  # noqa: E731
    whole = euler_maruyama(model, noise, y, num_steps=20, generator=gens(range(4)))
    parts = torch.cat([euler_maruyama(model, noise[:1], y[:1], num_steps=20, generator=gens(range(1))),
                       euler_maruyama(model, noise[1:], y[1:], num_steps=20, generator=gens(range(1, 4)))])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)
    other = euler_maruyama(model, noise, y, num_steps=20, generator=gens(range(10, 14)))
    assert not torch.allclose(whole, other)


def test_generate_images_builds_no_autograd_graph_inside_training():
    # the training loop samples grids with grad enabled: the VAE decode must not record a graph
    from conftest import tiny_sit_args, tiny_vae_args
    from repae.generate import generate_images
    from repae.models.sit import SiT
    from repae.models.vae import AutoencoderKL

    torch.manual_seed(0)
    sit, vae = SiT(tiny_sit_args(num_classes=10)), AutoencoderKL(tiny_vae_args())
    seen = []
    vae.decoder.register_forward_hook(lambda mod, args, out: seen.append(out.requires_grad))
    with torch.enable_grad():
        images = generate_images(sit, vae, torch.tensor([0, 1]), num_steps=2, batch_size=2, progress=False)
    assert images.dtype == torch.uint8 and seen == [False]
