"""The LiteRT (TFLite) adapter: ai-edge-litert's interpreter, XNNPACK unless turned off."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeship.device.runtimes.session import concrete_shape
from edgeship.errors import ModelLoadError
from edgeship.records import RuntimeOption, TensorSpec


class LiteRTSession:
    """The LiteRT (TFLite) interpreter from ai-edge-litert, with the XNNPACK delegate unless turned off.

    An int8 model with int8 input/output is fed float32 images quantized with its
    input's scale and zero point, and its output is dequantized, so callers of `run` always
    see float32 in and out. `inputs` describes what `run` takes. For timing, `run` is
    `finish(invoke(prepare(batch)))`: `invoke` is the runtime's own work (set the input
    tensor, invoke, read the output), `prepare`/`finish` the numpy I/O conversion
    (`converts_io` says whether there is any), which the benchmark reports beside it.
    """

    name = "litert"

    def __init__(self, path: str | Path, threads: int = 0, xnnpack: bool | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise ModelLoadError("the LiteRT runtime is not installed here; install it with "
                                 "pip install 'edgeship[litert]' (the ai-edge-litert package)") from None
        if xnnpack is None:
            xnnpack = os.environ.get("EDGESHIP_LITERT_XNNPACK", "1").strip().lower() not in ("0", "false", "no", "off")
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads if threads > 0 else None,
                                            experimental_op_resolver_type=resolver)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"LiteRT cannot load {Path(path).name}: {error}") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._batch = int(self._input["shape"][0]) if len(self._input["shape"]) else 1
        self.inputs = [TensorSpec(name=i["name"], shape=concrete_shape(i["shape"].tolist()), dtype="float32")
                       for i in self._interpreter.get_input_details()]
        self.outputs = [TensorSpec(name=o["name"], shape=concrete_shape(o["shape"].tolist()), dtype="float32")
                        for o in self._interpreter.get_output_details()]
        self.dynamic_batch = False  # litert-torch exports a fixed batch; `run` splits larger batches
        ops = self._interpreter._get_ops_details()  # noqa: SLF001  (the only place the interpreter tells)
        # A delegate that took over nodes shows as a DELEGATE node in the graph.
        self.delegate_partitions = sum(1 for op in ops if op["op_name"] == "DELEGATE")
        self.xnnpack = bool(xnnpack and self.delegate_partitions)
        self.options: dict[str, RuntimeOption] = {"xnnpack": self.xnnpack}  # False: XNNPACK took no node
        self.file_inputs = [TensorSpec(name=self._input["name"], shape=concrete_shape(self._input["shape"].tolist()),
                                       dtype=np.dtype(self._input["dtype"]).name)]

    def run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == self._batch:
            return self.finish(self.invoke(self.prepare(batch)))
        return np.concatenate([self.finish(self.invoke(self.prepare(batch[start:start + self._batch])))
                               for start in range(0, len(batch), self._batch)])

    @property
    def converts_io(self) -> bool:
        """Whether `run` quantizes the input or dequantizes the output (an integer-I/O model)."""
        return any(np.dtype(d["dtype"]).kind in "iu" for d in (self._input, self._output))

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """float32 images -> the input tensor's dtype (quantized with its scale and zero point)."""
        return _quantize(batch, self._input)

    def invoke(self, prepared: np.ndarray) -> np.ndarray:
        """The runtime's own work on a prepared input: set the tensor, invoke, read the output tensor."""
        self._interpreter.set_tensor(self._input["index"], prepared)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"])

    def finish(self, output: np.ndarray) -> np.ndarray:
        """The output tensor -> float32 logits (dequantized when integer)."""
        return _dequantize(output, self._output)

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output tensor of one invocation (a batch of the model's size), dequantized when integer."""
        self._interpreter.set_tensor(self._input["index"], self.prepare(batch))
        self._interpreter.invoke()
        return {detail["name"]: _dequantize(self._interpreter.get_tensor(detail["index"]), detail)
                for detail in self._interpreter.get_output_details()}


def _quantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """float32 -> the tensor's dtype, with its scale and zero point when it is an integer tensor."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale) + zero_point, info.min, info.max).astype(dtype)


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """The tensor's values as float32 (integer tensors through their scale and zero point)."""
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32, copy=True)
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)
