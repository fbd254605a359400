import pytest
import torch

from repae.flow import (denoising_loss, drop_labels, interpolate, path_coefficients, sample_time,
                        score_from_velocity, velocity_target)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_velocity_target_is_time_derivative_of_interpolant(path):
    x0, eps = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(5, 4, 3, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.98 + 0.01
    _, dxdt = torch.func.jvp(lambda tt: interpolate(x0, eps, tt, path), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(velocity_target(x0, eps, t, path), dxdt)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_endpoints_t0_is_data_t1_is_noise(path):
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(3), path), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(3), path), eps)


def test_linear_velocity_is_noise_minus_data():
    x0, eps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(velocity_target(x0, eps, torch.rand(2)), eps - x0)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_exact_gaussian_velocity(path):
    # data x0 ~ N(0, s^2): x_t ~ N(0, a^2 s^2 + sig^2), E[v | x_t] = (a a' s^2 + sig sig') / var * x
    s = 0.7
    t = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    c = path_coefficients(t.view(3, 1, 1, 1), path)
    var = c.alpha**2 * s**2 + c.sigma**2
    v = (c.alpha * c.d_alpha * s**2 + c.sigma * c.d_sigma) / var * x
    torch.testing.assert_close(score_from_velocity(v, x, t, path), -x / var)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_time_has_median_one_half(path):
    # sigma/alpha = exp(N(0,1)) has median 1, i.e. alpha = sigma, which is t = 0.5 on both paths
    t = sample_time(20000, "lognormal", path, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02


def test_uniform_time_range_and_mean():
    t = sample_time(20000, "uniform", generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.01


def test_unknown_schemes_are_errors():
    with pytest.raises(ValueError, match="time sampling"):
        sample_time(2, "beta")
    with pytest.raises(ValueError, match="path_type"):
        path_coefficients(torch.rand(2), "edm")


def test_denoising_loss_known_value():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    torch.testing.assert_close(denoising_loss(pred, target), torch.tensor([1.0, 4.0]))


def test_drop_labels_rate_and_null_id():
    y = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(y, 0.1, null_class=10, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(y, 0.0, 10), y)
