"""The verl methods gradproj wraps, checked at install time.

verl 0.9 builds the actor's optimizer from parameters alone and runs each micro-batch's forward,
loss and backward inside its FSDP engine. gradproj wraps (never replaces) seven methods:

* ``FSDPEngine.__init__`` -- start-up checks of the engine config when a gradproj optimizer is
  configured (FSDP2, no sequence parallelism, no packed-length padding), before anything is built;
* ``FSDPEngine._build_optimizer`` -- wraps the optimizer the factory built around the FSDP module
  (`gradproj.wrap`); the factories refuse to build one anywhere else (``external_lib`` missing,
  so this wrapper was not installed in time; another engine);
* ``FSDPEngine._gradient_sync_context`` -- one training micro-batch (forward, loss, backward): closes
  the ``opt.microbatch`` block after the backward, averages over the ranks after the last one;
* ``FSDPEngineWithLMHead.forward_step`` -- records the micro-batch's token layout (packed or padded);
* ``FSDPEngine.train_batch`` -- appends ``opt.metrics()`` to verl's metrics;
* ``TrainingWorker.set_loss_fn`` -- start-up checks of the actor config (loss mode, KL loss, entropy,
  ``ppo_epochs``; the ``gradproj`` loss without gradproj's optimizer, e.g. on another engine; the
  asynchronous trainers' detached actor);
* ``TrainingWorker.train_mini_batch`` -- refuses an actor update of more than one optimizer step on
  one rollout batch, before the first (the backstop of the trainer-side check below).

In the trainer process (where verl imports ``external_lib`` while building the tokenizer, before any
worker starts) the whole configuration is checked too (`checks.check_trainer_config`), by
wrapping the trainer method that runs next: ``PPOTrainer._init_dataloader`` (the v1 trainer) or
``RayPPOTrainer.init_workers`` (the v0 one), when their modules are loaded.

A verl release without one of the engine methods fails at import with the supported version range.
"""

from __future__ import annotations

import functools
import inspect
import sys
from contextlib import contextmanager

from gradproj import GradProjOptimizer, wrap
from gradproj.errors import ConfigError
from gradproj.integrations.verl.checks import (
    LOSS_MODE,
    check_actor_config,
    check_engine_config,
    check_optimizer_steps,
    check_sgrpo_config,
    check_trainer_config,
)
from gradproj.integrations.verl.loss import sgrpo_of
from gradproj.integrations.verl.microbatches import MicroBatchSlot, current_slot, pop_slot, push_slot
from gradproj.integrations.verl.optimizers import CONFIG_ATTR, building, requested_config
from gradproj.integrations.verl.version import SUPPORTED_VERL

__all__ = ["install", "installed", "TARGETS"]

#: (module, class, method) wrapped by `install`
TARGETS = (
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine", "__init__"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine", "_build_optimizer"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine", "_gradient_sync_context"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine", "train_batch"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead", "forward_step"),
    ("verl.workers.engine_workers", "TrainingWorker", "set_loss_fn"),
    ("verl.workers.engine_workers", "TrainingWorker", "train_mini_batch"),
)

#: trainer-process methods that run right after verl imports ``external_lib`` there (wrapped when loaded)
TRAINER_TARGETS = (
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_init_dataloader"),
    ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer", "init_workers"),
)

_MARK = "__gradproj_wrapped__"
_installed = False


def installed() -> bool:
    """Whether `install` has run in this process."""
    return _installed


def _resolve():
    import importlib

    found, missing = {}, []
    for module_name, cls_name, method in TARGETS:
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{cls_name}")
            continue
        if not callable(getattr(cls, method, None)):
            missing.append(f"{module_name}.{cls_name}.{method}")
            continue
        found[(cls_name, method)] = cls
    if missing:
        import verl

        raise ImportError(
            f"gradproj.integrations.verl supports verl >={SUPPORTED_VERL[0]},<{SUPPORTED_VERL[1]}; verl "
            f"{getattr(verl, '__version__', '?')} lacks {', '.join(missing)}. Install a supported version: "
            f"pip install 'verl>={SUPPORTED_VERL[0]},<{SUPPORTED_VERL[1]}'"
        )
    return found


def _gradproj_optimizer(engine) -> GradProjOptimizer | None:
    opt = getattr(engine, "optimizer", None)
    return opt if isinstance(opt, GradProjOptimizer) else None


def _wrap_method(cls, name: str, make):
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    wrapper = make(original)
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)


def _init(original):
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        given = signature.bind_partial(self, *args, **kwargs).arguments
        engine_config, optimizer_config = given.get("engine_config"), given.get("optimizer_config")
        if requested_config(optimizer_config) and not getattr(engine_config, "forward_only", False):
            check_engine_config(engine_config, given.get("model_config"))
        original(self, *args, **kwargs)

    return __init__


def _build_optimizer(original):
    def _build_optimizer(self, module):
        with building():
            inner = original(self, module)
        config = getattr(inner, CONFIG_ATTR, None)
        if config is None:
            if requested_config(self.optimizer_config):
                raise ConfigError(
                    f"optim.optimizer={self.optimizer_config.optimizer!r} in gradproj.integrations.verl did not "
                    "build a gradproj optimizer; use AdamW, Adam, SGD or Optimizer (inner=<module.Class>)"
                )
            return inner
        delattr(inner, CONFIG_ATTR)
        return wrap(inner, module, config)

    return _build_optimizer


def _gradient_sync_context(original):
    @contextmanager
    def _gradient_sync_context(self, *, is_last_micro_batch: bool):
        opt = _gradproj_optimizer(self)
        if opt is None:
            with original(self, is_last_micro_batch=is_last_micro_batch):
                yield
            return
        slot = MicroBatchSlot(self, opt, is_last_micro_batch)
        push_slot(slot)
        try:
            with original(self, is_last_micro_batch=is_last_micro_batch):
                try:
                    yield
                except BaseException as exc:
                    slot.close(exc)
                    raise
                slot.close(None)
        finally:
            pop_slot(slot)
        if is_last_micro_batch and slot.capture:
            opt.sync_gradients()  # before verl clips and logs the gradient norm

    return _gradient_sync_context


def _forward_step(original):
    def forward_step(self, micro_batch, loss_function, forward_only):
        slot = current_slot(self)
        if slot is not None and not forward_only:
            slot.describe(micro_batch)
        return original(self, micro_batch, loss_function, forward_only)

    return forward_step


def _train_batch(original):
    def train_batch(self, data, loss_function):
        outputs = original(self, data, loss_function)
        opt = _gradproj_optimizer(self)
        if opt is not None and self.is_mp_src_rank_with_outputs():
            # verl chains per-mini-batch metric lists (TrainingWorker.train_mini_batch)
            for key, value in opt.metrics().items():
                outputs["metrics"][key] = [float(value)]
        return outputs

    return train_batch


def _calling_worker_class_names(depth: int = 6) -> set[str]:
    """Class names (with their bases) of the ``self`` of the frames calling this one: the verl
    worker whose ``init_model`` sets the loss function (gradproj is imported inside that call, so
    the worker's own methods cannot be wrapped in time)."""
    names: set[str] = set()
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if owner is not None:
            names.update(cls.__name__ for cls in type(owner).__mro__)
        frame = frame.f_back
    return names


def _set_loss_fn(original):
    def set_loss_fn(self, loss_fn):
        result = original(self, loss_fn)
        engine = getattr(self, "engine", None)
        opt = _gradproj_optimizer(engine)
        actor_config = getattr(loss_fn, "keywords", {}).get("config") if loss_fn is not None else None
        if actor_config is None:
            return result
        policy_loss = getattr(actor_config, "policy_loss", None)
        loss_mode = policy_loss.get("loss_mode", "vanilla") if policy_loss is not None else "vanilla"
        if opt is None and loss_mode == LOSS_MODE:
            strategy = getattr(actor_config, "strategy", None)
            raise ConfigError(
                f"policy_loss.loss_mode={LOSS_MODE} trains through gradproj's optimizer on verl's FSDP2 engine, but this "
                f"actor's engine is {type(engine).__name__} (actor_rollout_ref.actor.strategy={strategy!r}) without it. Set "
                "actor_rollout_ref.actor.strategy=fsdp2 and actor_rollout_ref.actor.optim.optimizer_impl="
                "gradproj.integrations.verl (optimizer=AdamW, +actor_rollout_ref.actor.optim.override_optimizer_config."
                "gradproj.strategy=proma); Megatron, VeOmni and the other engines are not supported"
            )
        if opt is None:
            return result
        check_actor_config(actor_config, opt.config, needs_capture=opt.captures)
        check_sgrpo_config(actor_config, sgrpo_of(opt))
        if opt.captures and "DetachActorWorker" in _calling_worker_class_names():
            raise ConfigError(
                "verl's asynchronous trainers (one-step off-policy, fully async, trainer.v1.trainer_mode=separate_async) "
                "train on rollouts of older policies; gradproj's loss has no importance ratio and needs every step "
                "on-policy: use the synchronous trainer (verl.trainer.main_ppo, trainer.v1.trainer_mode=sync)"
            )
        return result

    return set_loss_fn


def _train_mini_batch(original):
    def train_mini_batch(self, data):
        opt = _gradproj_optimizer(getattr(self, "engine", None))
        if opt is not None and opt.captures:
            from verl.utils import tensordict_utils as tu

            epochs = int(tu.get(data, key="epochs", default=1) or 1)
            mini = tu.get(data, key="mini_batch_size", default=None)
            count = tu.get(data, key="num_mini_batch", default=None)
            if mini is not None:
                per_gpu = max(int(mini) // max(self.engine.get_data_parallel_size(), 1), 1)
                count = max(data.shape[0] // per_gpu, 1)
            check_optimizer_steps(int(count or 1) * epochs)
        return original(self, data)

    return train_mini_batch


def _check_trainer(original):
    def method(self, *args, **kwargs):
        check_trainer_config(self.config)
        return original(self, *args, **kwargs)

    return method


def install_trainer_checks() -> list[str]:
    """Wrap the `TRAINER_TARGETS` whose modules are loaded (the trainer process); returns them."""
    done = []
    for module_name, cls_name, method in TRAINER_TARGETS:
        module = sys.modules.get(module_name)
        cls = getattr(module, cls_name, None) if module is not None else None
        if cls is None or not callable(getattr(cls, method, None)):
            continue
        _wrap_method(cls, method, _check_trainer)
        done.append(f"{cls_name}.{method}")
    return done


def install() -> None:
    """Wrap the `TARGETS` (idempotent); ImportError if this verl lacks one of them."""
    global _installed
    if _installed:
        install_trainer_checks()  # a trainer module loaded since the first import
        return
    classes = _resolve()
    makers = {
        ("FSDPEngine", "__init__"): _init,
        ("FSDPEngine", "_build_optimizer"): _build_optimizer,
        ("FSDPEngine", "_gradient_sync_context"): _gradient_sync_context,
        ("FSDPEngine", "train_batch"): _train_batch,
        ("FSDPEngineWithLMHead", "forward_step"): _forward_step,
        ("TrainingWorker", "set_loss_fn"): _set_loss_fn,
        ("TrainingWorker", "train_mini_batch"): _train_mini_batch,
    }
    for key, make in makers.items():
        _wrap_method(classes[key], key[1], make)
    install_trainer_checks()
    _installed = True
