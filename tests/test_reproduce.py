"""benchmarks.reproduce: the GRPO-loop options it relies on, and verdicts that follow the data."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import tiny_char_model

from benchmarks import reproduce
from gradproj.demo.grpo_loop import GRPOLoopConfig, InitialPolicy, kl_penalty, run_method
from gradproj.demo.tasks import AdditionTask
from gradproj.demo.verdicts import CONTRADICTED, HELD, NOT_SHOWN, mean_interval, verdict_row
from gradproj.integrations.torch.logprobs import token_logprobs


def test_kl_penalty_is_grpos_k3_with_its_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    value = kl_penalty(logp, ref, mask, scale=1.0)
    d = ref - logp.detach()
    expected = ((torch.exp(d) - d - 1) * mask).sum() / 2
    assert math.isclose(float(value), float(expected), rel_tol=1e-12)
    value.backward()
    grad = (-(torch.exp(d)) + 1) * mask / 2  # d/dlogp of exp(ref - logp) - (ref - logp) - 1
    assert torch.allclose(logp.grad, grad, rtol=1e-12)
    assert float(kl_penalty(logp.detach(), logp.detach(), mask, 1.0)) == 0.0


def _tiny(lora):
    from gradproj.demo.adder import build_tokenizer

    tok = build_tokenizer()
    model = tiny_char_model(tok, seed=3)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    return tok, model


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora-disabled"])
def test_initial_policy_is_the_policy_before_training(lora):
    tok, model = _tiny(lora)
    enc = tok(["12+7=19", "3+4=7"], return_tensors="pt", padding=True)
    before = token_logprobs(model, enc["input_ids"], enc["attention_mask"]).detach()
    initial = InitialPolicy(model, lora)
    assert torch.equal(initial.logprobs(enc["input_ids"], enc["attention_mask"]), before)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(0.05 * torch.randn_like(p))
    after = token_logprobs(model, enc["input_ids"], enc["attention_mask"]).detach()
    assert not torch.allclose(after, before)
    assert torch.equal(initial.logprobs(enc["input_ids"], enc["attention_mask"]), before)


class AnyDigitOne(AdditionTask):
    """A random policy never adds correctly; this reward varies within groups."""

    def reward(self, completion: str, answer: str) -> float:
        return float("1" in completion)


def _loop(**options):
    tok, _ = _tiny(False)
    sizes = {"steps": 2, "prompts_per_step": 4, "group_size": 4, "microbatches": 2, "eval_every": 2, "lr": 1e-3,
             "lora": True, "lora_rank": 2, "track_initial_kl": True}
    config = GRPOLoopConfig(**{**sizes, **options})
    return run_method("reinforce", lambda: _tiny(False)[1], tok, AnyDigitOne(), config, evaluate=lambda m: 0.0)


def test_run_method_records_drift_and_bound_with_kl_penalty():
    records = _loop(lora_bound=True, kl_coef=0.04)
    first, second = records[1], records[2]
    assert first["initial_kl"] == pytest.approx(0.0, abs=1e-12)  # measured before the first update
    assert second["initial_kl"] > 0
    assert second["lora_bound_mu_mean"] > 0


def test_run_method_records_prompt_gradient_cosines():
    records = _loop(diagnostics=True, prompts_per_step=16, steps=3)
    assert any("group_cos_below_0.15" in r for r in records[1:])


def test_kl_penalty_with_per_sequence_capture_is_refused():
    from gradproj.errors import ConfigError

    with pytest.raises(ConfigError, match="per-token KL penalty"):
        _loop(diagnostics=True, kl_coef=0.04)


# ---------------------------------------------------------------------------------------------
# verdicts, on synthetic records: three seeds, every measure set per run

SEEDS = (0, 1, 2)


def _run(label, seed, tags, *, steps=4, start=0.3, end=0.4, **measures):
    """One synthetic run of ``steps`` GRPO steps: held-out accuracy ``start`` before training and
    ``end`` at the last step; each other measure is constant over the steps, or a function of the step."""
    defaults = {"reward": 0.3, "step_kl": 1e-3, "entropy": 0.7, "seconds": 1.0, "initial_kl": 1e-2}
    rows = [{"label": label, "seed": seed, **tags, "step": 0, "accuracy": start}]
    for step in range(1, steps + 1):
        values = {k: v(step) if callable(v) else v for k, v in {**defaults, **measures}.items()}
        rows.append({"label": label, "seed": seed, **tags, "step": step, **values, **({"accuracy": end} if step == steps else {})})
    return rows


def _proma_records(proma, reinforce, grpo=None, lr=1e-4):
    """proma, reinforce and grpo runs at one learning rate; each argument: per seed, `_run`'s measures."""
    out = []
    for method, runs in (("grpo", grpo or reinforce), ("reinforce", reinforce), ("proma", proma)):
        for seed, measures in zip(SEEDS, runs):
            out += _run(f"{method} lr={lr:g}", seed, {"method": method, "lr": lr}, **measures)
    return out


def _lora_records(kl, end_free=(0.4,) * 3, end_penalised=(0.4,) * 3, seconds_free=1.0, seconds_penalised=1.2, mu=True):
    """Runs at each rank of ``kl`` (rank -> per seed the KL-free runs' KL to the initial policy; the
    penalised runs get half), KL-free and with the penalty 0.04; mu(r) = 0.1 r (1 + seed / 10)."""
    out = []
    for rank, kls in kl.items():
        for coef, ends, seconds in ((0.0, end_free, seconds_free), (0.04, end_penalised, seconds_penalised)):
            label = f"r={rank} KL-free" if coef == 0 else f"r={rank} KL {coef:g}"
            for seed, value in zip(SEEDS, kls):
                extra = {"lora_bound_mu_mean": 0.1 * rank * (1 + seed / 10)} if mu else {}
                out += _run(label, seed, {"method": "reinforce", "rank": rank, "kl_coef": coef}, end=ends[seed], seconds=seconds,
                            initial_kl=value if coef == 0 else value / 2, **extra)
    return out


def _normalization_records(early, late, reward_norm=(0.3,) * 3, reward_raw=(0.3,) * 3, steps=8):
    """Both arms; ``early`` / ``late``: arm (True = std-normalised) -> per seed the fraction of prompt
    pairs with |cos| < 0.15 in the first / second half of the steps."""
    out = []
    for normalize, rewards in ((True, reward_norm), (False, reward_raw)):
        label = "std-normalised (GRPO)" if normalize else "unnormalised (mean-centred)"
        for seed in SEEDS:
            first, second = early[normalize][seed], late[normalize][seed]
            out += _run(label, seed, {"method": "reinforce", "normalize_std": normalize}, steps=steps, reward=rewards[seed],
                        **{"group_cos_below_0.15": lambda step, a=first, b=second: a if step <= steps // 2 else b,
                           "group_cos_abs_mean": 0.1})
    return out


def _lora_full_records(kl_by_rank, full_kl=(1.0, 2.0, 1.5), lora_end=(0.42, 0.43, 0.41), full_end=(0.2, 0.25, 0.22), bound=10.0):
    """KL-free LoRA at each rank of ``kl_by_rank`` (rank -> per seed KL to the initial policy at the
    end) at lr 5e-4; full fine-tuning at 5e-4 (KL ``full_kl``, accuracy ``full_end``) and at 3e-5."""
    out = []
    for rank, kls in kl_by_rank.items():
        for seed, value in zip(SEEDS, kls):
            out += _run(f"LoRA r={rank} lr=0.0005", seed, {"method": "reinforce", "rank": rank, "lr": 5e-4, "lora": True},
                        end=lora_end[seed], initial_kl=lambda step, v=value: v * step / 4, lora_kl_bound_max=bound,
                        lora_bound_mu_mean=1.0)
    for lr, kls, ends in ((5e-4, full_kl, full_end), (3e-5, (0.1,) * 3, (0.42,) * 3)):
        for seed in SEEDS:
            out += _run(f"full lr={lr:g}", seed, {"method": "reinforce", "rank": 0, "lr": lr, "lora": False}, end=ends[seed],
                        initial_kl=lambda step, v=kls[seed]: v * step / 4)
    return out


def test_lora_vs_full_drift_accuracy_slope_and_bound():
    sqrt_growth = {1: (0.01, 0.02, 0.015), 4: (0.02, 0.04, 0.03), 16: (0.04, 0.08, 0.06)}  # KL ∝ sqrt(r) on every seed
    claims = _claims("lora-vs-full", _lora_full_records(sqrt_growth))
    drift = _claim(claims, "KL-free LoRA r=4 drifts less than KL-free full fine-tuning (the same learning rate)")
    assert drift.effect.verdict == HELD and drift.effect.estimate == pytest.approx(0.02)
    accuracy = _claim(claims, "KL-free LoRA r=4 keeps accuracy against full fine-tuning (the same")
    assert accuracy.effect.verdict == HELD and accuracy.effect.estimate == pytest.approx((0.22 + 0.18 + 0.19) / 3)
    grows = _claim(claims, "KL to the initial policy grows with the LoRA rank")
    assert grows.effect.verdict == HELD and grows.effect.estimate == pytest.approx(0.5)
    shape = _claim(claims, "... like sqrt(r)")
    assert shape.effect.verdict == NOT_SHOWN and shape.effect.estimate == pytest.approx(0.0, abs=1e-12)
    bound = _claim(claims, "mu(r) e^mu(r) (largest adapter) bounds the measured KL, r=16")
    assert bound.effect.verdict == HELD and bound.effect.estimate == pytest.approx(_geometric_mean([10 / 0.04, 10 / 0.08, 10 / 0.06]))
    # linear growth contradicts sqrt(r) on every seed; a bound below the KL contradicts the bound
    linear = {1: (0.01, 0.02, 0.015), 4: (0.04, 0.08, 0.06), 16: (0.16, 0.32, 0.24)}
    claims = _claims("lora-vs-full", _lora_full_records(linear, bound=0.01))
    assert _claim(claims, "... like sqrt(r)").effect.verdict == CONTRADICTED
    assert _claim(claims, "... like sqrt(r)").effect.estimate == pytest.approx(0.5)
    assert _claim(claims, "mu(r) e^mu(r) (largest adapter) bounds the measured KL, r=16").effect.verdict == CONTRADICTED
    # mixed seeds: no verdict on the drift against full fine-tuning at its own learning rate
    mixed = {1: (0.05, 0.2, 0.1), 4: (0.06, 0.3, 0.1)}
    own = _claim(_claims("lora-vs-full", _lora_full_records(mixed)), "KL-free LoRA r=4 drifts less than KL-free full "
                 "fine-tuning (full fine-tuning's lr 3e-05)")
    assert own.effect.verdict == NOT_SHOWN


def _sgrpo_records(sgrpo_end, full_end):
    """S-GRPO and full-token GRPO under LoRA, accuracy 0.4 at the start; ends per seed."""
    out = []
    for method, label, ends in (("sgrpo", "S-GRPO (LoRA)", sgrpo_end), ("reinforce", "full-token GRPO (LoRA)", full_end)):
        for seed in SEEDS:
            out += _run(label, seed, {"method": method, "lr": 5e-4, "rank": 8}, start=0.4, end=ends[seed])
    return out


@pytest.mark.parametrize("sgrpo_end,full_end,verdicts", [
    ((0.45, 0.46, 0.44), (0.39, 0.38, 0.395), (HELD, HELD, HELD)),          # the paper's picture
    ((0.45, 0.38, 0.44), (0.42, 0.43, 0.41), (NOT_SHOWN, CONTRADICTED, NOT_SHOWN)),
])
def test_sgrpo_claims(sgrpo_end, full_end, verdicts):
    claims = _claims("sgrpo", _sgrpo_records(sgrpo_end, full_end))
    raises = _claim(claims, "S-GRPO under LoRA raises held-out accuracy")
    fails = _claim(claims, "full-token GRPO under LoRA fails to improve")
    above = _claim(claims, "S-GRPO ends above full-token GRPO")
    assert (raises.effect.verdict, fails.effect.verdict, above.effect.verdict) == verdicts
    assert raises.effect.estimate == pytest.approx(statistics.fmean(sgrpo_end) - 0.4)
    assert above.effect.estimate == pytest.approx(statistics.fmean(sgrpo_end) - statistics.fmean(full_end))


CLAIMS = {"proma": reproduce.proma_claims, "lora-rank": reproduce.lora_claims, "normalization": reproduce.normalization_claims,
          "lora-vs-full": reproduce.lora_full_claims, "sgrpo": reproduce.sgrpo_claims}


def _claims(experiment, records):
    return CLAIMS[experiment](reproduce.summarize(records), reproduce.label_tags(records))


def _claim(claims, start):
    found = [c for c in claims if c.claim.startswith(start)]
    assert len(found) == 1, [c.claim for c in claims]
    return found[0]


def _geometric_mean(ratios):
    return math.exp(statistics.fmean(math.log(r) for r in ratios))


@pytest.mark.parametrize("factors, verdict", [((0.5, 0.6, 0.4), HELD), ((0.5, 2.0, 1.2), NOT_SHOWN), ((2.0, 1.5, 3.0), CONTRADICTED)],
                         ids=["lower-every-seed", "mixed", "higher-every-seed"])
def test_proma_per_step_kl_verdict_is_the_paired_log_ratio(factors, verdict):
    reinforce = [{"step_kl": 1e-2 * (1 + seed)} for seed in SEEDS]
    proma = [{"step_kl": run["step_kl"] * f} for run, f in zip(reinforce, factors)]
    effect = _claim(_claims("proma", _proma_records(proma, reinforce)), "PROMA: per-step KL below").effect
    assert effect.verdict == verdict
    assert effect.log and effect.seeds == 3
    assert effect.estimate == pytest.approx(_geometric_mean(factors))
    assert effect.low == pytest.approx(min(factors)) and effect.high == pytest.approx(max(factors))  # 3 seeds


@pytest.mark.parametrize("proma_end, verdict", [((0.45, 0.5, 0.42), HELD), ((0.4, 0.4, 0.4), NOT_SHOWN), ((0.3, 0.35, 0.38), CONTRADICTED)],
                         ids=["better", "equal", "worse"])
def test_proma_accuracy_against_grpo(proma_end, verdict):
    same = [{} for _ in SEEDS]
    records = [r for r in _proma_records(same, same) if not r["label"].startswith("proma")]
    for seed, end in zip(SEEDS, proma_end):
        records += _run("proma lr=0.0001", seed, {"method": "proma", "lr": 1e-4}, end=end)
    claim = _claim(_claims("proma", records), "PROMA: accuracy comparable to or better than GRPO-clip's")
    assert "*not shown* = no difference beyond the seed spread" in claim.claim
    assert claim.effect.verdict == verdict
    assert claim.effect.estimate == pytest.approx(statistics.fmean(proma_end) - 0.4, abs=1e-12)


def test_proma_learning_rate_robustness_pairs_the_spreads_by_seed():
    def records(proma_ends, reinforce_ends):  # per learning rate, per seed: accuracy at the end
        out = []
        for lr, proma_at, reinforce_at in zip((1e-4, 2e-4), proma_ends, reinforce_ends):
            for method, ends in (("reinforce", reinforce_at), ("proma", proma_at)):
                for seed in SEEDS:
                    out += _run(f"{method} lr={lr:g}", seed, {"method": method, "lr": lr}, end=ends[seed])
        return out

    def spread(ends):
        return [max(pair) - min(pair) for pair in zip(*ends)]

    steady, fragile = [(0.40, 0.42, 0.41), (0.39, 0.40, 0.42)], [(0.40, 0.42, 0.41), (0.20, 0.25, 0.30)]
    held = _claim(_claims("proma", records(steady, fragile)), "PROMA: accuracy more robust").effect
    assert held.verdict == HELD
    assert held.estimate == pytest.approx(statistics.fmean(a - b for a, b in zip(spread(steady), spread(fragile))))
    assert _claim(_claims("proma", records(fragile, steady)), "PROMA: accuracy more robust").effect.verdict == CONTRADICTED
    one_lr = _proma_records([{}] * 3, [{}] * 3)
    assert not [c for c in _claims("proma", one_lr) if "robust" in c.claim]


@pytest.mark.parametrize("growth, verdict", [((2.0, 3.0, 2.5), HELD), ((2.0, 0.5, 1.1), NOT_SHOWN), ((0.5, 0.4, 0.3), CONTRADICTED)],
                         ids=["grows-every-seed", "mixed", "falls-every-seed"])
def test_lora_kl_grows_with_rank_per_consecutive_ranks(growth, verdict):
    r1 = (1e-3, 2e-3, 1.5e-3)
    r4 = tuple(k * g for k, g in zip(r1, growth))
    r16 = tuple(4 * k for k in r4)
    claims = _claims("lora-rank", _lora_records({1: r1, 4: r4, 16: r16}))
    first = _claim(claims, "KL to the initial policy grows with the LoRA rank (KL-free), r=1 → r=4").effect
    assert first.verdict == verdict and first.estimate == pytest.approx(_geometric_mean(growth))
    second = _claim(claims, "KL to the initial policy grows with the LoRA rank (KL-free), r=4 → r=16").effect
    assert second.verdict == HELD and second.estimate == pytest.approx(4.0)
    assert not [c for c in claims if "r=1 → r=16" in c.claim]


@pytest.mark.parametrize("end_free, verdict", [((0.45, 0.42, 0.5), HELD), ((0.4, 0.4, 0.4), NOT_SHOWN), ((0.3, 0.35, 0.32), CONTRADICTED)],
                         ids=["better", "kept", "worse"])
def test_lora_accuracy_without_the_penalty(end_free, verdict):
    claims = _claims("lora-rank", _lora_records({1: (1e-3,) * 3, 4: (2e-3,) * 3}, end_free=end_free))
    for rank in (1, 4):
        claim = _claim(claims, f"removing the KL penalty keeps accuracy, r={rank} ")
        assert "*contradicted* = KL-free worse" in claim.claim
        assert claim.effect.verdict == verdict
        assert claim.effect.estimate == pytest.approx(statistics.fmean(end_free) - 0.4, abs=1e-12)


def test_lora_time_and_bound_verdicts_and_a_missing_bound():
    claims = _claims("lora-rank", _lora_records({1: (1e-3,) * 3, 4: (2e-3,) * 3}, seconds_free=1.0, seconds_penalised=1.25))
    faster = _claim(claims, "KL-free training is faster (no reference-policy forward), r=4").effect
    assert faster.verdict == HELD and faster.estimate == pytest.approx(0.8)
    slower = _claim(_claims("lora-rank", _lora_records({1: (1e-3,) * 3}, seconds_free=1.25, seconds_penalised=1.0)),
                    "KL-free training is faster").effect
    assert slower.verdict == CONTRADICTED
    mu = _claim(claims, "the bound mu(r) grows with the LoRA rank (KL-free), r=1 → r=4").effect
    assert mu.verdict == HELD and mu.estimate == pytest.approx(4.0)
    assert not [c for c in _claims("lora-rank", _lora_records({1: (1e-3,) * 3, 4: (2e-3,) * 3}, mu=False)) if "mu(r)" in c.claim]


@pytest.mark.parametrize("early, verdict", [((0.95, 0.93, 0.97), HELD), ((0.95, 0.8, 0.92), NOT_SHOWN), ((0.8, 0.85, 0.7), CONTRADICTED)],
                         ids=["above-0.9-every-seed", "mixed", "below-0.9-every-seed"])
def test_normalization_orthogonality_against_ninety_percent(early, verdict):
    records = _normalization_records({True: early, False: (0.5,) * 3}, {True: early, False: (0.5,) * 3})
    claims = _claims("normalization", records)
    effect = _claim(claims, "prompt gradients nearly orthogonal (> 90% of pairs with \\|cos\\| < 0.15), std-normalised").effect
    assert effect.verdict == verdict
    assert effect.estimate == pytest.approx(statistics.fmean(early) - 0.9)
    assert _claim(claims, "prompt gradients nearly orthogonal (> 90% of pairs with \\|cos\\| < 0.15), unnormalised").effect.verdict == CONTRADICTED


def test_normalization_late_decline_and_reward():
    early = {True: (0.9, 0.85, 0.88), False: (0.9, 0.85, 0.88)}
    late = {True: (0.8, 0.8, 0.7), False: (0.95, 0.8, 0.9)}  # std-normalised: lower on every seed; unnormalised: mixed
    reward_norm, reward_raw = (0.35, 0.32, 0.4), (0.3, 0.3, 0.3)
    records = _normalization_records(early, late, reward_norm=reward_norm, reward_raw=reward_raw)
    claims = _claims("normalization", records)
    declined = _claim(claims, "orthogonality declines late in training, std-normalised").effect
    assert declined.verdict == HELD
    assert declined.estimate == pytest.approx(statistics.fmean(b - a for a, b in zip(early[True], late[True])))
    assert _claim(claims, "orthogonality declines late in training, unnormalised").effect.verdict == NOT_SHOWN
    reward = _claim(claims, "std normalisation converges faster: higher reward").effect
    assert reward.verdict == HELD and reward.estimate == pytest.approx(statistics.fmean(reward_norm) - 0.3)
    reverse = _normalization_records(early, late, reward_norm=reward_raw, reward_raw=reward_norm)
    assert _claim(_claims("normalization", reverse), "std normalisation converges faster: higher reward").effect.verdict == CONTRADICTED


SETTINGS = {"policy": "synthetic", "task": "addition", "seeds": list(SEEDS), "quick": False, "machine": "test",
            "date": "2000-01-01 00:00", "command": "", "runs": [{"label": "x", "steps": 4, "prompts_per_step": 4,
                                                                 "group_size": 4, "microbatches": 2, "updates_per_rollout": 1}]}

EXPERIMENT_RECORDS = {
    "proma": lambda: _proma_records([{"step_kl": 5e-3}] * 3, [{"step_kl": 1e-2}] * 3),
    "lora-rank": lambda: _lora_records({1: (1e-3, 2e-3, 1.5e-3), 4: (4e-3, 6e-3, 5e-3)}),
    "normalization": lambda: _normalization_records({True: (0.9,) * 3, False: (0.9,) * 3}, {True: (0.8,) * 3, False: (0.8,) * 3}),
    "lora-vs-full": lambda: _lora_full_records({1: (0.01, 0.02, 0.015), 4: (0.02, 0.04, 0.03)}),
    "sgrpo": lambda: _sgrpo_records((0.45, 0.46, 0.44), (0.39, 0.38, 0.395)),
}


@pytest.mark.parametrize("experiment", list(EXPERIMENT_RECORDS))
def test_report_shows_every_verdict_row_and_is_deterministic(experiment, tmp_path):
    records = EXPERIMENT_RECORDS[experiment]()
    report = reproduce.EXPERIMENTS[experiment]
    text = report(records, SETTINGS, tmp_path)
    assert text == report(records, SETTINGS, tmp_path)
    assert "## Results (mean [95% bootstrap interval] over seeds)" in text and "±" not in text
    assert "[the verdict rule](../../reproductions.md#the-verdict-rule)" in text
    assert SETTINGS["date"] not in text
    claims = _claims(experiment, records)
    assert claims
    for claim in claims:
        assert verdict_row(claim.claim, claim.comparison, claim.effect) in text
    assert text.index("## Verdicts") < text.index(verdict_row(claims[0].claim, claims[0].comparison, claims[0].effect))
    assert all(png.stat().st_size > 0 for png in tmp_path.glob("*.png"))


def test_results_table_shows_mean_and_interval_over_seeds(tmp_path):
    ends = (0.3, 0.4, 0.5)
    text = reproduce.report_lora(_lora_records({1: (1e-3, 2e-3, 1.5e-3)}, end_free=ends), SETTINGS, tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| r=1 KL-free |"))
    mean, low, high = mean_interval(list(ends))
    assert low < mean < high
    assert row.startswith("| r=1 KL-free | 3 |") and f"| {mean:.3f} [{low:.3f}, {high:.3f}] |" in row


def test_report_only_rewrites_the_page_from_records_and_old_settings(tmp_path):
    records = EXPERIMENT_RECORDS["normalization"]()
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"settings": SETTINGS}))  # an older page: has a date, no threads
    reproduce.main(["normalization", "--report-only", "--out", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert SETTINGS["date"] not in text and "## Verdicts" in text
    saved = json.loads((tmp_path / "summary.json").read_text())
    claims = _claims("normalization", records)
    assert [v["claim"] for v in saved["verdicts"]] == [c.claim.replace("\\|", "|") for c in claims]
    assert [v["verdict"] for v in saved["verdicts"]] == [c.effect.verdict for c in claims]
    first = text
    reproduce.main(["normalization", "--report-only", "--out", str(tmp_path)])
    assert (tmp_path / "report.md").read_text() == first
