"""The PTQ baseline: ONNX Runtime's static quantization of the fp32 model, no training.

The trained float model is exported to ONNX, pre-processed (shape inference, BatchNorm
folding), and quantized by `onnxruntime.quantization.quantize_static` to QDQ format:
per-channel symmetric int8 weights, uint8 activations with ranges calibrated on the
calibration split. It is what a user gets without quantization-aware training, kept
as a comparison row so the release shows what QAT bought.

The same QDQ model serves the cost side of sensitivity analysis:
`edgeship.tasks.qdq_onnx.revert_layers` turns chosen layers back to float inside it (their weights dequantized, their
activations' Q/DQ kept as the island's boundaries), which is what a mixed-precision
plan looks like to ONNX Runtime.

    >>> baseline = post_training_quantize(trained, data, PtqParams(), Path("build/ptq"))
    >>> baseline.onnx_test_accuracy, baseline.integer_ops
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from edgeship.config import PtqParams
from edgeship.errors import CompileError
from edgeship.records import PreparedData, QuantizedModel, TrainedModel
from edgeship.tasks.data import load_split
from edgeship.tasks.qdq_onnx import float_ops_of, integer_ops_of, onnx_accuracy, optimized_op_counts

ONNX_NAME = "model_int8_ptq.onnx"
FP32_NAME = "model_fp32.onnx"
# Entropy (KL) calibration's histogram: ONNX Runtime 1.31's quantize_static builds it with 128 bins and 128
# quantized bins, which leaves one candidate threshold, the full range: MinMax under another name. Given to its
# calibrator directly: 512 bins searched for the best 128-bin quantization (192 candidate thresholds per tensor;
# TensorRT searches 2048 bins, which ONNX Runtime's Python search makes about 5x slower).
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 512, 128
logger = logging.getLogger(__name__)


def post_training_quantize(trained: TrainedModel, data: PreparedData, ptq_params: PtqParams, out_dir: Path,
                           fp32_onnx: Path | None = None) -> QuantizedModel:
    """Export (unless `fp32_onnx` is given), quantize statically, and measure on ONNX Runtime.

    Raises:
        CompileError: the model does not export, or ONNX Runtime's quantizer fails on it.
    """
    out_dir = Path(out_dir)
    fp32_onnx = Path(fp32_onnx) if fp32_onnx else export_fp32(trained, out_dir / FP32_NAME)
    calibration, _ = load_split(data, "calibration")
    path = quantize_onnx(fp32_onnx, calibration, out_dir / ONNX_NAME, ptq_params.calibration_method,
                         ptq_params.per_channel)
    ops = optimized_op_counts(path)
    x_val, y_val = load_split(data, "val")
    x_test, y_test = load_split(data, "test")
    val, test = onnx_accuracy(path, x_val, y_val), onnx_accuracy(path, x_test, y_test)
    return QuantizedModel(onnx_path=path, val_accuracy=val, test_accuracy=test, integer_ops=integer_ops_of(ops),
                          float_ops=float_ops_of(ops), onnx_val_accuracy=val, onnx_test_accuracy=test, method="ptq")


def export_fp32(trained: TrainedModel, path: Path) -> Path:
    """The trained float model as ONNX (edgeship's conventions: input "input", output "logits")."""
    from edgeship.tasks.compile.onnx import export_onnx
    from edgeship.tasks.train import load_model

    try:
        return export_onnx(load_model(trained), trained.input_shape, Path(path))
    except Exception as error:  # noqa: BLE001  (the exporter raises many types; its message is the news)
        raise CompileError(f"torch.onnx.export failed for '{trained.factory}': {type(error).__name__}: {error}"
                           ) from error


def quantize_onnx(fp32_onnx: Path, calibration: np.ndarray, out_path: Path, method: str = "minmax",
                  per_channel: bool = True) -> Path:
    """ONNX Runtime static QDQ quantization: int8 weights (per channel), uint8 activations.

    uint8 activations with int8 weights is the combination ONNX Runtime's x86 kernels are
    fastest at (ONNX Runtime 1.31's own default, int8 activations, left 15 of MobileNetV2's
    52 convs unfused here and ran at 0.5x the speed).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeship-ptq-") as tmp:
        source = Path(tmp) / "preprocessed.onnx"
        preprocess(Path(fp32_onnx), source)
        cache = entropy_ranges(source, calibration, Path(tmp)) if method == "entropy" else None
        try:
            quantize_static(str(source), str(out_path), _batches(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], calibration_cache_path=cache)
        except Exception as error:  # noqa: BLE001
            raise CompileError(f"ONNX Runtime's static quantization failed: {type(error).__name__}: {error}"
                               ) from error
    return out_path


def preprocess(model: Path, out: Path) -> None:
    """ONNX Runtime's quantization pre-processing (shape inference, graph optimizations), without symbolic shape
    inference where it gives up: on graphs with Resize ("Incomplete symbolic shape inference", and it leaves
    sym_shape_infer_temp.onnx in the working directory), and on any graph where it fails; both logged."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if "Resize" in {node.op_type for node in onnx.load(str(model), load_external_data=False).graph.node}:
        logger.info("quantization pre-processing of %s: the graph has Resize, which ONNX Runtime's symbolic shape "
                    "inference cannot complete; skipping it", model.name)
    else:
        try:
            quant_pre_process(str(model), str(out))
            return
        except Exception as error:  # noqa: BLE001  (ORT raises a bare Exception)
            logger.info("quantization pre-processing of %s: symbolic shape inference failed (%s); skipping it",
                        model.name, error)
    try:
        quant_pre_process(str(model), str(out), skip_symbolic_shape=True)
    except Exception as error:  # noqa: BLE001
        raise CompileError(f"ONNX Runtime's quantization pre-processing failed on {model.name}, even without "
                           f"symbolic shape inference: {type(error).__name__}: {error}") from error


def _batches(images: np.ndarray, batch_size: int = 16):
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{"input": images[i:i + batch_size].astype(np.float32)}
                                  for i in range(0, len(images), batch_size)])

        def get_next(self):
            return next(self._batches, None)

    return Batches()



def entropy_ranges(model: Path, calibration: np.ndarray, directory: Path) -> Path:
    """Entropy (KL-divergence) activation ranges with ENTROPY_BINS / ENTROPY_QUANTIZED_BINS, as a calibration cache
    for quantize_static (which would otherwise calibrate with bins that collapse entropy to MinMax)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(Path(model), list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                   augmented_model_path=str(directory / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": ENTROPY_BINS,
                                                  "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
    calibrator.collect_data(_batches(calibration))
    path = directory / "entropy_ranges.json"
    save_tensors_data(calibrator.compute_data(), path)
    return path
