"""The verl methods gradproj wraps, checked at install time.

verl 0.9 builds the actor's optimizer from parameters alone and runs each micro-batch's forward,
loss and backward inside its FSDP engine. gradproj wraps (never replaces) six methods:

* ``FSDPEngine.__init__`` -- start-up checks of the engine config when a gradproj optimizer is
  configured (FSDP2, no sequence parallelism, no packed-length padding), before anything is built;
* ``FSDPEngine._build_optimizer`` -- wraps the optimizer the factory built around the FSDP module
  (:func:`gradproj.wrap`);
* ``FSDPEngine._gradient_sync_context`` -- one training micro-batch (forward, loss, backward): closes
  the ``opt.microbatch`` block after the backward, averages over the ranks after the last one;
* ``FSDPEngineWithLMHead.forward_step`` -- records the micro-batch's token layout (packed or padded);
* ``FSDPEngine.train_batch`` -- appends ``opt.metrics()`` to verl's metrics;
* ``TrainingWorker.set_loss_fn`` -- start-up checks of the actor config (loss mode, KL loss, entropy).

A verl release without one of them fails at import with the supported version range.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

from gradproj.errors import ConfigError
from gradproj.optimizer import GradProjOptimizer, wrap
from gradproj.integrations.verl.checks import check_actor_config, check_engine_config
from gradproj.integrations.verl.microbatches import MicroBatchSlot, current_slot, pop_slot, push_slot
from gradproj.integrations.verl.optimizers import CONFIG_ATTR, requested_config
from gradproj.integrations.verl.version import SUPPORTED_VERL

__all__ = ["install", "installed", "TARGETS"]

#: (module, class, method) wrapped by :func:`install`
TARGETS = (
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine", "__init__"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine", "_build_optimizer"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine", "_gradient_sync_context"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngine", "train_batch"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead", "forward_step"),
    ("verl.workers.engine_workers", "TrainingWorker", "set_loss_fn"),
)

_MARK = "__gradproj_wrapped__"
_installed = False


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
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


def _set_loss_fn(original):
    def set_loss_fn(self, loss_fn):
        result = original(self, loss_fn)
        opt = _gradproj_optimizer(getattr(self, "engine", None))
        actor_config = getattr(loss_fn, "keywords", {}).get("config") if loss_fn is not None else None
        if opt is not None and actor_config is not None:
            check_actor_config(actor_config, opt.engine.config, needs_capture=opt.engine.needs_capture)
        return result

    return set_loss_fn


def install() -> None:
    """Wrap the :data:`TARGETS` (idempotent); ImportError if this verl lacks one of them."""
    global _installed
    if _installed:
        return
    classes = _resolve()
    makers = {
        ("FSDPEngine", "__init__"): _init,
        ("FSDPEngine", "_build_optimizer"): _build_optimizer,
        ("FSDPEngine", "_gradient_sync_context"): _gradient_sync_context,
        ("FSDPEngine", "train_batch"): _train_batch,
        ("FSDPEngineWithLMHead", "forward_step"): _forward_step,
        ("TrainingWorker", "set_loss_fn"): _set_loss_fn,
    }
    for key, make in makers.items():
        _wrap_method(classes[key], key[1], make)
    _installed = True
