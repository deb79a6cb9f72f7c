"""The `prepare` stage: any folder of class subfolders -> fixed-size train/val/test/calibration splits.

The raw data is an image folder, one subfolder per class (the ImageFolder layout);
class names are the sorted subfolder names. `prepare` reads every image with
Pillow, converts it to grayscale or RGB, resizes it, and writes stratified splits
as `.npz` files (x: float32 NCHW in [0, 1], y: int64) plus `meta.json`. The output
is byte-for-byte the same for the same input and params, so DVC hashes are stable.

    >>> export_digits(Path("data/raw"))                  # the default data set, as PNGs
    >>> data = prepare(Path("data/raw"), Path("data/prepared"), DataParams(input_size=32))
    >>> x, y = load_split(data, "train")
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from edgeship.config import DataParams
from edgeship.errors import DataError
from edgeship.files import write_atomic
from edgeship.records import PreparedData

SPLITS = ("train", "val", "test", "calibration")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamp inside .npz files, so bytes depend on data only


def export_digits(raw_dir: Path) -> int:
    """Write scikit-learn's 8x8 digits as `raw_dir/<digit>/<index>.png` (8-bit grayscale); return the count."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    raw_dir = Path(raw_dir)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = raw_dir / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return len(pixels)


def prepare(raw_dir: Path, out_dir: Path, params: DataParams) -> PreparedData:
    """Read an image folder and write stratified, resized splits and meta.json to `out_dir`.

    Raises:
        DataError: the folder is missing or empty, has one class, a class has too few
            images to put one in each of train/val/test, or an image cannot be read.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    files = _list_images(raw_dir)
    _check_one_mode(files)
    classes = sorted(files)
    x = np.stack([_read_image(path, params.channels, params.input_size)
                  for name in classes for path in files[name]])
    y = np.concatenate([np.full(len(files[name]), label, dtype=np.int64) for label, name in enumerate(classes)])

    indices = _split_indices(y, classes, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_npz(out_dir / f"{split}.npz", x=x[indices[split]], y=y[indices[split]])
    input_shape = (params.channels, params.input_size, params.input_size)
    counts = {split: int(len(indices[split])) for split in SPLITS}
    meta = {"classes": classes, "input_shape": list(input_shape), "counts": counts,
            "class_counts": {name: len(files[name]) for name in classes}}
    write_atomic(out_dir / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return PreparedData(directory=out_dir, classes=classes, input_shape=input_shape, counts=counts)


def read_prepared(out_dir: Path) -> PreparedData:
    """The record of splits that `prepare` wrote earlier to `out_dir`."""
    meta_path = Path(out_dir) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found; run the prepare stage first (`dvc repro prepare`)")
    meta = json.loads(meta_path.read_text())
    return PreparedData(directory=Path(out_dir), classes=meta["classes"],
                        input_shape=tuple(meta["input_shape"]), counts=meta["counts"],
                        task=meta.get("task", "classification"), annotations_sha256=meta.get("annotations_sha256"))


def load_split(data: PreparedData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (float32 NCHW in [0, 1]) and labels (int64; a detection split: objects per image) of one split."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; splits are {list(SPLITS)}")
    path = data.split_path(split)
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare stage again")
    with np.load(path) as arrays:
        return images_of(arrays), arrays["y"]


def images_of(arrays, limit: int | None = None) -> np.ndarray:
    """A split's images as float32 in [0, 1] (detection splits keep them as uint8 on disk: a quarter the size)."""
    x = arrays["x"][:limit]
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x


def _list_images(raw_dir: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, checking there is something to learn from."""
    if not raw_dir.is_dir():
        raise DataError(f"image folder {raw_dir} does not exist; point data.raw_dir in params.yaml at a folder "
                        f"with one subfolder per class (`edgeship data digits` writes the default digits there)")
    files = {}
    for folder in sorted(p for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in folder.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            files[folder.name] = images
    if not files:
        raise DataError(f"image folder {raw_dir} holds no class subfolders with images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}); put each class's images in raw_dir/<class name>/")
    if len(files) == 1:
        only = next(iter(files))
        raise DataError(f"image folder {raw_dir} has only one class ('{only}'); a classifier needs at least two "
                        f"class subfolders with images")
    return files


def _check_one_mode(files: dict[str, list[Path]]) -> None:
    """Every image in one Pillow mode (all L, all RGB, ...): a folder mixing them is usually two data sets."""
    from PIL import Image

    modes: dict[str, list[Path]] = {}
    for path in (p for paths in files.values() for p in paths):
        try:
            with Image.open(path) as image:
                modes.setdefault(image.mode, []).append(path)
        except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise DataError(f"cannot read image {path}: {error}; delete or replace the file") from None
    if len(modes) > 1:
        counts = ", ".join(f"{len(paths)} {mode} (e.g. {paths[0]})" for mode, paths in
                           sorted(modes.items(), key=lambda item: -len(item[1])))
        raise DataError(f"the image folder mixes image modes: {counts}; convert them to one mode (for example "
                        f"all RGB, with data.channels: 3, or all grayscale L with data.channels: 1) before "
                        f"preparing")


def _read_image(path: Path, channels: int, size: int) -> np.ndarray:
    """One image as float32 (channels, size, size) in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((size, size), Image.Resampling.BILINEAR)
    except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"cannot read image {path}: {error}; delete or replace the file") from None
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _split_indices(y: np.ndarray, classes: list[str], params: DataParams) -> dict[str, np.ndarray]:
    """Stratified split: each class contributes the same fractions, at least one image to each split."""
    rng = np.random.default_rng(params.seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        members = rng.permutation(np.flatnonzero(y == label))
        n_val = max(1, round(len(members) * params.val_fraction))
        n_test = max(1, round(len(members) * params.test_fraction))
        if len(members) - n_val - n_test < 1:
            raise DataError(f"class '{name}' has {len(members)} image(s): too few for one image in each of "
                            f"train, val and test; add images to it (at least 3) or remove the class")
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val:n_val + n_test])
        parts["train"].append(members[n_val + n_test:])
    # Shuffled so no split is ordered by class (a prefix of any split is a fair sample).
    indices = {split: rng.permutation(np.concatenate(chunks)) for split, chunks in parts.items()}
    n_calibration = min(params.calibration_size, len(indices["train"]))
    indices["calibration"] = indices["train"][:n_calibration]
    return indices


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez, but with fixed zip timestamps, so the same arrays give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), member.getvalue())
    write_atomic(path, buffer.getvalue())
