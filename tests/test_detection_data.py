"""Detection data: COCO and YOLO folders written by hand (each problem named once, with its file and fix), the shapes
generator (seeded, exact boxes), the prepare stage's splits, and augmentation that moves boxes with the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeship.config import DataParams
from edgeship.errors import DataError
from edgeship.tasks.detection.annotations import read_annotations
from edgeship.tasks.detection.data import load_targets, prepare_detection
from edgeship.tasks.detection.shapes import export_shapes
from edgeship.tasks.detection.train import augment


def _image(path: Path, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)


def _coco(root: Path, annotations: list, images: list | None = None) -> Path:
    for name in ("a.png", "b.png"):
        _image(root / "images" / name)
    document = {"images": images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                                     {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
                "annotations": annotations, "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (root / "annotations.json").write_text(json.dumps(document))
    return root


GOOD = {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 12]}


def test_a_valid_coco_folder_reads_boxes_as_xyxy_with_contiguous_classes(tmp_path):
    source = read_annotations(_coco(tmp_path, [GOOD]))
    assert source.classes == ["cat", "dog"] and len(source.images) == 2
    first = source.images[0]
    assert first.boxes.tolist() == [[2, 3, 12, 15]] and first.classes.tolist() == [1]
    assert len(source.annotations_sha256) == 64


@pytest.mark.parametrize("broken, named", [
    ({"id": 9, "image_id": 1, "category_id": 3, "bbox": [35, 3, 10, 12]}, ["annotation id 9", "a.png",
                                                                           "not inside the 40x30 image", "fix the box"]),
    ({"id": 9, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4]}, ["annotation id 9", "has no area"]),
    ({"id": 9, "image_id": 1, "category_id": 5, "bbox": [2, 3, 4, 4]}, ["annotation id 9", "category_id 5",
                                                                        "3 cat, 7 dog", "add the category"]),
])
def test_each_bad_coco_annotation_is_one_clear_error(tmp_path, broken, named):
    with pytest.raises(DataError) as error:
        read_annotations(_coco(tmp_path, [GOOD, broken]))
    message = str(error.value)
    assert "1 problem(s)" in message and "annotations.json" in message
    for words in named:
        assert words in message


def test_a_coco_folder_with_a_bad_box_a_missing_image_and_an_unknown_category_names_all_three(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 2, "file_name": "gone.png", "width": 40, "height": 30}]
    annotations = [GOOD, {"id": 2, "image_id": 1, "category_id": 3, "bbox": [-6, 0, 10, 10]},
                   {"id": 3, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},
                   {"id": 4, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5]}]
    with pytest.raises(DataError) as error:
        prepare_detection(_coco(tmp_path / "raw", annotations, images), tmp_path / "out",
                          DataParams(input_size=32, channels=3))
    lines = str(error.value).splitlines()
    assert "3 problem(s)" in lines[0] and "nothing was prepared" in lines[0]
    assert any("images/gone.png" in line and "does not exist" in line and "add the file" in line for line in lines)
    assert any("annotation id 2" in line and "not inside" in line for line in lines)
    assert any("annotation id 3" in line and "category_id 99" in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_yolo_labels_read_and_validate(tmp_path):
    root = tmp_path / "yolo"
    for name in ("one", "two", "three"):
        _image(root / "images" / f"{name}.jpg", (50, 50))
    (root / "classes.txt").write_text("car\nbike\n")
    (root / "labels").mkdir()
    (root / "labels" / "one.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.1 0.1\n")
    (root / "labels" / "two.txt").write_text("")  # no objects
    source = read_annotations(root)
    one = next(i for i in source.images if i.path.stem == "one")
    np.testing.assert_allclose(one.boxes, [[20, 15, 30, 35], [2.5, 2.5, 7.5, 7.5]], atol=1e-4)
    assert one.classes.tolist() == [1, 0] and source.classes == ["car", "bike"]

    (root / "labels" / "two.txt").write_text("2 0.5 0.5 0.1 0.1\n0 0.95 0.5 0.3 0.1\nbike 0.1 0.1 0.1 0.1\n")
    (root / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError) as error:
        read_annotations(root, "yolo")
    message = str(error.value)
    assert "4 problem(s)" in message
    assert "two.txt:1: class 2 is not in classes.txt (2 classes, 0..1)" in message
    assert "two.txt:2" in message and "not inside the 50x50 image" in message
    assert "two.txt:3" in message and "is not 'class cx cy w h'" in message
    assert "ghost.txt: no image images/ghost.* exists" in message


def test_the_shapes_set_is_seeded_and_its_boxes_are_exact(tmp_path):
    export_shapes(tmp_path / "a", count=30, size=64, seed=3)
    export_shapes(tmp_path / "b", count=30, size=64, seed=3)
    assert (tmp_path / "a" / "annotations.json").read_bytes() == (tmp_path / "b" / "annotations.json").read_bytes()
    assert (tmp_path / "a" / "images" / "00007.png").read_bytes() == (tmp_path / "b" / "images" / "00007.png").read_bytes()
    coco = json.loads((tmp_path / "a" / "annotations.json").read_text())
    assert {c["name"] for c in coco["categories"]} == {"circle", "square", "triangle", "cross"}
    checked = 0
    for image in coco["images"]:
        objects = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        if len(objects) != 1:
            continue
        pixels = np.asarray(Image.open(tmp_path / "a" / "images" / image["file_name"]))
        ys, xs = np.nonzero(pixels.max(axis=2) >= 150)  # shapes are drawn bright, the background dark
        x, y, w, h = objects[0]["bbox"]
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h), image["file_name"]
        checked += 1
    assert checked >= 3


def test_prepare_splits_resizes_boxes_and_hashes_the_annotations(tmp_path):
    export_shapes(tmp_path / "raw", count=40, size=64, seed=0)
    data = prepare_detection(tmp_path / "raw", tmp_path / "prepared", DataParams(input_size=32, channels=3))
    assert data.task == "detection" and sum(data.counts[s] for s in ("train", "val", "test")) == 40
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["annotations_sha256"] == data.annotations_sha256 and meta["task"] == "detection"
    images, targets = load_targets(data, "test")
    assert images.dtype == np.float32 and images.shape[1:] == (3, 32, 32) and 0 <= images.min() <= images.max() <= 1
    raw = json.loads((tmp_path / "raw" / "annotations.json").read_text())
    halves = sorted(tuple(np.asarray(a["bbox"], float) / 2) for a in raw["annotations"])
    for boxes, _ in targets:  # every prepared box is a raw box at half the size
        for x1, y1, x2, y2 in boxes:
            assert (x1, y1, x2 - x1, y2 - y1) in [tuple(np.round(h, 4)) for h in halves] or \
                any(np.allclose((x1, y1, x2 - x1, y2 - y1), h, atol=1e-4) for h in halves)


def test_augmentation_moves_the_boxes_with_the_pixels():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 4:12, 2:10] = 1.0  # an object at x 2..10, y 4..12
    boxes = torch.tensor([[2.0, 4.0, 10.0, 12.0]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        moved, targets = augment(image, [(boxes, torch.tensor([1]))], generator)
        ys, xs = torch.nonzero(moved[0, 0] > 0.5, as_tuple=True)
        (box,), _ = targets[0]
        assert box.tolist() == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
