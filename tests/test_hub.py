"""Hub ids (`hf:owner/name[@revision][/file]`) resolve offline from a local hub cache laid out as
huggingface_hub lays it out (models--owner--name/{blobs, refs/REV, snapshots/SHA/FILE -> blob}), and
load to the same tensors as the same file given by its local path. No network: HF_HUB_OFFLINE=1."""

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("huggingface_hub")

from repae import hub  # noqa: E402
from repae.models.vae import AutoencoderKL, VAEArgs  # noqa: E402
from repae.models.sit import SiT  # noqa: E402
from repae.weights import load_latent_stats, load_model, save_model  # noqa: E402
from conftest import randomize, tiny_sit_args, tiny_vae_args  # noqa: E402


def put_repo(cache: Path, repo_id: str, files: dict, ref: str = "main", sha: str = None) -> str:
    """One snapshot of `repo_id` in the cache: files {path in repo: bytes}; refs/`ref` -> its sha."""
    sha = sha or hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                              + ref.encode()).hexdigest()
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / sha / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as huggingface_hub makes them
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(sha)
    return sha


def saved(obj, path: Path) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def ldm_vae() -> AutoencoderKL:
    """Smallest VAE a bare official state dict loads as (base width 128: the LDM family's 32 groups)."""
    return randomize(AutoencoderKL(VAEArgs(ch=128, ch_mult=[1], num_res_blocks=1, z_channels=4,
                                           attn_resolutions=[], norm_groups=32)))


# ----------------------------------------------------------------------------- grammar


def test_grammar():
    assert hub.parse_hub_id("hf:REPA-E/e2e-sdvae") == hub.HubId("hf:REPA-E/e2e-sdvae", "REPA-E/e2e-sdvae", None, None)
    h = hub.parse_hub_id("hf:REPA-E/sit-repae-sdvae@0123abc/checkpoints/0400000.pt")
    assert (h.repo_id, h.revision, h.filename) == ("REPA-E/sit-repae-sdvae", "0123abc", "checkpoints/0400000.pt")
    assert not hub.is_hub_id("pretrained/e2e-sdvae-400k.pt") and hub.local_path("x/y.pt", "vae") == "x/y.pt"


@pytest.mark.parametrize("bad", ["hf:", "hf:REPA-E", "hf:REPA-E/", "hf:/REPA-E/sdvae", "hf:REPA-E/sdvae@",
                                 "hf:REPA-E/sdvae/../x.pt", "hf:REPA-E/sdvae//x.pt", "hf:a--b/c", "hf:REPA E/x"])
def test_malformed_id_is_one_clear_error(bad, cache):
    with pytest.raises(hub.HubError) as err:
        load_model(bad, kind="vae")
    assert str(err.value) == f"{bad}: not a hub id; expected {hub.SYNTAX}"


# ----------------------------------------------------------------------------- each kind


def test_sit_checkpoint_and_its_bundled_vae(cache, tmp_path):
    """REPA-E/sit-repae-sdvae: checkpoints/0400000.pt, an official training checkpoint (ema, model,
    vae, and the argparse Namespace the official code pickles)."""
    sit, ema, vae = randomize(SiT(tiny_sit_args())), randomize(SiT(tiny_sit_args())), ldm_vae()
    ckpt = {"model": sit.state_dict(), "ema": ema.state_dict(), "vae": vae.state_dict(), "steps": 400000,
            "args": argparse.Namespace(model="SiT-XL/2", vae="f8d4")}
    local = tmp_path / "0400000.pt"
    put_repo(cache, "REPA-E/sit-repae-sdvae", {"checkpoints/0400000.pt": saved(ckpt, local), "args.json": b"{}"})
    for ref in ("hf:REPA-E/sit-repae-sdvae", "hf:REPA-E/sit-repae-sdvae/checkpoints/0400000.pt"):
        got = load_model(ref, kind="sit")
        assert same_tensors(got, load_model(local, kind="sit")) and same_tensors(got, ema)  # EMA preferred
        assert same_tensors(load_model(ref, kind="vae"), vae)
    assert hub.resolve("hf:REPA-E/sit-repae-sdvae", "sit").parent.name == "checkpoints"


def test_official_vae_pt_and_latent_statistics(cache, tmp_path):
    vae = ldm_vae()
    stats = {"latents_scale": torch.rand(1, 4, 1, 1) + 0.5, "latents_bias": torch.randn(1, 4, 1, 1)}
    files = {"e2e-sdvae-400k.pt": saved(vae.state_dict(), tmp_path / "e2e-sdvae-400k.pt"),
             "e2e-sdvae-400k-latents-stats.pt": saved(stats, tmp_path / "stats.pt")}
    put_repo(cache, "REPA-E/e2e-sdvae", files)
    for ref in ("hf:REPA-E/e2e-sdvae", "hf:REPA-E/e2e-sdvae/e2e-sdvae-400k.pt"):
        got = load_model(ref, kind="vae")
        assert same_tensors(got, load_model(tmp_path / "e2e-sdvae-400k.pt", kind="vae")) and same_tensors(got, vae)
    assert same_tensors(load_model("hf:REPA-E/e2e-sdvae"), vae)  # no kind given: the release's VAE
    for ref in ("hf:REPA-E/e2e-sdvae", "hf:REPA-E/e2e-sdvae/e2e-sdvae-400k-latents-stats.pt"):
        for a, b in zip(load_latent_stats(ref), load_latent_stats(tmp_path / "stats.pt")):
            assert torch.equal(a, b)


def test_diffusers_vae_directory(cache, tmp_path):
    from repae.models.vae_diffusers import export_diffusers

    vae = randomize(AutoencoderKL(tiny_vae_args()))
    export_diffusers(vae, tmp_path / "e2e-sdvae-hf")
    put_repo(cache, "REPA-E/e2e-sdvae-hf", {f.name: f.read_bytes() for f in (tmp_path / "e2e-sdvae-hf").iterdir()})
    got = load_model("hf:REPA-E/e2e-sdvae-hf", kind="vae")
    assert same_tensors(got, load_model(tmp_path / "e2e-sdvae-hf", kind="vae")) and same_tensors(got, vae)
    assert hub.resolve("hf:REPA-E/e2e-sdvae-hf", "vae").is_dir()


def test_any_repo_with_one_weight_file_and_our_safetensors(cache, tmp_path):
    vae = randomize(AutoencoderKL(tiny_vae_args()))
    save_model(vae, tmp_path / "vae.safetensors")
    put_repo(cache, "someone/my-vae", {"vae.safetensors": (tmp_path / "vae.safetensors").read_bytes(),
                                       "README.md": b"a VAE"})
    got = load_model("hf:someone/my-vae", kind="vae")  # picked from the cached file list
    assert same_tensors(got, load_model(tmp_path / "vae.safetensors")) and same_tensors(got, vae)


def test_discriminator(cache, tmp_path):
    from repae.config import LossConfig
    from repae.losses import VAERegulariser
    from test_losses import official_discriminator_shapes

    state = {k: torch.randn(s) if s else torch.tensor(3) for k, s in official_discriminator_shapes().items()}
    put_repo(cache, "REPA-E/sdvae", {"sdvae-f8d4.pt": saved(ldm_vae().state_dict(), tmp_path / "v.pt"),
                                     "sdvae-f8d4-discriminator-ckpt.pt": saved(state, tmp_path / "d.pt")})
    by_id, by_path = (VAERegulariser(LossConfig(lpips_weight=0)) for _ in range(2))
    by_id.load_discriminator("hf:REPA-E/sdvae")
    by_path.load_discriminator(tmp_path / "d.pt")
    assert same_tensors(by_id.discriminator, by_path.discriminator)
    assert torch.equal(by_id.discriminator.main[11].weight, state["main.11.weight"])


def test_encoder_file(cache, tmp_path):
    from repae.models.encoders import load_encoder_from_spec
    from test_encoders import timm_vit, tiny

    spec = tiny("dinov1-vit-b")
    put_repo(cache, "facebook/dino-vitb16", {spec.filename: saved(timm_vit(), tmp_path / spec.filename)})
    got = load_encoder_from_spec(spec, f"hf:facebook/dino-vitb16/{spec.filename}", 256)
    assert same_tensors(got, load_encoder_from_spec(spec, str(tmp_path / spec.filename), 256))


def test_lpips_vgg_and_inception(cache, tmp_path):
    from repae.models.inception import WEIGHTS_FILE, InceptionV3
    from repae.models.lpips import LPIPS
    from test_inception import fake_fid_state

    g = torch.Generator().manual_seed(0)
    vgg = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in LPIPS().state_dict().items() if k.startswith("features.")}
    lin = {k: torch.rand(v.shape, generator=g) for k, v in LPIPS().state_dict().items() if not k.startswith("features.")}
    assert vgg and lin
    put_repo(cache, "someone/lpips", {"vgg16-397923af.pth": saved(vgg, tmp_path / "vgg16.pth"),
                                      "vgg.pth": saved(lin, tmp_path / "lin.pth")})
    got = LPIPS.from_files("hf:someone/lpips/vgg16-397923af.pth", "hf:someone/lpips/vgg.pth")
    assert same_tensors(got, LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "lin.pth"))
    put_repo(cache, "someone/fid-inception", {WEIGHTS_FILE: saved(fake_fid_state(), tmp_path / WEIGHTS_FILE)})
    got = InceptionV3.from_file("hf:someone/fid-inception")  # the repo's one weight file
    assert same_tensors(got, InceptionV3.from_file(tmp_path / WEIGHTS_FILE))


# ----------------------------------------------------------------------------- revisions, errors


def test_revision_pin_picks_its_snapshot(cache, tmp_path):
    old, new = (randomize(AutoencoderKL(tiny_vae_args())) for _ in range(2))
    for vae, name in ((old, "old"), (new, "new")):
        save_model(vae, tmp_path / f"{name}.safetensors")
    old_sha = put_repo(cache, "someone/vae", {"vae.safetensors": (tmp_path / "old.safetensors").read_bytes()},
                       ref="v1")
    put_repo(cache, "someone/vae", {"vae.safetensors": (tmp_path / "new.safetensors").read_bytes()})
    assert same_tensors(load_model("hf:someone/vae/vae.safetensors"), new)  # main
    assert same_tensors(load_model(f"hf:someone/vae@{old_sha}/vae.safetensors"), old)  # a commit
    assert same_tensors(load_model("hf:someone/vae@v1"), old)  # a tag / branch, via refs/v1
    assert f"snapshots/{old_sha}/" in hub.resolve(f"hf:someone/vae@{old_sha}", "vae").as_posix()


def test_missing_file_names_the_id_and_what_to_do(cache, tmp_path):
    put_repo(cache, "REPA-E/e2e-sdvae", {"e2e-sdvae-400k.pt": saved(ldm_vae().state_dict(), tmp_path / "v.pt")})
    with pytest.raises(hub.HubError) as err:
        load_model("hf:REPA-E/e2e-sdvae/e2e-sdvae-4x.pt", kind="vae")
    msg = str(err.value)
    assert msg.startswith("hf:REPA-E/e2e-sdvae/e2e-sdvae-4x.pt: file e2e-sdvae-4x.pt is not in the local hub cache")
    assert "HF_HUB_OFFLINE=1" in msg and "`hf download REPA-E/e2e-sdvae e2e-sdvae-4x.pt`" in msg
    assert msg.endswith("or pass a local path") and "\n" not in msg
    with pytest.raises(hub.HubError, match=r"^hf:REPA-E/e2e-sdvae: file e2e-sdvae-400k-latents-stats.pt is not "):
        load_latent_stats("hf:REPA-E/e2e-sdvae")  # a shortcut names the file it expected
    with pytest.raises(hub.HubError, match=r"^hf:REPA-E/e2e-vavae@abc: file e2e-vavae-400k.pt is not in the local "
                                           r"hub cache .* at revision abc.*--revision abc"):
        load_model("hf:REPA-E/e2e-vavae@abc", kind="vae")  # nothing cached for this repo at all


def test_ambiguous_repo_asks_for_a_file(cache, tmp_path):
    b = saved({"w": torch.zeros(1)}, tmp_path / "a.pt")
    put_repo(cache, "someone/two", {"a.pt": b, "b.pt": b})
    with pytest.raises(hub.HubError, match=r"^hf:someone/two: the repo someone/two holds several vae files "
                                           r"\(a.pt, b.pt\); name one, e.g. hf:someone/two/a.pt$"):
        load_model("hf:someone/two", kind="vae")


def test_encoder_repo_offline_is_a_clear_error(cache):
    from repae.models.encoders import load_encoder

    with pytest.raises(hub.HubError, match=r"^hf:facebook/dinov2-base: the repo facebook/dinov2-base is not in "
                                           r"the local hub cache .*HF_HUB_OFFLINE=1.*or pass a local path$"):
        load_encoder("dinov2-vit-b", "hf:facebook/dinov2-base", 256)


# ----------------------------------------------------------------------------- released SiT protocol


def test_sample_protocol_of_the_released_sits():
    p = hub.sample_protocol("hf:REPA-E/sit-repae-sdvae")
    assert (p.preset, p.mode, p.num_steps, p.cfg_scale, p.guidance_low, p.guidance_high) == \
        ("sit-xl2-f8d4", "sde", 250, 2.2, 0.0, 0.65)
    ldm = hub.sample_protocol("hf:REPA-E/sit-ldm-e2e-vavae")
    assert (ldm.cfg_scale, ldm.guidance_high, ldm.label_sampling, ldm.vae) == (2.4, 0.73, "balanced", "hf:REPA-E/e2e-vavae")
    preset, overrides, vae = hub.apply_sample_protocol("hf:REPA-E/sit-repae-invae", "toy", ["sample.cfg_scale=3"], None)
    assert preset == "sit-xl1-f16d32" and overrides[-1] == "sample.cfg_scale=3" and vae == "hf:REPA-E/sit-repae-invae"
    assert hub.apply_sample_protocol("run/ckpt.pt", "toy", ["a=1"], None) == ("toy", ["a=1"], None)


def test_repae_sample_with_a_released_sit(cache, tmp_path):
    """`repae sample --ckpt hf:REPA-E/sit-repae-sdvae` takes the file, its bundled VAE and the published
    protocol; the user's overrides win (fewer steps here, to keep the test fast)."""
    from repae.cli import main

    sit, vae = randomize(SiT(tiny_sit_args(z_dims=[], num_classes=10))), ldm_vae()
    ckpt = {"model": sit.state_dict(), "ema": sit.state_dict(), "vae": vae.state_dict()}
    put_repo(cache, "REPA-E/sit-repae-sdvae", {"checkpoints/0400000.pt": saved(ckpt, tmp_path / "c.pt")})
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", "hf:REPA-E/sit-repae-sdvae", "--num-samples", "2", "--out", str(out),
                 "sample.num_steps=3", "sample.batch_size=2"]) == 0
    cfg = yaml.safe_load(out.with_suffix(".config.yaml").read_text())
    assert cfg["preset"] == "sit-xl2-f8d4" and cfg["eval"]["label_sampling"] == "uniform"
    assert {k: cfg["sample"][k] for k in ("mode", "num_steps", "cfg_scale", "guidance_low", "guidance_high")} == \
        {"mode": "sde", "num_steps": 3, "cfg_scale": 2.2, "guidance_low": 0.0, "guidance_high": 0.65}
    assert out.is_file() and json.dumps(cfg)


def test_evaluate_loads_a_released_sit_with_its_protocol(cache, tmp_path):
    """`repae evaluate samples hf:REPA-E/sit-ldm-e2e-vavae`: the SiT, the VAE and statistics of
    hf:REPA-E/e2e-vavae, and the published protocol (class-balanced labels, CFG 2.4 on [0, 0.73])."""
    from repae.evaluate.loading import load_sit_and_vae
    from repae.evaluate.sources import source_kind

    sit, vae = randomize(SiT(tiny_sit_args(z_dims=[]))), ldm_vae()
    stats = {"latents_scale": torch.full((1, 4, 1, 1), 2.0), "latents_bias": torch.arange(4.0).view(1, 4, 1, 1)}
    put_repo(cache, "REPA-E/sit-ldm-e2e-vavae", {"checkpoints/4000000.pt": saved({"ema": sit.state_dict()},
                                                                                 tmp_path / "s.pt")})
    put_repo(cache, "REPA-E/e2e-vavae", {"e2e-vavae-400k.pt": saved(vae.state_dict(), tmp_path / "v.pt"),
                                         "e2e-vavae-400k-latents-stats.pt": saved(stats, tmp_path / "st.pt")})
    assert source_kind("hf:REPA-E/sit-ldm-e2e-vavae") == "checkpoint"
    loaded = load_sit_and_vae("hf:REPA-E/sit-ldm-e2e-vavae", None, "toy", [], ["sample.num_steps=5"])
    assert same_tensors(loaded.vae, vae) and loaded.files["vae"] == "hf:REPA-E/e2e-vavae"
    assert loaded.cfg.preset == "sit-xl1-f16d32" and loaded.cfg.eval.label_sampling == "balanced"
    assert (loaded.cfg.sample.cfg_scale, loaded.cfg.sample.guidance_high, loaded.cfg.sample.num_steps) == (2.4, 0.73, 5)
    assert torch.equal(loaded.sit.bn.running_mean.flatten(), torch.arange(4.0))  # the release's statistics
    assert torch.allclose(loaded.sit.bn.running_var.flatten(), torch.full((4,), 0.25))


def test_repae_info_reads_a_hub_id(cache, tmp_path, capsys):
    from repae.cli import main

    put_repo(cache, "REPA-E/e2e-sdvae", {"e2e-sdvae-400k.pt": saved(ldm_vae().state_dict(), tmp_path / "v.pt")})
    assert main(["info", "hf:REPA-E/e2e-sdvae"]) == 0
    assert capsys.readouterr().out.startswith("hf:REPA-E/e2e-sdvae: AutoencoderKL")


def test_run_checks_and_evaluation_records_resolve_hub_ids(cache, tmp_path):
    """`repae bench reproduce` checks named files up front; evaluation records hash what an id resolved to."""
    from repae.config import load_config
    from repae.evaluate.report import describe_files
    from repae.reproduce.runner import check_named_files

    put_repo(cache, "REPA-E/sdvae", {"sdvae-f8d4-discriminator-ckpt.pt": saved({"w": torch.ones(2)}, tmp_path / "d.pt")})
    cfg = load_config("toy", [], ["loss.discriminator_path=hf:REPA-E/sdvae"], world_size=1)
    check_named_files(cfg)
    cfg.vae.latent_stats_path = "hf:REPA-E/sdvae"  # no statistics cached: named, before any arm starts
    with pytest.raises(hub.HubError, match="^hf:REPA-E/sdvae: file sdvae-f8d4-latents-stats.pt is not in"):
        check_named_files(cfg)
    record = describe_files({"discriminator": "hf:REPA-E/sdvae"})["discriminator"]
    assert record["id"] == "hf:REPA-E/sdvae"
    assert record["sha256"] == hashlib.sha256((tmp_path / "d.pt").read_bytes()).hexdigest()
