"""`edgeship data shapes`: a procedurally drawn, seeded detection data set whose boxes are known exactly.

RGB images of circles, squares, triangles and crosses (1 to 4 per image, 12-45% of the side, colours
apart from a noisy gradient background, overlapping little) written in the COCO layout the `prepare`
stage reads: `<out>/images/NNNNN.png` and `<out>/annotations.json`. Each shape is drawn inside its box,
touching all four sides, so the box is exact. The same seed gives the same bytes, so DVC's hash is stable.
A detection quick start needs no download.

    >>> export_shapes(Path("data/raw"), count=2000, size=128, seed=0)
    2000
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeship.files import write_atomic

CLASSES = ("circle", "square", "triangle", "cross")
_MAX_OVERLAP = 0.2  # IoU at most between two shapes of one image


def export_shapes(out_dir: Path, count: int = 2000, size: int = 128, seed: int = 0) -> int:
    """Write `count` images of `size` px and annotations.json (COCO instances) to `out_dir`; return the count."""
    from PIL import Image, ImageDraw

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for index in range(count):
        canvas = Image.fromarray(_background(rng, size), mode="RGB")
        draw = ImageDraw.Draw(canvas)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, 5))):
            box = _place(rng, size, boxes)
            if box is None:
                continue
            boxes.append(box)
            label = int(rng.integers(len(CLASSES)))
            _draw(draw, CLASSES[label], box, tuple(int(c) for c in rng.integers(150, 256, 3)))
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "area": (x1 - x0 + 1) * (y1 - y0 + 1),
                                "iscrowd": 0})
        name = f"{index:05d}.png"
        canvas.save(out_dir / "images" / name, optimize=False)
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    document = {"info": {"description": f"edgeship shapes, seed {seed}"}, "images": images,
                "annotations": annotations, "categories": categories}
    write_atomic(out_dir / "annotations.json", (json.dumps(document, indent=1) + "\n").encode())
    return count


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark colour gradient with noise: shapes (drawn bright) stand out, but not trivially."""
    start, end = rng.integers(0, 90, 3), rng.integers(0, 90, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    gradient = start + (end - start) * (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(np.broadcast_to(gradient, (size, size, 3)) + noise, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, size: int, taken: list) -> tuple[int, int, int, int] | None:
    """A square box (inclusive pixel corners) inside the image overlapping the others little, or None."""
    for _ in range(20):
        side = int(rng.integers(max(4, round(0.12 * size)), round(0.45 * size) + 1))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if all(_iou(box, other) <= _MAX_OVERLAP for other in taken):
            return box
    return None


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _draw(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    """Draw `shape` filling `box` (it touches every side of the box)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # cross: two bars a third of the side wide
        third = (x1 - x0 + 1) / 3
        draw.rectangle((x0, round(y0 + third), x1, round(y1 - third)), fill=colour)
        draw.rectangle((round(x0 + third), y0, round(x1 - third), y1), fill=colour)
