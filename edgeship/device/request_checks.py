"""A client's request, checked against what the model declares before it runs: bad input is never the model's failure.

A request that does not fit the model (wrong rank or shape, a dtype that does not cast, NaN or infinite
values, a batch over the limit, a body over the limit or not a batch at all) is refused with a reason
(HTTP 400, 413 for the body) and does not count for probation or the fallback. Only what fails after
this check is the model's own failure.

    >>> limits = RequestLimits(max_batch=256, max_body_bytes=16 << 20)
    >>> batch = decode_batch(body, "application/x-npy", limits)     # InputRefused: not a batch
    >>> batch = fit_batch(batch, session.inputs, released.inputs, session.dynamic_batch, limits)

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeship.errors import EdgeshipError
from edgeship.records import TensorSpec


class InputRefused(EdgeshipError):
    """A request that does not fit the model's declared inputs (the client's error, answered 400 or 413)."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold (`edgeship-device serve --max-batch --max-body-mb`)."""

    max_batch: int = 1024
    max_body_bytes: int = 16 << 20


def decode_batch(body: bytes, content_type: str, limits: RequestLimits) -> np.ndarray:
    """The batch in a request body: a .npy array (Content-Type application/x-npy) or JSON {"inputs": [...]}.

    Raises:
        InputRefused: 413 over the body limit; 400 for anything that is not a numeric array.
    """
    if len(body) > limits.max_body_bytes:
        raise InputRefused(f"the body of {len(body)} bytes is over the {limits.max_body_bytes} byte limit; send "
                           f"smaller batches", 413)
    try:
        if content_type.startswith("application/x-npy"):
            batch = np.load(io.BytesIO(body), allow_pickle=False)
        else:
            payload = json.loads(body)
            if not isinstance(payload, dict) or "inputs" not in payload:
                raise ValueError('the JSON is not an object with "inputs"')
            batch = np.asarray(payload["inputs"])
    except Exception as error:  # numpy and json raise many types for bytes that are not what they claim
        raise InputRefused(f'send a .npy array (Content-Type application/x-npy) or JSON {{"inputs": [...]}}: '
                           f"{type(error).__name__}: {error}") from None
    if not isinstance(batch, np.ndarray) or batch.dtype.kind not in "biuf":
        kind = batch.dtype if isinstance(batch, np.ndarray) else type(batch).__name__
        raise InputRefused(f"the inputs are {kind}, not numbers; send a numeric array")
    return batch


def fit_batch(batch: np.ndarray, declared: Sequence[TensorSpec], released: Sequence[TensorSpec] = (),
              dynamic_batch: bool = True, limits: RequestLimits = RequestLimits()) -> np.ndarray:
    """`batch` cast to the model's input dtype, after checking it fits the model's first declared input.

    `declared` is what the loaded model file says (the runtime's `inputs`; a symbolic dimension reads 1),
    `released` what the release says (its compile-time input spec): the release's dimensions win where
    both are given, and the batch dimension is free when the model takes any batch.

    Raises:
        InputRefused: the rank, a dimension, the dtype, a non-finite value or the batch size does not fit.
    """
    spec = (released or declared or [None])[0]
    file_spec = declared[0] if declared else spec
    if spec is None:
        return batch
    expected = tuple(spec.shape)
    if batch.ndim != len(expected):
        raise InputRefused(f"the inputs have rank {batch.ndim} (shape {batch.shape}); the model takes rank "
                           f"{len(expected)}, {_shape_text(expected, dynamic_batch)}")
    if batch.shape[0] < 1:
        raise InputRefused("the batch is empty; send at least one input")
    if batch.shape[0] > limits.max_batch:
        raise InputRefused(f"a batch of {batch.shape[0]} is over this service's limit of {limits.max_batch}; "
                           f"send smaller batches (or start serve with a higher --max-batch)")
    if not dynamic_batch and file_spec is not None and batch.shape[0] != file_spec.shape[0]:
        raise InputRefused(f"a batch of {batch.shape[0]}; the model takes batches of exactly {file_spec.shape[0]}")
    wrong = [i for i in range(1, len(expected)) if expected[i] > 0 and batch.shape[i] != expected[i]]
    if wrong:
        raise InputRefused(f"the inputs have shape {batch.shape}; the model takes "
                           f"{_shape_text(expected, dynamic_batch)} (dimension {wrong[0]} differs)")
    dtype = np.dtype((file_spec or spec).dtype)
    if batch.dtype != dtype and not _casts(batch.dtype, dtype):
        raise InputRefused(f"the inputs are {batch.dtype}; the model takes {dtype} (send {dtype} values)")
    if batch.dtype.kind == "f" and not np.all(np.isfinite(batch)):
        raise InputRefused("the inputs hold NaN or infinite values; send finite numbers")
    if dtype.kind in "iu" and batch.size and (batch.min() < np.iinfo(dtype).min or batch.max() > np.iinfo(dtype).max):
        raise InputRefused(f"the inputs hold values outside {dtype}'s range; send {dtype} values")
    return batch.astype(dtype, copy=False)


def _casts(source: np.dtype, target: np.dtype) -> bool:
    """Numbers into a float model; integers into an integer model when every value could fit its kind."""
    if target.kind == "f":
        return source.kind in "biuf"
    return source.kind in "biu" and target.kind in "iu"


def _shape_text(shape: tuple[int, ...], dynamic_batch: bool) -> str:
    dims = ["N" if i == 0 and dynamic_batch else str(d) if d > 0 else "any" for i, d in enumerate(shape)]
    return f"({', '.join(dims)})"
