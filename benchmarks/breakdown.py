"""Where a gradproj step's overhead goes: the same step with later stages switched off.

    python -m benchmarks.breakdown                  # the issue's shape, both setups (about 3 minutes)
    python -m benchmarks.breakdown --quick          # tiny shape (what CI runs)

Each row is the wrapped step with the strategy cut short after one stage, timed interleaved with
the plain step over the same microbatches (the shape and options of :mod:`benchmarks.step_overhead`):

* ``proma/capture``     -- capture only: hooks, staging, and each layer's update ``g_m`` from the
  token factors (one weighted weight-gradient matmul); nothing projected, no ``s_i`` built;
* ``proma/materialize`` -- also materialise the k sequence gradients and combine through them;
* ``proma``             -- the full strategy (Gram of ``[S; G]``, k x k solve, combine);
* ``intra_proma/capture`` -- intra_proma's capture and ``g_m`` (every microbatch), no subspace;
* ``intra_proma/subspaces`` -- also the input and output-gradient subspaces of every weight,
  without projecting ``g_m`` off them;
* ``intra_proma``       -- the full strategy.

The cut-short rows replace the strategies' ``accumulate`` methods in this process only, so their
updates are wrong on purpose: they measure cost, nothing else. Differences between consecutive rows
are the cost of each stage.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import step_overhead
from gradproj.strategies.intra_proma import IntraProma

#: the real ``IntraProma._project``, called by the subspaces-only stage while the class's method is swapped
_INTRA_PROJECT = IntraProma._project

__all__ = ["main", "STAGES"]


def _capture_only(self, step):
    return step.combine(step.coefficients)


def _materialize(self, step):
    if step.grad is not None and hasattr(step.seq, "_flat"):
        step.seq._flat  # noqa: B018 -- builds the (k, *shape) sequence gradients
    return step.combine(step.coefficients)


def _batch_combine(self, batch):
    return batch.combine(batch.coefficients)


def _no_projection(g, p, q, basis_r, basis_c, projector):
    return g, 0.0, (basis_r.shape[1], basis_c.shape[1])


def _subspaces_only(self, entries):
    from gradproj.linalg import factored

    saved = factored._project_matrix
    factored._project_matrix = _no_projection
    try:
        return _INTRA_PROJECT(self, entries)
    finally:
        factored._project_matrix = saved


#: stage name -> (strategy, {method name: replacement})
STAGES = {
    "proma/capture": ("proma", {"accumulate": _capture_only, "accumulate_batch": _batch_combine}),
    "proma/materialize": ("proma", {"accumulate": _materialize, "accumulate_batch": _batch_combine}),
    "proma": ("proma", {}),
    "intra_proma/capture": ("intra_proma", {"accumulate": _capture_only}),
    "intra_proma/subspaces": ("intra_proma", {"_project": _subspaces_only}),
    "intra_proma": ("intra_proma", {}),
}


class _Cut:
    """A step function that swaps the strategy class's methods in for the duration of the step."""

    def __init__(self, cls, methods: dict) -> None:
        self.cls, self.methods = cls, methods

    def __call__(self, model, opt, data) -> None:
        saved = {name: self.cls.__dict__[name] for name in self.methods}
        for name, fn in self.methods.items():
            setattr(self.cls, name, fn)
        try:
            step_overhead.step_wrapped(model, opt, data)
        finally:
            for name, fn in saved.items():
                setattr(self.cls, name, fn)


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
        runs[stage] = (model, gradproj.wrap(inner, model, strategy), _Cut(classes[strategy], methods))
    return step_overhead.time_interleaved(runs, data, args.repeats, setup)


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
    step_overhead.publish(lines, known.markdown)
    return results


if __name__ == "__main__":
    main()
