"""FID InceptionV3: key layout of pt_inception-2015-12-05-6726825d.pth, TF1 resize, output taps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repae.models.inception import (
    WEIGHTS_FILE, InceptionV3, InceptionWeightsError, _avg_pool_tf, preprocess, resize_bilinear_tf1,
)
from repae.weights import CheckpointError

# ----------------------------------------------------------------------------- expected layout
# Written from pytorch-fid's fid_inception_v3 (torchvision Inception3, 1008 classes, no aux
# logits): (layer, in, out, kh, kw) per conv; every conv has a BN with 4 tensors.


def _a(cin, pf):
    return [("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
            ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
            ("branch_pool", cin, pf, 1, 1)]


def _b(cin):
    return [("branch3x3", cin, 384, 3, 3), ("branch3x3dbl_1", cin, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3),
            ("branch3x3dbl_3", 96, 96, 3, 3)]


def _c(cin, c7):
    return [("branch1x1", cin, 192, 1, 1), ("branch7x7_1", cin, c7, 1, 1), ("branch7x7_2", c7, c7, 1, 7),
            ("branch7x7_3", c7, 192, 7, 1), ("branch7x7dbl_1", cin, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
            ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1), ("branch7x7dbl_5", c7, 192, 1, 7),
            ("branch_pool", cin, 192, 1, 1)]


def _d(cin):
    return [("branch3x3_1", cin, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3), ("branch7x7x3_1", cin, 192, 1, 1),
            ("branch7x7x3_2", 192, 192, 1, 7), ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]


def _e(cin):
    return [("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3),
            ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
            ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", cin, 192, 1, 1)]


CONVS = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
         ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
for _name, _spec in [("Mixed_5b", _a(192, 32)), ("Mixed_5c", _a(256, 64)), ("Mixed_5d", _a(288, 64)),
                     ("Mixed_6a", _b(288)), ("Mixed_6b", _c(768, 128)), ("Mixed_6c", _c(768, 160)),
                     ("Mixed_6d", _c(768, 160)), ("Mixed_6e", _c(768, 192)), ("Mixed_7a", _d(768)),
                     ("Mixed_7b", _e(1280)), ("Mixed_7c", _e(2048))]:
    CONVS += [(f"{_name}.{layer}", *shape) for layer, *shape in _spec]


def fid_weight_shapes():
    shapes = {}
    for name, cin, cout, kh, kw in CONVS:
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for t in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{t}"] = (cout,)
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


def fake_fid_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in fid_weight_shapes().items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    return state


# ----------------------------------------------------------------------------- weights


def test_state_dict_layout_is_the_fid_port():
    shapes = fid_weight_shapes()
    assert len(CONVS) == 94 and len(shapes) == 472
    own = {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}
    assert own == shapes  # same names, same shapes, and no num_batches_tracked


def test_from_file_loads_strictly(tmp_path):
    state = fake_fid_state()
    torch.save(state, tmp_path / WEIGHTS_FILE)
    net = InceptionV3.from_file(tmp_path / WEIGHTS_FILE)
    assert torch.equal(net.Mixed_6d.branch7x7_2.conv.weight, state["Mixed_6d.branch7x7_2.conv.weight"])
    assert torch.equal(net.Mixed_7c.branch_pool.bn.running_var, state["Mixed_7c.branch_pool.bn.running_var"])
    # a copy saved from a torchvision-style module carries BN counters: accepted, they hold nothing
    counters = {f"{name}.bn.num_batches_tracked": torch.tensor(0) for name, *_ in CONVS}
    torch.save({**state, **counters}, tmp_path / "with_counters.pth")
    InceptionV3.from_file(tmp_path / "with_counters.pth")


def test_missing_or_unexpected_key_is_named(tmp_path):
    state = fake_fid_state()
    del state["Mixed_6d.branch1x1.bn.running_var"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: Mixed_6d\.branch1x1\.bn\.running_var"):
        InceptionV3.from_file(tmp_path / "missing.pth")
    state = fake_fid_state()
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    torch.save(state, tmp_path / "aux.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: AuxLogits\.fc\.weight"):
        InceptionV3.from_file(tmp_path / "aux.pth")


def test_missing_weight_file_names_the_expected_file(tmp_path):
    for path in (tmp_path / "nowhere.pth", None):
        with pytest.raises(InceptionWeightsError, match=r"pt_inception-2015-12-05-6726825d\.pth.*pytorch-fid"):
            InceptionV3.from_file(path)


# ----------------------------------------------------------------------------- preprocessing


def test_tf1_resize_1d_and_2d_known_values():
    up = resize_bilinear_tf1(torch.tensor([[[[0.0, 3.0]]]]), (1, 3))
    assert up.flatten().tolist() == [0.0, 2.0, 3.0]  # samples x = 0, 2/3, 4/3 (clamped)
    torch_half_pixel = F.interpolate(torch.tensor([[[[0.0, 3.0]]]]), size=(1, 3), mode="bilinear", align_corners=False)
    assert torch_half_pixel.flatten().tolist() == [0.0, 1.5, 3.0]  # what TF1 does not do
    four_to_six = resize_bilinear_tf1(torch.tensor([[[[0.0, 10.0, 20.0, 30.0]]]]), (1, 6)).flatten()
    assert four_to_six.tolist() == pytest.approx([0, 20 / 3, 40 / 3, 20, 80 / 3, 30], rel=1e-6)
    six_to_four = resize_bilinear_tf1(torch.arange(0.0, 60.0, 10.0).view(1, 1, 1, 6), (1, 4)).flatten()
    assert six_to_four.tolist() == [0.0, 15.0, 30.0, 45.0]  # x = 0, 1.5, 3, 4.5; no antialiasing
    square = resize_bilinear_tf1(torch.tensor([[[[0.0, 3.0], [6.0, 9.0]]]]), 3)[0, 0]
    np.testing.assert_allclose(square.numpy(), [[0, 2, 3], [4, 6, 7], [6, 8, 9]], rtol=1e-6)


def test_preprocess_is_identity_resize_then_graph_normalisation():
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    x = preprocess(images)
    assert torch.equal(x, (images.float() - 128) / 128)
    assert preprocess(torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)).shape == (1, 3, 299, 299)
    assert preprocess(torch.full((1, 3, 5, 7), 255, dtype=torch.uint8)).unique().tolist() == [127 / 128]
    with pytest.raises(TypeError, match="uint8"):
        preprocess(torch.zeros(1, 3, 8, 8))


def test_tf_average_pool_ignores_padding():
    assert torch.equal(_avg_pool_tf(torch.ones(1, 2, 5, 5)), torch.ones(1, 2, 5, 5))
    net = InceptionV3()
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool


# ----------------------------------------------------------------------------- outputs


def _constant_network():
    """All conv weights 0 and BN = identity + bias, so every layer outputs relu(its BN bias)."""
    net = InceptionV3()
    with torch.no_grad():
        for name, module in net.named_modules():
            if hasattr(module, "conv") and hasattr(module, "bn"):
                module.conv.weight.zero_()
                module.bn.weight.fill_(1.0)
                module.bn.running_mean.zero_()
                module.bn.running_var.fill_(1.0 - module.bn.eps)
                module.bn.bias.fill_(0.5)
        for layer, value in [("branch1x1", 0.1), ("branch3x3_2a", 0.2), ("branch3x3_2b", -0.3),
                             ("branch3x3dbl_3a", 0.4), ("branch3x3dbl_3b", 0.5), ("branch_pool", 0.6)]:
            getattr(net.Mixed_7c, layer).bn.bias.fill_(value)
        net.Mixed_6d.branch1x1.bn.bias.copy_(torch.arange(192) * 0.1 - 0.25)
        net.fc.weight.copy_(torch.randn(1008, 2048))
        net.fc.bias.fill_(100.0)
    return net


def test_outputs_known_answer_with_constant_layers():
    net = _constant_network()
    out = net(torch.randint(0, 256, (2, 3, 40, 33), dtype=torch.uint8))
    # pool_3 = Mixed_7c's concat [1x1 (320), 3x3 a|b (384|384), 3x3dbl a|b (384|384), pool (192)]
    expected_pool = torch.cat([torch.full((320,), 0.1), torch.full((384,), 0.2), torch.zeros(384),
                               torch.full((384,), 0.4), torch.full((384,), 0.5), torch.full((192,), 0.6)])
    assert out.pool.shape == (2, 2048) and out.pool.dtype == torch.float32
    torch.testing.assert_close(out.pool, expected_pool.expand(2, -1))
    # spatial: channels 0..6 of Mixed_6d.branch1x1 = relu(c*0.1-0.25), flattened in HWC order
    seven = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.15, 0.25, 0.35])
    assert out.spatial.shape == (2, 17 * 17 * 7)
    torch.testing.assert_close(out.spatial, seven.repeat(17 * 17).expand(2, -1))
    # logits: pool @ W^T without the bias (ADM's IS)
    torch.testing.assert_close(out.logits, out.pool @ net.fc.weight.t())


def test_spatial_is_mixed_6d_branch1x1_in_hwc_order():
    net = InceptionV3()
    with torch.no_grad():
        for b in net.modules():
            if hasattr(b, "running_var"):
                b.bias.normal_(0.1, 0.2)  # non-trivial, partly negative pre-ReLU
    seen = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    out = net(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    tap = seen["x"]  # [1,192,17,17], post BN+ReLU
    assert tap.shape == (1, 192, 17, 17) and (tap == 0).any() and (tap > 0).any()
    torch.testing.assert_close(out.spatial, tap[:, :7].permute(0, 2, 3, 1).reshape(1, -1), rtol=0, atol=0)


def test_bf16_autocast_returns_close_fp32_features():
    torch.manual_seed(0)
    net = InceptionV3()
    with torch.no_grad():
        for b in net.modules():
            if hasattr(b, "running_var"):
                b.bias.normal_(0.1, 0.2)
    images = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8)
    ref, low = net(images), net(images, autocast=torch.bfloat16)
    for a, b in zip(ref, low):
        assert b.dtype == torch.float32
        assert (a - b).norm() / a.norm() < 0.05
