#!/usr/bin/env bash
# gradproj on a GPU: step-time and peak-memory ratios at realistic RL shapes, set-up included.
#
#   bash benchmarks/gpu_overhead.sh [OUT_DIR] [more benchmarks.step_overhead options]
#   bash benchmarks/gpu_overhead.sh --fetch-wheels     # on a machine with an index: wheels for an offline node
#
# Needs a CUDA build of torch (2.11 or newer), transformers and peft already installed -- as on a
# training node or the project's H200 image. What else gradproj needs (pydantic, pluggy) is installed
# from ./.whl when that folder exists (an offline node: fetch the wheels first, elsewhere, with
# --fetch-wheels), else from the package index, into a private folder (nothing else changes).
# gradproj itself runs from this checkout. Writes OUT_DIR/gpu_overhead.{md,json} (default: ./gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."

NEEDED=(pydantic pydantic-core annotated-types typing-inspection pluggy)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${NEEDED[@]}"
    exit 0
fi

OUT_DIR="${1:-gpu-results}"
[[ $# -gt 0 ]] && shift
mkdir -p "$OUT_DIR"
start=$(date +%s)

if ! python3 -c "import pydantic, pluggy" 2>/dev/null; then
    site=/tmp/gradproj-site
    if [[ -d .whl ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    else
        python3 -m pip install -q --no-deps --target "$site" "${NEEDED[@]}"
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch, transformers, peft, gradproj
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, gradproj from {gradproj.__file__}; {torch.cuda.get_device_name()}")
PY
python3 -m benchmarks.step_overhead --device cuda --markdown "$OUT_DIR/gpu_overhead.md" --json "$OUT_DIR/gpu_overhead.json" "$@"
echo "done in $(( $(date +%s) - start )) s (set-up included)"
