#!/usr/bin/env bash
# Install the package with its test extras and run the whole test suite (slow tests included).
# Usage: bash scripts/test.sh [pytest args]      (README's test command; CI runs exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# Pin torch explicitly: an unpinned install makes pip fetch the newest multi-GB CUDA build.
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
export ISBI_DIR="${ISBI_DIR:-$(cd .. && pwd)/shared/isbi2012}"
[ -f "$ISBI_DIR/train-volume.tif" ] || echo "note: ISBI_DIR=$ISBI_DIR has no ISBI 2012 stacks; the real-data tests will be skipped"
exec "$PY" -m pytest -q "$@"
