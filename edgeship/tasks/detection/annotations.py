"""Detection annotations in: COCO instances JSON and YOLO txt labels, read and validated.

Both readers return the same thing, a `DetectionSource`: every image with its boxes (xyxy, the image's
own pixels) and class indices, and the class names in index order. Nothing is read half-way: every
problem found (a box outside its image or of no size, an image the annotations name that does not exist,
a category no one declared, a line that is not five numbers) is collected, and one DataError lists each
with the file it is in and what to do.

    COCO:  <raw_dir>/images/<file_name> and <raw_dir>/annotations.json (instances: images, annotations,
           categories; bbox is [x, y, width, height] in pixels)
    YOLO:  <raw_dir>/images/<name>.<ext>, <raw_dir>/labels/<name>.txt ("class cx cy w h", normalized to [0, 1],
           one object a line; no file: no objects) and <raw_dir>/classes.txt (one name a line)

    >>> source = read_annotations(Path("data/raw"), "auto")
    >>> source.classes, len(source.images), source.images[0].boxes
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeship.errors import DataError

COCO_FILE = "annotations.json"
YOLO_CLASSES = "classes.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
_TOLERANCE_PX = 0.5  # a box may poke this far past its image's edge (rounding in the tool that wrote it)
_SHOWN = 20  # problems listed in one error at most (the count says how many more)


@dataclass
class AnnotatedImage:
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (k, 4) float32 xyxy in the image's pixels
    classes: np.ndarray  # (k,) int64, indices into DetectionSource.classes


@dataclass
class DetectionSource:
    classes: list[str]
    images: list[AnnotatedImage]
    annotations_sha256: str  # of the annotation files, in a fixed order (lineage)
    problems: list[str] = field(default_factory=list)


def detect_format(raw_dir: Path) -> str:
    """`coco` when raw_dir holds annotations.json, `yolo` when it holds labels/; else a DataError saying what to add."""
    if (raw_dir / COCO_FILE).is_file():
        return "coco"
    if (raw_dir / "labels").is_dir():
        return "yolo"
    raise DataError(f"{raw_dir} holds neither {COCO_FILE} (COCO instances, with images/) nor labels/ (YOLO txt, with "
                    f"images/ and {YOLO_CLASSES}); put a detection data set there (`edgeship data shapes` writes the "
                    f"reference one) or set data.format")


def read_annotations(raw_dir: Path, data_format: str = "auto") -> DetectionSource:
    """Read and validate a COCO or YOLO data set in `raw_dir`.

    Raises:
        DataError: the folder or its files are missing, or any annotation is wrong (every problem, listed).
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"detection data folder {raw_dir} does not exist; point data.raw_dir in params.yaml at it "
                        f"(`edgeship data shapes` writes the reference set there)")
    data_format = detect_format(raw_dir) if data_format == "auto" else data_format
    if not (raw_dir / "images").is_dir():
        raise DataError(f"{raw_dir}/images/ does not exist; put the images there (both COCO and YOLO layouts keep "
                        f"them in images/)")
    source = _read_coco(raw_dir) if data_format == "coco" else _read_yolo(raw_dir)
    if source.problems:
        shown = "\n".join(f"  - {problem}" for problem in source.problems[:_SHOWN])
        more = len(source.problems) - _SHOWN
        raise DataError(f"the detection annotations in {raw_dir} have {len(source.problems)} problem(s); nothing "
                        f"was prepared:\n{shown}" + (f"\n  ... and {more} more" if more > 0 else ""))
    if not source.images:
        raise DataError(f"{raw_dir} holds no annotated images; add images and their annotations")
    if not source.classes:
        raise DataError(f"{raw_dir} declares no classes; list them ({COCO_FILE}'s categories or {YOLO_CLASSES})")
    return source


def _image_size(path: Path) -> tuple[int, int] | str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        return f"cannot read image {path}: {error}; delete or replace the file"


def _box_problem(box: np.ndarray, width: int, height: int) -> str | None:
    x1, y1, x2, y2 = (float(v) for v in box)
    if not np.all(np.isfinite(box)):
        return "is not finite"
    if x2 <= x1 or y2 <= y1:
        return "has no area (width or height <= 0)"
    t = _TOLERANCE_PX
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        return f"is not inside the {width}x{height} image"
    return None


def _read_coco(raw_dir: Path) -> DetectionSource:
    path = raw_dir / COCO_FILE
    raw = path.read_bytes()
    try:
        coco = json.loads(raw)
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON ({error}); write it as COCO instances "
                        f"(images, annotations, categories)") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco.get(key), list)]
    if missing:
        raise DataError(f"{path} has no list {missing}; a COCO instances file holds images, annotations and "
                        f"categories")
    problems: list[str] = []
    categories = sorted(coco["categories"], key=lambda c: c.get("id", 0))
    index = {c.get("id"): i for i, c in enumerate(categories)}
    known = ", ".join(f"{c.get('id')} {c.get('name')}" for c in categories) or "none"
    images: dict[object, AnnotatedImage] = {}
    for entry in coco["images"]:
        file = raw_dir / "images" / str(entry.get("file_name", ""))
        if not file.is_file():
            problems.append(f"{path}: image id {entry.get('id')} names '{file.relative_to(raw_dir)}', which does not "
                            f"exist; add the file or remove the image (and its annotations) from {COCO_FILE}")
            continue
        size = _image_size(file)
        if isinstance(size, str):
            problems.append(size)
            continue
        declared = (entry.get("width"), entry.get("height"))
        if None not in declared and tuple(declared) != size:
            problems.append(f"{path}: image id {entry.get('id')} ('{entry.get('file_name')}') is declared "
                            f"{declared[0]}x{declared[1]} but the file is {size[0]}x{size[1]}; fix width/height")
        images[entry.get("id")] = AnnotatedImage(file, size[0], size[1], np.zeros((0, 4), np.float32),
                                                 np.zeros(0, np.int64))
    named = {entry.get("id") for entry in coco["images"]}
    found: dict[object, tuple[list, list]] = {}
    for annotation in coco["annotations"]:
        where = f"{path}: annotation id {annotation.get('id')}"
        if annotation.get("category_id") not in index:
            problems.append(f"{where} has category_id {annotation.get('category_id')}, which {COCO_FILE}'s "
                            f"categories do not declare (declared: {known}); add the category or fix the annotation")
            continue
        if annotation.get("image_id") not in named:
            problems.append(f"{where} is for image_id {annotation.get('image_id')}, which {COCO_FILE} does not list "
                            f"in images; add the image or remove the annotation")
            continue
        image = images.get(annotation.get("image_id"))
        if image is None:  # its image is missing: reported once, above
            continue
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            problems.append(f"{where} has bbox {bbox!r}; write it as [x, y, width, height] in pixels")
            continue
        box = np.asarray([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], dtype=np.float32)
        why = _box_problem(box, image.width, image.height)
        if why:
            problems.append(f"{where} (image '{image.path.name}'): bbox [x, y, w, h] = {bbox} {why}; fix the box "
                            f"or remove the annotation")
            continue
        boxes, classes = found.setdefault(annotation.get("image_id"), ([], []))
        boxes.append(np.clip(box, 0, [image.width, image.height, image.width, image.height]))
        classes.append(index[annotation["category_id"]])
    for image_id, (boxes, classes) in found.items():
        images[image_id].boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        images[image_id].classes = np.asarray(classes, np.int64)
    ordered = [images[key] for key in sorted(images, key=lambda k: str(images[k].path))]
    return DetectionSource([str(c.get("name")) for c in categories], ordered, hashlib.sha256(raw).hexdigest(),
                           problems)


def _read_yolo(raw_dir: Path) -> DetectionSource:
    classes_file = raw_dir / YOLO_CLASSES
    if not classes_file.is_file():
        raise DataError(f"{classes_file} does not exist; list the class names there, one a line, in the order of "
                        f"the labels' class indices")
    classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    digest = hashlib.sha256(classes_file.read_bytes())
    problems: list[str] = []
    image_files = {p.stem: p for p in sorted((raw_dir / "images").iterdir())
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    labels = sorted((raw_dir / "labels").glob("*.txt"))
    for label in labels:
        if label.stem not in image_files:
            problems.append(f"{label}: no image images/{label.stem}.* exists for these labels; add the image or "
                            f"remove the label file")
    label_of = {label.stem: label for label in labels}
    images = []
    for stem, file in image_files.items():
        size = _image_size(file)
        if isinstance(size, str):
            problems.append(size)
            continue
        width, height = size
        boxes, found_classes = [], []
        label = label_of.get(stem)
        if label is not None:
            text = label.read_bytes()
            digest.update(label.name.encode() + b"\0" + text)
            for number, line in enumerate(text.decode(errors="replace").splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{label}:{number}"
                fields = line.split()
                try:
                    cls, values = int(fields[0]), np.asarray([float(v) for v in fields[1:]], np.float64)
                except (ValueError, IndexError):
                    problems.append(f"{where}: '{line.strip()}' is not 'class cx cy w h' (an integer and four "
                                    f"numbers); fix the line")
                    continue
                if len(values) != 4:
                    problems.append(f"{where}: '{line.strip()}' has {len(values)} numbers after the class, not 4 "
                                    f"(cx cy w h); segmentation labels are not boxes: convert them")
                    continue
                if not 0 <= cls < len(classes):
                    problems.append(f"{where}: class {cls} is not in {YOLO_CLASSES} ({len(classes)} classes, 0.."
                                    f"{len(classes) - 1}); add the class name or fix the label")
                    continue
                cx, cy, w, h = values
                box = np.asarray([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                  (cy + h / 2) * height], np.float32)
                why = _box_problem(box, width, height)
                if why:
                    problems.append(f"{where}: box cx cy w h = {values.tolist()} (normalized) {why}; fix the box "
                                    f"or remove the line")
                    continue
                boxes.append(np.clip(box, 0, [width, height, width, height]))
                found_classes.append(cls)
        images.append(AnnotatedImage(file, width, height, np.asarray(boxes, np.float32).reshape(-1, 4),
                                     np.asarray(found_classes, np.int64)))
    return DetectionSource(classes, images, digest.hexdigest(), problems)
