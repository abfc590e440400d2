"""benchmarks.reproduce: the GRPO-loop options it relies on, and verdicts that follow the data."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import reproduce  # noqa: E402
from gradproj.demo.grpo_loop import GRPOLoopConfig, InitialPolicy, kl_penalty, run_method  # noqa: E402
from gradproj.integrations.torch.logprobs import token_logprobs  # noqa: E402
from gradproj.demo.tasks import AdditionTask  # noqa: E402
from helpers import tiny_char_model  # noqa: E402


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
    sizes = dict(steps=2, prompts_per_step=4, group_size=4, microbatches=2, eval_every=2, lr=1e-3, lora=True,
                 lora_rank=2, track_initial_kl=True)
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


def _records(kls, seconds_kl, seconds_free, acc_kl=0.5, acc_free=0.5):
    """Synthetic lora-rank records: 2 seeds, 4 steps, per rank a KL level."""
    out = []
    for rank, kl in kls.items():
        for coef in (0.0, 0.04):
            label = f"r={rank} {'KL-free' if coef == 0 else 'KL'}"
            for seed in (0, 1):
                acc = acc_free if coef == 0 else acc_kl
                out.append({"label": label, "seed": seed, "rank": rank, "kl_coef": coef, "method": "reinforce",
                            "step": 0, "accuracy": 0.3})
                for step in range(1, 5):
                    out.append({"label": label, "seed": seed, "rank": rank, "kl_coef": coef, "method": "reinforce",
                                "step": step, "reward": 0.3, "step_kl": 1e-3, "entropy": 0.7,
                                "seconds": seconds_free if coef == 0 else seconds_kl,
                                "initial_kl": kl * (1 + 0.01 * seed), "lora_bound_mu_mean": rank * 0.1,
                                **({"accuracy": acc} if step == 4 else {})})
    return out


SETTINGS = {"policy": "synthetic", "task": "addition", "seeds": [0, 1], "quick": False, "machine": "test",
            "date": "today", "command": "", "runs": [{"label": "x", "steps": 4, "prompts_per_step": 4, "group_size": 4,
                                                      "microbatches": 2, "updates_per_rollout": 1}]}


def test_lora_verdicts_follow_the_data(tmp_path):
    held = reproduce.report_lora(_records({1: 1e-3, 4: 2e-3, 16: 4e-3}, 1.2, 1.0), SETTINGS, tmp_path)
    assert "rises at 2 of 2 rank steps. **held**" in held
    assert "*KL-free training is faster*" in held and "17%" in held
    assert (tmp_path / "rank.png").stat().st_size > 0
    not_held = reproduce.report_lora(_records({1: 4e-3, 4: 2e-3, 16: 1e-3}, 1.0, 1.2, acc_kl=0.5, acc_free=0.3),
                                     SETTINGS, tmp_path)
    assert "rises at 0 of 2 rank steps. **not held**" in not_held
    assert "keeps accuracy* (KL-free not lower by more than the seed std or 0.01): 0 of 3 ranks (r=1: 0.300 ± 0.000 KL-free" in not_held
    assert "0.500 ± 0.000). **not held**" in not_held
    assert "*KL-free training is faster*" in not_held and "**not held**" in not_held.split("KL-free training is faster")[1]
