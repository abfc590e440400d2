"""Fault injection for verl: every setting that would take an off-policy optimizer step, or train
without gradproj where gradproj was asked for, is refused -- in the trainer process before any
worker starts, at the worker's start-up, or at the latest before the first optimizer step of an
update -- and a refused update leaves the weights as they were."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradproj.errors import ConfigError
from gradproj.testing.verl_cpu import smoke
from test_config import make_worker

# (gradproj.integrations.verl is imported inside the tests: the session fixture installs the CPU
# platform before anything imports verl's engine)
TRAINER_TARGETS = (
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_init_dataloader"),
    ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer", "init_workers"),
)


def check_trainer_config(config):
    from gradproj.integrations.verl import check_trainer_config as check

    check(config)

ROOT = Path(__file__).resolve().parents[2]
SMOKE = smoke.load_overrides(smoke.DEFAULT_OVERRIDES)
LORA_RECIPE = ROOT / "examples" / "verl" / "kl_free_lora_grpo_qwen3_gsm8k.yaml"
PROMA_RECIPE = ROOT / "examples" / "verl" / "proma_qwen3_gsm8k.yaml"
PROMA_ON_LORA = [  # the LoRA recipe's own advice for PROMA on top (the recipe already adds the gradproj key)
    "actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=proma",
    "actor_rollout_ref.actor.policy_loss.loss_mode=gradproj",
]


def composed(extra, base=None):
    return smoke.compose((SMOKE if base is None else smoke.load_overrides(base)) + ["actor_rollout_ref.model.path=/x"] + extra)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["actor_rollout_ref.actor.ppo_epochs=2"], "ppo_epochs=2"),
        (["data.train_batch_size=4"], "ppo_mini_batch_size=2 < data.train_batch_size=4"),
        (["trainer.v1.trainer_mode=colocate_async"], "trainer_mode=colocate_async"),
        (["trainer.v1.trainer_mode=separate_async"], "trainer_mode=separate_async"),
        (["+trainer.v1.sync.parameter_sync_step=2"], "parameter_sync_step=2"),
        (["+trainer.v1.sampler.custom_sampler.path=my.py", "+trainer.v1.sampler.custom_sampler.name=Buffer"], "custom_sampler"),
        (["skip.rollout.enable=True"], "skip.rollout.enable"),
        (["skip.rollout_tq.enable=True"], "skip.rollout_tq.enable"),
        (["skip.async_rollout.enable=True"], "skip.async_rollout.enable"),
    ],
    ids=["ppo-epochs", "mini-batches", "colocate-async", "separate-async", "parameter-sync-step", "custom-sampler",
         "skip-rollout", "skip-rollout-tq", "skip-async-rollout"],
)
def test_off_policy_trainer_settings_are_refused_in_the_trainer_process(extra, needle):
    with pytest.raises(ConfigError, match=needle):
        check_trainer_config(composed(extra))


def test_on_policy_settings_pass_the_trainer_check():
    check_trainer_config(composed([]))
    check_trainer_config(composed([], base=PROMA_RECIPE))


def test_the_lora_recipe_alone_accepts_mini_batches_and_its_proma_advice_is_correct():
    """Strategy none (the LoRA KL bound only) accepts any verl loss and mini-batching; PROMA on top
    is refused with the recipe's 4 mini-batches and accepted with the mini-batch size its comment gives."""
    check_trainer_config(composed([], base=LORA_RECIPE))
    with pytest.raises(ConfigError, match="ppo_mini_batch_size=64 < data.train_batch_size=256"):
        check_trainer_config(composed(PROMA_ON_LORA, base=LORA_RECIPE))
    advice = [line.strip("# \n") for line in LORA_RECIPE.read_text().splitlines() if line.startswith("#   ")]
    assert PROMA_ON_LORA[0] in advice and PROMA_ON_LORA[1] in advice
    check_trainer_config(composed(advice, base=LORA_RECIPE))


def test_the_gradproj_loss_alone_counts_as_capturing():
    with pytest.raises(ConfigError, match="ppo_epochs=2"):
        check_trainer_config(composed(["actor_rollout_ref.actor.optim.optimizer_impl=torch.optim",
                                       "actor_rollout_ref.actor.optim.override_optimizer_config=null",
                                       "actor_rollout_ref.actor.ppo_epochs=2"]))


@pytest.mark.parametrize("module_name, cls_name, method", TRAINER_TARGETS, ids=["v1", "v0"])
def test_the_trainer_check_runs_before_the_trainer_builds_anything(module_name, cls_name, method):
    import importlib

    from gradproj.integrations.verl import patches

    assert patches.TRAINER_TARGETS == TRAINER_TARGETS
    cls = getattr(importlib.import_module(module_name), cls_name)  # (v1 needs TransferQueue: gradproj[verl] has it)
    assert patches.install_trainer_checks()
    assert getattr(getattr(cls, method), "__gradproj_wrapped__", False)

    class Trainer:
        config = composed(["actor_rollout_ref.actor.ppo_epochs=3"])

    with pytest.raises(ConfigError, match="ppo_epochs=3"):
        getattr(cls, method)(Trainer())


@pytest.mark.parametrize(
    "extra, needle",
    [(["actor_rollout_ref.actor.ppo_epochs=2"], "ppo_epochs=2"),
     (["actor_rollout_ref.actor.calculate_entropy=True"], "calculate_entropy=False")],
    ids=["ppo-epochs", "calculate-entropy"],
)
def test_worker_start_up_refusals(extra, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        make_worker(tmp_path, extra)


def weights(worker):
    return {n: p.detach().full_tensor().clone() for n, p in worker.actor.engine.module.named_parameters()}


@pytest.mark.parametrize("epochs, mini", [(1, 1), (2, 2)], ids=["two-mini-batches", "two-epochs"])
def test_an_update_of_several_optimizer_steps_is_refused_before_the_first(epochs, mini, tmp_path, monkeypatch):
    """The worker-side backstop: a rollout batch split into several optimizer steps (the trainer check
    did not run, e.g. a custom driver) fails before any step, the weights unchanged."""
    config, worker = make_worker(tmp_path, [])
    monkeypatch.setattr(config.actor_rollout_ref.actor, "ppo_mini_batch_size", mini)
    monkeypatch.setattr(config.actor_rollout_ref.actor, "ppo_epochs", epochs)
    before = weights(worker)
    with pytest.raises(ConfigError, match="optimizer steps on one rollout batch"):
        smoke.update_actor(worker, smoke.rollout_batch(worker.actor.engine.module.config.vocab_size), config)
    after = weights(worker)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_plain_optimizer_with_several_mini_batches_is_fine(tmp_path, monkeypatch):
    """Strategy none (no capture): verl's own mini-batching is left alone."""
    config, worker = make_worker(
        tmp_path,
        ["actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=none",
         "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"],
    )
    monkeypatch.setattr(config.actor_rollout_ref.actor, "ppo_mini_batch_size", 1)
    metrics = smoke.update_actor(worker, smoke.rollout_batch(worker.actor.engine.module.config.vocab_size), config)
    assert len(metrics["gradproj/microbatches"]) == 2  # two optimizer steps, each reported


def test_factory_outside_the_engine_build_is_refused():
    """What a missing external_lib leads to: verl imports the factory module only while it builds the
    optimizer, after the engine method gradproj wraps already started -- the factory refuses."""
    from gradproj.integrations.verl.optimizers import AdamW

    with pytest.raises(ConfigError, match="external_lib=gradproj.integrations.verl"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, gradproj={"strategy": "none", "lora_bound": False})


def child_env():
    return {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}


@pytest.mark.parametrize("strategy", ["proma", "none"])
def test_missing_external_lib_is_refused_at_start_up_in_a_fresh_process(strategy, tmp_path):
    """Without external_lib nothing imported gradproj before verl built its engine: the optimizer
    factory (imported by verl's build_optimizer) refuses instead of training plain AdamW."""
    folder = smoke.tiny_model(tmp_path / "model")
    overrides = [o for o in SMOKE if "external_lib" not in o and "loss_mode" not in o and "gradproj.strategy" not in o]
    overrides += smoke.CPU_OVERRIDES + [f"actor_rollout_ref.model.path={folder}",
                                        f"+actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy={strategy}"]
    code = (
        "from gradproj.testing.verl_cpu import start, smoke; start()\n"
        "import sys\n"
        f"config = smoke.compose({overrides!r})\n"
        "assert 'gradproj.integrations.verl' not in sys.modules\n"
        "try:\n"
        "    smoke.actor_worker(config)\n"
        "except Exception as err:\n"
        "    print('REFUSED', type(err).__name__, err)\n"
        "else:\n"
        "    print('BUILT')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=child_env())
    assert "REFUSED ConfigError" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    assert "external_lib=gradproj.integrations.verl" in run.stdout


def test_gradproj_loss_on_another_engine_is_refused_in_gradprojs_words(tmp_path):
    """Megatron, VeOmni, ...: the gradproj loss without gradproj's optimizer fails at set_loss_fn."""
    from functools import partial

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine_workers import TrainingWorker
    from verl.workers.utils.losses import ppo_loss

    actor = omega_conf_to_dataclass(composed(["actor_rollout_ref.actor.strategy=megatron"]).actor_rollout_ref.actor)

    class MegatronLike:
        optimizer = None

    worker = TrainingWorker.__new__(TrainingWorker)
    worker.engine = MegatronLike()
    with pytest.raises(ConfigError, match="MegatronLike.*strategy='megatron'.*not supported"):
        TrainingWorker.set_loss_fn(worker, partial(ppo_loss, config=actor))


def test_the_asynchronous_trainers_detached_actor_is_refused(tmp_path):
    """one-step off-policy / fully async / separate_async build DetachActorWorker for the trainer."""
    from verl.experimental.separation.engine_workers import DetachActorWorker

    folder = smoke.tiny_model(tmp_path / "model")
    config = smoke.compose(SMOKE + smoke.CPU_OVERRIDES + [f"actor_rollout_ref.model.path={folder}"])
    worker = DetachActorWorker(config=config.actor_rollout_ref, role="actor")
    with pytest.raises(ConfigError, match="asynchronous trainers"):
        worker.init_model()
