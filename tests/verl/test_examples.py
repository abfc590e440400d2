"""The verl examples: GSM8K in verl's data format (scored by verl's own GSM8K reward), the launch
script's override parsing, and the CPU smoke run as documented."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "verl"))

import prepare_gsm8k  # noqa: E402


def test_prepare_gsm8k_rows_are_scored_by_verls_gsm8k_reward(tmp_path):
    import pandas as pd
    from verl.utils.reward_score import default_compute_score

    prepare_gsm8k.main(["--out", str(tmp_path)])
    train = pd.read_parquet(tmp_path / "train.parquet")
    test = pd.read_parquet(tmp_path / "test.parquet")
    assert (len(train), len(test)) == (7473, 1319)
    row = test.iloc[0]
    assert row["data_source"] == "openai/gsm8k"
    assert row["prompt"][0]["role"] == "user" and "####" in row["prompt"][0]["content"]
    truth = row["reward_model"]["ground_truth"]
    right = f"Step by step... #### {truth}"
    wrong = f"Step by step... #### {int(truth) + 1}"
    assert default_compute_score("openai/gsm8k", right, truth) == 1.0
    assert default_compute_score("openai/gsm8k", wrong, truth) == 0.0


def test_run_sh_passes_the_recipe_overrides_to_verls_trainer(tmp_path):
    """run.sh execs `python -m verl.trainer.main_ppo <overrides> <extra>`: check with a stand-in python."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\nprintf "%s\\n" "$@"\n')
    (fake / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    recipe = ROOT / "examples" / "verl" / "proma_qwen3_gsm8k.yaml"
    run = subprocess.run(["bash", str(ROOT / "examples" / "verl" / "run.sh"), str(recipe), "trainer.n_gpus_per_node=4"],
                         capture_output=True, text=True, env=env, check=True)
    args = run.stdout.splitlines()
    assert args[:2] == ["-m", "verl.trainer.main_ppo"]
    assert "actor_rollout_ref.model.external_lib=gradproj.integrations.verl" in args
    assert args[-1] == "trainer.n_gpus_per_node=4"


def test_cpu_smoke_command(tmp_path):
    """`python -m gradproj.testing.verl_cpu.smoke` as the guide shows it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    run = subprocess.run([sys.executable, "-m", "gradproj.testing.verl_cpu.smoke"], capture_output=True,
                         text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "optimizer: GradProjOptimizer" in run.stdout
    assert "parameters changed: 27/27" in run.stdout
    assert "gradproj/proma/projected_fraction" in run.stdout


@pytest.mark.parametrize("strategy", ["intra_proma", "none"])
def test_cpu_smoke_with_another_strategy(strategy, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    run = subprocess.run(
        [sys.executable, "-m", "gradproj.testing.verl_cpu.smoke",
         f"actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy={strategy}"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"strategy='{strategy}'" in run.stdout
    assert "parameters changed: 27/27" in run.stdout
