"""Where a gradproj step's overhead goes: the same step with later stages switched off.

    python -m benchmarks.breakdown                  # the issue's shape, both setups (about 3 minutes)
    python -m benchmarks.breakdown --quick          # tiny shape (what CI runs)

Each row is the wrapped step with the strategy cut short after one stage, timed interleaved with
the plain step over the same microbatches (the shape and options of `benchmarks.step_overhead`):

* ``proma/capture``     -- capture only: hooks, staging, and each layer's update ``g_m`` from the
  token factors (one weighted weight-gradient matmul); nothing projected, no ``s_i`` built;
* ``proma/materialize`` -- also materialise the k sequence gradients and combine through them;
* ``proma/no-checks``   -- the full strategy (Gram of ``[S; G]``, k x k solve, combine) without the
  never-silently-wrong checks of each microbatch and forward (the walk of the loss's graph for terms
  that bypass the log-probs, the optimizer's parameters covered, replaced parameters);
* ``proma``             -- the full strategy with those checks: the last row's increment is their cost;
* ``intra_proma/capture`` -- intra_proma's capture and ``g_m`` (every microbatch), no subspace;
* ``intra_proma/subspaces`` -- also the input and output-gradient subspaces of every weight,
  without projecting ``g_m`` off them;
* ``intra_proma``       -- the full strategy.

The cut-short rows replace the strategies' ``accumulate`` methods (or the engine's checks) in this
process only, so their updates are wrong on purpose: they measure cost, nothing else. Differences between consecutive rows
are the cost of each stage.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import step_overhead
from gradproj.linalg import factored
from gradproj.work import Update

__all__ = ["main", "STAGES"]


def _capture_only(self, batch):
    return Update(batch.combine(batch.coefficients))


def _materialize(self, batch):
    seq = batch._seq  # a single large tensor: build its (k, *shape) sequence gradients
    if batch.grads[0] is not None and hasattr(seq, "_flat"):
        seq._flat  # noqa: B018
    return Update(batch.combine(batch.coefficients))


def _no_projection(g, p, q, basis_r, basis_c, projector):
    return g, 0.0, (basis_r.shape[1], basis_c.shape[1])


def _count_backward_call(self, mb, roots):
    mb.backward_calls += 1  # what the engine needs for rollback, without the walk of the loss's graph


def _no_optimizer_check(self):
    return None


def _count_forward_only(self):
    from gradproj.capture.layer import in_checkpoint_recomputation

    if not in_checkpoint_recomputation():
        self.pending += 1


def _no_check(*_args, **_kwargs):
    return None


def _checks_off():
    import gradproj.capture.engine as engine_module
    from gradproj.capture import guards
    from gradproj.capture.engine import CaptureEngine
    from gradproj.capture.layer import LayerCapture
    from gradproj.optimizer import GradProjOptimizer

    return {
        (CaptureEngine, "_on_backward_call"): _count_backward_call,
        (guards, "refuse_edited_grads"): _no_check,
        (GradProjOptimizer, "_check_optimizer_params"): _no_optimizer_check,
        (LayerCapture, "count_forward"): _count_forward_only,
        (engine_module, "check_row_order"): _no_check,
    }


#: stage name -> (strategy, {method name or (class, method name): replacement}); a callable value
#: builds that mapping when the stage is set up
STAGES = {
    "proma/capture": ("proma", {"accumulate": _capture_only}),
    "proma/materialize": ("proma", {"accumulate": _materialize}),
    "proma/no-checks": ("proma", _checks_off),
    "proma": ("proma", {}),
    "intra_proma/capture": ("intra_proma", {"accumulate": _capture_only}),
    "intra_proma/subspaces": ("intra_proma", {(factored, "_project_matrix"): _no_projection}),
    "intra_proma": ("intra_proma", {}),
}


class _Cut:
    """A step function that swaps methods in for the duration of the step (names alone: the
    strategy class's; ``(class, name)``: that class's)."""

    def __init__(self, cls, methods: dict) -> None:
        self.methods = {(key if isinstance(key, tuple) else (cls, key)): fn for key, fn in methods.items()}

    def __call__(self, model, opt, data) -> None:
        saved = {(owner, name): owner.__dict__[name] for owner, name in self.methods}
        for (owner, name), fn in self.methods.items():
            setattr(owner, name, fn)
        try:
            step_overhead.step_wrapped(model, opt, data)
        finally:
            for (owner, name), fn in saved.items():
                setattr(owner, name, fn)


def time_setup(args, setup: str) -> dict[str, float]:
    """Median seconds per step of ``plain`` and every stage, interleaved."""
    import gradproj
    from gradproj.strategies.intra_proma import IntraProma
    from gradproj.strategies.proma import Proma

    classes = {"proma": Proma, "intra_proma": IntraProma}
    data = step_overhead.make_data(args)
    runs = {}
    model = step_overhead.build_model(args, setup)
    runs["plain"] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5), step_overhead.step_plain)
    for stage, (strategy, methods) in STAGES.items():
        model = step_overhead.build_model(args, setup)
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        runs[stage] = (model, gradproj.wrap(inner, model, strategy), _Cut(classes[strategy], methods() if callable(methods) else methods))
    return step_overhead.time_interleaved(runs, data, args.repeats, setup)


def check_costs(args, setup: str, repeats: int = 2000) -> dict[str, float]:
    """The checks alone, isolated (seconds): per microbatch, the optimizer's parameters covered,
    the model's trainable parameters covered (and no BatchNorm training), the rows of ``logp`` in the
    model's order, the snapshot and comparison of ``.grad`` (no edit inside the block), and the walk of
    a real loss's graph from its root to ``logp``; per covered layer and forward, the replaced or
    converted parameter check (with the layer count to scale it)."""
    import time

    import gradproj
    from gradproj.capture import backward_watch
    from gradproj.capture.layout import check_row_order

    model = step_overhead.build_model(args, setup)
    opt = gradproj.wrap(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5), model, "proma")
    step_overhead.step_wrapped(model, opt, step_overhead.make_data(args)[:2])  # .grad exists, as mid-step
    for param in opt.engine._covered_params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    engine = opt.engine
    ids, attn, mask, adv = step_overhead.make_data(args)[0]
    logp = step_overhead.logprobs(model, ids, attn)
    loss = step_overhead.loss_fn(logp, mask, adv, 1.0)
    layer = engine.layers[0]

    def snapshot_and_compare():
        seen = [(p, p.grad, p.grad._version) for p in engine._covered_params]
        return [p for p, grad, version in seen if p.grad is not grad or grad._version != version]

    def timed(fn) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    costs = {
        "optimizer_params": timed(opt._check_optimizer_params),
        "model_params": timed(lambda: engine._check_coverage("benchmark")),
        "row_order": timed(lambda: check_row_order(logp, "benchmark")),
        "grad_snapshot": timed(snapshot_and_compare),
        "loss_graph_walk": timed(
            lambda: backward_watch.path_around((loss,), (logp.grad_fn, logp.output_nr), engine.loss_terms.is_covered_node)
        ),
        "replaced_params_per_layer": timed(layer.count_forward) - timed(lambda: _count_forward_only(layer)),
        "layers": float(len(engine.layers)),
    }
    costs["per_microbatch"] = sum(
        costs[k] for k in ("optimizer_params", "model_params", "row_order", "grad_snapshot", "loss_graph_walk")
    ) + costs["layers"] * costs["replaced_params_per_layer"]
    opt.detach()
    return costs


def main(argv=None) -> dict:
    """Print the stage table for each setup; returns {setup: {stage: seconds}}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", help="write a Markdown table to this file")
    known, rest = parser.parse_known_args(argv)
    args = step_overhead.parse(rest)
    torch.set_num_threads(args.threads)
    results = {setup: time_setup(args, setup) for setup in args.setups if setup != "full"}
    lines = [
        f"Shape: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers; {args.microbatches} "
        f"microbatches x {args.k} sequences x {args.tokens} tokens; {args.threads} threads; median of "
        f"{args.repeats} interleaved repeats; torch {torch.__version__}.",
        "",
        "| setup | stage | x plain step | added by this stage |",
        "|---|---|---:|---:|",
    ]
    for setup, med in results.items():
        previous = 1.0
        for name, seconds in med.items():
            ratio = seconds / med["plain"]
            added = "" if name == "plain" else f"{ratio - previous:+.3f}"
            lines.append(f"| {setup} | {name} | {ratio:.3f} | {added} |")
            previous = 1.0 if name in ("proma", "plain") else ratio
    lines += ["", "The checks alone (isolated, same run; per microbatch unless said): the optimizer's and the model's "
              "parameters covered, the rows of logp in the model's order, .grad not edited inside the block, the walk "
              "of the loss's graph to logp, and the replaced-parameter check of every covered layer's forward.", "",
              "| setup | optimizer params | model params | row order | .grad snapshot | loss graph walk | "
              "replaced params (all layers) | per microbatch | x plain step (all microbatches) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setup, med in results.items():
        c = check_costs(args, setup)
        share = c["per_microbatch"] * args.microbatches / med["plain"]
        us = lambda v: f"{v * 1e6:.1f} us"  # noqa: E731
        lines.append(
            f"| {setup} | {us(c['optimizer_params'])} | {us(c['model_params'])} | {us(c['row_order'])} | "
            f"{us(c['grad_snapshot'])} | {us(c['loss_graph_walk'])} | {us(c['layers'] * c['replaced_params_per_layer'])} | "
            f"{us(c['per_microbatch'])} | {share:.5f} |"
        )
    step_overhead.publish(lines, known.markdown)
    return results


if __name__ == "__main__":
    main()
