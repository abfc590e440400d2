"""How the overhead grows: step-time (or peak-memory) ratios over a grid of shapes, in one command.

    python -m benchmarks.grid                      # the full grid (about an hour on 2 cores)
    python -m benchmarks.grid --measure memory     # peak memory instead of time (a process per variant)
    python -m benchmarks.grid --quick              # a tiny grid (what CI runs)

For every setup (LoRA, every Linear, full fine-tuning) x sequences per microbatch k x tokens per
sequence x hidden width, it times -- in one process, interleaved, as
`benchmarks.step_overhead` does -- the plain step, each strategy and the per-sequence
backward loop, and records the ratios to the plain step of the same configuration. Results are
written as they come (``--out``: ``grid.jsonl``, then ``grid.md`` and ``grid.png`` -- overhead
against k, tokens and width, one line per strategy and setup), so an interrupted run keeps what it
measured. The paper's claim is an O(k d) cost per layer on top of the step. ``--measure memory``
records instead the peak memory of a training step of each variant (weights, optimizer state,
gradients, activations, gradproj's buffers), each in a fresh process
(`benchmarks.step_overhead.peak_memory`), as a ratio to the plain step's.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

from benchmarks import step_overhead

__all__ = ["main", "run_grid"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", default=["lora", "linear", "full"], choices=["lora", "linear", "full"])
    p.add_argument("--strategies", nargs="+", default=["proma", "intra_proma"])
    p.add_argument("--ks", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--tokens", nargs="+", type=int, default=[64, 256])
    p.add_argument("--hidden", nargs="+", type=int, default=[256, 512])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-per-sequence", dest="per_sequence", action="store_false")
    p.add_argument("--out", default="runs/grid", help="output folder")
    p.add_argument("--quick", action="store_true", help="a tiny grid for smoke tests")
    p.add_argument("--measure", choices=["time", "memory"], default="time",
                   help="step time (interleaved, in this process) or peak memory (a fresh process per variant)")
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.tokens, args.hidden = [2, 4], [8], [32]
        args.layers, args.vocab, args.microbatches, args.repeats = 1, 64, 2, 1
    return args


def _config_args(args, hidden: int, k: int, tokens: int):
    """The step_overhead arguments of one grid point (intermediate ~ 5.4 x hidden, as Qwen2's ratio)."""
    return step_overhead.parse(_config_argv(args, hidden, k, tokens))


def _config_argv(args, hidden: int, k: int, tokens: int) -> list[str]:
    """The same as a command line (for the memory children)."""
    argv = [
        "--hidden", str(hidden), "--intermediate", str(int(round(hidden * 5.375))), "--layers", str(args.layers),
        "--vocab", str(args.vocab), "--microbatches", str(args.microbatches), "--k", str(k), "--tokens", str(tokens),
        "--repeats", str(args.repeats), "--threads", str(args.threads), "--strategies", *args.strategies,
    ]
    if not args.per_sequence:
        argv.append("--no-per-sequence")
    return argv


def _memory_point(args, setup: str, hidden: int, k: int, tokens: int) -> dict[str, float]:
    """Peak memory (MiB) of a training step of each variant, each in a fresh process."""
    argv = _config_argv(args, hidden, k, tokens)
    names = ["plain", *args.strategies, *(["per_sequence"] if args.per_sequence else [])]
    return {name: step_overhead.peak_memory(argv, setup, name)["peak_mib"] for name in names}


def run_grid(args) -> list[dict]:
    """Measure every grid point; returns the rows (also appended to ``grid.jsonl`` as they come)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = list(itertools.product(args.setups, args.hidden, args.ks, args.tokens))
    rows = []
    with (out / "grid.jsonl").open("w") as log:
        for setup, hidden, k, tokens in tqdm(points, desc="grid points", file=sys.stderr):
            if args.measure == "memory":
                med = _memory_point(args, setup, hidden, k, tokens)
                key = "peak_mib"
            else:
                med, _ = step_overhead.time_setup(_config_args(args, hidden, k, tokens), setup)
                key = "seconds"
            for name, value in med.items():
                row = {"setup": setup, "hidden": hidden, "k": k, "tokens": tokens, "variant": name,
                       key: value, "ratio": value / med["plain"] if med["plain"] > 0 else float("nan")}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
            log.flush()
    return rows


def write_markdown(rows: list[dict], args, path: Path) -> None:
    """One table: a line per grid point, a column per variant's ratio to the plain step."""
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "plain"]
    memory = any("peak_mib" in r for r in rows)
    lines = [
        f"Qwen2-shaped random models, {args.layers} layers, vocab {args.vocab}, {args.microbatches} microbatches, "
        f"AdamW, float32, {args.threads} threads, "
        + ("the second step of each variant (after a warm-up), each in a fresh process" if memory else f"median of {args.repeats} interleaved repeats")
        + f"; torch "
        f"{torch.__version__}; run {datetime.date.today().isoformat()}. " + (
            "Cells: peak memory of a training step (weights, optimizer state, gradients, activations, "
            "buffers; fresh process per variant) / the plain step's."
            if memory else "Cells: step time / plain step time."),
        "",
        "| setup | hidden | k | tokens | " + ("plain peak (MiB)" if memory else "plain step (s)") + " | "
        + " | ".join(variants) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(variants),
    ]
    points = dict.fromkeys((r["setup"], r["hidden"], r["k"], r["tokens"]) for r in rows)
    for point in points:
        here = {r["variant"]: r for r in rows if (r["setup"], r["hidden"], r["k"], r["tokens"]) == point}
        cells = [f"{here[v]['ratio']:.2f}" if v in here else "" for v in variants]
        base = f"{here['plain']['peak_mib']:.1f}" if memory else f"{here['plain']['seconds']:.3f}"
        lines.append(f"| {point[0]} | {point[1]} | {point[2]} | {point[3]} | {base} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """Overhead (ratio - 1) against k, tokens and hidden width, averaged over the other axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [("k", "sequences per microbatch k"), ("tokens", "tokens per sequence"), ("hidden", "hidden width")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v not in ("plain", "per_sequence")]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    for ax, (key, label) in zip(axes, axes_names):
        for i, (variant, setup) in enumerate(itertools.product(variants, setups)):
            values = sorted({r[key] for r in rows})
            means = []
            for value in values:
                sel = [r["ratio"] - 1 for r in rows if r["variant"] == variant and r["setup"] == setup and r[key] == value]
                means.append(sum(sel) / len(sel) if sel else float("nan"))
            ax.plot(values, means, marker="o", color=f"C{i}", label=f"{variant} ({setup})")
        ax.set_xlabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    memory = any("peak_mib" in r for r in rows)
    axes[0].set_ylabel("peak memory over the plain step's (ratio - 1)" if memory else "overhead over the plain step (ratio - 1)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    """Run the grid and write ``grid.jsonl``, ``grid.md`` and ``grid.png`` into ``--out``."""
    args = parse(argv)
    rows = run_grid(args)
    out = Path(args.out)
    write_markdown(rows, args, out / "grid.md")
    plot(rows, out / "grid.png")
    print((out / "grid.md").read_text())
    return rows


if __name__ == "__main__":
    main()
