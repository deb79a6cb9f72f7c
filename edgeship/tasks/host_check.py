"""Host check: load a compiled artifact on its own runtime here and measure it on the test split.

Before anything goes to a device, the artifact must load on the runtime that will
run it and keep its accuracy: this loads it with the same runtime adapter the
device agent uses (`edgeship.device.runtimes`), computes test accuracy, and
compares its logits with the fp32 torch model's (top-1 agreement, max abs
difference). A runtime that cannot load the artifact is a result, not a crash.

    >>> reference = reference_logits(trained, data)
    >>> check = host_check(artifact, data, reference)
    >>> check.accuracy, check.top1_agreement, check.error
"""

from __future__ import annotations

import numpy as np

from edgeship.device.runtimes import Session, open_session, unavailable_reason
from edgeship.records import CompiledArtifact, HostCheck, PreparedData, TrainedModel
from edgeship.tasks.data import load_split


def reference_logits(trained: TrainedModel, data: PreparedData, split: str = "test") -> np.ndarray:
    """Logits of the fp32 torch model on one split: what every artifact is compared with."""
    from edgeship.tasks.train import load_model, predict_logits

    x, _ = load_split(data, split)
    return predict_logits(load_model(trained), x)


def host_check(artifact: CompiledArtifact, data: PreparedData, reference: np.ndarray | None = None,
               threads: int = 0) -> HostCheck:
    """Accuracy of `artifact` on the test split, run on its runtime here, and its agreement with `reference`.

    Never raises for a broken artifact or a missing runtime: the returned HostCheck carries
    the error instead, so one target failing does not stop the others.
    """
    reason = unavailable_reason(artifact.runtime)
    if reason:
        return proxy_or_not_measured(artifact, reason)
    x, y = load_split(data, "test")
    try:
        session = open_session(artifact.runtime, artifact.path, threads=threads)
        logits = run_batches(session, x)
    except Exception as error:  # noqa: BLE001  (ModelLoadError, a missing runtime, a runtime failing mid-run)
        return HostCheck(target=artifact.target, accuracy=None, runtime=artifact.runtime,
                         error=f"{type(error).__name__}: {error}")
    predictions = logits.argmax(axis=1)
    agreement = max_diff = None
    if reference is not None:
        if reference.shape != logits.shape:
            return HostCheck(target=artifact.target, accuracy=float((predictions == y).mean()),
                             runtime=artifact.runtime,
                             error=f"logits of shape {logits.shape} cannot be compared with the reference's "
                                   f"{reference.shape}; the reference must come from the same test split")
        agreement = float((predictions == reference.argmax(axis=1)).mean())
        max_diff = float(np.abs(logits.astype(np.float64) - reference).max())
    return HostCheck(target=artifact.target, accuracy=float((predictions == y).mean()), top1_agreement=agreement,
                     max_abs_logit_diff=max_diff, runtime=artifact.runtime)


def proxy_or_not_measured(artifact: CompiledArtifact, reason: str) -> HostCheck:
    """Where the target's runtime cannot run here: the proxy its compiler measured (labelled), or nothing."""
    proxy = artifact.notes.get("proxy")
    if not proxy:
        return HostCheck(target=artifact.target, accuracy=None, runtime=artifact.runtime,
                         error=f"not measured: {reason}", note=reason)
    return HostCheck(target=artifact.target, accuracy=proxy["accuracy"], top1_agreement=proxy.get("top1_agreement"),
                     max_abs_logit_diff=proxy.get("max_abs_logit_diff"), runtime=artifact.runtime, proxy=True,
                     note=f"proxy ({reason}): {proxy.get('description', '')}")


def run_batches(session: Session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for all images, in batches (one at a time for a model with a fixed batch of 1)."""
    step = batch_size if session.dynamic_batch else session.inputs[0].shape[0]
    outputs = [np.asarray(session.run(images[start:start + step].astype(np.float32, copy=False)))
               for start in range(0, len(images), step)]
    return np.concatenate(outputs).reshape(len(images), -1)
