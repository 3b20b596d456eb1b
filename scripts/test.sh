#!/usr/bin/env bash
# Install the package with its test, onnx and bioimageio extras and run the whole test suite (slow tests included).
# Usage: bash scripts/test.sh [pytest args]      (README's test command; CI runs exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# Pin torch explicitly: an unpinned install makes pip fetch the newest multi-GB CUDA build.
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,onnx,bioimageio,openvino]"
# A given ISBI_DIR must hold the data (CI's does; the tests fail otherwise). Without one, the stacks are
# looked for beside the checkout, and the real-data tests are skipped when they are not there.
if [ -z "${ISBI_DIR:-}" ]; then
  default="$(cd .. && pwd)/shared/isbi2012"
  if [ -f "$default/train-volume.tif" ]; then
    export ISBI_DIR="$default"
  else
    echo "note: no ISBI 2012 stacks at $default (set ISBI_DIR); the real-data tests will be skipped"
  fi
fi
exec "$PY" -m pytest -q "$@"
