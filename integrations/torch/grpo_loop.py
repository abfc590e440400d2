"""A small on-policy GRPO loop around a wrapped optimizer: the example people copy.

Per step: sample ``group_size`` responses for each of ``prompts_per_step`` prompts, score them,
compute group-relative advantages, then run ``updates_per_rollout`` optimizer updates over the
rollouts in ``microbatches`` microbatches each. Every method gets exactly the same prompts,
sampling seeds, batch sizes, learning rate and number of updates; only the loss and the gradproj
strategy differ (:data:`METHODS`):

* ``grpo`` -- PPO-clip on the likelihood ratio against the sampling policy (the usual baseline;
  the clip acts from the second update of a rollout on), plain accumulation;
* ``reinforce`` -- the REINFORCE/GRPO policy gradient, no ratio, no clipping, plain accumulation;
* any gradproj strategy name (``proma``, ``intra_proma``, ``proma_reference``, ...) -- the
  REINFORCE loss with that strategy accumulating the microbatches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import gradproj
from gradproj.errors import ConfigError
from gradproj.integrations.torch.grpo import group_advantages
from gradproj.integrations.torch.logprobs import token_logprobs
from gradproj.integrations.torch.rollout import Rollout, sample_rollout
from gradproj.integrations.torch.tasks import Task

__all__ = ["GRPOLoopConfig", "METHODS", "method_spec", "run_method", "clipped_loss", "step_kl"]

#: name -> (gradproj strategy, loss): the baselines; other names are gradproj strategies.
METHODS = {"grpo": ("none", "clip"), "reinforce": ("none", "reinforce")}


@dataclass
class GRPOLoopConfig:
    """Settings shared by every method of a comparison."""

    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    microbatches: int = 4
    updates_per_rollout: int = 2
    lr: float = 1e-4
    clip_eps: float = 0.2
    normalize_std: bool = True
    temperature: float = 1.0
    eval_every: int = 10
    seed: int = 0
    lora: bool = False
    lora_rank: int = 8

    def validate(self) -> None:
        """Refuse impossible sizes with a message saying what to change."""
        checks = [
            (self.steps >= 1, "--steps must be at least 1"),
            (self.prompts_per_step >= 1, "--prompts must be at least 1"),
            (self.group_size >= 2, "--group-size must be at least 2 (advantages are relative to the group)"),
            (self.microbatches >= 1, "--microbatches must be at least 1"),
            (self.prompts_per_step * self.group_size >= self.microbatches,
             "--microbatches cannot exceed prompts x group size (every microbatch needs a sequence)"),
            (self.updates_per_rollout >= 1, "--updates must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.eval_every >= 1, "--eval-every must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def method_spec(name: str) -> tuple[str, str]:
    """``(gradproj strategy, loss kind)`` of a method; unknown names are a :class:`ConfigError`."""
    if name in METHODS:
        return METHODS[name]
    known = gradproj.get_registry().strategies
    if name in known:
        return name, "reinforce"
    raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join([*METHODS, *sorted(known)])}")


def clipped_loss(logp, logp_old, mask, advantages, clip_eps: float, scale: float):
    """PPO-clip, token-mean: ``-mean(min(r A, clip(r, 1-eps, 1+eps) A))`` with ``r = exp(logp - logp_old)``."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    mask = mask.to(logp.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1) * scale


def _reinforce_loss(logp, mask, advantages, scale: float):
    mask = mask.to(logp.dtype)
    return -(advantages[:, None].to(logp.dtype) * logp * mask).sum() / mask.sum().clamp(min=1) * scale


#: Up to this vocabulary size the per-step KL is exact over the full distributions; above it, the
#: k3 estimator on the sampled tokens (full distributions of a 50k vocabulary do not fit).
EXACT_KL_MAX_VOCAB = 4096


@torch.no_grad()
def _distribution_stats(model, roll: Rollout, chunks, keep: bool):
    """Token entropy on the response positions (and their log-distributions when ``keep``)."""
    logdists, entropy_sum, count = [], 0.0, 0
    for rows in chunks:
        logits = model(input_ids=roll.ids[rows], attention_mask=roll.attention_mask[rows]).logits[:, :-1]
        logq = F.log_softmax(logits[roll.response_mask[rows]].double(), dim=-1)  # (tokens, V)
        entropy_sum += float(-(logq.exp() * logq).sum())
        count += logq.shape[0]
        if keep:
            logdists.append(logq)
    return logdists, entropy_sum / max(count, 1)


@torch.no_grad()
def step_kl(model, roll: Rollout, chunks, before_dists, before_logp) -> float:
    """KL(policy before the step || after) per response token, on the step's own sequences."""
    total, count = 0.0, 0
    for index, rows in enumerate(chunks):
        mask = roll.response_mask[rows]
        if before_dists:
            logits = model(input_ids=roll.ids[rows], attention_mask=roll.attention_mask[rows]).logits[:, :-1]
            logq = F.log_softmax(logits[mask].double(), dim=-1)
            logp = before_dists[index]
            total += float((logp.exp() * (logp - logq)).sum())
        else:
            after = token_logprobs(model, roll.ids[rows], roll.attention_mask[rows])
            total += gradproj.policy_kl(before_logp[index], after, mask, "k3") * int(mask.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def _build(model_factory, config: GRPOLoopConfig, strategy: str):
    model = model_factory()
    if config.lora:
        from peft import LoraConfig, get_peft_model

        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"})
        model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0, target_modules=targets))
    else:  # full fine-tuning of every block; embeddings stay frozen (the same for every method)
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = gradproj.wrap(torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0), model, strategy)
    return model, opt


def run_method(
    name: str,
    model_factory: Callable[[], torch.nn.Module],
    tok: Any,
    task: Task,
    config: GRPOLoopConfig,
    evaluate: Callable[[torch.nn.Module], float],
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train a fresh policy with method ``name``; returns one record per step.

    Args:
        model_factory: builds the initial policy (called once; the same weights for every method).
        tok: its tokenizer (a ``PreTrainedTokenizer`` with left padding).
        task: a :class:`gradproj.integrations.torch.tasks.Task`.
        evaluate: ``evaluate(model) -> accuracy`` on held-out problems.
        on_step: called with each record (progress bars, logging).
    """
    config.validate()
    strategy, loss_kind = method_spec(name)
    model, opt = _build(model_factory, config, strategy)
    model.train()
    records = []
    accuracy = evaluate(model)
    records.append({"method": name, "step": 0, "accuracy": accuracy})
    for step in range(1, config.steps + 1):
        start = time.perf_counter()
        problems = task.train_problems(step, config.prompts_per_step, config.seed)
        roll = sample_rollout(model, tok, problems, config.group_size, task.max_new_tokens, config.temperature,
                              seed=config.seed * 1_000_003 + step, reward_fn=task.reward)
        advantages = group_advantages(roll.rewards, config.group_size, normalize_std=config.normalize_std)
        chunks = torch.arange(roll.ids.shape[0]).chunk(config.microbatches)
        exact = model.get_output_embeddings().weight.shape[0] <= EXACT_KL_MAX_VOCAB
        before, entropy = _distribution_stats(model, roll, chunks, keep=exact)
        with torch.no_grad():
            old = [token_logprobs(model, roll.ids[rows], roll.attention_mask[rows]) for rows in chunks]
        scale = 1.0 / len(chunks)
        for _update in range(config.updates_per_rollout):
            for index, rows in enumerate(chunks):
                mask = roll.response_mask[rows]
                logp = token_logprobs(model, roll.ids[rows], roll.attention_mask[rows])
                with opt.microbatch(logp, mask):
                    if loss_kind == "clip":
                        loss = clipped_loss(logp, old[index], mask, advantages[rows], config.clip_eps, scale)
                    else:
                        loss = _reinforce_loss(logp, mask, advantages[rows], scale)
                    loss.backward()
            opt.step()
            opt.zero_grad()
        seconds = time.perf_counter() - start
        kl = step_kl(model, roll, chunks, before, old)
        metrics = opt.metrics()
        record = {
            "method": name, "step": step, "reward": float(roll.rewards.mean()), "step_kl": kl,
            "entropy": entropy, "seconds": seconds,
            "projected_fraction": metrics.get(f"gradproj/{strategy}/projected_fraction",
                                              metrics.get("gradproj/proma/projected_fraction", 0.0)),
        }
        if step % config.eval_every == 0 or step == config.steps:
            record["accuracy"] = evaluate(model)
        records.append(record)
        if on_step is not None:
            on_step(record)
    opt.detach()
    return records
