"""From kept runs to numbers, plots and verdicts: per-run summaries, seed bands, the claim table.

Everything here is computed from the step records of `gradproj.demo.runs`; nothing is typed in.
The same records give the same report byte for byte (the bootstrap uses a fixed generator; no
wall-clock time or date is written into it -- timings go to ``timing.json``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from gradproj.demo.verdicts import Effect, mean_interval, paired_effect, verdict_row

__all__ = ["run_summary", "per_seed", "Claim", "demo_claims", "summary_table", "claim_table", "band_plot",
           "MEASURES", "finish_axes"]

#: Per-run measures: key -> (table heading, number format).
MEASURES = {
    "sampled_accuracy_initial": ("sampled acc. start", ".3f"),
    "sampled_accuracy_final": ("sampled acc. end", ".3f"),
    "accuracy_initial": ("greedy acc. start", ".3f"),
    "accuracy_final": ("greedy acc. end", ".3f"),
    "reward_last_quarter": ("reward (last ¼)", ".3f"),
    "mean_step_kl": ("mean step KL", ".2e"),
    "initial_kl_final": ("KL to initial (end)", ".2e"),
    "entropy_last_quarter": ("entropy (last ¼)", ".3f"),
    "projected_fraction_mean": ("projected fraction", ".2f"),
}


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def run_summary(records: list[dict]) -> dict[str, float]:
    """One run's measures (see `MEASURES`): "end" is the mean over the evaluations in the last
    quarter of the steps (fewer single-evaluation flukes), "last ¼" the mean over those steps."""
    records = sorted(records, key=lambda r: r["step"])
    trained = [r for r in records if r["step"] > 0]
    steps = trained[-1]["step"] if trained else 0
    quarter = max(1, len(trained) // 4)
    late = [r for r in records if r["step"] > 0.75 * steps] or records[-1:]
    summary = {
        "reward_first_quarter": _mean([r["reward"] for r in trained[:quarter]]),
        "reward_last_quarter": _mean([r["reward"] for r in trained[-quarter:]]),
        "mean_step_kl": _mean([r["step_kl"] for r in trained]),
        "max_step_kl": max((r["step_kl"] for r in trained), default=math.nan),
        "entropy_first_quarter": _mean([r["entropy"] for r in trained[:quarter]]),
        "entropy_last_quarter": _mean([r["entropy"] for r in trained[-quarter:]]),
        "projected_fraction_mean": _mean([r.get("projected_fraction", math.nan) for r in trained]),
        "seconds_per_step": _mean([r["seconds"] for r in trained]),
    }
    for key in ("accuracy", "sampled_accuracy"):
        evaluated = [r for r in records if key in r]
        summary[f"{key}_initial"] = evaluated[0][key] if evaluated else math.nan
        summary[f"{key}_final"] = _mean([r[key] for r in late if key in r])
    drift = [r for r in trained if "initial_kl" in r]
    summary["initial_kl_final"] = drift[-1]["initial_kl"] if drift else math.nan
    return summary


def per_seed(summaries: dict[tuple[str, int], dict], label: str, key: str) -> dict[int, float]:
    """``{seed: summary[key]}`` of the runs labelled ``label``."""
    return {seed: s[key] for (name, seed), s in summaries.items() if name == label and key in s}


@dataclass(frozen=True)
class Claim:
    """A checked claim: what it says, the comparison behind it, and its `Effect`."""

    claim: str
    comparison: str
    effect: Effect


def demo_claims(summaries: dict[tuple[str, int], dict], labels: list[str]) -> list[Claim]:
    """The demo's claims, each by the paired rule of `gradproj.demo.verdicts`.

    * RL raises held-out accuracy (each method; end against its own start), sampled and greedy;
    * PROMA / Intra-PROMA keep the per-step KL and the drift (KL to the initial policy at the end)
      below unclipped REINFORCE's, and the entropy above it (the PROMA paper);
    * their accuracy against GRPO-clip's (the paper: comparable or better).
    """
    claims = []
    for label in labels:
        for key, what in (("sampled_accuracy", "sampled"), ("accuracy", "greedy")):
            end, start = per_seed(summaries, label, f"{key}_final"), per_seed(summaries, label, f"{key}_initial")
            if any(math.isfinite(v) for v in end.values()):
                claims.append(Claim(f"`{label}` raises held-out accuracy ({what})", "end − start",
                                    paired_effect(end, start, "greater")))
    if "reinforce" in labels:
        for label in ("proma", "intra_proma"):
            if label not in labels:
                continue
            for key, claim, direction, log in (
                ("mean_step_kl", "per-step KL below REINFORCE's", "less", True),
                ("initial_kl_final", "drift (KL to the initial policy) below REINFORCE's", "less", True),
                ("entropy_last_quarter", "entropy (last ¼) above REINFORCE's", "greater", False),
            ):
                a, b = per_seed(summaries, label, key), per_seed(summaries, "reinforce", key)
                if a and any(math.isfinite(v) for v in a.values()):
                    claims.append(Claim(f"`{label}`: {claim}", f"{label} {'/' if log else '−'} reinforce",
                                        paired_effect(a, b, direction, log=log)))
    if "grpo" in labels:
        for label in ("proma", "intra_proma"):
            if label not in labels:
                continue
            key = "sampled_accuracy_final" if any(math.isfinite(v) for v in per_seed(summaries, label, "sampled_accuracy_final").values()) else "accuracy_final"
            claims.append(Claim(f"`{label}`: accuracy at least GRPO-clip's ({'sampled' if 'sampled' in key else 'greedy'}, end)",
                                f"{label} − grpo", paired_effect(per_seed(summaries, label, key), per_seed(summaries, "grpo", key), "greater")))
    return claims


def claim_table(claims: list[Claim]) -> str:
    """The claims as a Markdown table with their effects, intervals and verdicts."""
    lines = ["| claim | comparison (paired by seed) | effect [95% interval] | seeds | verdict |", "|---|---|---|---|---|"]
    lines += [verdict_row(c.claim, c.comparison, c.effect) for c in claims]
    return "\n".join(lines)


def summary_table(summaries: dict[tuple[str, int], dict], labels: list[str], measures: dict[str, tuple[str, str]] | None = None) -> str:
    """Per label: each measure's mean over seeds and its bootstrap 95% interval."""
    measures = measures or MEASURES
    shown = [key for key in measures if any(math.isfinite(v) for label in labels for v in per_seed(summaries, label, key).values())]
    lines = ["| method | seeds | " + " | ".join(measures[k][0] for k in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for label in labels:
        cells = []
        for key in shown:
            values = list(per_seed(summaries, label, key).values())
            mean, low, high = mean_interval(values)
            fmt = measures[key][1]
            cells.append("n/a" if math.isnan(mean) else f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]")
        seeds = len(per_seed(summaries, label, shown[0])) if shown else 0
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def _smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def band_plot(path: Path, records_by_label: dict[str, list[list[dict]]], key: str, ylabel: str, *, log: bool = False,
              smooth: int = 1, title: str | None = None) -> None:
    """Per label: the mean over seeds of ``key`` against the step, with a band from the lowest to
    the highest seed (each seed's curve first smoothed by a ``smooth``-step moving mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = False
    for index, (label, runs) in enumerate(records_by_label.items()):
        curves = []
        for records in runs:
            points = sorted((r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key]))
            if points:
                steps, values = zip(*points)
                curves.append(dict(zip(steps, _smooth(list(values), smooth))))
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if log:
            steps = [s for s in steps if all(c[s] > 0 for c in curves)]
        if not steps:
            continue
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        low = [min(c[s] for c in curves) for s in steps]
        high = [max(c[s] for c in curves) for s in steps]
        color = f"C{index}"
        marker = "o" if len(steps) <= 12 else None
        ax.plot(steps, mean, color=color, marker=marker, markersize=3, label=f"{label} ({len(curves)} seeds)")
        ax.fill_between(steps, low, high, color=color, alpha=0.18, linewidth=0)
        drawn = True
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(ylabel)
    if log and drawn:
        ax.set_yscale("log")
    note = f"{smooth}-step moving mean; " if smooth > 1 else ""
    ax.set_title(f"{title or ylabel}\n({note}line: mean over seeds, band: lowest to highest seed)", fontsize=9)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "nothing to plot", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
