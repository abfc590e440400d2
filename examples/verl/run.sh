#!/usr/bin/env bash
# Launch verl's PPO trainer with the Hydra overrides listed in a gradproj recipe YAML (plus any
# extra overrides on the command line). Needs GPUs, verl 0.9 with vLLM, and gradproj installed:
#   pip install "verl[vllm]==0.9.1" && pip install -e ".[verl]"   (see docs/install.md)
#   python examples/verl/prepare_gsm8k.py
#   bash examples/verl/run.sh examples/verl/proma_qwen3_gsm8k.yaml trainer.n_gpus_per_node=4
#
# Attention: verl defaults to flash_attention_2, which neither verl's extras nor gradproj install.
# Unless the command line sets attn_implementation itself, this script keeps verl's default when
# flash_attn imports, and otherwise adds +actor_rollout_ref.model.override_config.attn_implementation=sdpa
# (and says so).
set -euo pipefail
recipe=${1:?usage: run.sh RECIPE.yaml [key=value ...]}
shift
mapfile -t overrides < <(python -c 'import sys, yaml; print("\n".join(yaml.safe_load(open(sys.argv[1]))["overrides"]))' "$recipe")
attention=()
if [[ " ${overrides[*]} $* " != *attn_implementation=* ]]; then
  if python -c 'import flash_attn' 2>/dev/null; then
    echo "run.sh: flash-attn is installed: verl's default attention (flash_attention_2)" >&2
  else
    echo "run.sh: flash-attn is not installed: attention sdpa" \
         "(+actor_rollout_ref.model.override_config.attn_implementation=sdpa)" >&2
    attention=(+actor_rollout_ref.model.override_config.attn_implementation=sdpa)
  fi
fi
exec python -m verl.trainer.main_ppo "${overrides[@]}" "${attention[@]}" "$@"
