"""The `prepare` stage for detection: annotated images -> resized train/val/test/calibration splits with boxes.

Each image is read with Pillow, converted to the data's mode and resized to `input_size` square (its
boxes scaled with it); the splits are seeded and by image. Each `<split>.npz` holds `x` (uint8 NCHW: a
quarter of float32's size; `load_split` gives float32 in [0, 1]), `y` (objects per image), and the
boxes of all its images: `boxes` (M, 4) xyxy in input pixels, `classes` (M,), `owner` (M,) the image
index. meta.json adds the task and the annotations' sha256, which the release tags as lineage.

    >>> data = prepare_detection(Path("data/raw"), Path("data/prepared"), DataParams(input_size=128, channels=3))
    >>> images, targets = load_targets(data, "val")       # targets[i] = (boxes (k, 4), classes (k,))
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeship.config import DataParams
from edgeship.errors import DataError
from edgeship.files import write_atomic
from edgeship.records import PreparedData
from edgeship.tasks.data import SPLITS, images_of, write_npz
from edgeship.tasks.detection.annotations import AnnotatedImage, read_annotations

Targets = list[tuple[np.ndarray, np.ndarray]]  # per image: boxes (k, 4) xyxy input pixels, classes (k,)


def prepare_detection(raw_dir: Path, out_dir: Path, params: DataParams) -> PreparedData:
    """Read a COCO or YOLO folder (validated), resize, split by image, and write the splits and meta.json.

    Raises:
        DataError: the annotations have problems (each named), an image cannot be read, or there are too
            few images for one in each of train, val and test.
    """
    source = read_annotations(Path(raw_dir), params.format)
    if len(source.images) < 3:
        raise DataError(f"{raw_dir} has {len(source.images)} annotated image(s): too few for one in each of train, "
                        f"val and test; add images (at least 3)")
    size = params.input_size
    x = np.stack([_read(image, params.channels, size) for image in source.images])
    targets = [_scaled(image, size) for image in source.images]
    indices = _split(len(x), params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        chosen = indices[split]
        boxes, classes, owner = _flatten([targets[i] for i in chosen])
        write_npz(out_dir / f"{split}.npz", x=x[chosen], y=np.asarray([len(targets[i][1]) for i in chosen], np.int64),
                  boxes=boxes, classes=classes, owner=owner)
    input_shape = (params.channels, size, size)
    counts = {split: int(len(indices[split])) for split in SPLITS}
    objects = np.bincount(np.concatenate([t[1] for t in targets]), minlength=len(source.classes))
    meta = {"task": "detection", "classes": source.classes, "input_shape": list(input_shape), "counts": counts,
            "objects_per_class": dict(zip(source.classes, objects.tolist())),
            "annotations_sha256": source.annotations_sha256}
    write_atomic(out_dir / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return PreparedData(directory=out_dir, classes=source.classes, input_shape=input_shape, counts=counts,
                        task="detection", annotations_sha256=source.annotations_sha256)


def load_targets(data: PreparedData, split: str, limit: int | None = None) -> tuple[np.ndarray, Targets]:
    """Images (float32 NCHW in [0, 1]) and per image its boxes (xyxy, input pixels) and classes."""
    path = data.split_path(split)
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare stage again")
    with np.load(path) as arrays:
        if "boxes" not in arrays.files:
            raise DataError(f"{path} holds no boxes: it was prepared for classification; set task: detection and "
                            f"run the prepare stage again")
        images = images_of(arrays, limit)
        boxes, classes, owner = arrays["boxes"], arrays["classes"], arrays["owner"]
    return images, [(boxes[owner == i], classes[owner == i]) for i in range(len(images))]


def load_raw_images(data: PreparedData, split: str) -> np.ndarray:
    """A split's images as stored (uint8 NCHW): what training batches from, a quarter of float32's memory."""
    with np.load(data.split_path(split)) as arrays:
        return arrays["x"]


def _read(image: AnnotatedImage, channels: int, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(image.path) as opened:
            resized = opened.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
    except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"cannot read image {image.path}: {error}; delete or replace the file") from None
    array = np.asarray(resized, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _scaled(image: AnnotatedImage, size: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray([size / image.width, size / image.height] * 2, np.float32)
    return (image.boxes * scale).astype(np.float32), image.classes.astype(np.int64)


def _flatten(targets: Targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.concatenate([t[0] for t in targets]).astype(np.float32) if targets else np.zeros((0, 4), np.float32)
    classes = np.concatenate([t[1] for t in targets]).astype(np.int64) if targets else np.zeros(0, np.int64)
    owner = np.concatenate([np.full(len(t[1]), i, np.int64) for i, t in enumerate(targets)]) if targets \
        else np.zeros(0, np.int64)
    return boxes.reshape(-1, 4), classes, owner


def _split(n: int, params: DataParams) -> dict[str, np.ndarray]:
    """Seeded split by image, at least one image in each of train, val and test."""
    order = np.random.default_rng(params.seed).permutation(n)
    n_val = max(1, round(n * params.val_fraction))
    n_test = max(1, round(n * params.test_fraction))
    indices = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    indices["calibration"] = indices["train"][:min(params.calibration_size, len(indices["train"]))]
    return indices
