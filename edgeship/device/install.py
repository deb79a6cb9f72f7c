"""The steps of installing one model file: smoke test against golden vectors, place, swap, prune.

The updater (edgeship.device.updater) decides what to install; this module
does it, step by step, in an order that a crash at any point cannot break:

  1. the file is downloaded and verified under downloads/ (nothing else changes);
  2. `smoke_test` loads it on its runtime and runs the release's golden vectors
     (real inputs and the outputs the pipeline's host check got) and requires the
     same outputs within tolerance; without golden vectors, one seeded random
     batch must give finite outputs of the right batch size, and the file's inputs and
     output shape must be what the release declares for its target (`spec_mismatch`);
  3. `place` moves it into its slot (versions/<version>/...): still not active;
  4. the swap is one atomic write of state.json naming it active, on probation;
  5. `prune` deletes files no slot names any more.

`pause_point(step)` is a test hook: with EDGESHIP_UPDATER_PAUSE_AT=<step> the
updater stops at that step (download, verify, smoke_test, swap, probation),
writes <state_dir>/.paused-<step> and waits, so a test can kill -9 it there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.device.detections import agreement, open_model
from edgeship.device.state import DeviceState, slot_path
from edgeship.errors import SmokeTestFailed
from edgeship.ota.channel import GoldenVectors, ReleasedModel

logger = logging.getLogger(__name__)

PAUSE_ENV = "EDGESHIP_UPDATER_PAUSE_AT"
STEPS = ("download", "verify", "smoke_test", "swap", "probation")


def pause_point(state_dir: Path, step: str) -> None:
    """Test hook: stop here for good when EDGESHIP_UPDATER_PAUSE_AT names this step."""
    if os.environ.get(PAUSE_ENV) == step:
        (Path(state_dir) / f".paused-{step}").write_text(str(os.getpid()))
        while True:
            time.sleep(3600)


@dataclass(frozen=True)
class Golden:
    """Golden vectors loaded from their verified .npz."""

    inputs: np.ndarray
    outputs: np.ndarray
    spec: GoldenVectors

    @classmethod
    def load(cls, path: Path, spec: GoldenVectors) -> "Golden":
        with np.load(path, allow_pickle=False) as arrays:
            return cls(np.asarray(arrays["inputs"]), np.asarray(arrays["outputs"]), spec)

    def input(self, index: int) -> np.ndarray:
        return self.inputs[index:index + 1]

    def __len__(self) -> int:
        return len(self.inputs)

    def mismatch(self, outputs: np.ndarray, index: int | None = None) -> str | None:
        """Why `outputs` (of all inputs, or of input `index` alone) differ from the reference; None if they match."""
        outputs = np.asarray(outputs)
        reference = self.outputs if index is None else self.outputs[index:index + 1]
        if outputs.shape != reference.shape:
            return f"output shape {outputs.shape}, the reference has {reference.shape}"
        if not np.all(np.isfinite(outputs)):
            return "NaN or infinite outputs"
        if self.spec.kind == "detections":
            matched, score_diff = agreement(outputs, reference)
            if matched < self.spec.min_matched:
                return (f"detections match the reference's on {matched:.0%} (IoU-matched, same class), below "
                        f"{self.spec.min_matched:.0%}")
            if score_diff > self.spec.atol:
                return f"matched detections' scores differ by {score_diff:.4g} on average (atol {self.spec.atol})"
            return None
        if self.spec.top1 and outputs.ndim == 2:
            disagree = int(np.sum(outputs.argmax(1) != reference.argmax(1)))
            if disagree:
                return f"top-1 class differs on {disagree} of {len(outputs)} golden inputs"
        if not np.allclose(outputs, reference, atol=self.spec.atol, rtol=self.spec.rtol):
            worst = float(np.max(np.abs(outputs - reference)))
            return f"outputs differ from the reference by up to {worst:.4g} (atol {self.spec.atol}, rtol {self.spec.rtol})"
        return None


def smoke_test(model: ReleasedModel, path: Path, golden: Golden | None = None, threads: int = 1) -> None:
    """Load a model on its runtime and check its outputs: against golden vectors when the release has them.

    Raises:
        SmokeTestFailed: It does not load or run, or its outputs are wrong (the message says how).
    """
    try:
        session = open_model(model.runtime, path, threads=threads, postprocess=model.postprocess)
        if golden is not None:  # one input at a time: fixed-batch models take batches of one
            output = np.concatenate([np.asarray(session.run(golden.input(i))) for i in range(len(golden))])
        else:
            batch = random_batch(model, session)
            output = np.asarray(session.run(batch))
    except Exception as error:  # each runtime raises its own types
        raise SmokeTestFailed(f"version {model.version} ({model.filename}) does not run on {model.runtime}: "
                              f"{error}") from None
    if golden is not None:
        why = golden.mismatch(output)
        if why:
            raise SmokeTestFailed(f"golden vectors: version {model.version} {why}")
        return
    if output.ndim == 0 or output.shape[0] != batch.shape[0]:
        raise SmokeTestFailed(f"version {model.version} returned shape {output.shape} for a batch of {batch.shape[0]}")
    if output.dtype.kind == "f" and not np.all(np.isfinite(output)):
        raise SmokeTestFailed(f"version {model.version} returned NaN or infinite values")
    why = spec_mismatch(model, session, output)
    if why:
        raise SmokeTestFailed(f"model spec: version {model.version} {why}; the release declares "
                              f"inputs {[tuple(i.shape) for i in model.inputs]}, outputs "
                              f"{[tuple(o.shape) for o in model.outputs]}")


def spec_mismatch(model: ReleasedModel, session, output: np.ndarray) -> str | None:
    """How the model file's inputs, or its first output on a batch, differ from what the release declares for its
    target (rank, every dimension but the batch; adapters convert dtypes); None when they agree or the release
    declares nothing."""
    for declared, found in zip(model.inputs[:1], session.inputs[:1]):
        dims = zip(found.shape[1:], declared.shape[1:])
        if len(found.shape) != len(declared.shape) or any(f != d and f != 1 and d > 0 for f, d in dims):  # 1: symbolic
            return f"takes inputs of shape {tuple(found.shape)}"
    if model.outputs and model.postprocess is None:  # a detector's answer is packed by the runtime, not the file
        declared = tuple(model.outputs[0].shape)
        if output.ndim != len(declared) or any(d > 0 and f != d for f, d in zip(output.shape[1:], declared[1:])):
            return f"answers shape {output.shape} for a batch of {output.shape[0]}"
    return None


def random_batch(model: ReleasedModel, session=None) -> np.ndarray:
    """A seeded batch of the model's first input spec (symbolic dimensions as 1)."""
    spec = model.inputs[0] if model.inputs else session.inputs[0]
    shape = tuple(d if d > 0 else 1 for d in spec.shape)
    rng = np.random.default_rng(0)
    dtype = np.dtype(spec.dtype)
    return (rng.standard_normal(shape) if dtype.kind == "f" else rng.integers(0, 8, shape)).astype(dtype)


def place(state_dir: Path, model: ReleasedModel, downloaded: Path, slot: str = "active") -> Path:
    """Move a verified file into its slot (not yet active: state.json decides that)."""
    final = slot_path(state_dir, model, slot)  # type: ignore[arg-type]
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, final)
    return final


def prune(state_dir: Path, state: DeviceState) -> None:
    """Delete model files that no slot of the state names (devices have little storage)."""
    keep = {slot_path(state_dir, m, "active").parent for m in (state.active, state.last_known_good) if m}
    keep |= {slot_path(state_dir, state.fallback, "fallback").parent} if state.fallback else set()
    keep |= {slot_path(state_dir, state.shadow, "shadow").parent} if state.shadow else set()
    for area in ("versions", "fallback", "shadow"):
        directory = state_dir / area
        if directory.is_dir():
            for child in directory.iterdir():
                if child not in keep:
                    shutil.rmtree(child, ignore_errors=True)


def clear_downloads(state_dir: Path) -> None:
    """Drop whatever an interrupted check left half-downloaded."""
    directory = state_dir / "downloads"
    if directory.is_dir():
        shutil.rmtree(directory, ignore_errors=True)
