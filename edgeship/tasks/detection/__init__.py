"""Object detection: annotations in (COCO, YOLO), the reference shapes set, decode and loss, mAP, the task."""
