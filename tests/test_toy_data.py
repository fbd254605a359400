import numpy as np
import pytest
import torch

from repae.data.toy import CLASSES, ToyShapes, render, toy_tensor


def test_images_are_a_pure_function_of_seed_and_index():
    a, la = render(123, seed=0)
    b, lb = render(123, seed=0)
    assert np.array_equal(a, b) and la == lb == 123 % 10
    assert not np.array_equal(a, render(123, seed=1)[0])
    ds = ToyShapes(20, offset=100)
    assert torch.equal(ds[3][0], torch.from_numpy(render(103)[0]).permute(2, 0, 1))


def test_contiguous_ranges_are_class_balanced_uint8_32px():
    x, y = toy_tensor(50)
    assert x.dtype == torch.uint8 and x.shape == (50, 3, 32, 32)
    assert torch.bincount(y).tolist() == [5] * len(CLASSES)


def test_images_vary_in_colour_and_layout_within_a_class():
    x, y = toy_tensor(200)
    circles = x[y == 0].float()
    assert circles.mean(dim=(2, 3)).std(dim=0).min() > 20  # mean colour per channel varies
    assert (circles[0] - circles[1]).abs().mean() > 10
    # the shape's position varies: centroid of the pixels that differ most from the corner colour
    corner = circles[:, :, :2, :2].mean(dim=(2, 3), keepdim=True)
    fg = ((circles - corner).abs().sum(1) > 120).float()
    cols = (fg.sum(1) * torch.arange(32.0)).sum(1) / fg.sum(dim=(1, 2)).clamp_min(1)
    assert cols.std() > 2


def test_out_of_range_index_raises():
    ds = ToyShapes(5)
    try:
        ds[5]
    except IndexError:
        return
    raise AssertionError("index 5 of a 5-image dataset must raise IndexError")


def test_bars_are_tilted_within_the_limit_and_by_varying_angles():
    # the bar (3:1) gives its tilt away: the principal axis of its pixels. Foreground = pixels far
    # from the corner colour (the same mask as above); image y grows downwards, hence the minus.
    from repae.data.toy import MAX_TILT_DEG

    x, y = toy_tensor(400)
    bars = x[y == CLASSES.index("bar")].float()
    corner = bars[:, :, :2, :2].mean(dim=(2, 3), keepdim=True)
    angles = []
    for fg in (bars - corner).abs().sum(1) > 120:
        rows, cols = torch.nonzero(fg, as_tuple=True)
        u, v = cols.float() - cols.float().mean(), -(rows.float() - rows.float().mean())
        angle = 0.5 * torch.atan2(2 * (u * v).mean(), (u * u).mean() - (v * v).mean())
        angles.append(float(torch.rad2deg(angle)))
    angles = torch.tensor(angles)
    assert angles.abs().max() < MAX_TILT_DEG + 4  # anti-aliased edges: a few degrees of slack
    assert angles.std() > MAX_TILT_DEG / 3  # uniform in +-20 degrees has std 11.5


def test_coverage_is_the_shapes_area_and_separates_shape_from_background_pixels():
    """A circle of radius r covers pi r^2 pixels (r is 30-42% of the 32-px width); fully covered pixels have
    the shape's colour, uncovered ones the background's, and the two differ in value by construction."""
    from repae.data.toy import RADIUS_RANGE, render_with_coverage

    lo, hi = (np.pi * (r * 32) ** 2 for r in RADIUS_RANGE)
    for i in range(0, 100, 10):  # class 0: circles
        image, label, coverage = render_with_coverage(i)
        assert label == 0 and np.array_equal(image, render(i)[0])
        assert coverage.min() >= 0 and coverage.max() <= 1
        assert lo - 4 <= coverage.sum() <= hi + 4
        inside, outside = image[coverage == 1].astype(float), image[coverage == 0].astype(float)
        assert abs(inside.max(axis=1).mean() - outside.max(axis=1).mean()) > 40  # HSV value 0.2 apart at least


def test_toy_arrays_with_coverage_quantise_the_renderers_coverage():
    from repae.data.toy import render_with_coverage, toy_arrays_with_coverage

    images, labels, coverage = toy_arrays_with_coverage(4, seed=3, offset=7)
    assert coverage.dtype == np.uint8 and coverage.shape == (4, 32, 32)
    for k in range(4):
        image, label, exact = render_with_coverage(7 + k, seed=3)
        assert labels[k] == label and np.array_equal(images[k], image.transpose(2, 0, 1))
        assert np.abs(coverage[k] / 255 - exact).max() <= 0.5 / 255 + 1e-6


def test_without_distractors_the_world_renders_exactly_as_toy_world_v7():
    """distractors=0 adds no random draw: the images and coverage are v7's, byte for byte (the hash of the
    first 20 of v7's cached training pool, seed 0), so v7 caches and reports stay valid."""
    import hashlib

    from repae.data.toy import toy_arrays_with_coverage

    images, _, coverage = toy_arrays_with_coverage(20, 0, 0)
    assert hashlib.sha256(images.tobytes() + coverage.tobytes()).hexdigest() == V7_FIRST_20


V7_FIRST_20 = "c574920fc3d109f409e1d5b122414798e29a743fb26be0ddb765af4668c75a3d"


def test_distractors_add_unlabelled_shapes_behind_the_labelled_one():
    from repae.data.toy import render_with_coverage

    grew = 0
    for i in range(60):
        img0, label0, cov0 = render_with_coverage(i, 0)
        img2, label2, cov2 = render_with_coverage(i, 0, distractors=2)
        assert label2 == label0 == i % len(CLASSES)  # the label stays the large shape's
        # the labelled shape is drawn as before (its draws come first) and on top: its coverage is kept
        assert np.all(cov2 >= cov0)
        # pixels wholly inside the labelled shape keep its colour, up to the pixel noise (std 3.8 levels in
        # each image, so ~5.4 in a difference); a distractor drawn over it would move them by far more
        diff = np.abs(img2[cov0 == 1.0].astype(int) - img0[cov0 == 1.0].astype(int))
        assert diff.mean() < 8 and diff.max() <= 40
        grew += cov2.sum() > cov0.sum() + 4  # at least a few pixels' worth of other shapes
    assert grew >= 55


def test_distractors_are_a_toy_world_setting_with_its_own_cache():
    from repae.config import ConfigError, ToyWorldConfig, load_config
    from repae.toyworld import cache_dir_for

    plain, busy = ToyWorldConfig(cache_dir="/c"), ToyWorldConfig(cache_dir="/c", distractors=2)
    assert cache_dir_for(plain).name == "toyworld-v7-n20000-h2000-t150-v600-b64-vb32-s0"  # v7's, unchanged
    assert cache_dir_for(busy).name == cache_dir_for(plain).name + "-d2"
    assert load_config("toy", overrides=["toy.distractors=2"]).toy.distractors == 2
    with pytest.raises(ConfigError, match="toy.distractors"):
        load_config("toy", overrides=["toy.distractors=9"])


def test_the_generator_trains_on_a_class_balanced_subset_when_asked():
    """toy.generator_images: the SiT's data is the first N training images, N/classes of each class;
    0 keeps all of them; a count the classes do not divide, or more than the world holds, is refused."""
    import types

    from repae.config import ConfigError, load_config
    from repae.toyworld import generator_data

    labels = torch.arange(100) % 10
    world = types.SimpleNamespace(train_images=torch.arange(100).view(100, 1, 1, 1).to(torch.uint8), train_labels=labels)
    cfg = load_config("toy", [], ["toy.generator_images=30"])
    images, got = generator_data(world, cfg.toy)
    assert images.flatten().tolist() == list(range(30)) and torch.bincount(got).tolist() == [3] * 10
    assert len(generator_data(world, load_config("toy", [], []).toy)[0]) == 100
    from repae.data.sources import training_batches

    cfg.data.source = "toy"
    batches = training_batches(cfg, world)  # what the training loop draws from
    seen = torch.cat([batches.next(10)[0] for _ in range(6)]).flatten()
    assert set(seen.tolist()) == set(range(30))  # two epochs of the 30, nothing else
    for bad in ("toy.generator_images=25", f"toy.generator_images={cfg.toy.train_size + 10}"):
        with pytest.raises(ConfigError, match="toy.generator_images"):
            load_config("toy", [], [bad])
