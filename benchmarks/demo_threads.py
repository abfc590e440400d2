"""How the demo's thread layout copes with a busy machine.

    python -m benchmarks.demo_threads [--steps 6] [--full] [--out docs/assets/demo_threads.md]

Runs ``gradproj demo`` (default policy, 4 methods, one seed, ``--steps`` steps; ``--full``: also the
whole default demo) in two layouts -- the demo's default (one run per core, one torch thread each)
and the old one (one run at a time on torch's default thread count) -- on an idle machine and with
one competing CPU-bound process (a Python busy loop), and writes the wall times and the training
seconds per step as a Markdown table. Each measurement runs in a fresh output folder (nothing is
resumed). Time it on an otherwise quiet machine: the competitor is the only load it means to add.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["measure", "main"]

LAYOUTS = {
    "one run per core, 1 thread each (default)": [],
    f"one run at a time, {torch.get_num_threads()} threads": ["--workers", "1", "--threads", str(torch.get_num_threads())],
}


def measure(args: list[str], busy: bool) -> dict:
    """Wall time and mean training seconds per step of one ``gradproj demo`` command."""
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gradproj.demo.cli", "demo", "--no-progress", *args, "--out", out],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            timing = json.loads((Path(out) / "timing.json").read_text())["runs"]
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    per_step = sum(r["seconds_per_step"] for r in timing.values()) / len(timing)
    return {"wall": wall, "seconds_per_step": per_step, "runs": len(timing)}


def main(argv: list[str] | None = None) -> Path:
    """Command line: measure each layout idle and busy, write the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--full", action="store_true", help="also time the whole default demo, idle and busy")
    parser.add_argument("--out", default="runs/demo_threads.md")
    args = parser.parse_args(argv)
    small = ["--steps", str(args.steps), "--seeds", "0", "--eval-every", str(args.steps)]
    rows = []
    for name, layout in LAYOUTS.items():
        for busy in (False, True):
            result = measure(small + layout, busy)
            rows.append((f"4 runs × {args.steps} steps", name, busy, result))
            print(f"{name:45s} {'busy' if busy else 'idle'}: {result['wall']:.0f} s, {result['seconds_per_step']:.2f} s/step", flush=True)
    if args.full:
        for busy in (False, True):
            result = measure([], busy)
            rows.append(("the default demo (12 runs × 60 steps)", "one run per core, 1 thread each (default)", busy, result))
            print(f"default demo {'busy' if busy else 'idle'}: {result['wall']:.0f} s", flush=True)
    lines = [
        f"Measured with `python -m benchmarks.demo_threads --steps {args.steps}{' --full' if args.full else ''}` on {os.cpu_count()} cores, "
        f"torch {torch.__version__}; busy = one competing CPU-bound process (a Python busy loop).",
        "",
        "| demo | layout | machine | wall time | training s/step (mean over runs) |",
        "|---|---|---|---|---|",
    ]
    for what, name, busy, r in rows:
        lines.append(f"| {what} | {name} | {'one competing process' if busy else 'idle'} | {r['wall']:.0f} s | {r['seconds_per_step']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
