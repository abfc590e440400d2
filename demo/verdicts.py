"""One honest rule for every verdict of the demo and the reproductions.

A claim compares two arms (say PROMA and REINFORCE) on one measure. Both arms run with the same
random seeds -- the same initial policy, prompts and sampling seeds -- so the seeds pair them: the
effect is the mean over seeds of the per-seed difference (or, for measures that live on a log scale
such as a KL, of the per-seed log ratio). Its interval is a paired percentile bootstrap over the
seeds (seeds drawn with replacement, a fixed generator so the same records give the same report).

* **held** -- the interval lies entirely on the side the claim predicts;
* **contradicted** -- it lies entirely on the other side;
* **not shown at this scale** -- it contains zero (no effect beyond the seed spread), or fewer
  than three seeds were run (the bootstrap of one or two values is no interval at all).

With three seeds the 2.5th percentile of the bootstrap is the smallest per-seed difference (a
resample of three copies of one seed has probability 1/27 > 2.5%), so "held" then means *every
seed* moved in the claimed direction; more seeds make the rule finer, never looser than the data.
Per-seed differences are rounded to 12 decimals first, so that floating-point residue of equal
values (1e-17) is a tie, not an effect.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

__all__ = ["Effect", "HELD", "CONTRADICTED", "NOT_SHOWN", "paired_effect", "mean_interval", "verdict_row"]

HELD = "held"
CONTRADICTED = "contradicted"
NOT_SHOWN = "not shown at this scale"

Direction = Literal["greater", "less"]


@dataclass(frozen=True)
class Effect:
    """A paired comparison of arm ``a`` against arm ``b`` over seeds.

    Attributes:
        estimate: the mean per-seed difference ``a - b``; with ``log=True`` the ratio ``a / b``
            (the exponential of the mean log ratio).
        low: the lower end of the bootstrap interval of ``estimate`` (same scale).
        high: its upper end.
        seeds: how many seeds both arms have.
        log: whether the comparison is a ratio (``estimate`` 1 means no effect) or a difference (0).
        verdict: `HELD`, `CONTRADICTED` or `NOT_SHOWN`.
    """

    estimate: float
    low: float
    high: float
    seeds: int
    log: bool
    verdict: str

    def text(self, digits: str = ".3g") -> str:
        """``"ratio 0.62 [0.51, 0.74]"`` or ``"+0.041 [+0.012, +0.065]"``."""
        if self.log:
            return f"ratio {self.estimate:{digits}} [{self.low:{digits}}, {self.high:{digits}}]"
        return f"{self.estimate:+{digits}} [{self.low:+{digits}}, {self.high:+{digits}}]"


def _percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linear interpolation."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _bootstrap_means(values: list[float], resamples: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    n = len(values)
    return sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))


def paired_effect(
    a: dict[int, float],
    b: dict[int, float],
    direction: Direction,
    *,
    log: bool = False,
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
    min_seeds: int = 3,
) -> Effect:
    """The effect of arm ``a`` against arm ``b`` (per-seed values, keyed by seed) and its verdict.

    Args:
        a: ``{seed: value}`` of the arm the claim is about; only the seeds both arms have are compared.
        b: ``{seed: value}`` of the arm it is compared against.
        direction: what the claim predicts: ``"greater"`` (``a`` above ``b``) or ``"less"``.
        log: compare log ratios (for positive measures on a log scale, such as a KL); values that
            are not positive make the comparison impossible (verdict `NOT_SHOWN`, NaN estimate).
        level: the interval's coverage (0.95: the 2.5th to the 97.5th percentile).
        resamples: bootstrap resamples (a fixed generator, ``seed``: the same inputs give the same
            interval).
        min_seeds: fewer paired seeds than this give `NOT_SHOWN` whatever the values.

    Returns:
        An `Effect`.
    """
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")
    seeds = sorted(set(a) & set(b))
    values = [(a[s], b[s]) for s in seeds if math.isfinite(a[s]) and math.isfinite(b[s])]
    if log and any(x <= 0 or y <= 0 for x, y in values):
        return Effect(math.nan, math.nan, math.nan, len(values), log, NOT_SHOWN)
    diffs = [round(math.log(x) - math.log(y) if log else x - y, 12) for x, y in values]
    if not diffs:
        return Effect(math.nan, math.nan, math.nan, 0, log, NOT_SHOWN)
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        low = high = mean
        verdict = NOT_SHOWN
    else:
        means = _bootstrap_means(diffs, resamples, seed)
        low, high = _percentile(means, (1 - level) / 2), _percentile(means, 1 - (1 - level) / 2)
        above, below = low > 0, high < 0
        if len(diffs) < min_seeds:
            above = below = False
        if (direction == "greater" and above) or (direction == "less" and below):
            verdict = HELD
        elif above or below:
            verdict = CONTRADICTED
        else:
            verdict = NOT_SHOWN
    scale = math.exp if log else (lambda x: x)
    return Effect(scale(mean), scale(low), scale(high), len(diffs), log, verdict)


def mean_interval(values: list[float], *, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over seeds and its percentile-bootstrap interval (for tables)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, mean, mean
    means = _bootstrap_means(finite, resamples, seed)
    return mean, _percentile(means, (1 - level) / 2), _percentile(means, 1 - (1 - level) / 2)


def verdict_row(claim: str, comparison: str, effect: Effect, digits: str = ".3g") -> str:
    """One Markdown table row: claim | comparison | effect [interval] | seeds | verdict."""
    shown = "n/a" if math.isnan(effect.estimate) else effect.text(digits)
    return f"| {claim} | {comparison} | {shown} | {effect.seeds} | **{effect.verdict}** |"
