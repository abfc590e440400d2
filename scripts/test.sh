#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up the three environments and Chromium (the docs' browser
# test), lint and type-check the core
# (ruff, mypy; settings in pyproject.toml), then run
#   .venv       (torch, transformers, peft, TRL, ...):  tests/ except tests/verl
#   .venv-verl  (verl 0.9.1, which pins transformers<5.11): tests/verl
#   .venv-compat (the verl GPU install, verl[vllm]==0.9.1: torch 2.11.0, transformers 5.9.0, vLLM
#                0.24.0): the core's CPU subset and tests/verl (scripts/test_compat.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/bootstrap_verl.sh
bash scripts/bootstrap_browser.sh     # Debian's chromium, for the docs' browser test
.venv/bin/ruff check gradproj
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
.venv-verl/bin/python -m pytest -q tests/verl --ignore=tests/verl/test_vllm_stack.py "$@"  # no vLLM here: .venv-compat runs it
bash scripts/test_compat.sh "$@"
