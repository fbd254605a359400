"""CKNNA / mutual kNN against a loop implementation of the published formula; SiT alignment."""


import numpy as np
import pytest
import torch

from repae.evaluate.cknna import (
    cknna,
    mutual_knn,
    prepare_features,
    sit_encoder_alignment,
    sit_hidden_at_depth,
)
from repae.flow import interpolate
from repae.generate import sample_noise
from repae.models.sit import SiT

from conftest import randomize, tiny_sit_args


# ------------------------------------------------ a direct loop implementation (PRH definition)

def _knn_sets(gram, k, exclude_self):
    n = len(gram)
    sets = []
    for i in range(n):
        cands = [j for j in range(n) if not (exclude_self and j == i)]
        cands.sort(key=lambda j: -gram[i][j])
        sets.append(set(cands[:k]))
    return sets


def _hsic_unbiased_loops(k, l):
    """Song et al. (2012) eq. 5, with zero diagonals, written as explicit sums."""
    n = len(k)
    kt = [[0.0 if i == j else k[i][j] for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else l[i][j] for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(map(sum, kt))
    sum_l = sum(map(sum, lt))
    one_kl_one = sum(kt[i][j] * lt[j][m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * one_kl_one / (n - 2)) / (n * (n - 3))


def _hsic_biased_loops(k, l):
    n = len(k)
    h = [[(1.0 if i == j else 0.0) - 1.0 / n for j in range(n)] for i in range(n)]
    def mm(a, b):
        return [[sum(a[i][t] * b[t][j] for t in range(n)) for j in range(n)] for i in range(n)]
    prod = mm(mm(mm(k, h), l), h)
    return sum(prod[i][i] for i in range(n))


def _cknna_loops(a, b, k, unbiased=True):
    a, b = a.double().tolist(), b.double().tolist()
    n = len(a)
    K = [[float(np.dot(a[i], a[j])) for j in range(n)] for i in range(n)]
    L = [[float(np.dot(b[i], b[j])) for j in range(n)] for i in range(n)]
    nk, nl = _knn_sets(K, k, unbiased), _knn_sets(L, k, unbiased)
    def masked(G, rows_a, rows_b):
        return [[G[i][j] if (j in rows_a[i] and j in rows_b[i]) else 0.0 for j in range(n)] for i in range(n)]
    hsic = _hsic_unbiased_loops if unbiased else _hsic_biased_loops
    s_kl = hsic(masked(K, nk, nl), masked(L, nk, nl))
    s_kk = hsic(masked(K, nk, nk), masked(K, nk, nk))
    s_ll = hsic(masked(L, nl, nl), masked(L, nl, nl))
    return s_kl / (np.sqrt(s_kk * s_ll) + 1e-6)


def _feats(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------ CKNNA

@pytest.mark.parametrize("unbiased", [True, False])
def test_cknna_matches_loop_implementation(unbiased):
    a = _feats(12, 5, 0)
    b = a[:, :3] @ _feats(3, 7, 1) + 0.5 * _feats(12, 7, 2)  # partly related features
    got = cknna(a, b, topk=4, unbiased=unbiased)
    assert got == pytest.approx(_cknna_loops(a, b, 4, unbiased), rel=1e-9, abs=1e-12)
    assert 0.05 < abs(got) < 0.999  # a non-trivial value, not a degenerate 0 or 1


def test_cknna_identical_features_is_one():
    # large-norm features so the source's +1e-6 in the denominator is negligible
    a = 10 * _feats(40, 16, 3)
    assert cknna(a, a, topk=10) == pytest.approx(1.0, abs=1e-9)


def test_cknna_invariances():
    a = 10 * _feats(40, 16, 4)
    b = 10 * (a[:, :8] + 0.7 * _feats(40, 8, 5))
    base = cknna(a, b, topk=10)
    assert cknna(a, 3.7 * b, topk=10) == pytest.approx(base, rel=1e-9)  # isotropic scaling
    q, _ = torch.linalg.qr(_feats(8, 8, 6))
    assert cknna(a, b @ q, topk=10) == pytest.approx(base, rel=1e-9)  # rotation: same Gram matrix
    # not symmetric: with row-wise (unsymmetrised) masks, 1^T K~ L~ 1 != 1^T L~ K~ 1 -- as in the source
    swapped = cknna(b, a, topk=10)
    assert swapped == pytest.approx(_cknna_loops(b, a, 10), rel=1e-9)
    assert swapped == pytest.approx(base, rel=0.05)
    assert cknna(a, a @ torch.linalg.qr(_feats(16, 16, 7))[0], topk=10) == pytest.approx(1.0, abs=1e-9)


def test_cknna_of_unrelated_features_is_small():
    a, b = prepare_features(_feats(300, 32, 8)), prepare_features(_feats(300, 32, 9))
    assert abs(cknna(a, b, topk=10)) < 0.2
    assert cknna(a, a, topk=10) > 0.99


def test_cknna_argument_checks():
    a = _feats(10, 4, 0)
    with pytest.raises(ValueError):
        cknna(a, a, topk=1)
    with pytest.raises(NotImplementedError):
        cknna(a, a, topk=3, distance_agnostic=True)
    assert cknna(10 * a, 10 * a, topk=None) == pytest.approx(1.0, abs=1e-6)  # k = n-1


# ------------------------------------------------ mutual kNN

def test_mutual_knn_identical_and_known_overlap():
    a = _feats(30, 6, 10)
    assert mutual_knn(a, a, topk=5) == 1.0
    q, _ = torch.linalg.qr(_feats(6, 6, 11))
    assert mutual_knn(a, a @ q, topk=5) == 1.0
    # 1-D positive features: by inner product every row's neighbours are the k largest values
    # (excluding itself); reversing the order of B makes them the k smallest instead
    x = torch.arange(1.0, 11.0)[:, None]
    y = (11.0 - torch.arange(1.0, 11.0))[:, None]
    k = 3
    na = _knn_sets(x.squeeze(1).outer(x.squeeze(1)).tolist(), k, True)
    nb = _knn_sets(y.squeeze(1).outer(y.squeeze(1)).tolist(), k, True)
    expected = np.mean([len(na[i] & nb[i]) / k for i in range(10)])
    assert mutual_knn(x, y, topk=k) == pytest.approx(expected)
    assert expected < 0.5


# ------------------------------------------------ SiT hidden states and alignment

def _tiny_sit(encoder_depth=2):
    return randomize(SiT(tiny_sit_args(encoder_depth=encoder_depth, latent_norm=False))).eval()


def test_hidden_at_depth_matches_sit_forward():
    sit2 = _tiny_sit(encoder_depth=2)
    sit3 = _tiny_sit(encoder_depth=3)
    sit3.load_state_dict(sit2.state_dict())
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([0, 3, 10])
    with torch.no_grad():
        for sit, depth in ((sit2, 2), (sit3, 3)):
            ref = sit(x, t, y, align_only=True).hidden
            assert torch.allclose(sit_hidden_at_depth(sit2, x, t, y, depth), ref, atol=1e-6)
    with pytest.raises(ValueError):
        sit_hidden_at_depth(sit2, x, t, y, 5)


def test_sit_encoder_alignment_with_its_own_features_is_one():
    sit = _tiny_sit()
    n, t, depth = 24, 0.3, 3
    z = torch.randn(n, 4, 8, 8)
    labels = torch.randint(0, 10, (n,))
    # the "encoder" features are the SiT's own mean-pooled tokens on the same noised latents,
    # scaled and rotated (CKNNA cannot see either)
    eps = sample_noise(range(n), (4, 8, 8), seed=0)
    x_t = interpolate(z, eps, torch.full((n,), t))
    own = sit_hidden_at_depth(sit, x_t, torch.full((n,), t), labels, depth)  # [n,N,D]
    q, _ = torch.linalg.qr(torch.randn(own.shape[-1], own.shape[-1]))
    enc = 5.0 * own @ q
    score = sit_encoder_alignment(sit, z, labels, enc, t=t, depth=depth, topk=5, batch_size=7)
    assert score > 0.999
    # a different noise level or depth gives different hidden states, hence a lower score
    other = sit_encoder_alignment(sit, z, labels, own, t=0.9, depth=depth, topk=5)
    assert other < score
    # batch size does not change the answer (per-sample noise seeds)
    again = sit_encoder_alignment(sit, z, labels, enc, t=t, depth=depth, topk=5, batch_size=24)
    assert again == pytest.approx(score, abs=1e-6)
    assert not sit.training
