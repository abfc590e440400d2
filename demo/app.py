"""``gradproj demo``: GRPO on a small model, methods side by side over several random seeds.

Every method trains fresh copies of the same policy, one per random seed, with the same prompts and
sampling seeds for a given seed (see `gradproj.demo.grpo_loop`). The runs go in parallel, one
thread each (`gradproj.demo.runs`), and each is kept as it finishes, so an interrupted demo
resumes. The report compares the methods by the paired rule of `gradproj.demo.verdicts`. Written to
``--out``: ``runs/<method>/seed<k>.json`` (every step of every run), ``metrics.jsonl`` (all steps,
one line each), ``summary.json``, PNG curves with seed bands, ``report.md`` and ``timing.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from gradproj.demo.grpo_loop import GRPOLoopConfig, method_spec
from gradproj.demo.report import band_plot, claim_table, demo_claims, run_summary, summary_table
from gradproj.demo.runs import RunSpec, Setup, available_cores, execute
from gradproj.demo.tasks import check_task_name
from gradproj.demo.verdicts import CONTRADICTED, HELD, NOT_SHOWN
from gradproj.errors import ConfigError

__all__ = ["DemoOptions", "DEMO_LOOP", "DEFAULT_METHODS", "run_demo", "write_report", "table", "PLOTS"]

DEFAULT_METHODS = ["grpo", "reinforce", "proma", "intra_proma"]

#: The demo's loop: 60 steps of 16 prompts x 8 samples, two updates per rollout, AdamW 3e-5 (at
#: 1e-4 and above the tiny policy's held-out accuracy fell under every method), held-out
#: evaluation and KL to the initial policy every 15 steps.
DEMO_LOOP = GRPOLoopConfig(steps=60, lr=3e-5, eval_every=15, track_initial_kl=True, initial_kl_every=15)

#: file -> (record key, title, axis label, log scale, moving-mean window)
PLOTS = {
    "reward.png": ("reward", "mean reward of the step's samples", "reward", False, 5),
    "sampled_accuracy.png": ("sampled_accuracy", "held-out accuracy, sampled at the training temperature", "accuracy", False, 1),
    "accuracy.png": ("accuracy", "held-out accuracy, greedy", "accuracy", False, 1),
    "step_kl.png": ("step_kl", "per-step KL(policy before ‖ after the step), per token", "KL", True, 5),
    "initial_kl.png": ("initial_kl", "drift: KL(policy ‖ initial policy), per token", "KL", True, 1),
    "entropy.png": ("entropy", "policy entropy per token", "entropy (nats)", False, 5),
    "projected_fraction.png": ("projected_fraction", "fraction of the gradient removed by the projection",
                               "projected fraction", False, 5),
}


@dataclass
class DemoOptions:
    """What ``gradproj demo`` runs (the CLI flags)."""

    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "runs/demo"
    task: str = "addition"
    model: str | None = None
    smollm2: bool = False
    progress: bool = True
    loop: GRPOLoopConfig = field(default_factory=lambda: replace(DEMO_LOOP))
    workers: int | None = None
    threads: int = 1
    report_only: bool = False
    eval_samples: int | None = None
    eval_count: int | None = None

    def setup(self) -> Setup:
        """The `Setup` every run shares (sampled evaluation only for the default policy: on a
        pretrained model's long answers it would cost more than the training)."""
        pretrained = self.model is not None or self.smollm2
        samples = self.eval_samples if self.eval_samples is not None else (0 if pretrained else 4)
        count = self.eval_count if self.eval_count is not None else (None if pretrained else 300)
        return Setup(model=self.model, smollm2=self.smollm2, task=self.task, eval_samples=samples, eval_count=count,
                     threads=self.threads)

    def validate(self) -> None:
        """Refuse what cannot run, before anything does."""
        self.loop.validate()
        if not self.strategies:
            raise ConfigError("--strategies needs at least one name")
        for name in self.strategies:
            method_spec(name)  # unknown names fail before anything runs
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError("--strategies names a method twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--seeds needs at least one seed, each once")
        if self.threads < 1 or (self.workers is not None and self.workers < 1):
            raise ConfigError("--threads and --workers must be at least 1")
        check_task_name(self.task)
        if self.model is not None and self.smollm2:
            raise ConfigError("give either --model PATH or --smollm2, not both")
        if self.task != "addition" and self.model is None and not self.smollm2:
            raise ConfigError(f"task {self.task!r} needs a pretrained language model: add --smollm2 or --model PATH")

    def specs(self) -> list[RunSpec]:
        """Every run: each method x each seed (seed-major, so early stops leave whole seeds)."""
        return [RunSpec(name, replace(self.loop, seed=seed)) for seed in self.seeds for name in self.strategies]


def run_demo(options: DemoOptions) -> dict:
    """Run (or resume) every run, then write the outputs into ``options.out``; returns the summary
    (``{"settings", "methods", "claims"}``)."""
    options.validate()
    from gradproj.demo.policies import load_policy

    out = Path(options.out)
    setup = options.setup()
    if options.report_only:
        description = _kept_description(out)
    else:
        _factory, _tok, description = load_policy(options.model, options.smollm2, progress=options.progress)
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps({"policy": description}, indent=1))
    specs = options.specs()
    kept = execute(specs, setup, out, description, workers=options.workers, progress=options.progress,
                   report_only=options.report_only)
    if not kept:
        raise ConfigError(f"no finished runs in {out / 'runs'} for these settings; run the demo without --report-only first")
    return write_outputs(out, options, setup, description, specs, kept)


def _kept_description(out: Path) -> str:
    path = out / "settings.json"
    if not path.exists():
        raise ConfigError(f"--report-only: {out} holds no demo run (no settings.json); run the demo first")
    return json.loads(path.read_text())["policy"]


def write_outputs(out: Path, options: DemoOptions, setup: Setup, description: str, specs: list[RunSpec],
                  kept: dict[tuple[str, int], dict]) -> dict:
    """``metrics.jsonl``, ``summary.json``, the plots, ``report.md`` and ``timing.json`` from the kept runs."""
    labels = [name for name in options.strategies if any(label == name for label, _ in kept)]
    order = [(spec.label, spec.seed) for spec in specs if (spec.label, spec.seed) in kept]
    summaries = {key: run_summary(kept[key]["records"]) for key in order}
    claims = demo_claims(summaries, labels)
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as log:
        for key in order:
            for record in kept[key]["records"]:
                log.write(json.dumps(record) + "\n")
    by_label = {label: [kept[key]["records"] for key in order if key[0] == label] for label in labels}
    for name, (key, title, ylabel, log_scale, smooth) in PLOTS.items():
        if key == "projected_fraction":
            shown = {label: runs for label, runs in by_label.items() if method_spec(label)[0] != "none"}
        else:
            shown = by_label
        band_plot(out / name, shown, key, ylabel, log=log_scale, smooth=smooth, title=title)
    missing = [f"{spec.label} seed {spec.seed}" for spec in specs if (spec.label, spec.seed) not in kept]
    summary = {
        "settings": {**asdict(options.loop), "seeds": options.seeds, "task": options.task, "policy": description,
                     "eval_samples": setup.eval_samples, "eval_count": setup.eval_count, "threads": setup.threads},
        "methods": {f"{label} seed {seed}": {k: v for k, v in summaries[(label, seed)].items() if k != "seconds_per_step"}
                    for label, seed in order},  # (wall times vary from run to run: timing.json)
        "claims": [{"claim": c.claim, "comparison": c.comparison, **asdict(c.effect)} for c in claims],
        "missing_runs": missing,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_number))
    write_report(out, options, setup, description, summaries, labels, claims, missing)
    timing = {f"{label} seed {seed}": {"seconds": kept[(label, seed)]["seconds"],
                                       "seconds_per_step": summaries[(label, seed)]["seconds_per_step"],
                                       "threads": kept[(label, seed)].get("threads")} for label, seed in order}
    (out / "timing.json").write_text(json.dumps({"cores": available_cores(), "torch": torch.__version__, "runs": timing}, indent=1))
    return summary


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(out: Path, options: DemoOptions, setup: Setup, description: str, summaries: dict, labels: list[str],
                 claims: list, missing: list[str]) -> str:
    """``report.md``: the settings, the table with intervals, the claim verdicts and the plots."""
    loop = options.loop
    counts = {v: sum(c.effect.verdict == v for c in claims) for v in (HELD, CONTRADICTED, NOT_SHOWN)}
    problems = f"{setup.eval_count}" if setup.eval_count else "the task's"
    evaluation = (f"greedy accuracy and sampled accuracy ({setup.eval_samples} samples per problem at temperature "
                  f"{loop.temperature}) on {problems} held-out problems"
                  if setup.eval_samples else "greedy accuracy on the task's held-out problems")
    text = [
        "# gradproj demo report",
        "",
        f"Policy: {description}; task: {options.task}; "
        f"{'LoRA r=' + str(loop.lora_rank) if loop.lora else 'full fine-tuning (embeddings frozen)'}.",
        f"Every method: {loop.steps} steps of {loop.prompts_per_step} prompts × {loop.group_size} samples, "
        f"{loop.microbatches} microbatches, {loop.updates_per_rollout} optimizer updates per rollout, AdamW lr {loop.lr:g}; "
        f"random seeds {', '.join(map(str, options.seeds))} (for each seed every method sees the same prompts and "
        f"sampling seeds). `grpo` is PPO-clip (eps {loop.clip_eps}); the others use the unclipped REINFORCE/GRPO loss "
        "with the named gradproj strategy"
        + (", each sequence weighted by its importance ratio to the sampling policy from the second update of a "
           "rollout on." if loop.updates_per_rollout > 1 else "."),
        f"Measured: {evaluation} every {loop.eval_every} steps; per-step KL on each step's own sequences (exact over "
        f"the vocabulary); KL to the initial policy every {loop.initial_kl_every} steps; token entropy; reward. "
        f"{setup.threads} torch thread(s) per run; torch {torch.__version__}. Wall times: `timing.json`.",
        "",
    ]
    if missing:
        text += [f"**Incomplete**: {len(missing)} run(s) not finished yet ({', '.join(missing)}); run the same "
                 "command again to finish them.", ""]
    text += [
        "## Verdicts",
        "",
        f"{counts[HELD]} held, {counts[CONTRADICTED]} contradicted, {counts[NOT_SHOWN]} not shown at this scale. "
        "The rule (the same on every results page, [Reproductions](../reproductions.md#the-verdict-rule)): runs are "
        "paired by random seed; a claim **holds** only when the 95% paired-bootstrap interval of its effect lies on "
        "the side it predicts, is **contradicted** when the interval lies on the other side, and is otherwise **not "
        "shown at this scale**. With 3 seeds, *held* means every seed moved the claimed way. KL effects are ratios "
        "(1 = no effect), the others differences (0 = no effect). \"end\" = mean of the evaluations in the last "
        "quarter of the steps.",
        "",
        claim_table(claims),
        "",
        "## Results (mean over seeds [95% bootstrap interval])",
        "",
        summary_table(summaries, labels),
        "",
    ]
    for name, (key, title, _ylabel, _log, _smooth) in PLOTS.items():
        if key == "projected_fraction" and not any(method_spec(label)[0] != "none" for label in labels):
            continue
        text += [f"![{title}]({name})", ""]
    text += ["Bands: the lowest to the highest seed; lines: the mean over seeds.", ""]
    report = "\n".join(text)
    (out / "report.md").write_text(report, encoding="utf-8")
    return report


def table(summary: dict) -> str:
    """The claim verdicts as plain text lines (what the command prints at the end)."""
    lines = []
    for c in summary["claims"]:
        estimate = c["estimate"]
        if estimate is None or (isinstance(estimate, float) and math.isnan(estimate)):
            shown = "n/a"
        elif c["log"]:
            shown = f"ratio {estimate:.3g} [{c['low']:.3g}, {c['high']:.3g}]"
        else:
            shown = f"{estimate:+.3g} [{c['low']:+.3g}, {c['high']:+.3g}]"
        lines.append(f"{c['verdict']:>24}  {c['claim'].replace('`', '')}: {shown}")
    return "\n".join(lines)
