"""verl's own ppo_trainer.yaml composed with the documented overrides, and the misconfigurations
gradproj refuses (each with the key to change)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradproj.errors import ConfigError
from gradproj.testing.verl_cpu import smoke

ROOT = Path(__file__).resolve().parents[2]
SMOKE = smoke.load_overrides(smoke.DEFAULT_OVERRIDES)
RECIPES = ROOT / "examples" / "verl"
PROMA_RECIPE = RECIPES / "proma_qwen3_gsm8k.yaml"
LORA_RECIPE = RECIPES / "kl_free_lora_grpo_qwen3_gsm8k.yaml"
#: what the CPU needs to run a GPU recipe's actor update on the tiny model
CPU_SIZES = ["actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4"]


def test_smoke_overrides_compose_into_verl_dataclasses():
    from verl.trainer.ppo.utils import need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass

    config = smoke.compose(SMOKE + ["actor_rollout_ref.model.path=/nonexistent"])
    actor = config.actor_rollout_ref.actor
    assert config.actor_rollout_ref.model.external_lib == "gradproj.integrations.verl"
    assert actor.strategy == "fsdp2"
    assert omega_conf_to_dataclass(actor).engine.strategy == "fsdp2"  # verl syncs actor.strategy into the engine
    assert actor.policy_loss.loss_mode == "gradproj"
    assert dict(actor.optim.override_optimizer_config) == {"gradproj": {"strategy": "proma"}}
    assert not need_reference_policy(config), "KL-free: no reference worker"
    optim = omega_conf_to_dataclass(actor.optim)
    assert (optim.optimizer_impl, optim.optimizer) == ("gradproj.integrations.verl", "AdamW")


@pytest.mark.parametrize("recipe", [PROMA_RECIPE, LORA_RECIPE], ids=["proma", "kl-free-lora-grpo"])
def test_gpu_recipes_compose_without_reference_worker(recipe):
    from verl.trainer.ppo.utils import need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass

    config = smoke.compose(smoke.load_overrides(recipe))
    actor = config.actor_rollout_ref.actor
    assert config.actor_rollout_ref.model.path == "Qwen/Qwen3-0.6B"
    assert config.data.train_files.endswith("/data/gsm8k/train.parquet")
    assert config.algorithm.adv_estimator == "grpo"
    assert not actor.use_kl_loss and not config.algorithm.use_kl_in_reward
    assert not need_reference_policy(config), "KL-free: verl builds no reference worker"
    assert omega_conf_to_dataclass(actor).engine.strategy == "fsdp2"
    if recipe == PROMA_RECIPE:
        assert actor.policy_loss.loss_mode == "gradproj"
        assert actor.optim.override_optimizer_config.gradproj.strategy == "proma_reference"
        assert config.actor_rollout_ref.model.lora_rank == 0
    else:
        assert config.actor_rollout_ref.model.lora_rank == 32
        assert actor.optim.override_optimizer_config.gradproj.lora_bound is True


@pytest.mark.parametrize("recipe", [PROMA_RECIPE, LORA_RECIPE], ids=["proma", "kl-free-lora-grpo"])
def test_gpu_recipes_run_an_actor_update_on_the_cpu(recipe, tmp_path):
    """The recipe's own keys (not the smoke ones) drive a real actor update of the tiny model."""
    folder = smoke.tiny_model(tmp_path / "model")
    config = smoke.compose(smoke.load_overrides(recipe) + smoke.CPU_OVERRIDES + CPU_SIZES
                           + [f"actor_rollout_ref.model.path={folder}", "actor_rollout_ref.rollout.name=hf"])
    worker = smoke.actor_worker(config)
    module = worker.actor.engine.module
    before = {n: p.detach().full_tensor().clone() for n, p in module.named_parameters() if p.requires_grad}
    metrics = smoke.update_actor(worker, smoke.rollout_batch(module.config.vocab_size), config)
    after = {n: p.detach().full_tensor() for n, p in module.named_parameters() if p.requires_grad}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    if recipe == PROMA_RECIPE:
        assert len(changed) == len(before)
        assert metrics["gradproj/proma/projections"][0] > 0
    else:
        assert before and all("lora_" in n for n in before)
        assert changed, "LoRA B starts at 0, so at least the B matrices move"
        bounds = [k for k in metrics if k.startswith("gradproj/lora_bound/")]
        assert bounds and all(v[0] >= 0 for k in bounds for v in [metrics[k]])


def make_worker(tmp_path, extra):
    folder = smoke.tiny_model(tmp_path / "model")
    config = smoke.compose(SMOKE + smoke.CPU_OVERRIDES + [f"actor_rollout_ref.model.path={folder}"] + extra)
    return config, smoke.actor_worker(config)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["actor_rollout_ref.actor.strategy=fsdp"], "actor_rollout_ref.actor.strategy=fsdp2"),
        (["actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"], "policy_loss.loss_mode=gradproj"),
        (["actor_rollout_ref.actor.use_kl_loss=True"], "use_kl_loss=False"),
        (["actor_rollout_ref.actor.entropy_coeff=0.01"], "entropy_coeff=0"),
        (["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"], "ulysses_sequence_parallel_size"),
        (["actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=not_a_strategy"], "not_a_strategy"),
        (["actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=variance_scaling"],
         "norm_adv_by_std_in_grpo"),
        (["actor_rollout_ref.actor.optim.override_optimizer_config=null"], "override_optimizer_config.gradproj.strategy"),
        (["actor_rollout_ref.actor.optim.optimizer=Lion"], "AdamW"),
        (["actor_rollout_ref.model.use_fused_kernels=True"], "use_fused_kernels=False"),
        (["actor_rollout_ref.actor.fsdp_config.pad_to_length=True"], "pad_to_length=False"),
        # S-GRPO's selection: verl's token-mean would divide by all response tokens, not each response's selection
        (["+actor_rollout_ref.actor.optim.override_optimizer_config.sgrpo={alpha:1,p:0.5,k:3}"],
         "loss_agg_mode=seq-mean-token-mean"),
        # ... and only gradproj's loss applies it (strategy none accepts any verl loss otherwise)
        (["+actor_rollout_ref.actor.optim.override_optimizer_config.sgrpo={alpha:1,p:0.5,k:3}",
          "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
          "actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=none",
          "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"], "policy_loss.loss_mode=gradproj"),
        (["+actor_rollout_ref.actor.optim.override_optimizer_config.sgrpo={alpha:4,p:0.5,k:3}"], "alpha <= k"),
        (["+actor_rollout_ref.actor.optim.override_optimizer_config.sgrpo={alpha:1,p:0.5}"], "give alpha, p, k"),
    ],
    ids=["fsdp1", "ppo-clip", "kl-loss", "entropy", "ulysses", "unknown-strategy", "variance-scaling", "no-strategy",
         "unknown-optimizer", "fused-kernels", "pad-to-length", "sgrpo-token-mean", "sgrpo-vanilla-loss",
         "sgrpo-alpha-above-k", "sgrpo-missing-k"],
)
def test_misconfigurations_fail_at_start_up(extra, needle, tmp_path):
    with pytest.raises((ConfigError, AttributeError)) as info:
        make_worker(tmp_path, extra)
    assert needle in str(info.value)


def test_gradproj_loss_without_gradproj_optimizer_is_an_error_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="optimizer_impl=gradproj.integrations.verl") as info:
        make_worker(
            tmp_path,
            ["actor_rollout_ref.actor.optim.optimizer_impl=torch.optim", "actor_rollout_ref.actor.optim.override_optimizer_config=null"],
        )
    assert "strategy='fsdp2'" in str(info.value) and "FSDPEngine" in str(info.value)


def test_plain_loss_with_gradproj_optimizer_is_an_error_at_the_first_micro_batch(tmp_path):
    """A loss that bypasses set_loss_fn's check (a custom loss function) is caught at its micro-batch."""
    config, worker = make_worker(tmp_path, [])
    from functools import partial

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss

    vanilla = smoke.compose(SMOKE + smoke.CPU_OVERRIDES + ["actor_rollout_ref.model.path=/x", "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"])
    actor = omega_conf_to_dataclass(vanilla.actor_rollout_ref.actor)
    worker.actor.loss_fn = partial(ppo_loss, config=actor)  # what a custom loss would do
    batch = smoke.rollout_batch(worker.actor.engine.module.config.vocab_size)
    before = {n: p.detach().full_tensor().clone() for n, p in worker.actor.engine.module.named_parameters()}
    with pytest.raises(Exception, match="loss_mode=gradproj"):
        smoke.update_actor(worker, batch, config)
    # (FSDP2 may stay unsharded after an exception inside the backward: compare whole tensors)
    after = {n: getattr(p.detach(), "full_tensor", p.detach)() for n, p in worker.actor.engine.module.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before), "no update from a refused micro-batch"


def test_sgrpo_with_another_aggregation_is_refused_at_the_first_micro_batch(tmp_path, monkeypatch):
    """A driver that skips set_loss_fn's S-GRPO check (here: the check disabled) meets the loss's own:
    refused before the micro-batch's backward -- weights, .grad and the optimizer state as they were."""
    from gradproj.integrations.verl import patches

    monkeypatch.setattr(patches, "check_sgrpo_config", lambda *a, **k: None)
    config, worker = make_worker(tmp_path, ["+actor_rollout_ref.actor.optim.override_optimizer_config.sgrpo={alpha:1,p:0.5,k:3}"])
    engine = worker.actor.engine
    batch = smoke.rollout_batch(engine.module.config.vocab_size)
    before = {n: p.detach().full_tensor().clone() for n, p in engine.module.named_parameters()}
    grads = [p.grad for p in engine.module.parameters()]
    inner = engine.optimizer.optimizer
    with pytest.raises(ConfigError, match="loss_agg_mode=seq-mean-token-mean"):
        smoke.update_actor(worker, batch, config)
    after = {n: getattr(p.detach(), "full_tensor", p.detach)() for n, p in engine.module.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before), "no update from a refused micro-batch"
    assert all(g is None for g in grads) and all(p.grad is None for p in engine.module.parameters())
    assert not inner.state  # AdamW never stepped
    assert engine.optimizer.steps == 0


def test_unsupported_verl_version_and_missing_internals(monkeypatch):
    from gradproj.integrations.verl import patches
    from gradproj.integrations.verl.version import SUPPORTED_VERL, check_verl_version

    assert check_verl_version("0.9.1") == "0.9.1"
    for bad in ("0.8.0", "0.10.0", "1.0.0"):
        with pytest.raises(ImportError, match=rf"verl >={SUPPORTED_VERL[0]},<{SUPPORTED_VERL[1]}"):
            check_verl_version(bad)
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    monkeypatch.delattr(FSDPEngine, "_gradient_sync_context")
    with pytest.raises(ImportError, match="lacks verl.workers.engine.fsdp.transformer_impl.FSDPEngine._gradient_sync_context"):
        patches._resolve()


def child_env():
    """This process's environment without its gloo rendezvous (a child process starts its own)."""
    return {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}


def test_loss_mode_gradproj_without_the_plugin_is_an_error():
    """Without external_lib (nothing imported gradproj), verl refuses the unknown loss mode: an error, not a log line."""
    code = (
        "from gradproj.testing.verl_cpu import start; start()\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "get_policy_loss_fn('gradproj')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=child_env())
    assert run.returncode != 0
    assert "Unsupported loss mode: gradproj" in run.stderr


def test_external_lib_imports_the_plugin_in_a_fresh_process(tmp_path):
    """verl's HFModelConfig imports external_lib: that alone registers the loss and wraps the engine."""
    folder = smoke.tiny_model(tmp_path / "model")
    code = (
        "from gradproj.testing.verl_cpu import start; start()\n"
        "import sys\n"
        "from verl.workers.config import HFModelConfig\n"
        "assert 'gradproj.integrations.verl' not in sys.modules\n"
        f"HFModelConfig(path={str(folder)!r}, external_lib='gradproj.integrations.verl')\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "from verl.workers.engine.fsdp.transformer_impl import FSDPEngine\n"
        "print(get_policy_loss_fn('gradproj').__name__, FSDPEngine._build_optimizer.__gradproj_wrapped__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr[-2000:]
    assert "compute_policy_loss_gradproj True" in run.stdout


def test_reference_free_monitoring_in_verls_metrics(tmp_path):
    """KL-free (no reference worker): gradproj's token entropy is in verl's metrics at every update and,
    with kl_estimate=True, the per-step KL of the previous update from the second on (FSDP2 shards:
    the update is gathered once per step)."""
    folder = smoke.tiny_model(tmp_path / "model")
    config = smoke.compose(smoke.load_overrides(smoke.DEFAULT_OVERRIDES) + smoke.CPU_OVERRIDES + [
        f"actor_rollout_ref.model.path={folder}",
        "+actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.kl_estimate=True",
    ])
    worker = smoke.actor_worker(config)
    vocab = worker.actor.engine.module.config.vocab_size
    first = smoke.update_actor(worker, smoke.rollout_batch(vocab), config)
    second = smoke.update_actor(worker, smoke.rollout_batch(vocab), config)
    assert first["gradproj/entropy"][0] > 0
    assert "gradproj/kl_estimate/per_token" not in first
    assert second["gradproj/kl_estimate/per_token"][0] > 0
    assert second["gradproj/kl_estimate/per_sequence"][0] > second["gradproj/kl_estimate/per_token"][0]


def guide_commands() -> list[list[str]]:
    """The `python -m verl.trainer.main_ppo ...` blocks of the verl guide, as override lists."""
    import re
    import shlex

    text = (ROOT / "docs" / "guides" / "verl.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        if block.startswith("python -m verl.trainer.main_ppo"):
            words = shlex.split(os.path.expandvars(block.replace("\\\n", " ")))
            commands.append(words[3:])
    return commands


@pytest.mark.parametrize("index", range(3), ids=["proma", "intra-proma", "kl-free-lora-grpo"])
def test_the_guides_command_lines_compose_and_pass_the_checks(index):
    """Each complete command line of the guide is valid Hydra for verl 0.9.1 (the `+` keys included),
    gives a valid gradproj config, builds no reference worker, and passes gradproj's trainer checks."""
    from verl.trainer.ppo.utils import need_reference_policy

    from gradproj.config import GradProjConfig
    from gradproj.integrations.verl.checks import check_trainer_config

    commands = guide_commands()
    assert len(commands) == 3
    config = smoke.compose(commands[index])
    actor = config.actor_rollout_ref.actor
    options = dict(actor.optim.override_optimizer_config.gradproj)
    GradProjConfig(**options)  # a valid strategy and options
    assert config.actor_rollout_ref.model.external_lib == "gradproj.integrations.verl"
    assert config.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert not need_reference_policy(config)
    check_trainer_config(config)
    expected = [("proma_reference", "gradproj"), ("intra_proma", "gradproj"), ("none", "vanilla")][index]
    assert (options["strategy"], actor.policy_loss.loss_mode) == expected
    if index == 1:
        assert options["rank"] == 16 and options["kl_estimate"] is True
    if index == 2:
        assert config.actor_rollout_ref.model.lora_rank == 32 and options["lora_bound"] is True


def test_the_sgrpo_pages_command_line_composes_and_passes_the_checks():
    """The S-GRPO page's verl command: valid Hydra, a valid selection, and gradproj's trainer and S-GRPO checks pass."""
    import re
    import shlex

    from gradproj.integrations.verl.checks import check_sgrpo_config, check_trainer_config
    from gradproj.integrations.verl.optimizers import sgrpo_selection

    text = (ROOT / "docs" / "methods" / "sgrpo.md").read_text()
    blocks = [b for b in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M) if b.startswith("python -m verl")]
    assert len(blocks) == 1
    config = smoke.compose(shlex.split(os.path.expandvars(blocks[0].replace("\\\n", " ")))[3:])
    actor = config.actor_rollout_ref.actor
    selection = sgrpo_selection(actor.optim.override_optimizer_config.sgrpo)
    assert (selection.alpha, selection.p, selection.k, selection.seed) == (4, 0.1, 16, 0)
    check_trainer_config(config)
    check_sgrpo_config(actor, selection)
