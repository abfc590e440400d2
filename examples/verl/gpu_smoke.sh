#!/usr/bin/env bash
# The verl GPU smoke run in one command, set-up included: both recipes for a few steps on a small
# random model, gradproj on and off, gradproj's metrics and the step times (examples/verl/gpu_smoke.py).
#
#   bash examples/verl/gpu_smoke.sh [--steps 4] [--out DIR]
#
# Set-up: if the python on PATH (or $PYTHON) already imports verl, vLLM and gradproj's verl
# integration, it is used as is. Otherwise this builds .venv-gpu-smoke in the checkout:
#   pip install "verl[vllm]==0.9.1"   (verl's GPU stack: its CUDA torch, vLLM, TransferQueue)
#   pip install -e ".[verl]"          (gradproj)
# On a node without internet, set WHEELHOUSE to a folder of wheels (pip --no-index --find-links).
# Needs one GPU; written for an H200-class GPU to finish within 8 minutes including the set-up
# when pip's cache or the wheelhouse holds the wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python}
if ! "$python" -c 'import verl, vllm, gradproj.integrations.verl' 2>/dev/null; then
  venv=.venv-gpu-smoke
  echo "gpu_smoke.sh: setting up $venv (verl[vllm]==0.9.1, then gradproj[verl])" >&2
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
  pip_args=(-q)
  if [[ -n ${WHEELHOUSE:-} ]]; then pip_args+=(--no-index --find-links "$WHEELHOUSE"); fi
  "$venv/bin/pip" install "${pip_args[@]}" "verl[vllm]==0.9.1"
  "$venv/bin/pip" install "${pip_args[@]}" -e ".[verl]"
  python=$venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "gpu_smoke.sh: nvidia-smi not found" >&2
exec "$python" examples/verl/gpu_smoke.py "$@"
