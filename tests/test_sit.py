import argparse

import pytest
import torch

from repae.models.sit import SiT, SiTArgs, sincos_pos_embed_2d
from repae.weights import load_model, save_model
from conftest import randomize, tiny_sit_args


def official_sit_state(depth=4, hidden=64, patch=2, channels=4, grid=4, classes=10, z_dims=(32, 48),
                       proj_dim=96, qk_norm=False, heads=4, bn=True):
    """A state dict with the key layout and shapes of the official REPA-E SiT checkpoints,
    written from that code's module structure (timm PatchEmbed/Attention/Mlp, build_mlp, bn)."""
    h, g = hidden, torch.Generator().manual_seed(0)
    shapes = {
        "x_embedder.proj.weight": (h, channels, patch, patch), "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, 256), "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h), "t_embedder.mlp.2.bias": (h,),
        "y_embedder.embedding_table.weight": (classes + 1, h),
        "pos_embed": (1, grid * grid, h),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,),
            b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
            b + "mlp.fc1.weight": (4 * h, h), b + "mlp.fc1.bias": (4 * h,),
            b + "mlp.fc2.weight": (h, 4 * h), b + "mlp.fc2.bias": (h,),
            b + "adaLN_modulation.1.weight": (6 * h, h), b + "adaLN_modulation.1.bias": (6 * h,),
        })
        if qk_norm:
            for n in ("q_norm", "k_norm"):
                shapes.update({b + f"attn.{n}.weight": (h // heads,), b + f"attn.{n}.bias": (h // heads,)})
    for k, z in enumerate(z_dims):
        p = f"projectors.{k}."
        shapes.update({p + "0.weight": (proj_dim, h), p + "0.bias": (proj_dim,),
                       p + "2.weight": (proj_dim, proj_dim), p + "2.bias": (proj_dim,),
                       p + "4.weight": (z, proj_dim), p + "4.bias": (z,)})
    shapes.update({"final_layer.linear.weight": (patch * patch * channels, h),
                   "final_layer.linear.bias": (patch * patch * channels,),
                   "final_layer.adaLN_modulation.1.weight": (2 * h, h),
                   "final_layer.adaLN_modulation.1.bias": (2 * h,)})
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    if bn:
        state["bn.running_mean"] = torch.randn(channels, generator=g)
        state["bn.running_var"] = torch.rand(channels, generator=g) + 0.5
        state["bn.num_batches_tracked"] = torch.tensor(7)
    return state


def test_our_keys_equal_the_official_layout():
    ours = SiT(tiny_sit_args(qk_norm=True)).state_dict()
    official = official_sit_state(qk_norm=True)
    assert set(ours) == set(official)
    assert all(tuple(ours[k].shape) == tuple(official[k].shape) for k in ours)


@pytest.mark.parametrize("entry", ["ema", "model"])
def test_official_training_checkpoint_loads_strictly_with_allowlisted_args(tmp_path, entry):
    ema, raw = official_sit_state(), official_sit_state()
    raw = {k: v + 1 for k, v in raw.items()}
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=2),
                "steps": 400000}, path)
    model = load_model(path, kind="sit", prefer_ema=(entry == "ema"), encoder_depth=2)
    expected = ema if entry == "ema" else raw
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    a = model.args
    assert (a.depth, a.hidden_size, a.patch_size, a.input_size, list(a.z_dims), a.num_classes, a.latent_norm) == (
        4, 64, 2, 8, [32, 48], 10, True)


def test_repa_checkpoint_without_bn_loads_as_model_without_bn(tmp_path):
    path = tmp_path / "repa.pt"
    torch.save(official_sit_state(bn=False), path)
    model = load_model(path, kind="sit")
    assert model.bn is None


def test_safetensors_round_trip_is_bit_identical(tmp_path, tiny_sit):
    path = save_model(tiny_sit, tmp_path / "sit.safetensors")
    loaded = load_model(path).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    a, b = tiny_sit(x, t, y), loaded(x, t, y)
    assert torch.equal(a.velocity, b.velocity)
    assert all(torch.equal(p, q) for p, q in zip(a.projected, b.projected))


def test_align_only_stops_at_encoder_depth_and_matches_full_pass(tiny_sit):
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    full = tiny_sit(x, t, y)
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(tiny_sit.blocks)]
    part = tiny_sit(x, t, y, align_only=True)
    for h in hooks:
        h.remove()
    assert ran == [0, 1] and part.velocity is None
    assert [p.shape for p in part.projected] == [torch.Size([2, 16, 32]), torch.Size([2, 16, 48])]
    for p, q in zip(full.projected, part.projected):
        torch.testing.assert_close(p, q)


def test_velocity_skips_the_projectors_and_equals_the_full_pass(tiny_sit):
    # the samplers call velocity() hundreds of times per image; the projectors feed only the REPA loss
    randomize(tiny_sit)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    full = tiny_sit(x, t, y)
    calls = []
    hooks = [p.register_forward_hook(lambda m, i, o: calls.append(1)) for p in tiny_sit.projectors]
    v = tiny_sit.velocity(x, t, y)
    for h in hooks:
        h.remove()
    assert calls == [] and len(tiny_sit.projectors) == 2
    assert torch.equal(v, full.velocity) and full.velocity.abs().sum() > 0
    with pytest.raises(ValueError, match="project"):
        tiny_sit(x, t, y, align_only=True, project=False)


def test_fresh_sit_predicts_zero_velocity_adaln_zero():
    model = SiT(tiny_sit_args())
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 10]))
    assert torch.equal(out.velocity, torch.zeros(2, 4, 8, 8))


def test_pos_embed_can_never_train():
    model = SiT(tiny_sit_args())
    model.requires_grad_(True)  # the reference's toggling turned its frozen pos_embed on
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" in model.state_dict()


def test_sincos_pos_embed_known_values():
    emb = sincos_pos_embed_2d(8, 3)  # [9, 8]; first half: column coordinate, second half: row
    # token 1 = (row 0, col 1): sin(1 * omega_0) with omega_0 = 1
    assert emb[1, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert emb[1, 4].item() == 0.0  # row 0 -> sin(0)
    assert emb[3, 0].item() == 0.0 and emb[3, 4].item() == pytest.approx(0.841471, abs=1e-6)  # (row 1, col 0)
    assert emb[0, 2].item() == 1.0  # cos(0)


def test_sdpa_and_math_attention_agree():
    a = randomize(SiT(tiny_sit_args(attention="sdpa", qk_norm=True))).eval()
    b = SiT(tiny_sit_args(attention="math", qk_norm=True)).eval()
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    torch.testing.assert_close(a.velocity(x, t, y), b.velocity(x, t, y), atol=1e-5, rtol=1e-5)


def test_sit_s_builds_with_its_own_width_and_null_class():
    model = SiT(SiTArgs(input_size=4, patch_size=2, hidden_size=384, depth=12, num_heads=6, num_classes=1000,
                        z_dims=[768]))
    assert model.final_layer.linear.in_features == 384
    assert model.y_embedder.embedding_table.num_embeddings == 1001 and model.null_class == 1000


def test_velocity_depends_on_label_and_time(tiny_sit):
    x = torch.randn(1, 4, 8, 8)
    v = lambda t, y: tiny_sit.velocity(x, torch.tensor([t]), torch.tensor([y]))
    assert not torch.allclose(v(0.3, 1), v(0.3, 10))
    assert not torch.allclose(v(0.3, 1), v(0.7, 1))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        SiT(tiny_sit_args(input_size=7))
    with pytest.raises(ValueError, match="encoder_depth"):
        SiT(tiny_sit_args(encoder_depth=5))


@pytest.mark.parametrize("size,depth,hidden,heads", [("S", 12, 384, 6), ("B", 12, 768, 12), ("L", 24, 1024, 16),
                                                     ("XL", 28, 1152, 16)])
@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_all_paper_sizes_build_with_official_shapes(size, depth, hidden, heads, patch):
    from repae.build import sit_args
    from repae.config import load_config

    cfg = load_config("sit-xl2-f8d4", overrides=[f"model.arch=SiT-{size}/{patch}", "encoder.names=[]"])
    with torch.device("meta"):
        model = SiT(sit_args(cfg, z_dims=[768]))
    state = model.state_dict()
    assert len(model.blocks) == depth and state["x_embedder.proj.weight"].shape == (hidden, 4, patch, patch)
    assert model.blocks[0].attn.num_heads == heads
    assert state["pos_embed"].shape == (1, (32 // patch) ** 2, hidden)


def test_time_scale_multiplies_t_before_the_sinusoids():
    from repae.models.sit import TimestepEmbedder

    a, b = TimestepEmbedder(32, time_scale=1000.0), TimestepEmbedder(32)
    b.load_state_dict(a.state_dict())
    t = torch.rand(4)
    torch.testing.assert_close(a(t), b(1000 * t))
    assert SiT(tiny_sit_args()).t_embedder.time_scale == 1.0  # the official convention by default


def test_activation_checkpointing_gives_the_same_outputs_and_gradients(tiny_sit):
    """Recomputing blocks in backward changes memory, not numbers (fp32, no dropout)."""
    randomize(tiny_sit)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])

    calls = []
    block_forward = tiny_sit.blocks[0].forward  # counted in forward itself: torch skips hooks on recompute
    tiny_sit.blocks[0].forward = lambda *a: calls.append(1) or block_forward(*a)

    def run(checkpointing: bool):
        calls.clear()
        tiny_sit.zero_grad(set_to_none=True)
        tiny_sit.activation_checkpointing = checkpointing
        out = tiny_sit(x, t, y)
        (out.velocity.square().mean() + out.projected[0].sum()).backward()
        return out.velocity.detach(), {n: p.grad.clone() for n, p in tiny_sit.named_parameters() if p.grad is not None}

    (v_plain, g_plain) = run(False)
    assert len(calls) == 1
    (v_ckpt, g_ckpt) = run(True)
    assert len(calls) == 2  # the block ran again in the backward pass
    del tiny_sit.blocks[0].forward
    assert torch.equal(v_plain, v_ckpt)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 10
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():  # no graph, nothing to recompute: the plain path
        assert torch.equal(tiny_sit(x, t, y).velocity, v_plain)


def test_activation_checkpointing_under_bf16_and_in_the_frozen_alignment_pass(tiny_sit):
    """The VAE's alignment pass runs the SiT with requires_grad off (frozen) and backpropagates into
    z after it is back on: recomputing there once made torch refuse the checkpoint. Frozen passes
    keep their activations; training passes recompute, with bf16 gradients equal to the plain path."""
    from repae.nn_utils import frozen

    randomize(tiny_sit)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    grads = []
    for checkpointing in (False, True):
        tiny_sit.zero_grad(set_to_none=True)
        tiny_sit.activation_checkpointing = checkpointing
        z = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with frozen(tiny_sit):
                aligned = tiny_sit(z, t, y, align_only=True).projected[0].float().sum()
            out = tiny_sit(x, t, y)
            loss = out.velocity.float().square().mean() + out.projected[0].float().sum()
        (aligned + loss).backward()
        grads.append(torch.cat([z.grad.flatten()] + [p.grad.flatten() for p in tiny_sit.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])
