"""repae.muon: torch.optim.Muon's rule, extended to convolution filters."""

import pytest
import torch

from repae.muon import Muon, orthogonalise


def _steps(param: torch.Tensor, opt: torch.optim.Optimizer, grads) -> torch.Tensor:
    for g in grads:
        param.grad = g.clone()
        opt.step()
    return param.detach().clone()


def test_matches_torch_muon_on_a_matrix_when_both_orthogonalise_in_bf16():
    torch.manual_seed(0)
    start = torch.randn(24, 40)
    grads = [torch.randn(24, 40) for _ in range(4)]
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    a = _steps(ours, Muon([ours], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16), grads)
    b = _steps(theirs, torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), grads)
    assert not torch.equal(a, start)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_orthogonalise_approximates_the_polar_factor():
    torch.manual_seed(1)
    m = torch.randn(32, 96) @ torch.diag(torch.logspace(-2, 1, 96))  # badly conditioned
    o = orthogonalise(m)
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.6 and singular.max() < 1.3  # the quintic's band, not exactly 1
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    cosine = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cosine > 0.95
    # a tall matrix is orthogonalised through its transpose
    torch.testing.assert_close(orthogonalise(m.T), o.T)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_filter_moves_as_its_out_by_fan_in_matrix(channels_last):
    torch.manual_seed(2)
    start = torch.randn(16, 8, 3, 3)
    grads = [torch.randn(16, 8, 3, 3) for _ in range(3)]
    conv = torch.nn.Parameter(start.clone())
    if channels_last:
        conv = torch.nn.Parameter(start.clone().contiguous(memory_format=torch.channels_last))
        grads = [g.contiguous(memory_format=torch.channels_last) for g in grads]
    flat = torch.nn.Parameter(start.reshape(16, 72).clone())
    a = _steps(conv, Muon([conv], lr=0.01), grads)
    b = _steps(flat, Muon([flat], lr=0.01), [g.reshape(16, 72) for g in grads])
    torch.testing.assert_close(a.reshape(16, 72), b)


def test_refuses_vectors():
    with pytest.raises(ValueError, match="1-d parameter"):
        Muon([torch.nn.Parameter(torch.zeros(8))])
