import numpy as np
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
