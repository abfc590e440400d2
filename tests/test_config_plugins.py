"""GradProjConfig validation and round trips; the pluggy registry and third-party strategies."""

import importlib.metadata
import types

import pytest
import torch

import gradproj
from gradproj.plugins.manager import BUILTIN_PLUGINS, refresh_registry
from helpers import TinyLM, make_microbatches, run_microbatches, trainable


def test_round_trip_dict_and_yaml():
    cfg = gradproj.GradProjConfig(strategy="proma", relative_bound=0.5, projector="gram_schmidt", exclude=["lm_head.*"])
    assert gradproj.GradProjConfig.from_dict(cfg.to_dict()) == cfg
    text = cfg.to_yaml()
    assert "relative_bound: 0.5" in text
    assert gradproj.GradProjConfig.from_yaml(text) == cfg
    assert cfg.options == {"relative_bound": 0.5, "projector": "gram_schmidt"}


def test_config_validation_messages():
    with pytest.raises(gradproj.ConfigError, match="valid strategies"):
        gradproj.GradProjConfig(strategy="nope")
    with pytest.raises(gradproj.ConfigError, match="valid options are: .*relative_bound"):
        gradproj.GradProjConfig(strategy="proma", rank=4)
    with pytest.raises(gradproj.ConfigError, match="projector"):
        gradproj.GradProjConfig(strategy="proma", projector="qr")
    with pytest.raises(gradproj.ConfigError, match="empty"):
        gradproj.GradProjConfig(strategy=[])
    with pytest.raises(gradproj.ConfigError, match="mapping"):
        gradproj.GradProjConfig.from_dict(["proma"])


def test_preset_defaults_and_override():
    resolved = gradproj.GradProjConfig(strategy="proma_reference").resolve()
    opts = resolved.accumulate.options
    assert (opts.projector, opts.sweeps, opts.relative_bound, opts.shrinkage) == ("gram_schmidt", 2, 0.5, 1.0)
    resolved = gradproj.GradProjConfig(strategy="proma_reference", relative_bound=0.25).resolve()
    assert resolved.accumulate.options.relative_bound == 0.25
    spec = gradproj.get_registry().strategy("proma_reference")
    assert spec.pipeline["loss_agg_mode"] == "token-mean"


def test_wrap_accepts_config_object():
    model = TinyLM()
    cfg = gradproj.GradProjConfig(strategy="proma", damping=0.0)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, cfg)
    assert opt.config.options == {"damping": 0.0}
    errors = run_microbatches(model, opt, make_microbatches(count=2), ref={"damping": 0.0})
    assert max(errors.values()) <= 1e-10


def test_builtins_are_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="gradproj")}
    for name, module in BUILTIN_PLUGINS.items():
        assert eps.get(name) == module
    pm = gradproj.get_plugin_manager()
    assert {name for name, _ in pm.list_name_plugin()} >= set(BUILTIN_PLUGINS)


def test_third_party_strategy_by_name():
    """A strategy from outside the package, registered as a plugin, is usable by name."""
    from pydantic import Field

    class HalfOptions(gradproj.StrategyOptions):
        factor: float = Field(default=0.5, gt=0)

    class Half(gradproj.Strategy):
        def accumulate(self, batch):
            return gradproj.Update(batch.combine(batch.coefficients * self.options.factor))

    plugin = types.ModuleType("gradproj_half_plugin")

    @gradproj.hookimpl
    def gradproj_strategies():
        return [gradproj.StrategySpec("half", Half, HalfOptions)]

    plugin.gradproj_strategies = gradproj_strategies
    pm = gradproj.get_plugin_manager()
    pm.register(plugin, name="half")
    refresh_registry()
    try:
        assert "half" in gradproj.get_registry().strategies
        batches = make_microbatches(count=2, k=3)
        grads = []
        for strategy, options, scale in (("half", {"factor": 0.25}, 1.0), ("none", {}, 0.25)):
            model = TinyLM(seed=1)
            opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)
            run_microbatches(model, opt, batches, scale=scale)
            grads.append(torch.cat([p.grad.flatten() for _, p in trainable(model)]))
            opt.detach()
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    finally:
        pm.unregister(name="half")
        refresh_registry()
    assert "half" not in gradproj.get_registry().strategies


def test_third_party_strategy_deferring_its_updates():
    """A strategy may hand back an unfinished update (batch.deferrable) and finish it in place in
    finish_microbatch(); returning False there drops the microbatch; deferring where the engine
    writes straight into .grad is a ProtocolError unless the rule declares may_defer."""

    class Late(gradproj.Strategy):
        fail = False
        force = False  # defer even where the engine does not allow it
        deferred = 0
        # no batching of small parameters: each is a batch of its own
        capabilities = gradproj.Capabilities(needs_tokens=True)

        def __init__(self, options):
            super().__init__(options)
            self.pending = []

        def accumulate(self, batch):
            updates = batch.combine(batch.coefficients)
            if not (batch.deferrable or Late.force):
                return gradproj.Update(updates)
            Late.deferred += 1
            for update in updates:
                self.pending.append((update, update.clone()))
                update.zero_()  # unfinished until finish_microbatch
            return gradproj.Update(updates, deferred=True)

        def finish_microbatch(self):
            for update, value in self.pending:
                update.copy_(value)
            self.pending.clear()
            return not Late.fail

        def end_microbatch(self):
            self.pending.clear()

    class LateBatched(Late):
        capabilities = gradproj.Capabilities()  # small parameters stacked (such batches are not deferrable)

    class LateDirect(Late):
        # also under direct writes: the engine holds the updates
        capabilities = gradproj.Capabilities(needs_tokens=True, may_defer=True)

    plugin = types.ModuleType("gradproj_late_plugin")

    @gradproj.hookimpl
    def gradproj_strategies():
        return [
            gradproj.StrategySpec("late", Late, gradproj.StrategyOptions),
            gradproj.StrategySpec("late_batched", LateBatched, gradproj.StrategyOptions),
            gradproj.StrategySpec("late_direct", LateDirect, gradproj.StrategyOptions),
        ]

    plugin.gradproj_strategies = gradproj_strategies
    pm = gradproj.get_plugin_manager()
    pm.register(plugin, name="late")
    refresh_registry()
    try:
        batches = make_microbatches(count=2, k=3)
        grads = []
        for strategy, options in (("late", {}), ("late_direct", {"nonfinite": "propagate"}), ("none", {})):
            model = TinyLM(seed=1)
            opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)
            deferred = Late.deferred
            run_microbatches(model, opt, batches)
            assert strategy == "none" or Late.deferred > deferred
            grads.append(torch.cat([p.grad.flatten() for _, p in trainable(model)]))
            opt.detach()
        torch.testing.assert_close(grads[0], grads[2], rtol=1e-12, atol=0)
        torch.testing.assert_close(grads[1], grads[2], rtol=1e-12, atol=0)

        model = TinyLM(seed=1)
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "late")
        run_microbatches(model, opt, batches[:1])
        before = [p.grad.clone() for _, p in trainable(model)]
        Late.fail = True
        run_microbatches(model, opt, batches[1:])
        assert all(torch.equal(p.grad, b) for (_, p), b in zip(trainable(model), before))
        assert opt.metrics()["gradproj/dropped_microbatches"] == 1.0
        opt.detach()
        Late.fail = False

        model = TinyLM(seed=1)  # direct writes: a failed finish poisons every gradient
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "late_direct", nonfinite="propagate")
        Late.fail = True
        run_microbatches(model, opt, batches[:1])
        assert all(torch.isnan(p.grad).all() for _, p in trainable(model))
        opt.detach()
        Late.fail = False

        Late.force = True
        for strategy, options in (("late", {"nonfinite": "propagate"}), ("late_batched", {})):  # direct writes; batched
            model = TinyLM(seed=1)
            opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)
            with pytest.raises(gradproj.GradProjError, match="deferred the update"):
                run_microbatches(model, opt, batches[:1])
            opt.detach()
    finally:
        Late.fail = Late.force = False
        pm.unregister(name="late")
        refresh_registry()
