"""Toy FID and class accuracy (repae.evaluate.toy) against answers known in closed form."""

import numpy as np
import pytest
import torch

from repae.evaluate.toy import class_accuracy, evaluator_outputs, gaussian, toy_fid
from repae.models.toy_teacher import ToyTeacher


def test_toy_fid_is_zero_for_the_same_features_and_the_squared_shift_for_a_translate():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 6))
    assert toy_fid(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    # same covariance, means differ by `shift`: the Fréchet distance is |shift|^2
    assert toy_fid(feats + shift, feats) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_toy_fid_of_two_scalings_of_one_sample_matches_the_closed_form():
    # a*X vs b*X: means a*m, b*m and covariances a^2 C, b^2 C, so sqrt(s1 s2) = ab C and
    # FID = (a-b)^2 |m|^2 + (a-b)^2 Tr(C), with m, C the sample's own mean and covariance
    rng = np.random.default_rng(1)
    base = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 1.0
    m, c = base.mean(0), np.cov(base, rowvar=False)
    assert toy_fid(2.0 * base, 0.5 * base) == pytest.approx(1.5**2 * (m @ m + np.trace(c)), rel=1e-6)


def test_gaussian_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        gaussian(np.zeros((1, 4)))


def test_class_accuracy_counts_argmax_hits():
    logits = torch.tensor([[3.0, 1.0], [0.0, 2.0], [5.0, 4.0], [1.0, 1.5]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.5


def test_evaluator_outputs_are_the_mean_pooled_tokens_and_their_head_and_do_not_depend_on_batching():
    torch.manual_seed(0)
    net = ToyTeacher(grid=8).eval()
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    feats, logits = evaluator_outputs(net, images, batch_size=3)
    with torch.no_grad():
        tokens = net(images)
        torch.testing.assert_close(torch.from_numpy(feats).float(), tokens.mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, net.logits(images), atol=1e-5, rtol=1e-5)
    feats_one, _ = evaluator_outputs(net, images, batch_size=7)
    np.testing.assert_allclose(feats, feats_one, atol=1e-5)
