"""The prepare stage: digits export, splits from any image folder, determinism, and errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeship.config import DataParams
from edgeship.errors import DataError
from edgeship.tasks.data import SPLITS, export_digits, load_split, prepare, read_prepared


@pytest.fixture(scope="module")
def digits_raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("digits") / "raw"
    assert export_digits(raw) == 1797
    return raw


def write_folder(root: Path, per_class: dict[str, int], size: int = 10, mode: str = "RGB") -> Path:
    """A small image folder: per_class[name] images in root/name/, each a distinct pattern."""
    rng = np.random.default_rng(0)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / name / f"{i}.png")
    return root


def test_export_digits_writes_grayscale_pngs_per_class(digits_raw: Path):
    assert sorted(p.name for p in digits_raw.iterdir()) == [str(d) for d in range(10)]
    files = sorted(digits_raw.glob("*/*.png"))
    assert len(files) == 1797
    with Image.open(files[0]) as image:
        assert image.mode == "L" and image.size == (8, 8)
    assert max(np.asarray(Image.open(f)).max() for f in files[:50]) == 255  # 0..16 scaled to 0..255


def test_prepare_digits_writes_stratified_splits(digits_raw: Path, tmp_path: Path):
    params = DataParams(input_size=16, calibration_size=100)
    data = prepare(digits_raw, tmp_path / "prepared", params)

    assert data.classes == [str(d) for d in range(10)]
    assert data.input_shape == (1, 16, 16)
    assert sum(data.counts[s] for s in ("train", "val", "test")) == 1797
    assert data.counts["calibration"] == 100
    for split in SPLITS:
        x, y = load_split(data, split)
        assert x.shape == (data.counts[split], 1, 16, 16) and x.dtype == np.float32
        assert y.dtype == np.int64 and 0.0 <= x.min() and x.max() <= 1.0
    _, y_all = np.unique(np.concatenate([load_split(data, s)[1] for s in ("train", "val", "test")]),
                         return_counts=True)
    _, y_test = np.unique(load_split(data, "test")[1], return_counts=True)
    assert np.all(np.abs(y_test - y_all * params.test_fraction) <= 1)  # each class in the same proportion

    x_train, _ = load_split(data, "train")
    x_calibration, _ = load_split(data, "calibration")
    assert all(any(np.array_equal(c, t) for t in x_train) for c in x_calibration[:5])  # drawn from train
    assert read_prepared(tmp_path / "prepared") == data


def test_prepare_is_byte_for_byte_deterministic(tmp_path: Path):
    raw = write_folder(tmp_path / "raw", {"cat": 7, "dog": 6})
    params = DataParams(input_size=12, channels=3, calibration_size=4, seed=3)
    first, second = prepare(raw, tmp_path / "a", params), prepare(raw, tmp_path / "b", params)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["calibration.npz", "meta.json", "test.npz", "train.npz", "val.npz"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first.input_shape == second.input_shape == (3, 12, 12)
    assert load_split(first, "train")[0].shape[1:] == (3, 12, 12)


def test_prepare_converts_and_ignores_non_images(tmp_path: Path):
    raw = write_folder(tmp_path / "raw", {"a": 3, "b": 3}, mode="RGB")
    (raw / "a" / "notes.txt").write_text("not an image")
    (raw / ".cache").mkdir()
    data = prepare(raw, tmp_path / "out", DataParams(input_size=8, channels=1))
    assert data.classes == ["a", "b"]
    assert data.counts == {"train": 2, "val": 2, "test": 2, "calibration": 2}


@pytest.mark.parametrize("layout, expected", [
    ("missing", "does not exist"),
    ("empty", "no class subfolders"),
    ("one_class", "only one class ('solo')"),
    ("too_few", "class 'rare' has 2 image(s)"),
])
def test_prepare_rejects_unusable_folders(tmp_path: Path, layout: str, expected: str):
    raw = tmp_path / "raw"
    if layout == "empty":
        raw.mkdir()
    elif layout == "one_class":
        write_folder(raw, {"solo": 5})
    elif layout == "too_few":
        write_folder(raw, {"common": 10, "rare": 2})
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        prepare(raw, tmp_path / "out", DataParams(input_size=8))


def test_prepare_names_an_unreadable_image(tmp_path: Path):
    raw = write_folder(tmp_path / "raw", {"a": 3, "b": 3})
    (raw / "b" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*b/broken\.png"):
        prepare(raw, tmp_path / "out", DataParams(input_size=8))


def test_read_prepared_and_load_split_say_what_is_missing(tmp_path: Path):
    with pytest.raises(DataError, match="run the prepare stage"):
        read_prepared(tmp_path)
    data = prepare(write_folder(tmp_path / "raw", {"a": 3, "b": 3}), tmp_path / "out", DataParams(input_size=8))
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_split(data, "holdout")
