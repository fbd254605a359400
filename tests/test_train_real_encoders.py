"""`repae train` on an image folder aligned to two published-layout encoders at once
(registry sizes, random weights written in their official formats)."""

import json

import torch

from repae.cli import main
from repae.config import load_config
from repae.models.encoders import build_network, encoder_spec
from repae.train.loop import setup_run, train
from test_folder_data import make_folder


def _write_official(tmp_path):
    """DINOv2-S in its hub layout (37x37 grid) and MoCo v3 ViT-S in its training-checkpoint layout."""
    dino = build_network(encoder_spec("dinov2-vit-s"), 518).state_dict()
    torch.save(dino, tmp_path / "dinov2_vits14_pretrain.pth")
    moco = build_network(encoder_spec("mocov3-vit-s"), 224).state_dict()
    torch.save({"epoch": 300, "state_dict": {f"module.base_encoder.{k}": v for k, v in moco.items()}},
               tmp_path / "vit-s-300ep.pth.tar")
    return [str(tmp_path / "dinov2_vits14_pretrain.pth"), str(tmp_path / "vit-s-300ep.pth.tar")]


def _cfg(tmp_path, paths, *extra):
    return load_config("toy", overrides=[
        "data.source=folder", f"data.path={make_folder(tmp_path / 'data', per_class=4, size=(70, 64))}",
        "data.image_size=64", "data.num_workers=0", "model.arch=SiT-T/4", "model.depth=2", "model.hidden_size=48",
        "model.num_heads=2", "model.encoder_depth=1", "model.projector_dim=64",
        "encoder.names=[dinov2-vit-s,mocov3-vit-s]", f"encoder.paths=[{paths[0]},{paths[1]}]",
        "train.global_batch_size=4", "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2",
        "train.sample_every=100", "sample.num_samples=4", "sample.batch_size=4", "sample.num_steps=2",
        "eval.num_samples=4", f"output_dir={tmp_path / 'runs'}", *extra])


def test_two_encoders_each_get_a_projector_and_stay_frozen(tmp_path):
    paths = _write_official(tmp_path)
    cfg = _cfg(tmp_path, paths)
    run = setup_run(cfg)
    assert [e.spec.name for e in run.m.encoders] == ["dinov2-vit-s", "mocov3-vit-s"]
    assert [p[-1].out_features for p in run.m.sit.projectors] == [384, 384]
    enc_params = {id(p) for e in run.m.encoders for p in e.parameters()}
    assert enc_params and not any(p.requires_grad for e in run.m.encoders for p in e.parameters())
    for opt in (run.m.sit_opt, run.m.vae_opt, run.m.disc_opt):
        if opt is not None:  # no optimiser owns an encoder parameter
            assert not enc_params & {id(p) for g in opt.param_groups for p in g["params"]}
    summary = train(cfg, progress=False)
    assert summary["steps_this_invocation"] == 2
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["repa_sit"])) for r in rows)
    assert -1.0 <= rows[-1]["repa_sit"] / cfg.loss.proj_coeff <= 1.0  # mean over two cosine terms


def test_missing_encoder_file_is_a_clear_cli_error(tmp_path, capsys):
    make_folder(tmp_path / "data", per_class=2, size=(64, 64))
    code = main(["train", "--no-progress", "data.source=folder", f"data.path={tmp_path / 'data'}",
                 "data.image_size=256", "model.arch=SiT-T/2", "vae.arch=f8d4", "encoder.names=[dinov2-vit-b]",
                 f"encoder.paths=[{tmp_path / 'missing.pth'}]", f"output_dir={tmp_path / 'runs'}",
                 "model.num_classes=2", "train.global_batch_size=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.pth does not exist" in err and "dinov2_vitb14_pretrain.pth" in err
