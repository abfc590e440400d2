"""The ``gradproj`` command line."""

from __future__ import annotations

import argparse
import sys


def _quickstart(args) -> int:
    from gradproj.integrations.torch.quickstart import QuickstartConfig, run_quickstart, summary_table

    cfg = QuickstartConfig(steps=args.steps, seed=args.seed, strategies=args.strategies, lr=args.lr)
    print(f"gradproj quickstart: GRPO on a tiny random Qwen2-shaped model (offline), {cfg.steps} steps, "
          f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples in {cfg.microbatches} microbatches, "
          f"lr {cfg.lr}, seed {cfg.seed}")
    results = run_quickstart(cfg, show_progress=not args.no_progress)
    print()
    print(summary_table(results))
    if "none" in results and "proma" in results:
        kl = {k: sum(r["step_kl"] for r in v) / len(v) for k, v in results.items()}
        verdict = "lower" if kl["proma"] < kl["none"] else "not lower"
        print(f"\nPROMA's mean per-step KL was {verdict} than plain accumulation's "
              f"({kl['proma']:.2e} vs {kl['none']:.2e}): the projection removes the part of the running "
              "gradient that lies in each microbatch's sequence-gradient span.")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``gradproj`` console script."""
    parser = argparse.ArgumentParser(prog="gradproj", description="gradproj: reference-free policy-gradient strategies")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="train a tiny model a few GRPO steps with and without PROMA and report")
    q.add_argument("--steps", type=int, default=30)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--lr", type=float, default=3e-3)
    q.add_argument("--strategies", nargs="+", default=["none", "proma"])
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_quickstart)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # one clear line, no traceback, for expected errors
        from gradproj.errors import GradProjError

        if isinstance(err, GradProjError):
            print(f"gradproj: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
