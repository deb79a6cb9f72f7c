"""What every runtime adapter is: the `Session` protocol, and the shape helper they share."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgeship.records import RuntimeOption, TensorSpec


class Session(Protocol):
    """A loaded model, ready to run."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_batch: bool  # whether the first input accepts any batch size
    options: dict[str, RuntimeOption]  # the adapter's options in effect (what a result reports)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch through the model and return the first output."""

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch (of the model's own batch size, when fixed) and return every output by name."""


def concrete_shape(shape) -> tuple[int, ...]:
    """Replace symbolic dimensions (batch) with 1."""
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)
