"""The second LiteRT route, run by the Python that has TensorFlow and onnx2tf (their own environment).

ONNX -> TensorFlow SavedModel (onnx2tf) -> `tf.lite.TFLiteConverter`: fp32; fp16 (float16 weights); or int8,
full-integer post-training quantization with a representative dataset from the calibration split, and the
input/output type the target asks for (`io`: int8, uint8 as the Coral Edge TPU compiler wants, or float32).
The input stays NCHW (onnx2tf's keep_ncw_or_nchw_or_ncdhw_input_names), like litert-torch's artifacts, so
the same runtime adapter feeds both.

onnx2tf pins exact versions of TensorFlow, ONNX and ONNX Runtime that conflict with the pipeline's
(requirements/tf-converter.txt), so `litert.py` runs this file with `.venv/tf-converter/bin/python`. This
file imports only the standard library at module level and never anything from edgeship.

The job (JSON, path as the only argument): `onnx` (the fp32 ONNX, input "input"), `output` (.tflite),
`precision` (fp32 | fp16 | int8), `io` (int8 | uint8 | float32, int8 only), `calibration` (.npy of NCHW
float32 images, int8 only), `workdir`. The answer is one JSON line on stdout: {"versions", "notes"} or
{"error"} with exit status 1.

    $ .venv/tf-converter/bin/python -I edgeship/tasks/compile/tf_convert.py job.json
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

_DISTRIBUTIONS = ("tensorflow", "onnx2tf", "onnx", "onnxruntime")


def convert(job: dict) -> dict:
    """Run one conversion job; return {"versions", "notes"}. Raises whatever the converters raise."""
    import numpy as np
    import onnx2tf
    import tensorflow as tf

    started = time.perf_counter()
    saved = os.path.join(job["workdir"], "saved_model")
    with contextlib.redirect_stdout(sys.stderr):
        onnx2tf.convert(input_onnx_file_path=job["onnx"], output_folder_path=saved, non_verbose=True,
                        keep_ncw_or_nchw_or_ncdhw_input_names=["input"], copy_onnx_input_output_names_to_tflite=True)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    precision, notes = job["precision"], {"route": "onnx2tf + tf.lite.TFLiteConverter", "layout": "NCHW"}
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        images = np.load(job["calibration"]).astype(np.float32, copy=False)

        def representative_dataset():
            for image in images:
                yield [image[None]]

        io = job.get("io") or "int8"
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io != "float32":
            converter.inference_input_type = converter.inference_output_type = getattr(tf, io)
        notes.update({"method": f"TFLiteConverter full-integer PTQ, {io} input/output", "io": io,
                      "calibration_images": int(len(images))})
    elif precision != "fp32":
        raise ValueError(f"unknown precision '{precision}'; the LiteRT targets are fp32, fp16 and int8")
    with contextlib.redirect_stdout(sys.stderr):
        flatbuffer = converter.convert()
    with open(job["output"], "wb") as handle:
        handle.write(flatbuffer)
    notes["convert_s"] = round(time.perf_counter() - started, 2)
    return {"versions": _versions(), "notes": notes}


def _litert_worker():
    """litert_convert.py, loaded by path (this directory is not on sys.path: its onnx.py would shadow onnx)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("edgeship_litert_worker", Path(__file__).with_name("litert_convert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _versions() -> dict[str, str]:
    return _litert_worker()._versions(_DISTRIBUTIONS)


if __name__ == "__main__":
    sys.exit(_litert_worker().main(sys.argv, run=convert))
