"""FID family metrics against closed forms and brute-force NumPy versions of the ADM definitions."""

import math

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from repae.evaluate.fid import (
    InceptionScoreAccumulator, NpzImages, Reference, compute_fid_family, inception_score, load_reference,
)
from repae.evaluate.manifold import precision_recall, squared_distances
from repae.evaluate.stats import (FeatureStats, frechet_distance, frechet_distance_noise, frechet_distance_to_features,
                                  load_stats, save_stats)
from repae.models.inception import InceptionOutput

# ----------------------------------------------------------------------------- brute force (test-side)


def brute_is(probs: np.ndarray, split: int) -> float:
    """IS from its definition: per split exp(mean_i KL(p_i || p_split)), averaged; 0 log 0 = 0."""
    scores = []
    for start in range(0, len(probs), split):
        part = probs[start:start + split]
        marg = part.mean(axis=0)
        kls = []
        for p in part:
            kls.append(sum(pc * math.log(pc / mc) for pc, mc in zip(p, marg) if pc > 0))
        scores.append(math.exp(sum(kls) / len(kls)))
    return sum(scores) / len(scores)


def brute_pr(ref: np.ndarray, smp: np.ndarray, k: int = 3):
    """Precision/recall from the definition, float64, squared distances, k-th NN with self at index 0."""
    def sqd(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sqd(ref, ref), axis=1)[:, k]
    r_smp = np.sort(sqd(smp, smp), axis=1)[:, k]
    d = sqd(ref, smp)  # [N1, N2]
    precision = np.mean([(d[:, j] <= r_ref).any() for j in range(len(smp))])
    recall = np.mean([(d[i, :] <= r_smp).any() for i in range(len(ref))])
    return precision, recall


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_direct_computations_on_spd():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8)
    # scipy, as written in the TTUR/ADM formula
    direct = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    # symmetric route: tr sqrt(s1 s2) = sum sqrt(eig(s1^1/2 s2 s1^1/2))
    w, v = np.linalg.eigh(s1)
    half = (v * np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(half @ s2 @ half), 0, None)).sum()
    symmetric = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(direct, rel=1e-9)
    assert got == pytest.approx(symmetric, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_fallback_on_a_product_without_square_root():
    # sigma1 sigma2 = [[0,1],[0,0]] (nilpotent) has no square root: sqrtm is not finite, ADM adds
    # eps*I to both; sqrt((1+eps)(N + eps I)) has trace 2 sqrt(eps (1+eps)).
    eps = 1e-6
    s1, s2 = np.eye(2), np.array([[0.0, 1.0], [0.0, 0.0]])
    with pytest.warns(UserWarning, match="singular product"):
        got = frechet_distance(np.zeros(2), s1, np.ones(2), s2, eps=eps)
    expected = 2.0 + 2.0 + 0.0 - 2 * 2 * math.sqrt(eps * (1 + eps))
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariances_stay_finite():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 12))  # 5 samples in 12-D: rank-4 covariance
    stats = FeatureStats().update(x).mean_cov()
    assert np.linalg.matrix_rank(stats.sigma) == 4
    d = frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)
    assert math.isfinite(d) and abs(d) < 1e-6 * np.trace(stats.sigma)
    zero = np.zeros((12, 12))
    assert frechet_distance(np.zeros(12), zero, np.full(12, 2.0), zero) == pytest.approx(48.0)


# ----------------------------------------------------------------------------- streaming statistics


@pytest.mark.parametrize("n", [5, 40, 64, 200])  # fewer samples than dimensions (the low-rank path), equal, more
def test_frechet_distance_from_features_equals_the_matrix_square_root_formulas(n):
    rng = np.random.default_rng(n)
    d = 64
    feats = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) + 0.3
    ref = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) / 8
    mu2, sigma2 = ref.mean(0), np.cov(ref, rowvar=False)
    mu1, sigma1 = feats.mean(0), np.cov(feats, rowvar=False)
    # Tr sqrt(sigma1 sigma2) from the symmetric sigma1^1/2 sigma2 sigma1^1/2 (same eigenvalues)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    exact = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    got = frechet_distance_to_features(feats, mu2, sigma2)
    # sqrt of round-off-sized eigenvalues (rank-deficient sigma1) costs each route ~1e-8 relative
    assert got == pytest.approx(exact, rel=1e-7)
    assert got == pytest.approx(frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-7)  # ADM's sqrtm formula
    # the same set against its own statistics: zero
    own = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(frechet_distance_to_features(feats, *own)) < 1e-7 * np.trace(own[1])  # scipy sqrtm: 1e-7 at n=5
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_to_features(feats[:1], mu2, sigma2)


def test_frechet_distance_noise_is_the_spread_over_fresh_draws_of_the_samples():
    """The bootstrap std from one draw of N samples against the std of the distance over many
    independent draws of N from the same Gaussian (the known answer, up to sampling error)."""
    rng = np.random.default_rng(0)
    d, n = 16, 300
    scale = rng.uniform(0.5, 1.5, size=d)
    mu2, sigma2 = np.zeros(d), np.eye(d)
    draw = lambda: rng.normal(size=(n, d)) * scale + 0.15  # noqa: E731
    fresh = np.std([frechet_distance_to_features(draw(), mu2, sigma2) for _ in range(400)], ddof=1)
    boot = np.mean([frechet_distance_noise(draw(), mu2, sigma2, resamples=60, seed=s) for s in range(10)])
    assert 0.75 * fresh < boot < 1.33 * fresh, (boot, fresh)
    # samples that are all the same image: every resample is the same set, no spread
    same = np.tile(draw()[:1], (n, 1))
    assert frechet_distance_noise(same, mu2, sigma2) == pytest.approx(0.0, abs=1e-9)
    feats = draw()
    assert frechet_distance_noise(feats, mu2, sigma2, seed=3) == frechet_distance_noise(feats, mu2, sigma2, seed=3)


def test_streaming_stats_equal_numpy_in_uneven_batches():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=3.0, scale=2.0, size=(37, 9)).astype(np.float32)
    stats = FeatureStats()
    for a, b in [(0, 5), (5, 6), (6, 20), (20, 37)]:
        stats.update(torch.from_numpy(x[a:b]))
    mu, sigma = stats.mean_cov()
    assert stats.count == 37
    np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)

    half1, half2 = FeatureStats().update(x[:17]), FeatureStats().update(x[17:])
    merged = half1.merge(half2).mean_cov()
    np.testing.assert_allclose(merged.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, sigma, rtol=1e-12)
    assert FeatureStats(dim=9).all_reduce().count == 0  # single process: a no-op


def test_stats_file_uses_adm_keys(tmp_path):
    rng = np.random.default_rng(4)
    pool = FeatureStats().update(rng.normal(size=(10, 4))).mean_cov()
    spatial = FeatureStats().update(rng.normal(size=(10, 3))).mean_cov()
    path = save_stats(tmp_path / "ref_stats.npz", pool, spatial)
    with np.load(path) as f:
        assert sorted(f.keys()) == ["mu", "mu_s", "sigma", "sigma_s"]
    p2, s2 = load_stats(path)
    np.testing.assert_array_equal(p2.sigma, pool.sigma)
    np.testing.assert_array_equal(s2.mu, spatial.mu)


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_known_answers():
    c = 5
    assert inception_score(np.full((20, c), 1.0 / c), split_size=10) == pytest.approx(1.0)
    one_hot = np.eye(c)[np.arange(20) % c]  # each split of 10 holds every class twice
    assert inception_score(one_hot, split_size=10) == pytest.approx(float(c))


def test_inception_score_matches_definition_and_streams():
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=2.0, size=(23, 7))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = brute_is(probs, split=10)  # splits of 10, 10, 3
    assert inception_score(probs, split_size=10) == pytest.approx(expected, rel=1e-12)
    acc = InceptionScoreAccumulator(split_size=10)
    for a, b in [(0, 4), (4, 13), (13, 14), (14, 23)]:
        acc.update_logits(torch.from_numpy(logits[a:b]))
    assert acc.counts == [10, 10, 3]
    assert acc.score() == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------- precision / recall


def test_precision_recall_matches_definition():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    smp = (rng.normal(size=(30, 8)) * 0.8 + 1.0).astype(np.float32)
    expected = brute_pr(ref.astype(np.float64), smp.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a non-trivial case
    got = precision_recall(ref, smp, fp16=False, row_batch=7, col_batch=11)  # uneven blocks
    assert got == pytest.approx(expected)


def test_precision_recall_radius_semantics_known_answer():
    # 1-D points (padded to 4-D). Reference {0,1,2,3,4}: point 0's k=3 radius is 3^2 = 9 (the 3rd
    # nearest *other* point; self sits at index 0). Sample -3 is at squared distance 9 (inside,
    # `<=`), -3.5 at 12.25 (outside); the far samples are outside everything. Every reference
    # point is within the radius of sample -3 (its 3rd neighbour, -51, is 48 away).
    def pts(xs):
        out = np.zeros((len(xs), 4), np.float32)
        out[:, 0] = xs
        return out

    ref, smp = pts([0, 1, 2, 3, 4]), pts([-3, -3.5, -50, -51, -52, -53])
    for fp16 in (False, True):
        precision, recall = precision_recall(ref, smp, fp16=fp16)
        assert precision == pytest.approx(1 / 6) and recall == 1.0
    assert brute_pr(ref.astype(np.float64), smp.astype(np.float64)) == pytest.approx((1 / 6, 1.0))


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(25, 16)).astype(np.float32)
    for fp16 in (False, True):
        assert precision_recall(a, a.copy(), fp16=fp16) == (1.0, 1.0)
        assert precision_recall(a, a + 100.0, fp16=fp16) == (0.0, 0.0)


def test_fp16_distances_fall_back_to_fp32_on_overflow():
    rng = np.random.default_rng(8)
    ref = rng.normal(loc=300.0, size=(20, 8)).astype(np.float32)  # |x|^2 ~ 7e5 > fp16 max 65504
    smp = rng.normal(loc=300.0, size=(15, 8)).astype(np.float32)
    u, v = torch.from_numpy(ref), torch.from_numpy(smp)
    assert not torch.isfinite((u.half().float().square().sum(1)).half()).all()
    assert torch.equal(squared_distances(u, v, fp16=True), squared_distances(u, v, fp16=False))
    assert precision_recall(ref, smp, fp16=True) == pytest.approx(brute_pr(ref.astype(np.float64), smp.astype(np.float64)))


def test_fp16_distances_are_fp16_rounded():
    # |u|^2 = 100, |v|^2 ~ 0.01: fp16 has a spacing of 1/16 near 100, so ADM's fp16 block gives 100
    u, v = torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 0.1]])
    assert squared_distances(u, v, fp16=True).item() == 100.0
    assert squared_distances(u, v, fp16=False).item() == pytest.approx(100.01, rel=1e-6)
    # |u|^2 = 1e6 overflows fp16 (max 65504): that block is recomputed exactly in float32
    big = squared_distances(torch.tensor([[1000.0, 0.0]]), torch.tensor([[0.0, 1.0]]), fp16=True)
    assert big.item() == 1000001.0


# ----------------------------------------------------------------------------- reference batches & pipeline


class LinearInception(nn.Module):
    """Stand-in with the InceptionV3 interface: features are fixed linear maps of the pixels."""

    def __init__(self, pixels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_pool = nn.Parameter(torch.randn(pixels, 6, generator=g) / pixels**0.5)
        self.w_spatial = nn.Parameter(torch.randn(pixels, 5, generator=g) / pixels**0.5)
        self.w_cls = nn.Parameter(torch.randn(6, 4, generator=g))

    def features(self, images: torch.Tensor):
        flat = images.float().flatten(1) / 255.0
        pool = flat @ self.w_pool
        return pool, flat @ self.w_spatial, pool @ self.w_cls

    def forward(self, images, autocast=None):
        return InceptionOutput(*self.features(images))


def _save_images(path, images_nchw: np.ndarray, **extra):
    np.savez(path, arr_0=images_nchw.transpose(0, 2, 3, 1), **extra)


def test_npz_images_stream_in_batches(tmp_path):
    rng = np.random.default_rng(9)
    imgs = rng.integers(0, 256, size=(11, 3, 4, 5), dtype=np.uint8)
    _save_images(tmp_path / "b.npz", imgs)
    batches = list(NpzImages(tmp_path / "b.npz", batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 3] and len(NpzImages(tmp_path / "b.npz", 4)) == 3
    np.testing.assert_array_equal(torch.cat(batches).numpy(), imgs)


def test_reference_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        load_reference(tmp_path / "nowhere.npz")
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(KeyError, match="arr_0.*mu, sigma, mu_s, sigma_s"):
        load_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(KeyError, match="needs the reference images"):
        load_reference(tmp_path / "stats.npz", need_features=True)
    ref = load_reference(tmp_path / "stats.npz")  # stats only: no network needed
    assert ref.spatial is None and ref.pool_feats is None
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        NpzImages(tmp_path / "float.npz")


def test_compute_fid_family_end_to_end(tmp_path):
    rng = np.random.default_rng(10)
    ref_imgs = rng.integers(0, 256, size=(14, 3, 4, 4), dtype=np.uint8)
    smp_imgs = np.clip(rng.integers(0, 256, size=(12, 3, 4, 4)) * 0.8 + 30, 0, 255).astype(np.uint8)
    _save_images(tmp_path / "ref.npz", ref_imgs)
    net = LinearInception(3 * 4 * 4)

    with torch.no_grad():
        rp, rs, _ = (t.double().numpy() for t in net.features(torch.from_numpy(ref_imgs)))
        sp, ss, sl = (t.double().numpy() for t in net.features(torch.from_numpy(smp_imgs)))
    probs = np.exp(sl) / np.exp(sl).sum(1, keepdims=True)
    expected_fid = frechet_distance(sp.mean(0), np.cov(sp, rowvar=False), rp.mean(0), np.cov(rp, rowvar=False))
    expected_sfid = frechet_distance(ss.mean(0), np.cov(ss, rowvar=False), rs.mean(0), np.cov(rs, rowvar=False))

    batches = [torch.from_numpy(smp_imgs[a:b]) for a, b in [(0, 5), (5, 12)]]
    got = compute_fid_family(iter(batches), net, tmp_path / "ref.npz", is_split_size=5, progress=False, pr_fp16=False)
    assert got["num_images"] == 12
    assert got["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert got["sfid"] == pytest.approx(expected_sfid, rel=1e-6)
    assert got["inception_score"] == pytest.approx(brute_is(probs, split=5), rel=1e-6)
    assert (got["precision"], got["recall"]) == pytest.approx(brute_pr(rp, sp))

    # identical sample and reference sets: FID 0, precision = recall = 1
    same = compute_fid_family([torch.from_numpy(ref_imgs)], net, tmp_path / "ref.npz", progress=False)
    assert same["fid"] == pytest.approx(0.0, abs=1e-9) and same["sfid"] == pytest.approx(0.0, abs=1e-9)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)

    # precomputed statistics in the reference file win (as in ADM); no precision/recall needed
    _save_images(tmp_path / "ref2.npz", ref_imgs, mu=sp.mean(0), sigma=np.cov(sp, rowvar=False),
                 mu_s=ss.mean(0), sigma_s=np.cov(ss, rowvar=False))
    own = compute_fid_family(batches, net, tmp_path / "ref2.npz", with_precision_recall=False, progress=False)
    assert own["fid"] == pytest.approx(0.0, abs=1e-9) and own["precision"] is None


def test_compute_fid_family_needs_reference_features():
    ref = Reference(pool=FeatureStats().update(np.eye(3)).mean_cov(), spatial=None)
    with pytest.raises(ValueError, match="pool features"):
        compute_fid_family([], LinearInception(3), ref, progress=False)


# ----------------------------------------------------------------------------- two processes


def _all_reduce_worker(rank: int, port: int, x: np.ndarray, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        part = x[:13] if rank == 0 else x[13:]  # uneven shares
        mu, sigma = FeatureStats(dim=x.shape[1]).update(part).all_reduce().mean_cov()
        np.savez(f"{out_dir}/rank{rank}.npz", mu=mu, sigma=sigma)
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow  # spawns two processes: ~2-3 s
def test_feature_stats_all_reduce_over_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x = np.random.default_rng(11).normal(size=(30, 5))
    mp.spawn(_all_reduce_worker, args=(port, x, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as f:
            np.testing.assert_allclose(f["mu"], x.mean(0), rtol=1e-12)
            np.testing.assert_allclose(f["sigma"], np.cov(x, rowvar=False), rtol=1e-10)


def test_reference_that_is_not_an_npz(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="not an .npz"):
        load_reference(tmp_path / "plain.npy")
    with pytest.raises(ValueError, match="not an .npz"):
        NpzImages(tmp_path / "plain.npy")
