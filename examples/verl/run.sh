#!/usr/bin/env bash
# Launch verl's PPO trainer with the Hydra overrides listed in a gradproj recipe YAML (plus any
# extra overrides on the command line). Needs GPUs, verl 0.9 with vLLM, and gradproj installed:
#   pip install -e ".[verl]" (in a checkout; see docs/install.md); python examples/verl/prepare_gsm8k.py
#   bash examples/verl/run.sh examples/verl/proma_qwen3_gsm8k.yaml trainer.n_gpus_per_node=4
set -euo pipefail
recipe=${1:?usage: run.sh RECIPE.yaml [key=value ...]}
shift
mapfile -t overrides < <(python -c 'import sys, yaml; print("\n".join(yaml.safe_load(open(sys.argv[1]))["overrides"]))' "$recipe")
exec python -m verl.trainer.main_ppo "${overrides[@]}" "$@"
