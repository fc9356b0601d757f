#!/usr/bin/env bash
# Set up commtrain on a fresh machine (idempotent; re-running is cheap).
#
# torch is installed only when none is present: an existing CUDA build on a GPU machine
# is left alone. `torch==2.13.0` resolves to the local CPU wheel on our CPU machines,
# so no multi-GB CUDA wheels are pulled there. On a new GPU box, install the CUDA torch
# you want first (see README), then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found; installing torch==2.13.0" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
# The package and its extras. torch's range is satisfied by the installed build, so pip
# installs nothing torch-related here.
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev,hf,ray]"
"$PY" -c "import commtrain, torch; print(f'setup: commtrain {commtrain.__version__}, torch {torch.__version__}')"
