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

from gradproj.testing.verl_cpu import smoke  # noqa: E402


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
    # flash-attn is not installed here: sdpa, said on stderr
    assert "+actor_rollout_ref.model.override_config.attn_implementation=sdpa" in args
    assert "flash-attn is not installed: attention sdpa" in run.stderr
    # an attention choice on the command line is the user's: nothing added
    mine = "+actor_rollout_ref.model.override_config.attn_implementation=eager"
    run = subprocess.run(["bash", str(ROOT / "examples" / "verl" / "run.sh"), str(recipe), mine],
                         capture_output=True, text=True, env=env, check=True)
    args = run.stdout.splitlines()
    assert [a for a in args if "attn_implementation" in a] == [mine]


def test_run_sh_keeps_flash_attention_when_flash_attn_imports(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "flash_attn.py").write_text("")  # an importable stand-in
    (fake / "python").write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\nprintf "%s\\n" "$@"\n')
    (fake / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", PYTHONPATH=str(fake))
    recipe = ROOT / "examples" / "verl" / "kl_free_lora_grpo_qwen3_gsm8k.yaml"
    run = subprocess.run(["bash", str(ROOT / "examples" / "verl" / "run.sh"), str(recipe)],
                         capture_output=True, text=True, env=env, check=True)
    assert not [a for a in run.stdout.splitlines() if "attn_implementation" in a]
    assert "flash-attn is installed" in run.stderr


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


@pytest.fixture(scope="module")
def cpu_inputs(tmp_path_factory):
    """GSM8K as prepare_gsm8k.py writes it, and a tiny local model (the recipes' Qwen3-0.6B is not
    downloadable here) with a chat template, which verl's dataset applies."""
    from gradproj.testing.verl_cpu.trainer import prepare

    folder = tmp_path_factory.mktemp("run-sh")
    subprocess.run([sys.executable, str(ROOT / "examples" / "verl" / "prepare_gsm8k.py"), "--out", str(folder / "gsm8k")],
                   check=True, capture_output=True)
    return {"model": prepare(folder / "tiny")["model"], "data": folder / "gsm8k"}


def _run_sh_on_the_cpu(recipe, cpu_inputs, cwd, *extra):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1",
               RAY_DEDUP_LOGS="0", HYDRA_FULL_ERROR="1")
    for key in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    run = subprocess.run(
        ["bash", str(ROOT / "examples" / "verl" / "run.sh"), str(ROOT / "examples" / "verl" / recipe),
         f"actor_rollout_ref.model.path={cpu_inputs['model']}",
         f"data.train_files={cpu_inputs['data'] / 'train.parquet'}",
         f"data.val_files={cpu_inputs['data'] / 'test.parquet'}",
         "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
         "+ray_kwargs.ray_init.include_dashboard=False", *extra],
        capture_output=True, text=True, env=env, timeout=900, cwd=cwd,
    )
    assert run.returncode != 0
    return run.stdout + run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [
    ("proma_qwen3_gsm8k.yaml", ()),
    ("kl_free_lora_grpo_qwen3_gsm8k.yaml", ("actor_rollout_ref.model.lora.merge=True",)),
])
def test_run_sh_on_the_cpu_gets_to_verls_gpu_placement(recipe, extra, cpu_inputs, tmp_path):
    """The launch as a user types it, on this CPU machine: past config validation, Ray, the v1 trainer,
    TransferQueue, the tokenizer and the GSM8K dataset, and gradproj's trainer checks
    (``PPOTrainer._init_dataloader``), up to the first GPU-only step -- verl's resource pools
    (``ResourcePoolManager.create_resource_pool``), which place the actor and rollout on GPUs.

    Local stand-ins: the model path (no hub here) and one TransferQueue storage unit instead of
    verl's 8 -- each reserves a CPU in Ray, and with fewer than 9 CPUs verl 0.9.1 waits forever in
    ``tq.init`` (measured here: no progress in 10 minutes on 2 CPUs). The LoRA recipe merges its
    adapter for the sync (see the next test).
    """
    log = _run_sh_on_the_cpu(recipe, cpu_inputs, tmp_path, *extra)
    assert "ConfigError" not in log and "GradProjError" not in log, log[-4000:]
    _assert_stopped_at_verls_resource_pools(log)


def _assert_stopped_at_verls_resource_pools(log):
    assert "[validate_config] All configuration checks passed successfully!" in log, log[-4000:]
    assert "in _init_dataloader" not in log  # the dataset built and gradproj's checks passed ...
    assert "in create_resource_pool" in log, log[-4000:]  # ... and the run stopped where verl asks Ray for GPUs
    assert "Total available GPUs 0 is less than total desired GPUs 8" in log


@pytest.mark.slow
def test_run_sh_lora_recipe_as_written_on_the_cpu(cpu_inputs, tmp_path):
    """The KL-free LoRA recipe as written (unmerged LoRA, vLLM rollouts): verl's ``validate_config``
    imports vLLM to check the LoRA rank against vLLM's maximum. Where the guide's GPU install is
    (``verl[vllm]==0.9.1``, then gradproj's extra: .venv-compat, scripts/test_compat.sh), the check
    passes and the launch gets to verl's resource pools like the PROMA recipe; in .venv-verl (verl
    without vLLM, whose wheels are CUDA builds) that import is the recipe's first GPU-only step.
    scripts/test.sh runs this test in both environments."""
    import importlib.util

    log = _run_sh_on_the_cpu("kl_free_lora_grpo_qwen3_gsm8k.yaml", cpu_inputs, tmp_path)
    assert "ConfigError" not in log and "GradProjError" not in log, log[-4000:]
    if importlib.util.find_spec("vllm") is None:
        assert "in validate_config" in log and "vllm version None not supported" in log, log[-4000:]
        return
    _assert_stopped_at_verls_resource_pools(log)


@pytest.mark.parametrize("recipe", ["proma", "lora"])
def test_gpu_smoke_runs_compose_on_and_off(recipe, tmp_path):
    """gpu_smoke.py's GPU runs: the recipe as written vs. with every gradproj override removed, both
    composing with verl's config; the same sizes; PROMA's rollout batch is one optimizer step."""
    import gpu_smoke
    from verl.trainer.ppo.utils import need_reference_policy

    paths = {"model": "/m", "train": "/t.parquet", "val": "/v.parquet", "reward": "/r.py"}
    on = gpu_smoke.run_overrides(recipe, paths, tmp_path, 4, gradproj=True, cpu=False)
    off = gpu_smoke.run_overrides(recipe, paths, tmp_path, 4, gradproj=False, cpu=False)
    assert not any(gpu_smoke.configures_gradproj(o) for o in off)
    assert [o for o in on if gpu_smoke.configures_gradproj(o)] == [
        o for o in smoke.load_overrides(gpu_smoke.RECIPES[recipe]) if "gradproj" in o and "project_name" not in o
    ] + (["+actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.kl_estimate=True"] if recipe == "proma" else [])
    keys = [o.split("=", 1)[0].lstrip("+") for o in on]
    assert len(keys) == len(set(keys))
    for overrides in (on, off):
        config = smoke.compose(overrides)
        assert config.actor_rollout_ref.rollout.name == "vllm" and config.trainer.n_gpus_per_node == 1
        assert config.trainer.total_training_steps == 4 and config.data.train_batch_size == 16
        assert config.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
        assert not need_reference_policy(config)
    on_config, off_config = smoke.compose(on), smoke.compose(off)
    assert off_config.actor_rollout_ref.actor.optim.optimizer_impl != "gradproj.integrations.verl"
    assert off_config.actor_rollout_ref.actor.policy_loss.loss_mode == "vanilla"
    if recipe == "proma":
        assert on_config.actor_rollout_ref.actor.ppo_mini_batch_size == on_config.data.train_batch_size
        assert on_config.actor_rollout_ref.actor.policy_loss.loss_mode == "gradproj"
    else:
        assert on_config.actor_rollout_ref.model.lora_rank == 8


@pytest.mark.slow
def test_gpu_smoke_script_on_the_cpu(tmp_path):
    """The smoke script's whole path, run on the CPU (hf_cpu rollout, LoRA merged): the LoRA recipe with
    gradproj on and off, the report with both rows and the step-time ratio."""
    import gpu_smoke

    results = gpu_smoke.main(["--cpu", "--steps", "2", "--hidden", "32", "--layers", "1", "--recipes", "lora",
                              "--out", str(tmp_path)])
    assert set(results) == {"lora gradproj on", "lora gradproj off"}
    assert results["lora gradproj on"]["actor/gradproj/lora_bound/mu_mean"] > 0
    assert "actor/gradproj/lora_bound/mu_mean" not in results["lora gradproj off"]
    report = (tmp_path / "report.md").read_text()
    assert "| lora gradproj on |" in report and "lora: step time with gradproj / without = " in report
