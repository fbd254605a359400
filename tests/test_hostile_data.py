"""Hostile data files: a thin image whose crop resize would be gigapixels, Pillow running out of memory, labels
that would size a class list by 10**12 or overflow int64, labels that are the CFG null class or past the
model's embedding, and packed indexes pointing at negative offsets. Each is refused (or skipped and counted,
for an image) with the reader's own error, fast and without allocating: the undefended paths are guarded here
(a resize guard, a memory limit in a forked child) so that a missing defence fails quickly instead of
exhausting the machine."""

import io
import json
import os
import resource
import select
import tarfile
import time
import traceback

import numpy as np
import pytest
from PIL import Image, ImageFile

from repae.config import ConfigError, load_config
from repae.data import sources
from repae.data.folder import ImageFolder
from repae.data.images import ImageTooLarge, UnreadableImage, decode_image
from repae.data.packed import PackedDataError, PackedDataset, write_packed
from repae.data.wds import TarDataError, TarImages

BASE = ["data.image_size=16", "data.num_workers=0", "model.arch=SiT-T/2", "model.depth=2", "model.hidden_size=48",
        "model.num_heads=2", "model.encoder_depth=1", "vae.from_scratch=true", "train.tune_vae=false",
        "latent_norm.mode=fixed", "loss.proj_coeff=0", "model.num_classes=2"]


def png(width: int, height: int, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), 128).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def no_big_resizes(monkeypatch):
    """Any resize to more than 10 MP fails the test at once (before Pillow allocates the output)."""
    original = Image.Image.resize

    def guarded(self, size, *args, **kw):
        assert size[0] * size[1] <= 10_000_000, f"resized a {self.size} image to {size}"
        return original(self, size, *args, **kw)

    monkeypatch.setattr(Image.Image, "resize", guarded)


def in_child_with_memory_limit(fn, extra_bytes: int = 512 << 20, timeout: float = 30.0) -> str:
    """Run fn() in a forked child whose address space may grow by at most `extra_bytes`; returns
    "ok" or "<ExceptionType>: <message>". A defence that is missing fails with MemoryError in the child,
    quickly, instead of taking the machine's memory."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
            try:
                fn()
                result = "ok"
            except BaseException as err:  # noqa: B902 (reported to the parent, whatever it is)
                result = f"{type(err).__name__}: {err}"[:2000]
            os.write(write_end, result.encode("utf-8", "replace"))
        except BaseException:
            os.write(write_end, traceback.format_exc()[-2000:].encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
            return "timeout"
        chunks = []
        while True:
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


# ------------------------------------------------------------------------ A2: the crop's resize is bounded too


def test_thin_image_is_refused_before_its_crop_resize(no_big_resizes):
    """An 89-byte 1x4000 PNG passes the source pixel limit but its 256px crop resize is 256x1024000 = 262 MP."""
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="1x4000 would be resized to 256x1024000"):
        decode_image(png(1, 4000), size=256)
    assert time.perf_counter() - start < 1.0


def test_resize_limit_is_max_pixels_but_never_below_four_crops():
    # 1x300 to a 16px crop: 16x4800 = 76800 pixels, over max(1000, 4 * 16 * 16): refused, tiny as it is
    with pytest.raises(ImageTooLarge, match="16x4800"):
        decode_image(png(1, 300), max_pixels=1000, size=16)
    # a 4:1 image resizes to exactly 4 crops: read even with the limit below that
    assert decode_image(png(32, 8, "RGB"), max_pixels=1000, size=16).shape == (16, 16, 3)  # to 64x16
    # an ordinary upscaled small image (1 crop) is read whatever the limit
    assert decode_image(png(12, 10, "RGB"), max_pixels=120, size=16).shape == (16, 16, 3)


def test_thin_image_in_a_folder_is_skipped_and_counted(tmp_path, no_big_resizes):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0-thin.png").write_bytes(png(1, 4000))
    (tmp_path / "a" / "1-ok.png").write_bytes(png(20, 24, "RGB"))
    image, label, skipped = ImageFolder(tmp_path, image_size=256)[0]  # 1x4000 -> 256x1024000
    assert tuple(image.shape) == (3, 256, 256) and label == 0 and skipped == (0,)


@pytest.mark.parametrize("error", [MemoryError, OverflowError])
def test_pillow_running_out_of_memory_is_an_unreadable_image(monkeypatch, error):
    def load(self):
        raise error("cannot allocate")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(UnreadableImage, match=error.__name__):
        decode_image(png(8, 8))


# --------------------------------------------------------------- A3: labels bounded before anything is sized


def write_tar(path, label: str):
    with tarfile.open(path, "w") as tar:
        for name, data in (("s0.png", png(8, 8, "RGB")), ("s0.cls", label.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_label_too_big_for_int64_is_a_tar_error(tmp_path):
    shard = write_tar(tmp_path / "s.tar", "99999999999999999999")  # undefended: raw OverflowError
    with pytest.raises(TarDataError, match="s0.cls holds the label 99999999999999999999"):
        TarImages([shard], image_size=16)


def test_tar_label_of_10_to_the_12_builds_no_class_list(tmp_path):
    shard = write_tar(tmp_path / "s.tar", str(10**12))  # undefended: a list of 10**12 class names
    result = in_child_with_memory_limit(lambda: TarImages([shard], image_size=16))
    assert result.startswith("TarDataError") and "over the largest class id" in result, result


def write_table(path, labels, label_type, names=None):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cell = {"bytes": png(8, 8, "RGB"), "path": None}
    table = pa.table({"image": pa.array([cell] * len(labels)), "label": pa.array(labels, label_type)})
    if names is not None:  # the metadata `datasets` writes for a ClassLabel column
        features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path)
    return path


def test_table_label_of_10_to_the_12_builds_no_class_list(tmp_path):
    pa = pytest.importorskip("pyarrow")
    from repae.data.hf import open_table_images

    path = write_table(tmp_path / "train.parquet", [0, 10**12], pa.int64())
    result = in_child_with_memory_limit(lambda: open_table_images(path, image_size=16))
    assert result.startswith("TableDataError") and "over the largest class id" in result, result


def test_table_uint64_label_does_not_wrap_round(tmp_path):
    pa = pytest.importorskip("pyarrow")
    from repae.data.hf import TableDataError, open_table_images

    path = write_table(tmp_path / "train.parquet", [0, 2**64 - 1], pa.uint64())  # as int64: -1
    with pytest.raises(TableDataError, match="over the largest class id.*18446744073709551615"):
        open_table_images(path, image_size=16)


# -------------------------------------------------------- B2: every label is a class of the model, never the null one


def test_table_label_past_its_classlabel_names_is_refused(tmp_path):
    """ClassLabel names 2 classes, so len(classes) passes a model.num_classes=2 check; label 2 is the null class."""
    pa = pytest.importorskip("pyarrow")
    from repae.data.hf import TableDataError, open_table_images

    path = write_table(tmp_path / "train.parquet", [0, 1, 2], pa.int64(), names=["cat", "dog"])
    with pytest.raises(TableDataError, match="names 2 classes"):
        open_table_images(path, image_size=16)
    cfg = load_config("toy", overrides=BASE + ["data.source=hf", f"data.path={path}"])
    with pytest.raises(ConfigError, match="names 2 classes"):
        sources.training_batches(cfg)


@pytest.fixture
def packed(tmp_path):
    """A 2-class packed store of 4 images, and a function that rewrites its one index through `edit`."""
    for c in ("cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 18), (40 * i, 90, 10)).save(tmp_path / "src" / c / f"{i}.png")
    out = tmp_path / "packed"
    write_packed(tmp_path / "src", out, image_size=16, codec="png", progress=False)

    def rewrite(edit):
        manifest = json.loads((out / "manifest.json").read_text())
        rec = manifest["shards"][0]
        index = np.load(out / rec["idx"])
        edit(index)
        buf = io.BytesIO()
        np.save(buf, index)
        (out / rec["idx"]).write_bytes(buf.getvalue())
        rec["idx_bytes"] = len(buf.getvalue())
        (out / "manifest.json").write_text(json.dumps(manifest))
        return out

    return out, rewrite


def test_packed_label_of_the_null_class_is_refused(packed):
    """Every label 2 with 2 classes: trained silently as the CFG null class (unconditional) without the check."""
    out, rewrite = packed
    assert PackedDataset(out).labels.tolist() == [0, 0, 1, 1]
    rewrite(lambda index: index.__setitem__((slice(None), 2), 2))
    with pytest.raises(PackedDataError, match="4 labels are outside the 2 classes of its manifest, e.g. 2"):
        PackedDataset(out)
    cfg = load_config("toy", overrides=BASE + ["data.source=packed", f"data.path={out}"])
    with pytest.raises(ConfigError, match="outside the 2 classes"):
        sources.training_batches(cfg)


def test_packed_label_past_the_embedding_is_refused(packed):
    out, rewrite = packed
    rewrite(lambda index: index.__setitem__((0, 2), 999))  # undefended: a raw IndexError in the label embedding
    with pytest.raises(PackedDataError, match="e.g. 999"):
        PackedDataset(out)


class _Records:
    """What training_batches needs of a Dataset: classes, labels and a length."""

    def __init__(self, classes, labels):
        self.classes, self.labels = classes, labels

    def __len__(self):
        return len(self.labels)


@pytest.mark.parametrize("labels, message", [([0, 1, 2, 1], r"1 of 4 labels are outside 0..1 .*e\.g\. 2 \(the id of "
                                                            r"the null class"),
                                             ([0, 7], r"outside 0..1 \(model.num_classes=2\), e\.g\. 7$"),
                                             ([-1, 0], r"e\.g\. -1$")])
def test_training_refuses_labels_outside_the_models_classes_from_any_source(monkeypatch, labels, message):
    """A source whose class list fits the model but whose labels do not: refused before training, whatever the
    reader (each reader keeps its labels within its own classes; this is the one check against the model)."""
    monkeypatch.setattr(sources, "image_dataset", lambda cfg, hflip=False: _Records(["a", "b"], labels))
    cfg = load_config("toy", overrides=BASE + ["data.source=folder", "data.path=/nowhere"])
    with pytest.raises(ConfigError, match=message):
        sources.training_batches(cfg)
    monkeypatch.setattr(sources, "image_dataset", lambda cfg, hflip=False: _Records(["a", "b"], [0, 1, 1]))
    assert sources.training_batches(cfg).dataset.labels == [0, 1, 1]


# -------------------------------------------------------------- C8: index offsets and lengths are never negative


@pytest.mark.parametrize("offset, length", [(-8, 16), (0, -5), (2**62, 2**62)])  # the last: the sum wraps int64
def test_packed_index_with_negative_or_wrapping_offsets_is_refused_at_open(packed, offset, length):
    out, rewrite = packed

    def edit(index):
        index[0, 0], index[0, 1] = offset, length

    rewrite(edit)
    with pytest.raises(PackedDataError, match="negative offset or length, or past the"):
        PackedDataset(out)


def test_packed_index_with_a_forged_header_is_refused_before_allocating(packed):
    """An index whose .npy header claims 10**12 rows: np.load allocates 22 TiB first (a raw MemoryError);
    the bounded reader compares the claim with the file's bytes."""
    out, _ = packed
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["shards"][0]
    header = repr({"descr": "<i8", "fortran_order": False, "shape": (10**12, 3)}).encode()
    header += b" " * (64 - (10 + len(header) + 1) % 64) + b"\n"
    forged = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 96
    (out / rec["idx"]).write_bytes(forged)
    rec["idx_bytes"] = len(forged)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackedDataError, match="unreadable"):
        PackedDataset(out)


def test_table_with_deeply_nested_classlabel_metadata_falls_back_to_label_ids(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from repae.data.hf import open_table_images

    path = write_table(tmp_path / "train.parquet", [0, 1], pa.int64())
    table = pq.read_table(path).replace_schema_metadata({"huggingface": "[" * 100_000 + "]" * 100_000})
    pq.write_table(table, path)  # undefended: RecursionError out of json.loads
    assert open_table_images(path, image_size=16).classes == ["0", "1"]


@pytest.mark.parametrize("cell", [5, "/etc/hostname", [1, 2]])
def test_table_image_struct_whose_bytes_are_not_binary_is_refused_at_open(tmp_path, cell):
    """A string there was opened as a path on this machine: another file read as the image."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from repae.data.hf import TableDataError, open_table_images

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": cell, "path": "a.png"}] * 2), "label": [0, 1]}), path)
    with pytest.raises(TableDataError, match="column 'image' is struct<bytes: .*not image bytes"):
        open_table_images(path, image_size=8)


def test_arrow_file_with_offsets_beyond_its_data_is_refused_at_open(tmp_path):
    """Undefended, reading the row dereferences memory past the file's map: the process dies of SIGBUS."""
    import struct
    import subprocess
    import sys

    pa = pytest.importorskip("pyarrow")
    image = png(8, 8, "RGB")
    path = tmp_path / "train.arrow"
    with pa.ipc.new_file(str(path), pa.schema([("image", pa.binary()), ("label", pa.int64())])) as w:
        w.write_table(pa.table({"image": pa.array([image] * 3, pa.binary()), "label": pa.array([0, 1, 2])}))
    raw = bytearray(path.read_bytes())
    at = raw.find(struct.pack("<4i", 0, len(image), 2 * len(image), 3 * len(image)))  # the binary column's offsets
    assert at > 0
    raw[at + 4:at + 8] = struct.pack("<i", 0x7FFF0000)
    path.write_bytes(raw)
    code = ("import sys\nfrom repae.data.hf import TableDataError, open_table_images\n"
            f"try:\n    open_table_images({str(path)!r}, image_size=8)[0]\n"
            "except TableDataError as err:\n    print(err)\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, (done.returncode, done.stderr[-500:])  # a clear error, not a dead process
    assert f"{path} is not a readable arrow file" in done.stdout


@pytest.mark.parametrize("label", ["0" * 64 + "7", "1_0", "\u0663", "\uff15"])
def test_tar_label_that_int_would_misread_is_refused(tmp_path, label):
    """Undefended: the first 64 bytes of a 65-byte label were read as 0, and int() took "1_0" as 10 and
    Arabic-Indic or fullwidth digits as 3 and 5."""
    shard = write_tar(tmp_path / "s.tar", label)
    with pytest.raises(TarDataError, match=r"s0.cls holds .*(not an integer class id|not a class id)"):
        TarImages([shard], image_size=16)


def _forged_header(kind: bytes, name: str, size: int) -> bytes:
    """A 512-byte tar header of type `kind` whose size field (base-256) claims `size` bytes."""
    info = tarfile.TarInfo(name)
    info.type = kind
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT)[:512])
    block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.mark.parametrize("kind,name", [(tarfile.GNUTYPE_LONGNAME, "././@LongLink"),
                                       (tarfile.XHDTYPE, "././@PaxHeader")])
def test_tar_long_name_or_pax_header_with_a_forged_size_is_a_tar_error(tmp_path, kind, name):
    """tarfile reads these with one read(size) of the claimed size: 100 GB asked of a 2 KB file was a MemoryError."""
    shard = write_tar(tmp_path / "good.tar", "1")
    forged = tmp_path / "forged.tar"
    forged.write_bytes(_forged_header(kind, name, 10**11) + shard.read_bytes())
    result = in_child_with_memory_limit(lambda: TarImages([forged], image_size=16))
    assert result.startswith("TarDataError") and f"{forged} is not a readable tar file" in result, result


def test_tar_pax_field_that_does_not_parse_names_the_shard(tmp_path):
    """A garbage GNU.sparse.map raised a bare ValueError("invalid literal for int()") naming no shard."""
    record = b"GNU.sparse.map=x,y\n"
    record = b"%d %s" % (len(record) + 3, record)
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    body = pax.tobuf(tarfile.USTAR_FORMAT)[:512] + record + b"\0" * (512 - len(record))
    member = tarfile.TarInfo("s0.png")
    data = png(8, 8, "RGB")
    member.size = len(data)
    shard = tmp_path / "bad.tar"
    shard.write_bytes(body + member.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512) + b"\0" * 1024)
    with pytest.raises(TarDataError, match=f"{shard} is not a readable tar file"):
        TarImages([shard], image_size=16)


@pytest.mark.parametrize("flat", [False, True])
def test_a_fifo_named_like_an_image_is_not_listed(tmp_path, flat):
    """Undefended, the folder listed it and the first read of it blocked forever."""
    from repae.data.folder import ImageFolder

    where = tmp_path if flat else tmp_path / "cats"
    where.mkdir(exist_ok=True)
    (where / "a.png").write_bytes(png(8, 8, "RGB"))
    os.mkfifo(where / "pipe.jpg")
    if not flat:  # (in a flat folder a directory would be a class)
        (where / "dir.jpg").mkdir()
    assert [p.name for p in ImageFolder(tmp_path, image_size=8).files] == ["a.png"]


@pytest.mark.parametrize("name, reader", [
    ("w.safetensors", "repae.weights.load_model"), ("w.pt", "repae.weights.read_file"),
    ("c.yaml", "repae.config.read_yaml"), ("r.json", "repae.fileio.read_json_object"),
    ("a.npy", "repae.fileio.read_npy"),
])
def test_a_fifo_given_as_a_file_is_refused_not_waited_on(tmp_path, name, reader):
    """Undefended, `repae info pipe.safetensors`, `--config pipe.yaml` and `--longer pipe.json` blocked forever
    (safetensors blocks holding the interpreter lock, so the read runs in a child process with a time limit)."""
    import subprocess
    import sys

    fifo = tmp_path / name
    os.mkfifo(fifo)
    module, func = reader.rsplit(".", 1)
    code = (f"import sys, importlib\ntry:\n    importlib.import_module({module!r}).{func}(sys.argv[1])\n"
            f"except Exception as err:\n    print(err)\nelse:\n    print('read without error')")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{reader} still reading {fifo} after 60 s: blocked on a FIFO") from None
    assert f"{fifo} is not a regular file (a pipe, socket or device)" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("path, words", [("/dev/zero", "not a regular file"), (".", "is a directory")])
def test_a_config_that_is_a_device_or_a_directory_is_called_that(path, words):
    from repae.config import ConfigError, read_yaml

    with pytest.raises(ConfigError, match=words):  # both were "config file not found"
        read_yaml(path)
