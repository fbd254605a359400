"""The toy teacher's layout head and its targets: which token sees which pixel, and augmentation that keeps
images and targets together."""

import numpy as np
import pytest
import torch

from repae.models.toy_teacher import ToyTeacher, patch_coverage
from repae.toyworld import flip_and_turn, train_teacher


@pytest.mark.parametrize("grid", [4, 8])
def test_each_pixel_lands_in_the_token_of_its_patch_in_raster_order(grid):
    p = 32 // grid
    for y, x in [(0, 0), (9, 17), (31, 30), (15, 16)]:
        coverage = torch.zeros(1, 32, 32)
        coverage[0, y, x] = 1
        (hit,) = patch_coverage(coverage, grid).nonzero().tolist()
        assert hit == [0, (y // p) * grid + x // p, (y % p) * p + x % p]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_flips_and_turns_move_the_coverage_with_the_image(flip, turns):
    torch.manual_seed(turns)
    coverage = torch.rand(2, 32, 32)
    coverage[:, :5, :9] = 1.0  # not symmetric under any flip or turn
    images = torch.stack([coverage * 255, torch.zeros_like(coverage), coverage.flip(1)], dim=1)
    out, moved = flip_and_turn(images, coverage, flip, turns)
    torch.testing.assert_close(out[:, 0], moved * 255)
    assert flip_and_turn(images, None, flip, turns)[1] is None
    if flip or turns:
        assert not torch.equal(moved, coverage)


def test_the_evaluator_is_a_classifier_without_a_layout_head():
    with pytest.raises(ValueError, match="no layout head"):
        ToyTeacher(grid=8).coverage_logits(torch.zeros(1, 64, 128))
    assert not any("coverage" in k for k in ToyTeacher(grid=8).state_dict())


def test_training_with_coverage_teaches_the_layout_head():
    """Bright squares at random places on a dark ground: after a short training the layout head finds them
    better than the best layout-blind guess (every pixel at the mean coverage), and only a teacher given
    coverage has a head."""
    g = torch.Generator().manual_seed(0)
    corners = torch.randint(0, 20, (64, 2), generator=g)
    coverage = torch.zeros(64, 32, 32, dtype=torch.uint8)
    for k, (y, x) in enumerate(corners.tolist()):
        coverage[k, y : y + 12, x : x + 12] = 255
    images = coverage.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.arange(64) % 10
    target = patch_coverage(coverage.float() / 255, 4)
    teacher = train_teacher(images, labels, steps=80, batch=16, coverage=coverage, progress=False)
    with torch.no_grad():
        error = (torch.sigmoid(teacher.coverage_logits(teacher(images))) - target).abs().mean()
    blind = (target.mean() - target).abs().mean()
    assert error < 0.7 * blind, (error, blind)  # measured 0.14 against 0.24
    assert train_teacher(images, labels, steps=1, batch=4, progress=False).coverage_head is None


def _ridge_r2(x: torch.Tensor, y: torch.Tensor, train: int) -> float:
    """Held-out R^2 of a ridge regression from x [N,D] to y [N,K], fitted on the first `train` rows."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    y = y.double()
    w = torch.linalg.solve(x[:train].T @ x[:train] + 1e-2 * torch.eye(x.shape[1], dtype=x.dtype), x[:train].T @ y[:train])
    residual = ((x[train:] @ w - y[train:]) ** 2).sum()
    return float(1 - residual / ((y[train:] - y[train:].mean(0)) ** 2).sum())


@pytest.mark.slow
def test_the_teachers_tokens_know_more_of_the_layout_than_class_and_position_do(tmp_path):
    """The property DINOv2's patch tokens have and a classifier's lose (repae.models.toy_teacher's note): with the
    preset's recipe, a linear probe of one token predicts its patch's shape coverage far better than the class and
    the token's position alone do. A teacher trained only to classify fails this (R^2 0.53 against 0.61)."""
    from repae import toyworld
    from repae.config import load_config

    spec = load_config("toy").toy
    train_x, train_y, train_cov = toyworld._pool(tmp_path / "train.npz", spec.train_size, 0, "train", progress=False)
    held_x, held_y, held_cov = toyworld._pool(tmp_path / "held.npz", 2000, 1000, "held", progress=False)
    teacher = train_teacher(train_x, train_y, spec.teacher_steps, spec.batch_size, coverage=train_cov,
                            progress=False)
    with torch.no_grad():
        tokens = torch.cat([teacher(held_x[i : i + 500]) for i in range(0, len(held_x), 500)])
    n, grid = len(held_x), 4
    covered = patch_coverage(held_cov.float() / 255, grid).mean(dim=2).reshape(n * grid * grid, 1)
    class_and_position = torch.einsum("nc,tp->ntcp", torch.nn.functional.one_hot(held_y, 10).float(),
                                      torch.eye(grid * grid)).reshape(n * grid * grid, -1)
    train = int(0.7 * n) * grid * grid
    from_tokens = _ridge_r2(tokens.reshape(n * grid * grid, -1), covered, train)
    from_class = _ridge_r2(class_and_position, covered, train)
    assert from_tokens > from_class + 0.2, (from_tokens, from_class)
    assert toyworld.teacher_layout_iou(teacher, held_x, held_cov) > 0.75  # 0.81 in the v7 world build
    assert toyworld.teacher_accuracy(teacher, held_x, held_y) > 0.98
    assert np.isfinite(from_tokens)


# ------------------------------------------------------------------ the evaluator's scene factors (toy world v8)


def test_scene_factors_are_the_drawn_colours_and_size_of_each_rendered_image():
    """Known answers from the renderer: pixels fully inside the labelled shape have its colour (up to the faint
    noise), and a circle (class 0) covers pi * radius^2 of the image."""
    from repae.data.toy import SCENE_FACTORS, render_with_coverage, scene_factors

    factors = scene_factors(30, seed=3)
    assert factors.shape == (30, len(SCENE_FACTORS)) and factors.dtype == np.float32
    for i in range(30):
        image, label, cov = render_with_coverage(i, seed=3)
        inside = image[cov == 1.0].astype(np.float32) / 255
        np.testing.assert_allclose(inside.mean(axis=0), factors[i, :3], atol=0.01)
        if label == 0:
            assert abs(cov.mean() / (np.pi * factors[i, 9] ** 2) - 1) < 0.03
    assert not np.allclose(scene_factors(5, seed=4), factors[:5])  # another seed, other scenes


def test_coverage_factors_give_the_area_and_centre_of_a_known_block():
    from repae.toyworld import coverage_factors

    coverage = torch.zeros(2, 32, 32)
    coverage[0, 4:12, 20:28] = 1.0  # an 8x8 block centred at x = 24, y = 8 pixels
    torch.testing.assert_close(coverage_factors(coverage),
                               torch.tensor([[64 / 1024, 24 / 32, 8 / 32], [0.0, 0.5, 0.5]]))


def test_the_evaluator_learns_to_read_the_scene_off_its_mean_token():
    """Images whose only factor is their grey level (and a square at a random place): after a short training the
    factor head predicts the grey level far better than the blind guess, and only `scene` gives a factor head."""
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(64, 1, generator=g)
    images = (grey.view(64, 1, 1, 1) * 255).expand(64, 3, 32, 32).to(torch.uint8).contiguous()
    coverage = torch.zeros(64, 32, 32, dtype=torch.uint8)
    for k, (y, x) in enumerate(torch.randint(0, 20, (64, 2), generator=g).tolist()):
        coverage[k, y : y + 12, x : x + 12] = 255
    labels = torch.arange(64) % 10
    net = train_teacher(images, labels, steps=60, batch=16, grid=8, coverage=coverage, scene=grey, progress=False)
    assert net.coverage_head is None and net.factor_head.out_features == 4
    with torch.no_grad():
        predicted = net.factor_predictions(net(images))[:, 0]
    standardised = (grey[:, 0] - grey.mean()) / grey.std()
    assert (predicted - standardised).pow(2).mean() < 0.2  # blind guess (0): 1.0
    assert train_teacher(images, labels, steps=1, batch=4, grid=8, progress=False).factor_head is None
    with pytest.raises(ValueError, match="no factor head"):
        ToyTeacher(grid=8).factor_predictions(torch.zeros(1, 64, 128))


def test_the_evaluator_is_built_once_and_read_back_with_its_factor_head(tmp_path):
    from repae.config import ToyWorldConfig
    from repae.models.vae import VAEArgs
    from repae.toyworld import EVALUATOR_FILE, ensure_toy_evaluator, ensure_toy_world

    spec = ToyWorldConfig(cache_dir=str(tmp_path), train_size=40, heldout_size=20, teacher_steps=2, vae_steps=1,
                          batch_size=8, vae_batch_size=4)
    args = VAEArgs(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[], norm_groups=4)
    world = ensure_toy_world(args, spec, progress=False, device="cpu")
    built = ensure_toy_evaluator(world, spec, progress=False, device="cpu")
    assert (world.cache_dir / EVALUATOR_FILE).is_file() and built.factor_head is not None
    assert world.report["evaluator_version"] == "v8" and world.report["evaluator_heldout_factor_r2"] <= 1.0
    again = ensure_toy_evaluator(ensure_toy_world(args, spec, progress=False, device="cpu"), spec, progress=False)
    for (name, a), (_, b) in zip(built.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_factor_r2_is_one_for_a_perfect_read_out_and_zero_for_a_blind_one(tmp_path):
    """evaluator_factor_r2 against known answers: any affine map of the true held-out factors scores 1 (the
    head's outputs are standardised, so scale and offset are fitted), a constant scores 0."""
    from repae.config import ToyWorldConfig
    from repae.data.toy import scene_factors
    from repae.models.vae import VAEArgs
    from repae.toyworld import (HELDOUT_SEED_OFFSET, _read_pool, ensure_toy_world, evaluator_factor_r2,
                                evaluator_targets)

    spec = ToyWorldConfig(cache_dir=str(tmp_path), train_size=20, heldout_size=30, teacher_steps=1, vae_steps=1,
                          batch_size=4, vae_batch_size=4)
    args = VAEArgs(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[], norm_groups=4)
    world = ensure_toy_world(args, spec, progress=False, device="cpu")
    coverage = _read_pool(world.cache_dir / "heldout.npz", 30)[2]
    truth = evaluator_targets(torch.from_numpy(scene_factors(30, HELDOUT_SEED_OFFSET)), coverage)

    class ReadOut:  # stands in for an evaluator: its "tokens" are the images, its head returns `answer`
        def __init__(self, answer):
            self.answer = answer

        def __call__(self, images):
            return images

        def factor_predictions(self, tokens):
            return self.answer[: len(tokens)]

    assert evaluator_factor_r2(ReadOut(3 * truth - 1), world) == pytest.approx(1.0, abs=1e-6)
    assert evaluator_factor_r2(ReadOut(torch.zeros_like(truth)), world) == pytest.approx(0.0, abs=1e-6)


def test_the_world_builds_every_part_on_the_gpu_when_there_is_one(tmp_path, monkeypatch):
    """Issue 21: on a machine with a GPU the world build (teacher, VAE, evaluator) trains on it. With torch
    reporting a GPU, each part's training is handed the GPU (and runs on the CPU in its place here), and
    report.json says where each part trained."""
    import json

    from repae import toyworld
    from repae.config import ToyWorldConfig
    from repae.models.vae import VAEArgs

    asked = []
    real_teacher, real_vae = toyworld.train_teacher, toyworld.train_toy_vae

    def teacher(*args, device="cpu", **kwargs):
        asked.append(("teacher or evaluator", str(device)))
        return real_teacher(*args, device="cpu", **kwargs)

    def vae(images, steps, batch, vae_args, seed=0, progress=True, device="cpu"):
        asked.append(("vae", str(device)))
        return real_vae(images, steps, batch, vae_args, seed, progress, "cpu")

    monkeypatch.setattr(toyworld, "train_teacher", teacher)
    monkeypatch.setattr(toyworld, "train_toy_vae", vae)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = ToyWorldConfig(cache_dir=str(tmp_path), train_size=40, heldout_size=20, teacher_steps=1, vae_steps=1,
                          batch_size=8, vae_batch_size=4)
    args = VAEArgs(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[], norm_groups=4)
    world = toyworld.ensure_toy_world(args, spec, progress=False)  # device: auto
    toyworld.ensure_toy_evaluator(world, spec, progress=False)
    assert asked == [("teacher or evaluator", "cuda"), ("vae", "cuda"), ("teacher or evaluator", "cuda")]
    report = json.loads((world.cache_dir / "report.json").read_text())
    assert [report[f"{part}_build_device"] for part in ("teacher", "vae", "evaluator")] == ["cuda"] * 3
