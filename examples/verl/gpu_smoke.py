"""GPU smoke run of both verl recipes: a few steps each on a small random model, gradproj on and off.

    bash examples/verl/gpu_smoke.sh [--steps 4] [--out DIR]       # set-up if needed, then this
    python examples/verl/gpu_smoke.py [--steps 4] [--out DIR] [--recipes proma lora] [--cpu]

For each recipe (``proma_qwen3_gsm8k.yaml``, ``kl_free_lora_grpo_qwen3_gsm8k.yaml``) it runs verl's
``main_ppo`` twice on one GPU with the same model, data and sizes: with the recipe's overrides as
written, and with gradproj off -- every override that names gradproj removed (``external_lib``,
``optimizer_impl``, the ``gradproj`` options, ``loss_mode=gradproj``), which leaves verl's own
optimizer and its default PPO loss. The recipes' model, data, batch sizes and lengths are replaced
(`SIZES`): a random Llama-shaped model (``--hidden``, ``--layers``) with gradproj's character
tokenizer, the addition task of `gradproj.testing.verl_cpu.trainer` with its rule-based reward.
Each rollout batch is one optimizer step in the PROMA recipe (as it requires) and four in the LoRA
one (as its recipe has).

It prints, per run, gradproj's metrics (from verl's tracking file) and the step times (median over
steps 2..N; step 1 includes warm-up), and writes ``report.md`` and ``records.json`` to ``--out``.
``--cpu`` runs the same on the CPU, with the one replacement the end-to-end CPU run makes (the
``hf_cpu`` rollout instead of vLLM; the LoRA adapter merged for the sync): what the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = {"proma": HERE / "proma_qwen3_gsm8k.yaml", "lora": HERE / "kl_free_lora_grpo_qwen3_gsm8k.yaml"}

#: the recipes' sizes, replaced: 16 prompts x 4 samples per step
SIZES = [
    "data.train_batch_size=16",
    "data.max_prompt_length=16",
    "data.max_response_length=16",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
    # no CUDA-graph capture in vLLM's start-up (tens of seconds per run, for a few tiny batches)
    "actor_rollout_ref.rollout.enforce_eager=True",
    # fewer start-up processes for a few small steps: one TransferQueue storage unit (verl's 8 each
    # reserve a Ray CPU), two agent-loop workers, one reward worker
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    "actor_rollout_ref.rollout.agent.num_workers=2",
    "reward.num_workers=1",
]
#: mini-batches: PROMA one optimizer step per rollout batch; the LoRA recipe's 4 (64 of 256)
MINI_BATCH = {"proma": "actor_rollout_ref.actor.ppo_mini_batch_size=16",
              "lora": "actor_rollout_ref.actor.ppo_mini_batch_size=4"}
#: the LoRA rank, scaled to the small model (the recipe's 32 on Qwen3-0.6B's 1024 hidden units)
LORA = ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16"]

SHOWN = ("actor/gradproj/proma/projected_fraction", "actor/gradproj/entropy", "actor/gradproj/kl_estimate/per_token",
         "actor/gradproj/lora_bound/mu_mean", "actor/gradproj/sequences", "actor/pg_loss", "critic/score/mean")
TIMES = ("timing_s/step", "timing_s/gen", "timing_s/update_actor", "timing_s/update_weights")


def configures_gradproj(override: str) -> bool:
    """Whether a Hydra override turns gradproj on or sets one of its options: the plugin
    (``external_lib``), the optimizer (``optimizer_impl``), the ``gradproj``/``sgrpo`` options, the loss."""
    key, _, value = override.lstrip("+").partition("=")
    return (".gradproj" in key or key.endswith(".sgrpo") or value.startswith("gradproj.integrations")
            or (key.endswith("loss_mode") and value == "gradproj"))


def gradproj_off(overrides: list[str]) -> list[str]:
    """The recipe without gradproj: every override that configures it removed."""
    return [o for o in overrides if not configures_gradproj(o)]


def run_overrides(recipe: str, paths: dict[str, str], out: Path, steps: int, gradproj: bool, cpu: bool) -> list[str]:
    """The overrides of one run: the recipe's (gradproj on or off), then the task, the sizes, the device."""
    from gradproj.testing.verl_cpu.smoke import load_overrides
    from gradproj.testing.verl_cpu.trainer import cpu_overrides, merge_overrides, task_overrides

    base = load_overrides(RECIPES[recipe])
    if not gradproj:
        base = gradproj_off(base)
    extra = [MINI_BATCH[recipe], "trainer.project_name=gradproj-smoke",
             f"trainer.experiment_name={recipe}-{'on' if gradproj else 'off'}"]
    if recipe == "lora":
        extra += LORA
    if gradproj and recipe == "proma":
        extra.append("+actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.kl_estimate=True")
    device = ["+actor_rollout_ref.model.override_config.attn_implementation=sdpa"]
    if cpu:
        device = cpu_overrides() + (["actor_rollout_ref.model.lora.merge=True"] if recipe == "lora" else [])
    return merge_overrides(base, task_overrides(paths, out, steps), SIZES, extra, device)


def summarise(records: list[dict]) -> dict[str, float]:
    """Median step times over steps 2..N (all steps if only one) and the last step's gradproj metrics."""
    later = records[1:] or records
    summary = {key: statistics.median(r["data"][key] for r in later) for key in TIMES if key in later[0]["data"]}
    summary.update({key: records[-1]["data"][key] for key in SHOWN if key in records[-1]["data"]})
    return summary


def report(results: dict[str, dict[str, float]], steps: int, device: str) -> str:
    """A Markdown table of the runs, then each on/off step-time ratio."""
    keys = [k for k in TIMES + SHOWN if any(k in r for r in results.values())]
    lines = [f"verl main_ppo smoke run: {steps} steps per run on {device}; times are medians over steps 2..{steps}",
             "", "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, summary in results.items():
        cells = [f"{summary[k]:.4g}" if k in summary else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for recipe in RECIPES:
        on, off = results.get(f"{recipe} gradproj on"), results.get(f"{recipe} gradproj off")
        if on and off and off.get("timing_s/step"):
            lines.append(f"* {recipe}: step time with gradproj / without = "
                         f"{on['timing_s/step'] / off['timing_s/step']:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Command line: the runs, the table (printed and written to ``--out``)."""
    parser = argparse.ArgumentParser(prog="gpu_smoke.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (default 4)")
    parser.add_argument("--out", default=None, help="folder for the inputs, each run's log and the report")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--hidden", type=int, default=256, help="the random model's hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="its layers (default 4)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (hf_cpu rollout): for the tests")
    args = parser.parse_args(argv)

    from gradproj.testing.verl_cpu.trainer import prepare, run_main_ppo

    out = Path(args.out or tempfile.mkdtemp(prefix="gradproj-verl-smoke-"))
    paths = prepare(out / "inputs", problems=64, hidden=args.hidden, layers=args.layers)
    if args.cpu:
        device = "the CPU (hf_cpu rollout)"
    else:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU found"
    results: dict[str, dict[str, float]] = {}
    records_all: dict[str, list[dict]] = {}
    runs = [(recipe, on) for recipe in args.recipes for on in (True, False)]
    for i, (recipe, on) in enumerate(runs, 1):
        name = f"{recipe} gradproj {'on' if on else 'off'}"
        folder = out / name.replace(" ", "-")
        print(f"[{i}/{len(runs)}] {name} ...", flush=True)
        start = time.perf_counter()
        records = run_main_ppo(run_overrides(recipe, paths, folder, args.steps, on, args.cpu), folder)
        records_all[name], results[name] = records, summarise(records)
        print(f"[{i}/{len(runs)}] {name}: {len(records)} steps in {time.perf_counter() - start:.0f} s; "
              + ", ".join(f"{k}={v:.4g}" for k, v in results[name].items()), flush=True)
    text = report(results, args.steps, device)
    (out / "report.md").write_text(text)
    (out / "records.json").write_text(json.dumps(records_all, indent=1, default=str))
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'records.json'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
