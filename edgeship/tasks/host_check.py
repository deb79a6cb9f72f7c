"""Host check: load a compiled artifact on its own runtime here and measure it on the test split.

Before anything goes to a device, the artifact must load on the runtime that will
run it and keep its quality: this runs it with the same runtime adapter the device
agent uses (`edgeship.device.runtimes`), scores its outputs with the task's metric
(top-1 accuracy; mAP for a detector) and compares them with the fp32 torch model's
(the task's agreement: top-1 agreement and max logit difference; IoU-matched
detections and score difference). A runtime that cannot load the artifact is a
result, not a crash.

    >>> reference = reference_logits(trained, data)
    >>> check = host_check(artifact, data, reference)
    >>> check.accuracy, check.top1_agreement, check.error
"""

from __future__ import annotations

import numpy as np

from edgeship.device.runtimes import Session, unavailable_reason
from edgeship.records import CompiledArtifact, HostCheck, PreparedData, TrainedModel
from edgeship.tasks.data import load_split
from edgeship.tasks.kinds import task_of


def reference_logits(trained: TrainedModel, data: PreparedData, split: str = "test") -> np.ndarray:
    """The fp32 torch model's outputs on one split (logits; packed detections for a detector): what every
    artifact is compared with."""
    return task_of(trained).reference(trained, data, split)


def host_check(artifact: CompiledArtifact, data: PreparedData, reference: np.ndarray | None = None,
               threads: int = 0) -> HostCheck:
    """The task's metric of `artifact` on the test split, run on its runtime here, and its agreement with `reference`.

    Never raises for a broken artifact or a missing runtime: the returned HostCheck carries
    the error instead, so one target failing does not stop the others.
    """
    reason = unavailable_reason(artifact.runtime)
    if reason:
        return proxy_or_not_measured(artifact, reason)
    task = task_of(data)
    x, _ = load_split(data, "test")
    try:
        outputs = task.run(artifact, x, threads=threads)
    except Exception as error:  # noqa: BLE001  (ModelLoadError, a missing runtime, a runtime failing mid-run)
        return HostCheck(target=artifact.target, accuracy=None, runtime=artifact.runtime,
                         error=f"{type(error).__name__}: {error}")
    scores = task.score(outputs, data, "test")
    metric, others = scores.pop(task.metric), scores
    if reference is None:
        return HostCheck(target=artifact.target, accuracy=metric, metrics=others, runtime=artifact.runtime)
    if reference.shape != outputs.shape:
        return HostCheck(target=artifact.target, accuracy=metric, metrics=others, runtime=artifact.runtime,
                         error=f"outputs of shape {outputs.shape} cannot be compared with the reference's "
                               f"{reference.shape}; the reference must come from the same test split")
    agreement = task.agreement(outputs, reference)
    return HostCheck(target=artifact.target, accuracy=metric, top1_agreement=agreement.pop("top1_agreement", None),
                     max_abs_logit_diff=agreement.pop("max_abs_logit_diff", None), metrics={**others, **agreement},
                     runtime=artifact.runtime)


def proxy_or_not_measured(artifact: CompiledArtifact, reason: str) -> HostCheck:
    """Where the target's runtime cannot run here: the proxy its compiler measured (labelled), or nothing."""
    proxy = artifact.notes.get("proxy")
    if not proxy:
        return HostCheck(target=artifact.target, accuracy=None, runtime=artifact.runtime,
                         error=f"not measured: {reason}", note=reason)
    return HostCheck(target=artifact.target, accuracy=proxy["accuracy"], top1_agreement=proxy.get("top1_agreement"),
                     max_abs_logit_diff=proxy.get("max_abs_logit_diff"), metrics=proxy.get("metrics", {}),
                     runtime=artifact.runtime, proxy=True,
                     note=f"proxy ({reason}): {proxy.get('description', '')}")


def run_batches(session: Session, images: np.ndarray, batch_size: int = 64, flatten: bool = True) -> np.ndarray:
    """Outputs for all images, in batches (one at a time for a model with a fixed batch of 1); `flatten`: one row
    per image (logits), else as the session answers (packed detections)."""
    step = batch_size if session.dynamic_batch else session.inputs[0].shape[0]
    outputs = [np.asarray(session.run(images[start:start + step].astype(np.float32, copy=False)))
               for start in range(0, len(images), step)]
    stacked = np.concatenate(outputs)
    return stacked.reshape(len(images), -1) if flatten else stacked
