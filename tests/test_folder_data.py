import numpy as np
import pytest
import torch
from PIL import Image

from repae.data.folder import DatasetBatches, ImageFolder, adm_center_crop, list_image_folder


def make_folder(root, per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_adm_center_crop_known_geometry():
    # 100x40 image whose red channel is the column index: short side 40 >= 2*16 -> BOX halve to 50x20,
    # then BICUBIC to round(50*0.8)=40 x 16, then crop columns 12..27
    arr = np.zeros((40, 100, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(100, dtype=np.uint8)[None, :]
    out = adm_center_crop(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    half = Image.fromarray(arr).resize((50, 20), Image.BOX).resize((40, 16), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(half)[:, 12:28])
    assert 29 <= out[0, 0, 0] <= 33 and 66 <= out[0, -1, 0] <= 71  # centre columns 31..68 of the ramp


def test_folder_lists_classes_and_skips_corrupt_images(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dog" / "notes.txt").write_text("not an image")
    files, labels, classes = list_image_folder(root)
    assert classes == ["cat", "dog"] and labels.count(0) == 3 and labels.count(1) == 4
    ds = ImageFolder(root, image_size=16)
    broken = [i for i, f in enumerate(ds.files) if f.name == "broken.png"][0]
    image, label, bad = ds[broken]
    assert bad == (broken,) and image.shape == (3, 16, 16) and image.dtype == torch.uint8
    batches = DatasetBatches(ds, seed=0)
    for _ in range(4):
        batches.next(7)
    assert batches.bad_images == 1  # every pass over the 7 files meets the broken one: one file, counted once


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        list_image_folder(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images under"):
        list_image_folder(tmp_path / "empty")


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_batches_resume_exactly(tmp_path, workers):
    ds = ImageFolder(make_folder(tmp_path / "data", per_class=5), image_size=16, hflip=True)
    a = DatasetBatches(ds, seed=3, num_workers=workers)
    for _ in range(3):
        a.next(4)
    state = a.state_dict()
    expected = [a.next(4) for _ in range(3)]
    b = DatasetBatches(ds, seed=3, num_workers=workers)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.next(4) for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("skipped", [[99], [-1], ["0"], "0", [True]])
def test_dataset_batches_refuse_a_bad_unreadable_list_and_keep_their_place(tmp_path, skipped):
    # an edited checkpoint: its list of unreadable files must name files of this dataset (the old reader
    # took ints of anything, and "0" as a string of one index)
    ds = ImageFolder(make_folder(tmp_path / "data"), image_size=16)
    batches = DatasetBatches(ds, seed=3)
    batches.next(4)
    state = {**batches.state_dict(), "position": 1, "skipped": skipped}
    with pytest.raises(ValueError, match="unreadable-image list"):
        batches.load_state_dict(state)
    assert batches.state_dict()["position"] == 4 and batches.bad_images == 0


@pytest.mark.parametrize("pin", [True, False])
def test_training_batches_from_a_folder_come_pinned_when_asked(tmp_path, pinning, pin):
    """For a GPU (repae train, bench loop) each batch passes through the DataLoader's pin step, so that its
    copy to the device runs beside the host's work; nowhere else (a CPU run pays no page-locking)."""
    from repae.config import load_config
    from repae.data.sources import training_batches

    root = make_folder(tmp_path / "data", per_class=4)
    cfg = load_config("toy", overrides=["data.source=folder", f"data.path={root}", "data.image_size=32",
                                        "model.num_classes=2", "loss.proj_coeff=0", "vae.from_scratch=true",
                                        "train.tune_vae=false", "model.arch=SiT-T/2"])
    images, labels = training_batches(cfg, pin_memory=pin).next(4)
    assert len(pinning) == int(pin)
    if pin:
        assert pinning[0][0] is images and pinning[0][1] is labels
