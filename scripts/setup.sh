#!/usr/bin/env bash
# Create .venv and install moe-testbed with a CPU build of PyTorch.
# Idempotent: a second call with an unchanged pyproject.toml does nothing.
# GPU users: install a CUDA build of torch into .venv first (see README); this
# script keeps whatever torch is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.moe-testbed-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# Pin the CPU build explicitly: an unpinned `torch` in a fresh environment can
# resolve to a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"
echo "$want" > "$stamp"
