"""The one verdict rule of the demo and the reproductions (gradproj.demo.verdicts)."""

import math
import random

import pytest

from gradproj.demo.verdicts import CONTRADICTED, HELD, NOT_SHOWN, mean_interval, paired_effect, verdict_row


def test_every_seed_the_claimed_way_is_held():
    effect = paired_effect({0: 0.5, 1: 0.6, 2: 0.55}, {0: 0.4, 1: 0.45, 2: 0.5}, "greater")
    assert effect.verdict == HELD
    assert effect.estimate == pytest.approx((0.1 + 0.15 + 0.05) / 3)
    assert effect.seeds == 3 and not effect.log


def test_three_seeds_the_interval_starts_at_the_smallest_difference():
    """With 3 seeds the 2.5th bootstrap percentile is the smallest per-seed difference (P = 1/27 > 2.5%)."""
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.9, 1: 1.5, 2: 2.2}
    effect = paired_effect(a, b, "greater")
    assert effect.low == pytest.approx(0.1) and effect.high == pytest.approx(0.8)


def test_one_seed_against_the_rest_is_not_shown():
    effect = paired_effect({0: 0.5, 1: 0.6, 2: 0.3}, {0: 0.4, 1: 0.45, 2: 0.5}, "greater")
    assert effect.low < 0 < effect.high
    assert effect.verdict == NOT_SHOWN


def test_the_other_way_beyond_the_spread_is_contradicted():
    effect = paired_effect({0: 0.3, 1: 0.35, 2: 0.3}, {0: 0.4, 1: 0.45, 2: 0.5}, "greater")
    assert effect.verdict == CONTRADICTED
    assert paired_effect({0: 0.3, 1: 0.35, 2: 0.3}, {0: 0.4, 1: 0.45, 2: 0.5}, "less").verdict == HELD


def test_log_ratios_for_kl():
    a = {0: 1e-3, 1: 2e-3, 2: 4e-3}
    b = {s: 2 * v for s, v in a.items()}
    effect = paired_effect(a, b, "less", log=True)
    assert effect.log and effect.verdict == HELD
    assert effect.estimate == pytest.approx(0.5) and effect.low == pytest.approx(0.5) and effect.high == pytest.approx(0.5)
    assert effect.text() == "ratio 0.5 [0.5, 0.5]"
    # a non-positive value cannot be a log ratio: no verdict rather than a wrong one
    broken = paired_effect({0: 0.0, 1: 1.0}, {0: 1.0, 1: 1.0}, "less", log=True)
    assert broken.verdict == NOT_SHOWN and math.isnan(broken.estimate)


def test_only_paired_seeds_count_and_one_seed_shows_nothing():
    effect = paired_effect({0: 1.0, 1: 2.0, 2: 1.5, 5: 9.0}, {0: 0.0, 1: 1.0, 2: 0.5, 7: 0.0}, "greater")
    assert effect.seeds == 3 and effect.estimate == pytest.approx(1.0) and effect.verdict == HELD
    two = paired_effect({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0}, "greater")
    assert two.seeds == 2 and two.low == pytest.approx(1.0) and two.verdict == NOT_SHOWN  # two seeds: no verdict
    single = paired_effect({0: 1.0}, {0: 0.0}, "greater")
    assert single.seeds == 1 and single.verdict == NOT_SHOWN  # a large effect on one seed is not evidence
    empty = paired_effect({0: 1.0}, {1: 0.0}, "greater")
    assert empty.seeds == 0 and empty.verdict == NOT_SHOWN


def test_no_effect_is_not_shown_and_the_rule_is_deterministic():
    same = {0: 0.4, 1: 0.5, 2: 0.45}
    assert paired_effect(same, same, "greater").verdict == NOT_SHOWN
    rng = random.Random(3)
    a = {s: rng.gauss(0.1, 0.2) for s in range(8)}
    b = {s: rng.gauss(0.0, 0.2) for s in range(8)}
    assert paired_effect(a, b, "greater") == paired_effect(a, b, "greater")


def test_interval_covers_a_known_mean_about_as_often_as_it_says():
    """Coverage of the paired bootstrap with 10 seeds on normal differences: near 95% (percentile
    bootstraps under-cover a little at small n; far below would make the rule lenient)."""
    rng = random.Random(0)
    covered = 0
    trials = 300
    for _ in range(trials):
        diffs = {s: rng.gauss(0.3, 1.0) for s in range(10)}
        effect = paired_effect(diffs, dict.fromkeys(range(10), 0.0), "greater", resamples=800, seed=rng.randrange(10**6))
        covered += effect.low <= 0.3 <= effect.high
    assert 0.85 <= covered / trials <= 0.99


def test_bad_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        paired_effect({0: 1.0}, {0: 0.0}, "bigger")


def test_mean_interval_and_row():
    mean, low, high = mean_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.1) and high == pytest.approx(0.3)
    assert mean_interval([0.7]) == (0.7, 0.7, 0.7)
    assert all(math.isnan(v) for v in mean_interval([math.nan]))
    row = verdict_row("claim", "a − b", paired_effect({0: 1.0, 1: 2.0, 2: 1.5}, {0: 0.0, 1: 0.5, 2: 0.5}, "greater"))
    assert row == "| claim | a − b | +1.17 [+1, +1.5] | 3 | **held** |"


def test_floating_point_residue_is_a_tie():
    """0.3 - 0.1 - 0.2 is 5.6e-17, not an effect: on three seeds it must not read as "held"."""
    a = dict.fromkeys(range(3), 0.3)
    b = dict.fromkeys(range(3), 0.1 + 0.2)
    assert (0.3 - (0.1 + 0.2)) != 0
    effect = paired_effect(a, b, "less")
    assert effect.estimate == 0 and effect.verdict == NOT_SHOWN
