"""ImageNet as people store it: `data.source=hf` (parquet / arrow tables, as Hugging Face `datasets` holds them)
and `data.source=wds` (WebDataset tar shards) give the very batches `data.source=folder` gives on the same images
(same order, same ADM crops, the same corrupt record skipped and counted), resume exactly, split over ranks,
and name what is wrong with a path in one line."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from repae.cli import main  # noqa: E402
from repae.config import ConfigError, load_config  # noqa: E402
from repae.data.folder import DatasetBatches, list_image_folder  # noqa: E402
from repae.data.sources import image_dataset, training_batches  # noqa: E402
from repae.data.wds import expand_braces  # noqa: E402
from repae.train.checkpoint import latest_checkpoint  # noqa: E402
from repae.weights import read_file  # noqa: E402

BROKEN = b"\x89PNG\r\n\x1a\n not really a png"
CLASSES = ("cat", "dog", "eel")
BASE = ["data.image_size=16", "data.num_workers=0", "model.arch=SiT-T/2", "model.depth=2", "model.hidden_size=48",
        "model.num_heads=2", "model.encoder_depth=1", "vae.from_scratch=true",
        "train.tune_vae=false", "latent_norm.mode=fixed", "loss.proj_coeff=0", "model.num_classes=3",
        "train.global_batch_size=8", "train.sample_every=100", "sample.num_samples=2", "sample.batch_size=2",
        "sample.num_steps=2", "eval.num_samples=0"]


def records(folder):
    """(file name, bytes, label) of the folder in its listing order: the order every copy below keeps."""
    files, labels, _ = list_image_folder(folder)
    return [(f"{f.parent.name}/{f.name}", f.read_bytes(), y) for f, y in zip(files, labels)]


def write_parquet(recs, path, lo, hi, with_names=True):
    image = pa.array([{"bytes": b, "path": n} for n, b, _ in recs[lo:hi]],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "label": pa.array([y for _, _, y in recs[lo:hi]], pa.int64())})
    if with_names:  # the metadata `datasets` writes for a ClassLabel column
        features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(CLASSES)}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=5)  # several row groups per file


def write_tar(recs, path, lo, hi):
    with tarfile.open(path, "w") as tar:
        for k in range(lo, hi):
            name, data, label = recs[k]
            ext = name.rsplit(".", 1)[1]
            for member, payload in ((f"{k:06d}.{ext}", data), (f"{k:06d}.cls", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """The same 25 records (24 images of 3 classes, mixed formats and sizes, and one corrupt file) as an image
    folder, two parquet files (+ a validation split that must not be read), an arrow stream and two tar shards."""
    root = tmp_path_factory.mktemp("copies")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "folder" / c).mkdir(parents=True)
        for i in range(8):
            h, w = [(20, 26), (34, 24), (16, 16), (40, 50)][i % 4]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "folder" / c / f"{i}.{'png' if i % 2 else 'jpg'}", quality=90)
    (root / "folder" / "dog" / "3b-broken.png").write_bytes(BROKEN)
    recs = records(root / "folder")
    assert len(recs) == 25 and recs[12][1] == BROKEN  # dog/3.png, then the broken one
    write_parquet(recs, root / "hf" / "data" / "train-00000-of-00002.parquet", 0, 12)
    write_parquet(recs, root / "hf" / "data" / "train-00001-of-00002.parquet", 12, 25)
    write_parquet(recs, root / "hf" / "data" / "validation-00000-of-00001.parquet", 0, 3)
    table = pa.table({"img": pa.array([b for _, b, _ in recs], pa.binary()),  # raw bytes, not a struct
                      "label": pa.array([y for _, _, y in recs], pa.int64())})
    (root / "arrow").mkdir()
    with pa.ipc.new_stream(str(root / "arrow" / "data-00000-of-00001.arrow"), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)
    (root / "wds").mkdir()
    write_tar(recs, root / "wds" / "train-000.tar", 0, 13)
    write_tar(recs, root / "wds" / "train-001.tar", 13, 25)
    return root


def cfg_for(copies, source, path, *extra):
    return load_config("toy", overrides=BASE + [f"data.source={source}", f"data.path={path}",
                                                f"output_dir={copies / 'runs'}", *extra])


SOURCES = {"hf": ("hf", "hf"), "hf-file": ("hf", "hf/data/train-00001-of-00002.parquet"), "arrow": ("hf", "arrow"),
           "wds": ("wds", "wds/train-{000..001}.tar"), "wds-dir": ("wds", "wds")}


def take(batches, n, size=8):
    out = [batches.next(size) for _ in range(n)]
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


@pytest.mark.parametrize("name", ["hf", "arrow", "wds", "wds-dir"])
def test_same_batches_as_the_folder(copies, name):
    """4 global batches of 8 over 25 records: crosses an epoch and meets the corrupt record."""
    source, path = SOURCES[name]
    ours = training_batches(cfg_for(copies, source, copies / path))
    folder = training_batches(cfg_for(copies, "folder", copies / "folder"))
    (a, ya), (b, yb) = take(ours, 4), take(folder, 4)
    assert a.dtype == torch.uint8 and a.shape == (32, 3, 16, 16)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert ours.skipped == folder.skipped == {12} and ours.bad_images == 1
    if name == "hf":
        assert ours.dataset.classes == list(CLASSES) and len(ours.dataset) == 25  # the validation file is not read


def test_one_parquet_file_and_a_worker_process(copies):
    """One file as data.path; a DataLoader worker (through repae.data.workers) reads what the main process reads."""
    source, path = SOURCES["hf-file"]
    inline = training_batches(cfg_for(copies, source, copies / path))
    assert len(inline.dataset) == 13 and inline.dataset.labels.tolist() == [1] * 5 + [2] * 8
    worker = training_batches(cfg_for(copies, source, copies / path, "data.num_workers=1"))
    tar = training_batches(cfg_for(copies, "wds", copies / "wds", "data.num_workers=1"))
    folder = training_batches(cfg_for(copies, "folder", copies / "folder"))
    a, b = take(inline, 2), take(worker, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c, d = take(tar, 2), take(folder, 2)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


@pytest.mark.parametrize("name", ["hf", "wds"])
def test_exact_resume(copies, name):
    source, path = SOURCES[name]
    cfg = cfg_for(copies, source, copies / path)
    straight = training_batches(cfg)
    take(straight, 2)
    state = json.loads(json.dumps(straight.state_dict()))  # what a checkpoint keeps
    resumed = training_batches(cfg)
    resumed.load_state_dict(state)
    for _ in range(2):  # the second crosses into epoch 1
        a, b = straight.next(8), resumed.next(8)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert resumed.skipped == straight.skipped == {12}


@pytest.mark.parametrize("name", ["hf", "wds"])
def test_two_ranks_read_disjoint_shares_of_one_batch(copies, name):
    source, path = SOURCES[name]
    loaded = {0: set(), 1: set()}
    ranks = []
    for rank in (0, 1):
        ds = image_dataset(cfg_for(copies, source, copies / path))
        load = ds._load
        ds._load = lambda j, load=load, rank=rank: loaded[rank].add(j) or load(j)
        ranks.append(DatasetBatches(ds, seed=0, rank=rank, world=2))
    whole = DatasetBatches(image_dataset(cfg_for(copies, source, copies / path)), seed=0)
    for _ in range(4):
        loaded[0].clear(), loaded[1].clear()
        (x0, y0), (x1, y1), (x, y) = ranks[0].next(8), ranks[1].next(8), whole.next(8)
        assert len(x0) == len(x1) == 4
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        # each rank decoded only its own records (the record after the corrupt one stands in for it)
        assert not (loaded[0] & loaded[1]) - {13} and len(loaded[0]) + len(loaded[1]) >= 8
    assert ranks[0].skipped | ranks[1].skipped == {12}



def weights(run_dir):
    ckpt = latest_checkpoint(run_dir)
    return {name: read_file(ckpt / f"{name}.safetensors") for name in ("sit", "ema")}


def test_repae_train_on_hf_and_wds_equals_the_folder(copies):
    """3 steps of `repae train` (vanilla SiT on a frozen random VAE): bit-identical weights, so the same
    batches; the corrupt record is counted once."""
    runs = {}
    for source, path in (("folder", "folder"), ("hf", "hf"), ("wds", "wds/train-{000..001}.tar")):
        code = main(["train", "--no-progress", f"data.source={source}", f"data.path={copies / path}", *BASE,
                     "train.max_steps=3", "train.ckpt_every=3", f"output_dir={copies / 'runs'}", f"exp_name={source}"])
        assert code == 0
        run_dir = copies / "runs" / source
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["unreadable_images_skipped"] == 1
        runs[source] = weights(run_dir)
    for source in ("hf", "wds"):
        for name, tensors in runs["folder"].items():
            for key, value in tensors.items():
                assert torch.equal(runs[source][name][key], value), f"{source}: {name}.{key}"


def put_dataset_repo(cache, repo_id, files):
    """A dataset snapshot in a huggingface_hub cache (refs/main -> snapshots/SHA/...)."""
    sha = "0" * 39 + "1"
    root = cache / ("datasets--" + repo_id.replace("/", "--"))
    for rel, data in files.items():
        (root / "snapshots" / sha / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / sha / rel).write_bytes(data)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)


def test_hub_dataset_id_reads_the_cache_offline(copies, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hub"
    data = copies / "hf" / "data"
    put_dataset_repo(hub, "someone/tiny-imagenet", {f"data/{p.name}": p.read_bytes() for p in data.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = take(training_batches(cfg_for(copies, "hf", "hf:someone/tiny-imagenet")), 1)
    b = take(training_batches(cfg_for(copies, "folder", copies / "folder")), 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ConfigError, match="hf:someone/absent: .*not in the local hub cache"):
        image_dataset(cfg_for(copies, "hf", "hf:someone/absent"))


def bad_copies(root):
    """Paths that are wrong in one way each."""
    (root / "empty").mkdir()
    t = pa.table({"image": pa.array([BROKEN], pa.binary()), "target": pa.array([0], pa.int64())})
    pq.write_table(t, root / "nolabel.parquet")
    t = pa.table({"image": pa.array(["a"], pa.string()), "label": pa.array([0], pa.int64())})
    pq.write_table(t, root / "strings.parquet")
    t = pa.table({"image": pa.array([BROKEN], pa.binary()), "label": pa.array([-1], pa.int64())})
    pq.write_table(t, root / "test-00000.parquet")
    with tarfile.open(root / "noimages.tar", "w") as tar:
        info = tarfile.TarInfo("000000.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"0"))
    (root / "gz").mkdir()
    (root / "gz" / "train-0.tar.gz").write_bytes(b"\x1f\x8b")
    return root


@pytest.mark.parametrize("source, path, message", [
    ("hf", "nowhere", r"data.path: .*nowhere does not exist"),
    ("hf", "empty", r"no .parquet or .arrow files under"),
    ("hf", "nolabel.parquet", r"has no label column \(looked for label, labels, cls, class; found image, target\)"),
    ("hf", "strings.parquet", r"column 'image' is string, not image bytes"),
    ("hf", "test-00000.parquet", r"1 rows have a negative label"),
    ("wds", "noimages.tar", r"noimages.tar has no image members \(looked for .jpg.*found .cls\)"),
    ("wds", "nowhere-{0..3}.tar", r"4 of the 4 shards of .*nowhere-\{0..3\}.tar do not exist"),
    ("wds", "gz", r"only compressed tars: decompress them"),
    ("wds", "empty", r"no .tar files in"),
])
def test_bad_paths_are_one_line_errors(tmp_path, source, path, message):
    root = bad_copies(tmp_path)
    cfg = load_config("toy", overrides=BASE + [f"data.source={source}", f"data.path={root / path}"])
    with pytest.raises(ConfigError, match=message) as err:
        image_dataset(cfg)
    assert "\n" not in str(err.value)


def test_split_and_source_choices(copies):
    with pytest.raises(ConfigError, match=r"no 'test' files under .*named by split: train, validation.*data.split"):
        image_dataset(cfg_for(copies, "hf", copies / "hf", "data.split=test"))
    assert len(image_dataset(cfg_for(copies, "hf", copies / "hf", "data.split=validation"))) == 3
    with pytest.raises(ConfigError, match="'hf', 'wds'"):
        load_config("toy", overrides=["data.source=parquet"])


def test_brace_expansion():
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}-{0..1}") == ["x-0", "x-1", "y-0", "y-1"]
    assert expand_braces("s{1..0}-{a,b}") == ["s1-a", "s1-b", "s0-a", "s0-b"]
    assert expand_braces(os.path.join("d", "s.tar")) == [os.path.join("d", "s.tar")]


def test_stage2_caches_latents_from_hf_as_from_the_folder(copies, tmp_path):
    """`repae cache-latents --source hf ...` reads through the same interface: the same moments and labels
    from parquet as from the folder; training on the cache checks it is given the source it was made from."""
    from conftest import tiny_vae_args
    from repae.models.vae import AutoencoderKL
    from repae.stage2.cache import LatentCache, read_manifest
    from repae.stage2.latents import _check_source
    from repae.weights import save_model

    save_model(AutoencoderKL(tiny_vae_args()), tmp_path / "vae.safetensors")
    for source, path in (("hf", copies / "hf"), ("folder", copies / "folder")):
        assert main(["cache-latents", "--vae", str(tmp_path / "vae.safetensors"), "--data", str(path), "--out",
                     str(tmp_path / source), "--image-size", "16", "--batch-size", "8", "--num-workers", "0",
                     "--no-progress", "--source", source]) == 0
    made = read_manifest(tmp_path / "hf")
    assert made["source"]["kind"] == "hf" and made["source"]["count"] == 25
    a, b = LatentCache(tmp_path / "hf"), LatentCache(tmp_path / "folder")
    assert torch.equal(a.moments(list(range(25)))[0], b.moments(list(range(25)))[0])
    assert a.labels.tolist() == b.labels.tolist()
    _check_source(cfg_for(copies, "hf", copies / "hf"), made)
    with pytest.raises(ConfigError, match="come from a hf source, but data.source=folder"):
        _check_source(cfg_for(copies, "folder", copies / "folder"), made)


def test_detect_kind_tells_the_sources_apart_from_a_bare_path(copies):
    from repae.data.sources import detect_kind

    assert detect_kind("hf:ILSVRC/imagenet-1k") == "hf"
    assert detect_kind(str(copies / "hf")) == "hf" and detect_kind(str(copies / "arrow")) == "hf"
    assert detect_kind(str(copies / "hf" / "data" / "train-00000-of-00002.parquet")) == "hf"
    assert detect_kind(str(copies / "wds")) == "wds" and detect_kind(str(copies / "wds" / "train-{000..001}.tar")) == "wds"
    assert detect_kind(str(copies / "wds" / "*.tar")) == "wds"
    assert detect_kind(str(copies / "folder")) == "folder" and detect_kind(str(copies / "nope")) == "folder"


def test_evaluate_reads_every_source_as_the_folder(copies, tmp_path):
    """`repae evaluate vae --data` takes parquet/arrow, tar shards and folders through repae.data.sources: the same
    24 images in the same order give the same metrics, the corrupt record skipped and counted once."""
    from conftest import tiny_vae_args
    from repae.models.vae import AutoencoderKL
    from repae.weights import save_model

    torch.manual_seed(0)
    save_model(AutoencoderKL(tiny_vae_args()), tmp_path / "vae.safetensors")

    def evaluate(data, *extra):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        assert main(["evaluate", "vae", "--vae", str(tmp_path / "vae.safetensors"), "--data", str(data),
                     "--image-size", "16", "--batch-size", "5", "--no-progress", "--out", str(out), *extra]) == 0
        return json.loads(out.read_text())

    folder = evaluate(copies / "folder")
    assert folder["metrics"]["num_images"] == 24 and folder["metrics"]["unreadable_images_skipped"] == 1
    for data, extra in ((copies / "hf", ["--split", "train"]), (copies / "arrow", []),
                        (copies / "wds" / "train-{000..001}.tar", []), (copies / "wds", [])):
        rec = evaluate(data, *extra)
        for key in ("num_images", "unreadable_images_skipped", "psnr", "ssim"):
            assert rec["metrics"][key] == folder["metrics"][key], (data, key)
    assert evaluate(copies / "hf")["metrics"]["num_images"] == 3  # the default split is validation


def test_reproduction_heldout_set_reads_any_source(copies):
    """`repae bench reproduce --heldout PATH` takes parquet (its validation split) and tar shards as it takes a
    folder: the same images and labels."""
    from repae.reproduce.judges import heldout_set

    cfg = cfg_for(copies, "folder", copies / "folder")
    folder = image_dataset(cfg)
    first3 = torch.stack([folder[i][0] for i in range(3)]), [folder[i][1] for i in range(3)]
    images, labels, where = heldout_set(cfg, str(copies / "hf"), 3)  # validation-00000-of-00001: records 0..2
    assert torch.equal(images, first3[0]) and labels.tolist() == first3[1] and where == str(copies / "hf")
    a, ya, _ = heldout_set(cfg, str(copies / "wds"), 10)
    b, yb, _ = heldout_set(cfg, str(copies / "folder"), 10)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    with pytest.raises(ConfigError, match="nope"):
        heldout_set(cfg, str(copies / "nope"), 3)
