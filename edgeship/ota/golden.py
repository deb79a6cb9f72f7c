"""Golden vectors: a few real inputs and the outputs the pipeline's own runtime check gives for them.

A detector's outputs are its packed detections (edgeship.device.detections), compared IoU-matched.
They are signed with the release (an .npz target next to the model file) and the
device's smoke test runs the same inputs through the file it is about to install
and requires the same outputs within tolerance: a model that loads and runs but
computes the wrong thing is refused before it answers anyone.

    >>> path = write_golden(artifact, test_images[:8], tmp / "golden-onnx-int8.npz")
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeship.device.detections import open_model
from edgeship.device.runtimes import unavailable_reason
from edgeship.records import CompiledArtifact

logger = logging.getLogger(__name__)


def write_golden(artifact: CompiledArtifact, inputs: np.ndarray, path: Path) -> Path | None:
    """Run `inputs` through the artifact on its runtime here, one at a time, and write inputs + outputs.

    Returns None (and logs why) when this host cannot run the artifact's runtime: the
    release then ships without golden vectors for that target, and devices fall back
    to the finiteness smoke test.
    """
    reason = unavailable_reason(artifact.runtime)
    if reason:
        logger.warning("no golden vectors for %s: %s", artifact.target, reason)
        return None
    session = open_model(artifact.runtime, artifact.path, threads=1, postprocess=artifact.postprocess)
    inputs = np.ascontiguousarray(inputs, dtype=np.dtype(artifact.inputs[0].dtype) if artifact.inputs else None)
    outputs = np.concatenate([np.asarray(session.run(inputs[i:i + 1])) for i in range(len(inputs))])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, inputs=inputs, outputs=outputs)
    return path
