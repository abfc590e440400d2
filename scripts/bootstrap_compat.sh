#!/usr/bin/env bash
# A third environment, .venv-compat, with the torch and transformers that verl's GPU stack
# (`pip install "verl[vllm]==0.9.1"`) resolves to: torch 2.11.0 and transformers 5.9.0. scripts/test.sh
# runs gradproj's CPU test subset in it (scripts/test_compat.sh).
#
# PyPI has no CPU-only torch 2.11 wheel (PyTorch's CPU builds live on its own index, which this
# machine cannot reach), so this installs PyPI's Linux build: the same torch release, whose CPU
# kernels the tests use; its CUDA libraries (about 3 GB) are installed and never loaded on a CPU.
# Idempotent: a second run only checks the versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv-compat/bin/python ] || "$PY" -m venv .venv-compat
. .venv-compat/bin/activate
quiet() { "$@" 2>&1 | { grep -v -i -e "warning: location" -e "^ *!!" || true; }; }
if ! python -c "import torch, transformers, gradproj, pytest, hypothesis, torch_optimizer, peft, sys; sys.exit(0 if (torch.__version__.split('+')[0], transformers.__version__) == ('2.11.0', '5.9.0') else 1)" 2>/dev/null; then
  quiet python -m pip install -q --upgrade pip
  quiet pip install -q torch==2.11.0 transformers==5.9.0
  # gradproj (editable) with what its CPU tests import, torch and transformers held at those versions
  quiet pip install -q -e ".[hf]" torch==2.11.0 transformers==5.9.0 "pytest>=8" "hypothesis>=6.100" \
    "torch-optimizer>=0.3" "matplotlib>=3.7"
fi
python -c "import torch, transformers, peft, gradproj; print(f'.venv-compat ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
