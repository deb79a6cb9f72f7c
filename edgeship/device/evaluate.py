"""Run a validation batch through one compiled model in this process: what an evaluate job's child does.

The batch is an .npz of `x` and, optionally, `y` that the pipeline sent; the answer is
EvaluationResult fields (top-1 predictions, accuracy when labels came with it; a detector's detections,
per sample its rows [x1, y1, x2, y2, score, class], which the pipeline scores against its own boxes).
No torch, TensorFlow, MLflow or Prefect here: this runs on the device.

    >>> evaluate("model.onnx", "batch.npz", EvaluationRequest(), max_batch_bytes=64 << 20)["accuracy"]
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np

from edgeship.device.detections import open_model, trimmed
from edgeship.device.measure import pin_cpus
from edgeship.device.runtimes import predict_classes
from edgeship.errors import DeviceJobFailed
from edgeship.records import EvaluationRequest


def evaluate(path: str | Path, batch_path: str | Path, request: EvaluationRequest, max_batch_bytes: int) -> dict:
    """Run a validation batch through the model; return EvaluationResult fields (predictions, accuracy, ...).

    Raises:
        ModelLoadError: the runtime cannot load the file.
        DeviceJobFailed: the batch is not an .npz of numbers shaped for the model's input.
    """
    pin_cpus(request.cpus)
    images, labels = load_batch(batch_path, max_batch_bytes)
    started = time.perf_counter_ns()
    session = open_model(request.runtime, path, threads=request.threads, postprocess=request.postprocess,
                         **request.runtime_options)
    load_ns = time.perf_counter_ns() - started
    expected = session.inputs[0].shape
    if images.ndim != len(expected) or tuple(images.shape[1:]) != tuple(expected[1:]):
        raise DeviceJobFailed(f"the validation batch's x has shape {images.shape}, the model wants "
                              f"[N, {', '.join(map(str, expected[1:]))}]; send a batch of the model's input shape")
    if not session.dynamic_batch and len(images) % expected[0]:
        raise DeviceJobFailed(f"the model takes batches of exactly {expected[0]}; send a multiple of that "
                              f"many samples (got {len(images)})")
    if request.postprocess is not None:  # a detector: its detections; the pipeline holds the boxes to score them
        step = request.batch_size if session.dynamic_batch else expected[0]
        detections = [row for start in range(0, len(images), step)
                      for row in trimmed(session.run(images[start:start + step].astype(np.float32, copy=False)))]
        return {"runtime": request.runtime, "samples": len(images), "detections": detections, "accuracy": None,
                "load_ms": load_ns / 1e6}
    predictions = predict_classes(session, images, batch_size=request.batch_size)
    accuracy = float(np.mean(predictions == labels)) if labels is not None and len(labels) else None
    return {"runtime": request.runtime, "samples": len(images), "predictions": [int(p) for p in predictions],
            "accuracy": accuracy, "load_ms": load_ns / 1e6}


def load_batch(path: str | Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """x (and y, when present) of a validation .npz, refusing pickles and archives that inflate past `max_bytes`."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError) as error:
        raise DeviceJobFailed(f"the validation batch is not an .npz archive ({error}); send numpy.savez output "
                              "with arrays x and y") from None
    if inflated > max_bytes:
        raise DeviceJobFailed(f"the validation batch inflates to {inflated} bytes, more than this agent accepts "
                              f"({max_bytes}); send fewer samples")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays.files:
                raise DeviceJobFailed(f"the validation batch has no array 'x' (it has {arrays.files})")
            images = arrays["x"]
            labels = arrays["y"] if "y" in arrays.files else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DeviceJobFailed(f"the validation batch cannot be read as plain arrays: {error}") from None
    if images.dtype.kind not in "fiu" or images.ndim < 2 or len(images) == 0:
        raise DeviceJobFailed(f"the validation batch's x must be a non-empty numeric array of samples, got "
                              f"{images.dtype} {images.shape}")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (len(images),)):
        raise DeviceJobFailed(f"the validation batch's y must be one integer label per sample, got "
                              f"{labels.dtype} {labels.shape}")
    return images, labels
