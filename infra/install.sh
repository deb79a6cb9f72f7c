#!/usr/bin/env bash
# Install edgeship (pipeline + device + test tools) into ./.venv from nothing.
# Every third-party package comes from a lock with the hash of each file (requirements/constraints.txt, kept by
# infra/lock.py), so pip never resolves or backtracks (shared/notes/environment.md) and installs only what was
# locked; edgeship itself then goes in editable, without dependencies (pip cannot hash an editable install).
# tests/test_dependencies.py checks that the lock satisfies every range pyproject.toml declares for pipeline,dev.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=25"
.venv/bin/python -m pip install -q --require-hashes -r requirements/constraints.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .   # setuptools comes from the lock
.venv/bin/python -m pip check
# The LiteRT converter (litert-torch) pins packages that conflict with the pipeline's (see
# requirements/litert-converter.txt), so it gets its own environment; the tflite targets call it.
[ -x .venv/litert-converter/bin/python ] || .venv/bin/python -m venv .venv/litert-converter
.venv/litert-converter/bin/python -m pip install -q --upgrade "pip>=25"
.venv/litert-converter/bin/python -m pip install -q --require-hashes -r requirements/litert-converter.txt
.venv/litert-converter/bin/python -m pip check
# TensorFlow's LiteRT route (onnx2tf + TFLiteConverter) pins TensorFlow, ONNX and ONNX Runtime versions older than
# the pipeline's, so it has its own environment too; about 2.6 GB and 6.5 minutes here, so only when asked for.
if [ "${EDGESHIP_TF_CONVERTER:-0}" = "1" ]; then
  [ -x .venv/tf-converter/bin/python ] || .venv/bin/python -m venv .venv/tf-converter
  .venv/tf-converter/bin/python -m pip install -q --upgrade "pip>=25"
  .venv/tf-converter/bin/python -m pip install -q --require-hashes -r requirements/tf-converter.txt
  .venv/tf-converter/bin/python -m pip check
fi
