"""Re-runs redo only what changed: Prefect task caching keyed on what each stage really depends on.

A stage's cache key is a sha256 over what can change its result, and nothing else (never the
MLflow run or the run's output directory):

| stage | key |
| --- | --- |
| train | data hash, `model:` and `train:`, the source of the model factory's module and of the stage |
| distillation | the same, plus `distillation:` and the teacher factory's source |
| sensitivity, plan, QAT, PTQ | data hash, the fp32 checkpoint's sha256, their own sections (and the plan or report they take) |
| compile | target, data hash (calibration), sha256 of the checkpoint and of the QAT model, the target module's source |
| reference logits, host check | data hash, sha256 of the checkpoint / the artifact and the reference logits |
| benchmark | the artifact's sha256, the device's identity (what its /info reports, and its inventory entry), `benchmark:` and the batch |

The gate, the reports and the registration always run: changing a gate limit re-gates and
re-registers without retraining. Results persist under the project, in `.edgeship/cache` (keys/
and results/), so the next `edgeship run` finds them; `--fresh` recomputes every stage and
overwrites them. Prefect shows a reused stage as "Cached".

    >>> cache = ProjectCache.open(root, fresh=False)
    >>> trained = cache.call(t.train_model, params, data, out_dir, run, on_reuse=...)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeship.files import sha256_of

CACHE_DIR = Path(".edgeship") / "cache"
_SOURCES: dict[str, str] = {}


def digest(**parts: Any) -> str:
    """A stable sha256 of JSON-able parts (pydantic models as their JSON dump)."""
    def plain(value):
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json")
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
    return hashlib.sha256(json.dumps(plain(parts), sort_keys=True).encode()).hexdigest()


def source_hash(*modules: str) -> str:
    """sha256 over the source of each module ("pkg.mod", or an import path "pkg.mod:attr").

    The source is read from the module's file, not imported: a re-run whose stages are all cached never
    imports torch or the converters just to learn that nothing changed.
    """
    hashes = []
    for name in modules:
        module = name.partition(":")[0]
        if module not in _SOURCES:
            _SOURCES[module] = _module_source_hash(module)
        hashes.append(_SOURCES[module])
    return digest(modules=list(modules), sources=hashes)


def _module_source_hash(module: str) -> str:
    try:
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(".py"):  # a namespace package, a compiled module: its code object
            return hashlib.sha256(inspect.getsource(importlib.import_module(module)).encode()).hexdigest()
        return hashlib.sha256(Path(origin).read_bytes()).hexdigest()
    except (ImportError, OSError, TypeError, ValueError):  # not importable here: the stage itself reports it
        return f"unreadable:{module}"


def file_hash(path: Path | str | None) -> str | None:
    return sha256_of(Path(path)) if path is not None and Path(path).is_file() else None


def data_hash(data) -> str:
    """The prepared splits' identity: dvc.lock's md5 when locked, else the sha256 of the files themselves."""
    if data.dvc_hash:
        return data.dvc_hash
    return digest(files={p.name: sha256_of(p) for p in sorted(Path(data.directory).iterdir()) if p.is_file()})


def _task_source(context) -> str:
    return source_hash(context.task.fn.__module__)


# --- one key function per cached task: (TaskRunContext, parameters) -> key --------------------------------


def _detection(params) -> dict:
    """What a detection release adds to the keys (nothing for classification, whose keys stay as they were)."""
    if params.task != "detection":
        return {}
    return {"detection": params.detection, "detection_code": source_hash(*DETECTION_MODULES)}


def _detector(trained) -> dict:
    """A detector's head (its NMS included) and the detection code, for the keys of stages that take it."""
    if trained.detection is None:
        return {}
    return {"detection": trained.detection, "detection_code": source_hash(*DETECTION_MODULES)}


DETECTION_MODULES = ("edgeship.tasks.detection.train", "edgeship.tasks.detection.loss", "edgeship.tasks.detection.decode",
                     "edgeship.tasks.detection.data", "edgeship.tasks.detection.metric", "edgeship.tasks.compile.detection",
                     "edgeship.device.detections")


def train_key(context, p: dict) -> str:
    params = p["params"]
    return digest(stage="train", data=data_hash(p["data"]), model=params.model, train=params.train,
                  code=source_hash(params.model.factory, "edgeship.tasks.train"), task=_task_source(context),
                  **_detection(params))


def distillation_key(context, p: dict) -> str:
    params = p["params"]
    teacher = params.distillation.teacher.factory if params.distillation.teacher else None
    return digest(stage="distillation", data=data_hash(p["data"]), model=params.model, train=params.train,
                  distillation=params.distillation, task=_task_source(context),
                  code=source_hash(*filter(None, (params.model.factory, teacher)), "edgeship.tasks.train",
                                   "edgeship.tasks.distill"))


def _trained(p: dict) -> dict:
    return {"data": data_hash(p["data"]), "checkpoint": file_hash(p["trained"].checkpoint),
            "factory": p["trained"].factory, "factory_kwargs": p["trained"].factory_kwargs}


def sensitivity_key(context, p: dict) -> str:
    params = p["params"]
    return digest(stage="sensitivity", **_trained(p), sensitivity=params.sensitivity, qat=params.qat,
                  code=source_hash("edgeship.tasks.sensitivity", "edgeship.tasks.qdq_onnx"), task=_task_source(context))


def plan_key(context, p: dict) -> str:
    params = p["params"]
    return digest(stage="precision-plan", **_trained(p), report=p["report"], precision=params.precision,
                  qat=params.qat, sensitivity=params.sensitivity, code=source_hash("edgeship.tasks.precision_plan"),
                  task=_task_source(context))


def qat_key(context, p: dict) -> str:
    params, plan = p["params"], p["plan"]
    layers = dict(plan.layers) if plan else dict(params.precision.pinned)
    return digest(stage="qat", **_trained(p), plan=layers, qat=params.qat, task=_task_source(context),
                  code=source_hash("edgeship.tasks.qat", "edgeship.tasks.qat_plan", "edgeship.tasks.qat_prepare",
                                   "edgeship.tasks.qat_export", "edgeship.tasks.qdq_onnx"))


def ptq_key(context, p: dict) -> str:
    return digest(stage="ptq", **_trained(p), ptq=p["params"].ptq, code=source_hash("edgeship.tasks.ptq", "edgeship.tasks.qdq_onnx"),
                  task=_task_source(context))


def compile_key(context, p: dict) -> str:
    from edgeship.targets import KNOWN_TARGETS

    target, quantized = p["target"], p["quantized"]
    module = KNOWN_TARGETS[target].module if target in KNOWN_TARGETS else target
    return digest(stage="compile", target=target, **_trained(p), options=p.get("options"),
                  quantized=None if quantized is None else {
                      "onnx": file_hash(quantized.onnx_path), "float": file_hash(quantized.qat_float_checkpoint),
                      "plan": quantized.plan},
                  code=source_hash(module, "edgeship.tasks.compile"), task=_task_source(context),
                  **_detector(p["trained"]))


def reference_key(context, p: dict) -> str:
    return digest(stage="reference-logits", **_trained(p), code=source_hash("edgeship.tasks.host_check"),
                  task=_task_source(context), **_detector(p["trained"]))


def host_check_key(context, p: dict) -> str:
    return digest(stage="host-check", artifact=p["artifact"].sha256, target=p["artifact"].target,
                  data=data_hash(p["data"]), reference=file_hash(p["reference"]), golden=p.get("golden_count"),
                  code=source_hash("edgeship.tasks.host_check"), task=_task_source(context))


def benchmark_key(context, p: dict) -> str:
    """The artifact, the device as it reported itself (a replaced or upgraded device is measured again),
    its inventory entry (not a loopback agent's port), `benchmark:` and the evaluation batch's content."""
    pool, device, batch = p["pool"], p["device"], p["batch"]
    info = pool.info.get(device)
    identity = None if info is None else info.model_dump(
        mode="json", include={"name", "hostname", "os", "platform", "machine", "cpu_model", "cpu_count", "runtimes",
                              "agent_version", "emulated", "cpus", "threads"})
    endpoint = pool.devices[device]
    inventory = {"tags": list(endpoint.tags), "runtimes": endpoint.runtimes, "sustained_s": endpoint.sustained_s}
    return digest(stage="benchmark", artifact=p["artifact"].sha256, target=p["artifact"].target, device=device,
                  identity=identity, inventory=inventory, benchmark=p["params"].benchmark,
                  batch=None if batch is None else _batch_content(batch.path), task=_task_source(context))


def _batch_content(path: Path) -> str:
    """sha256 of the batch's arrays (the .npz file's own bytes carry a write time)."""
    import numpy as np

    with np.load(path) as arrays:
        return digest(**{name: hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest()
                         for name in sorted(arrays.files)})


# --- the project's cache ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectCache:
    """Where a project's cached stage results live, and whether this run may reuse them."""

    root: Path
    fresh: bool
    storage: Any  # a saved prefect LocalFileSystem block (result storage must be known to the Prefect API)

    @classmethod
    def open(cls, root: Path, fresh: bool = False) -> "ProjectCache":
        from prefect.filesystems import LocalFileSystem

        directory = Path(root) / CACHE_DIR
        (directory / "results").mkdir(parents=True, exist_ok=True)
        storage = LocalFileSystem(basepath=str(directory / "results"))
        storage.save(f"edgeship-results-{hashlib.sha256(str(directory).encode()).hexdigest()[:16]}", overwrite=True)
        return cls(Path(root), fresh, storage)

    def task(self, task):
        """`task` with its key function, results persisted under the project, refreshed when fresh."""
        from prefect.cache_policies import CacheKeyFnPolicy

        policy = CacheKeyFnPolicy(cache_key_fn=KEYS[task.name]).configure(
            key_storage=str(self.root / CACHE_DIR / "keys"))
        return task.with_options(cache_policy=policy, result_storage=self.storage, persist_result=True,
                                 refresh_cache=self.fresh)

    def call(self, task, *args, on_reuse: Callable[[Any], None] | None = None, **kwargs):
        """Run a cached task; when Prefect reused a stored result, hand it to `on_reuse` (log it to this run).

        A reused result whose files are gone (an earlier run's directory deleted) is computed again.
        """
        state = self.task(task)(*args, return_state=True, **kwargs)
        if state.name == "Cached" and missing_files(state.result()):
            state = self.task(task).with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
        return self.reused(state, on_reuse)

    def submit(self, task, *args, runner=None, **kwargs):
        """Submit a cached task (to `runner`, edgeship.flows.fan_out; None: the flow's own); `reused(future)` takes
        its result (computed again, here, if its files are gone)."""
        from edgeship.flows.fan_out import submit

        future = submit(runner, self.task(task), *args, **kwargs)
        future.edgeship_retry = lambda: self.task(task).with_options(refresh_cache=True)(*args, return_state=True,
                                                                                         **kwargs)
        return future

    @staticmethod
    def reused(state_or_future, on_reuse: Callable[[Any], None] | None = None):
        """The result of a finished state (or future); `on_reuse(result)` first when it came from the cache."""
        state = state_or_future
        if hasattr(state_or_future, "wait"):
            state_or_future.wait()
            state = state_or_future.state
            if state.name == "Cached" and missing_files(state.result()):
                state = state_or_future.edgeship_retry()
        result = state.result()
        if state.name == "Cached" and on_reuse is not None:
            on_reuse(result)
        return result


def missing_files(result: Any) -> list[Path]:
    """Files a (cached) record points at that no longer exist."""
    if hasattr(result, "model_dump"):
        result = result.model_dump()
    if isinstance(result, Path):
        return [] if result.exists() else [result]
    if isinstance(result, dict):
        return [m for value in result.values() for m in missing_files(value)]
    if isinstance(result, (list, tuple)):
        return [m for value in result for m in missing_files(value)]
    return []


KEYS: dict[str, Callable] = {
    "train": train_key, "distillation": distillation_key, "sensitivity-analysis": sensitivity_key,
    "precision-plan": plan_key, "quantization-aware-training": qat_key, "ptq-baseline": ptq_key,
    "compile": compile_key, "reference-logits": reference_key, "host-check": host_check_key,
    "benchmark": benchmark_key,
}
