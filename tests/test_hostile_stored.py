"""Hostile or damaged files that repae reads back: .npy/.npz arrays (reference statistics, latent-cache
labels, the toy world's pools), the latent cache's manifest and shards, checkpoint manifests, config
files with interpolations, and the reproduction's own records.

Every forged size here claims terabytes, so an undefended reader fails at once with MemoryError (the
allocation is refused, never touched) instead of using memory: the tests stay small either way."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from repae.config import ConfigError, ToyWorldConfig, from_dict, load_config
from repae.fileio import ArrayFileError, read_npy

HUGE = (10**12,)  # 8 TB of float64: an allocation no machine grants


def forged_npy(shape, dtype: str = "<f8", fortran: bool = False) -> bytes:
    """An .npy whose header claims `shape` and which holds 64 bytes of data."""
    header = repr({"descr": dtype, "fortran_order": fortran, "shape": shape}).encode()
    header += b" " * (64 - (10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_npz(path: Path, members: dict, compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for key, data in members.items():
            zf.writestr(f"{key}.npy", data)
    return path


# --------------------------------------------------------------------------------- the bounded reader


@pytest.mark.parametrize("where", ["npy", "npz-stored", "npz-deflated"])
def test_a_forged_array_header_is_refused_before_anything_is_allocated(tmp_path, where):
    if where == "npy":
        path, key = tmp_path / "a.npy", None
        path.write_bytes(forged_npy(HUGE))
    else:
        comp = zipfile.ZIP_STORED if where == "npz-stored" else zipfile.ZIP_DEFLATED
        path, key = write_npz(tmp_path / "a.npz", {"mu": forged_npy(HUGE)}, comp), "mu"
    with pytest.raises(ArrayFileError, match=r"a\.np[yz].*(forged|truncated)"):
        read_npy(path, key)


def test_the_bounded_reader_reads_what_numpy_writes(tmp_path):
    c = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    f = np.asfortranarray(np.linspace(0, 1, 12).reshape(3, 4))
    np.save(tmp_path / "c.npy", c)
    np.savez(tmp_path / "s.npz", c=c, f=f)
    np.savez_compressed(tmp_path / "z.npz", c=c, f=f)
    for got in (read_npy(tmp_path / "c.npy"), read_npy(tmp_path / "s.npz", "c"), read_npy(tmp_path / "z.npz", "c")):
        assert got.dtype == c.dtype and np.array_equal(got, c)
    for got in (read_npy(tmp_path / "s.npz", "f"), read_npy(tmp_path / "z.npz", "f")):
        assert got.flags.f_contiguous and np.array_equal(got, f)
    assert read_npy(tmp_path / "c.npy").flags.writeable


def test_the_bounded_reader_refuses_objects_truncation_and_oversize(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArrayFileError, match="Python objects"):
        read_npy(tmp_path / "o.npy")
    whole = npy_bytes(np.arange(100, dtype=np.int64))
    (tmp_path / "t.npy").write_bytes(whole[:-8])
    with pytest.raises(ArrayFileError, match="t.npy"):
        read_npy(tmp_path / "t.npy")
    (tmp_path / "ok.npy").write_bytes(whole)
    with pytest.raises(ArrayFileError, match="over the 80 allowed"):
        read_npy(tmp_path / "ok.npy", max_bytes=80)
    np.savez(tmp_path / "k.npz", a=np.zeros(2))
    with pytest.raises(ArrayFileError, match=r"no array 'b' \(found \['a'\]\)"):
        read_npy(tmp_path / "k.npz", "b")


# --------------------------------------------------------------------------------- reference statistics


def test_forged_reference_statistics_are_a_clear_error_not_terabytes(tmp_path):
    from repae.evaluate.errors import EvaluationError
    from repae.evaluate.loading import read_reference
    from repae.evaluate.stats import load_stats

    ref = write_npz(tmp_path / "ref.npz", {"mu": forged_npy(HUGE), "sigma": forged_npy((10**6, 10**6))})
    with pytest.raises(EvaluationError, match=r"ref\.npz \(array 'mu'\)"):
        read_reference(str(ref), None, False, 64, "cpu", None, False)
    with pytest.raises(ValueError, match=r"ref\.npz \(array 'mu'\)"):
        load_stats(ref)


def test_reference_statistics_of_mismatched_shapes_are_refused(tmp_path):
    from repae.evaluate.errors import EvaluationError
    from repae.evaluate.loading import read_reference
    from repae.evaluate.stats import load_stats

    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(5))
    with pytest.raises(EvaluationError, match="not a mean"):
        read_reference(str(tmp_path / "ref.npz"), None, False, 64, "cpu", None, False)
    np.savez(tmp_path / "s.npz", mu=np.zeros(3), sigma=np.eye(3), mu_s=np.array(["a", "b"]), sigma_s=np.eye(2))
    with pytest.raises(ValueError, match="not the floating-point statistics of features"):
        load_stats(tmp_path / "s.npz")


def test_a_fortran_ordered_image_batch_with_a_forged_count_is_refused(tmp_path):
    from repae.evaluate.fid import NpzImages

    path = write_npz(tmp_path / "b.npz", {"arr_0": forged_npy((10**9, 32, 32, 3), "|u1", fortran=True)})
    with pytest.raises(ArrayFileError, match="arr_0"):
        list(NpzImages(path))


# --------------------------------------------------------------------------------- latent cache


@pytest.fixture(scope="module")
def made_cache(tmp_path_factory):
    """A finished latent cache of 10 toy images in shards of 5, and what re-making it needs."""
    from repae.models.vae import AutoencoderKL, VAEArgs
    from repae.stage2.cache import ToySource, cache_latents
    from repae.weights import save_model

    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEArgs(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[],
                                norm_groups=4)).eval()
    save_model(vae, root / "vae.safetensors")
    source = ToySource(torch.randint(0, 255, (10, 3, 16, 16), dtype=torch.uint8), torch.arange(10) % 3)
    kwargs = dict(vae_file=root / "vae.safetensors", shard_size=5, progress=False)
    cache_latents(vae, source, root / "cache", **kwargs)
    return root / "cache", lambda out: cache_latents(vae, source, out, **kwargs)


def _copy(made_cache, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(made_cache[0], out)
    return out


def _edit_manifest(out: Path, fn) -> None:
    m = json.loads((out / "manifest.json").read_text())
    fn(m)
    (out / "manifest.json").write_text(json.dumps(m))


MANIFEST_DAMAGE = {
    "not json": lambda out: (out / "manifest.json").write_text("{not json"),
    "a list": lambda out: (out / "manifest.json").write_text("[1, 2]"),
    "not utf-8": lambda out: (out / "manifest.json").write_bytes(b"\xff\xfe\x00garbage"),
    "count missing": lambda out: _edit_manifest(out, lambda m: m.pop("count")),
    "count zero": lambda out: _edit_manifest(out, lambda m: m.update(count=0)),
    "shard_size a string": lambda out: _edit_manifest(out, lambda m: m.update(shard_size="5")),
    "dtype unknown": lambda out: _edit_manifest(out, lambda m: m.update(dtype="int8")),
    "latent_shape huge": lambda out: _edit_manifest(out, lambda m: m.update(latent_shape=[4, 100000, 100000])),
    "shards renamed": lambda out: _edit_manifest(out, lambda m: m.update(shards=["../x", "y"])),
    "vae args unknown": lambda out: _edit_manifest(out, lambda m: m["vae"]["args"].update(bogus=1)),
    "classes not names": lambda out: _edit_manifest(out, lambda m: m.update(classes=7)),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_a_damaged_cache_manifest_is_a_config_error_and_a_rerun_repairs_it(made_cache, tmp_path, damage):
    from repae.stage2.cache import LatentCache, read_manifest

    out = _copy(made_cache, tmp_path)
    MANIFEST_DAMAGE[damage](out)
    with pytest.raises(ConfigError, match="manifest.json"):
        LatentCache(out)
    with pytest.raises(ConfigError, match="cache-latents"):
        read_manifest(out)
    made_cache[1](out)  # the remedy the message gives: the same command again
    assert len(LatentCache(out)) == 10


def _rewrite_shard_header(path: Path, fn) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


SHARD_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "header length beyond file": lambda p: p.write_bytes(struct.pack("<Q", 50_000_000) + p.read_bytes()[8:]),
    "dtype unknown": lambda p: _rewrite_shard_header(p, lambda h: h["mean"].update(dtype="I8")),
    "shape beyond file": lambda p: _rewrite_shard_header(p, lambda h: h["mean"].update(shape=[5, 4, 8, 8000000])),
    "other channel count": lambda p: _rewrite_shard_header(
        p, lambda h: h["mean"].update(shape=[5, 2, 8, 8], data_offsets=[h["mean"]["data_offsets"][0],
                                                                          h["mean"]["data_offsets"][0] + 5 * 2 * 64 * 4])),
    "std missing": lambda p: _rewrite_shard_header(p, lambda h: h.pop("std")),
    "header a list": lambda p: p.write_bytes(struct.pack("<Q", 8) + b"[1,2,3] " + b"\0" * 64),
}


@pytest.mark.parametrize("damage", sorted(SHARD_DAMAGE))
@pytest.mark.parametrize("shard", [0, 1])
def test_a_damaged_shard_is_a_config_error_naming_it_and_a_rerun_rewrites_it(made_cache, tmp_path, damage, shard):
    from repae.stage2.cache import LatentCache, shard_name

    out = _copy(made_cache, tmp_path)
    path = out / shard_name(shard)
    SHARD_DAMAGE[damage](path)
    with pytest.raises(ConfigError, match=shard_name(shard)):
        LatentCache(out).moments([shard * 5])
    path.unlink()  # the remedy the message gives: delete the shard, run the same command again
    made_cache[1](out)
    mean, std = LatentCache(out).moments(range(10))
    good_mean, good_std = LatentCache(made_cache[0]).moments(range(10))
    assert torch.equal(mean, good_mean) and torch.equal(std, good_std)


@pytest.mark.parametrize("key, value", [("std", 1e30), ("mean", float("nan")), ("std", -1.0), ("mean", float("inf"))])
def test_a_shard_whose_values_are_no_posterior_is_refused_when_read(made_cache, tmp_path, key, value):
    # structure intact, values not: train-ldm trained through NaN batches (exit 0, "skipped": 0 in its records)
    # or stopped with a FloatingPointError blaming divergence
    from safetensors import safe_open
    from safetensors.torch import save_file

    from repae.stage2.cache import LatentCache, shard_name

    out = _copy(made_cache, tmp_path)
    path = out / shard_name(1)
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[key][2, 0, 0, 0] = value  # image 7
    save_file(tensors, str(path), metadata=meta)
    cache = LatentCache(out)
    cache.moments([0, 1, 5, 6])  # other images read as before
    with pytest.raises(ConfigError, match=rf"image 7 \(in {shard_name(1)}\) has a posterior mean or std"):
        cache.moments([3, 7, 9])


def test_a_truncated_shard_is_not_taken_for_a_finished_one_on_rerun(made_cache, tmp_path):
    from repae.stage2.cache import LatentCache, shard_name

    out = _copy(made_cache, tmp_path)
    path = out / shard_name(1)
    path.write_bytes(path.read_bytes()[:-64])  # its header (and label count) intact, its data short
    made_cache[1](out)
    assert torch.equal(LatentCache(out).moments(range(10))[0], LatentCache(made_cache[0]).moments(range(10))[0])


def test_a_latent_shape_that_the_shards_do_not_hold_is_refused_before_allocating(made_cache, tmp_path):
    from repae.stage2.cache import LatentCache

    out = _copy(made_cache, tmp_path)
    _edit_manifest(out, lambda m: m.update(latent_shape=[4096, 16384, 16384]))  # within the caps: 4 TiB per item
    with pytest.raises(ConfigError, match=r"shard-00000.*manifest says F32 \[5, 4096, 16384, 16384\]"):
        LatentCache(out)


LABEL_DAMAGE = {
    "objects": (lambda p: np.save(p, np.array([{"a": 1}] * 10, dtype=object), allow_pickle=True), "Python objects"),
    "forged header": (lambda p: p.write_bytes(forged_npy((10**13,), "<i8")), "over the 80 allowed"),
    "forged header, in bounds": (lambda p: p.write_bytes(forged_npy((10,), "<i8")[:-8]), "truncated|forged"),
    "too few": (lambda p: np.save(p, np.arange(3)), r"\[3\], not 10"),
    "floats": (lambda p: np.save(p, np.zeros(10)), "float64"),
    "outside the classes": (lambda p: np.save(p, np.full(10, 3)), r"outside 0\.\.2"),
    "negative": (lambda p: np.save(p, np.full(10, -1)), r"outside 0\.\.2"),
    "missing": (lambda p: p.unlink(), "missing"),
}


@pytest.mark.parametrize("damage", sorted(LABEL_DAMAGE))
def test_damaged_cache_labels_are_a_config_error(made_cache, tmp_path, damage):
    from repae.stage2.cache import LatentCache

    out = _copy(made_cache, tmp_path)
    make, message = LABEL_DAMAGE[damage]
    make(out / "labels.npy")
    with pytest.raises(ConfigError, match=message):
        LatentCache(out).labels


def test_cache_labels_outside_the_models_classes_are_refused_before_training(made_cache):
    """The cache's labels fit its own 3 classes but not a 2-class SiT: label 2 would be the CFG null class."""
    from repae.stage2.latents import latent_batches

    overrides = ["model.num_classes=2", "loss.proj_coeff=0", "train.tune_vae=false", f"latents.path={made_cache[0]}"]
    with pytest.raises(ConfigError, match=r"outside 0\.\.1 \(model.num_classes=2\), e\.g\. 2 \(the id of the null"):
        latent_batches(load_config("toy", overrides=overrides))
    assert len(latent_batches(load_config("toy", overrides=overrides[1:] + ["model.num_classes=3"])).items) == 10


def test_cache_settings_that_are_not_json_are_a_config_error(made_cache, tmp_path):
    out = _copy(made_cache, tmp_path)
    (out / "settings.json").write_text("{oops")
    with pytest.raises(ConfigError, match="settings.json is not valid JSON"):
        made_cache[1](out)


@pytest.mark.parametrize("labels", [[-1, 0, 1], [0, 1_000_000]])
def test_toy_labels_outside_any_model_are_refused_before_naming_classes(labels):
    from repae.stage2.cache import ToySource

    with pytest.raises(ConfigError, match="class ids"):
        ToySource(torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8), torch.tensor(labels))


# --------------------------------------------------------------------------------- checkpoint manifests


@pytest.mark.parametrize("files", ["counts", "list", "escaping name", "bool size"])
def test_a_checkpoint_manifest_of_wrong_types_reads_as_damaged(tmp_path, files):
    import hashlib

    from repae.train.checkpoint import REQUIRED, check_checkpoint

    ckpt = tmp_path / "step-0000005"
    ckpt.mkdir()
    for name in REQUIRED:
        (ckpt / name).write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"x")
    entry = {"bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}  # every listed file matches its entry
    good = {name: entry for name in REQUIRED}
    listing = {"counts": {name: 5 for name in REQUIRED},
               "list": list(REQUIRED),
               "escaping name": {**good, "../outside": entry},  # a file outside the checkpoint
               "bool size": {**good, "state.pt": {**entry, "bytes": True}}}[files]
    (ckpt / "manifest.json").write_text(json.dumps({"format": 1, "step": 5, "files": listing}))
    verdict, why = check_checkpoint(ckpt)
    assert verdict == "damaged" and "manifest.json" in why


# --------------------------------------------------------------------------------- config interpolation


def test_an_unresolvable_interpolation_in_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match="nope.key"):
        load_config("toy", overrides=["train.seed=${nope.key}"])
    # interpolation on the command line (the user's own words) still works
    assert load_config("toy", overrides=["exp_name=seed${train.seed}"]).exp_name == "seed0"


@pytest.mark.parametrize("text", ["train:\n  seed: ${nope.key}\n", "output_dir: ${oc.env:REPAE_TEST_SECRET}\n",
                                  "exp_name: x${oc.env:REPAE_TEST_SECRET}\n",
                                  "model:\n  z_dims: ['${oc.env:REPAE_TEST_SECRET}']\n"])
def test_a_config_file_is_data_its_interpolations_are_refused(tmp_path, monkeypatch, text):
    monkeypatch.setenv("REPAE_TEST_SECRET", "hunter2")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"c\.yaml.*interpolation") as err:
        load_config("toy", [path])
    assert "hunter2" not in str(err.value)


def test_a_saved_config_is_not_evaluated(monkeypatch):
    from repae.config import to_dict

    monkeypatch.setenv("REPAE_TEST_SECRET", "hunter2")
    data = to_dict(load_config("toy"))
    data["output_dir"] = "${oc.env:REPAE_TEST_SECRET}"
    with pytest.raises(ConfigError, match="interpolation"):
        from_dict(data)


# --------------------------------------------------------------------------------- the toy world's cache


@pytest.fixture()
def toy_cache(tmp_path):
    from repae.toyworld import cache_dir_for

    spec = ToyWorldConfig(cache_dir=str(tmp_path), train_size=12, heldout_size=4, teacher_steps=1, vae_steps=1,
                          batch_size=4, vae_batch_size=4)
    d = cache_dir_for(spec)
    d.mkdir(parents=True)
    return spec, d


def _toy_world(spec):
    from repae.models.vae import VAEArgs
    from repae.toyworld import ensure_toy_world

    return ensure_toy_world(VAEArgs(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[],
                                    norm_groups=4), spec, progress=False, device="cpu")


def _good_pool(n: int) -> dict:
    return {"images": npy_bytes(np.zeros((n, 3, 32, 32), np.uint8)), "labels": npy_bytes(np.arange(n) % 10),
            "coverage": npy_bytes(np.zeros((n, 32, 32), np.uint8))}


TOY_DAMAGE = {
    "train.npz not a zip": ("train.npz", lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "not a readable .npz"),
    "train.npz forged": ("train.npz", lambda p: write_npz(p, {**_good_pool(12), "images": forged_npy(
        (10**9, 3, 32, 32), "|u1")}), "forged"),
    "train.npz wrong shape": ("train.npz", lambda p: write_npz(p, {**_good_pool(12), "images": npy_bytes(
        np.zeros((12, 3, 8, 8), np.uint8))}), r"not uint8 \[12, 3, 32, 32\]"),
    "train.npz labels out of range": ("train.npz", lambda p: write_npz(p, {**_good_pool(12), "labels": npy_bytes(
        np.full(12, 10**12))}), "class ids"),
    "train.npz coverage a float": ("train.npz", lambda p: write_npz(p, {**_good_pool(12), "coverage": npy_bytes(
        np.zeros((12, 32, 32), np.float32))}), r"coverage is float32 \[12, 32, 32\], not uint8"),
    "heldout.npz no labels": ("heldout.npz", lambda p: write_npz(p, {"images": _good_pool(4)["images"]}),
                              "no array 'labels'"),
    "report.json not json": ("report.json", lambda p: p.write_text("{oops"), "report.json is damaged"),
    "report.json a list": ("report.json", lambda p: p.write_text("[1]"), "not an object"),
    "report.json accuracy a string": ("report.json", lambda p: p.write_text('{"teacher_heldout_accuracy": "x"}'),
                                      "not a number"),
    "report.json factor R^2 a list": ("report.json", lambda p: p.write_text('{"evaluator_heldout_factor_r2": [1]}'),
                                      "not a number"),
}


@pytest.mark.parametrize("damage", sorted(TOY_DAMAGE))
def test_a_damaged_toy_world_cache_says_to_delete_it(toy_cache, damage):
    spec, d = toy_cache
    name, make, message = TOY_DAMAGE[damage]
    if name == "heldout.npz":
        write_npz(d / "train.npz", _good_pool(12))
    make(d / name)
    with pytest.raises(ConfigError, match=message) as err:
        _toy_world(spec)
    assert f"delete the directory {d}" in str(err.value)


# --------------------------------------------------------------------------------- reproduction records


@pytest.mark.parametrize("text", ['{"2": {"num_samples": 10,', "[1]", '{"2": 5, "x": {}}', "\xff"])
def test_a_damaged_metrics_record_is_measured_again_not_a_crash(tmp_path, capsys, text):
    from repae.reproduce.measure import METRICS_FILE, measure_run, needs_measuring

    (tmp_path / METRICS_FILE).write_text(text, encoding="latin-1")
    assert needs_measuring(tmp_path, 10) is False  # no checkpoints: nothing to measure
    assert measure_run(tmp_path, 10) == {}
    assert METRICS_FILE in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{oops", "[1]", '{"runs": [1]}', '{"runs": {"a": {"train_seconds": "9"}}}',
                                  '{"invocations": {}}'])
def test_a_damaged_results_record_is_a_config_error_with_the_remedy(tmp_path, text):
    from repae.reproduce.runner import _read_previous

    (tmp_path / "results.json").write_text(text)
    with pytest.raises(ConfigError, match="results.json.*move it away or delete it"):
        _read_previous(tmp_path / "results.json")
    (tmp_path / "results.json").write_text('{"runs": {"a": {"train_seconds": 9.5, "exit_code": 0}}, "invocations": []}')
    assert _read_previous(tmp_path / "results.json")["runs"]["a"]["train_seconds"] == 9.5


# ------------------------------------------------------------------------------ JSON records read back

DEEP = b"[" * 200_000  # deeper than the JSON parser's recursion limit


@pytest.mark.parametrize("data, why", [(b"[1]", "JSON list, not an object"), (b'{"a": ', "not valid JSON"),
                                       (b"\xff{}", "not valid JSON"), (DEEP, "nested too deeply"),
                                       (b'{"a": "' + b"x" * 100 + b'"}', "larger than 64 bytes")])
def test_a_json_record_is_one_bounded_object_or_a_clear_error(tmp_path, data, why):
    from repae.fileio import JsonFileError, read_json_object

    path = tmp_path / "record.json"
    path.write_bytes(data)
    with pytest.raises(JsonFileError, match=why) as err:
        read_json_object(path, max_bytes=64 if b"xxx" in data else 1 << 20)
    assert str(path) in str(err.value)
    with pytest.raises(JsonFileError, match="cannot read"):
        read_json_object(tmp_path / "missing.json")
    path.write_text('{"step": 3, "files": {"a": [1, 2]}}')
    assert read_json_object(path) == {"step": 3, "files": {"a": [1, 2]}}


def test_a_packed_manifest_nested_too_deeply_is_a_packed_data_error(tmp_path):
    from repae.data.packed import MANIFEST, PackedDataError, read_manifest

    (tmp_path / MANIFEST).write_bytes(DEEP)
    with pytest.raises(PackedDataError, match="nested too deeply.*re-run `repae prepare-data`"):
        read_manifest(tmp_path)


def test_damaged_saved_judges_are_a_config_error_with_the_remedy(tmp_path):
    from safetensors.torch import save_file

    from repae.reproduce.judges import JUDGES_FILE, JUDGES_INFO, load_real_judges

    (tmp_path / JUDGES_INFO).write_text("[1]")
    with pytest.raises(ConfigError, match=f"JSON list.*delete {tmp_path} to measure the held-out images again"):
        load_real_judges(tmp_path, "cpu")
    (tmp_path / JUDGES_INFO).write_text('{"inception": "inception.pth", "starting_vae": "vae.safetensors"}')
    with pytest.raises(ConfigError, match=f"not found.*delete {tmp_path}"):  # judges.safetensors missing
        load_real_judges(tmp_path, "cpu")
    save_file({"heldout_images": torch.zeros(2, 3, 8, 8)}, str(tmp_path / JUDGES_FILE))
    with pytest.raises(ConfigError, match="lack heldout_labels, reference_mu"):
        load_real_judges(tmp_path, "cpu")


def _covariance(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return np.cov(x, rowvar=False).astype(np.float32)  # as a float32 pipeline stores it


@pytest.mark.parametrize("damage,message", [
    (lambda mu, s: s.__setitem__((1, 2), np.nan), "NaN or infinite"),  # undefended: scipy LinAlgError after sampling
    (lambda mu, s: mu.__setitem__(0, np.inf), "NaN or infinite"),  # undefended: FID inf, silently
    (lambda mu, s: s.__setitem__((0, 1), s[0, 1] + 1.0), "not symmetric"),  # undefended: "Imaginary component"
    (lambda mu, s: np.negative(s, out=s), "negative eigenvalue"),  # undefended: "Imaginary component"
    (lambda mu, s: np.multiply(s, 1e300, out=s), "beyond any statistics"),  # undefended: "Imaginary component"
    (lambda mu, s: mu.__setitem__(3, 1e12), "beyond any statistics"),
])
def test_reference_statistics_that_are_no_covariance_are_refused_when_read(tmp_path, damage, message):
    from repae.evaluate.errors import EvaluationError
    from repae.evaluate.loading import read_reference

    mu, sigma = np.zeros(64), _covariance(200, 64).astype(np.float64)
    damage(mu, sigma)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    with pytest.raises(EvaluationError, match=f"ref.npz: .*{message}"):
        read_reference(str(tmp_path / "ref.npz"), None, False, 64, "cpu", None, False)


def test_integer_reference_statistics_are_refused(tmp_path):
    # int8 statistics were taken as they were: a truncated covariance gave a plausible FID with exit 0
    from repae.evaluate.errors import EvaluationError
    from repae.evaluate.loading import read_reference

    np.savez(tmp_path / "ref.npz", mu=np.zeros(64, np.int8), sigma=np.eye(64, dtype=np.int8))
    with pytest.raises(EvaluationError, match="holds int8, not the floating-point statistics"):
        read_reference(str(tmp_path / "ref.npz"), None, False, 64, "cpu", None, False)


def test_a_rank_deficient_float32_covariance_is_still_a_covariance(tmp_path):
    from repae.evaluate.stats import load_stats

    sigma = _covariance(40, 256)  # fewer samples than dimensions: eigenvalues down to ~-1e-8 of the largest
    np.savez(tmp_path / "ref.npz", mu=np.ones(256), sigma=sigma)
    pool, _ = load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(pool.sigma, sigma.astype(np.float64))


def test_reference_statistics_of_another_network_are_refused_before_sampling(tmp_path):
    """16-d statistics against the 2048-d Inception pool: undefended, a ValueError from frechet_distance
    after every sample was drawn and embedded."""
    from repae.evaluate.errors import EvaluationError
    from repae.evaluate.loading import read_reference
    from repae.models.inception import InceptionV3

    np.savez(tmp_path / "ref.npz", mu=np.zeros(16), sigma=np.eye(16))
    with pytest.raises(EvaluationError, match="mu, sigma are 16-dimensional, but the Inception features they are "
                                              "compared with are 2048-dimensional"):
        read_reference(str(tmp_path / "ref.npz"), InceptionV3(), False, 64, "cpu", None, False)


def test_an_image_batch_of_huge_images_is_refused_from_its_header(tmp_path):
    """A 800 KB deflated .npz of two 12000x12000 images read as one 864 MB batch (64 such images: 28 GB)."""
    from repae.evaluate.errors import EvaluationError
    from repae.evaluate.sources import open_npz

    path = write_npz(tmp_path / "b.npz", {"arr_0": forged_npy((2, 12000, 12000, 3), "|u1")})
    with pytest.raises(EvaluationError, match=r"b\.npz: 'arr_0' holds 12000x12000 images, over the limit of "
                                              r"64000000 pixels"):
        open_npz(path)
    assert open_npz(path, max_pixels=12000 * 12000).num_images == 2  # the limit is the user's to raise


def test_an_image_batch_is_read_at_most_max_batch_bytes_at_a_time(tmp_path, monkeypatch):
    from repae.evaluate import fid
    from repae.evaluate.sources import open_npz

    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", arr_0=images)
    monkeypatch.setattr(fid, "MAX_BATCH_BYTES", 2 * 8 * 8 * 3)
    batches = list(open_npz(tmp_path / "b.npz", batch_size=64))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), images)
