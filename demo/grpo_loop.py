"""A small on-policy GRPO loop around a wrapped optimizer: the example people copy.

Per step: sample ``group_size`` responses for each of ``prompts_per_step`` prompts, score them,
compute group-relative advantages, then run ``updates_per_rollout`` optimizer updates over the
rollouts in ``microbatches`` microbatches each. Every method gets exactly the same prompts,
sampling seeds, batch sizes, learning rate and number of updates; only the loss and the gradproj
strategy differ (`METHODS`):

* ``grpo`` -- PPO-clip on the likelihood ratio against the sampling policy (the usual baseline;
  the clip acts from the second update of a rollout on), plain accumulation;
* ``reinforce`` -- the REINFORCE/GRPO policy gradient, no clipping, plain accumulation;
* ``sgrpo`` and ``sgrpo_proma`` -- S-GRPO (seed *token-efficient-rl*): the REINFORCE loss on a
  subset of each response's tokens (`gradproj.integrations.torch.sgrpo_token_mask`: the first
  ``sgrpo_alpha``, then each later one with probability ``sgrpo_p``, at most ``sgrpo_k``), averaged
  per response; plain accumulation, or PROMA;
* ``dmpo`` and ``dmpo_proma`` -- the REINFORCE loss plus DMPO's distribution-matching term
  (`gradproj.integrations.torch.dmpo`: ``dmpo_weight`` x the squared error between the group's
  reward softmax at temperature ``dmpo_alpha`` and the policy's softmax of mean log-probs; the
  weights recomputed at the current policy before each update); plain accumulation, or PROMA;
* ``tspmo`` -- T-SPMO (seed *token-efficient-rl*): each token's advantage from prefix matching
  within its group (`gradproj.integrations.torch.tspmo`), averaged over the unique (prefix, token)
  pairs, PPO-clipped per token from the second update on; plain accumulation only (per-token
  weights have no per-sequence gradient for a capturing strategy);
* any gradproj strategy name (``proma``, ``intra_proma``, ``proma_reference``, ...) -- the
  REINFORCE loss with that strategy accumulating the microbatches.

From the second update of a rollout on, the policy has moved: the REINFORCE loss then weights each
sequence by its importance ratio to the sampling policy (the likelihood ratio of the whole response,
`gradproj.integrations.torch.grpo.policy_loss` with ``old_logp``), so every update follows the
policy gradient at the current policy -- one coefficient per sequence, as gradproj needs.

Options for the reproductions (``benchmarks/reproduce.py``): ``kl_coef`` adds the usual per-token
KL penalty (k3) to the initial policy; ``track_initial_kl`` records KL(policy ‖ initial policy) on
each step's samples; ``diagnostics`` records gradproj's prompt-gradient cosines; ``lora_bound``
records the LoRA rank KL bound mu(r). The initial policy is the base model with the adapters
disabled under LoRA, else a frozen copy.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import gradproj
from gradproj.errors import ConfigError
from gradproj.integrations.torch.dmpo import dmpo_loss, dmpo_weights
from gradproj.integrations.torch.grpo import group_advantages, policy_loss
from gradproj.integrations.torch.logprobs import token_logprobs
from gradproj.integrations.torch.token_selection import sgrpo_token_mask
from gradproj.integrations.torch.tspmo import tspmo_loss, tspmo_weights
from gradproj.demo.rollout import Rollout, sample_rollout
from gradproj.demo.tasks import Task

__all__ = ["GRPOLoopConfig", "METHODS", "method_spec", "run_method", "clipped_loss", "kl_penalty", "step_kl", "InitialPolicy"]

#: name -> (gradproj strategy, loss): the baselines; other names are gradproj strategies.
METHODS = {"grpo": ("none", "clip"), "reinforce": ("none", "reinforce"), "sgrpo": ("none", "sgrpo"),
           "sgrpo_proma": ("proma", "sgrpo"), "dmpo": ("none", "dmpo"), "dmpo_proma": ("proma", "dmpo"),
           "tspmo": ("none", "tspmo")}


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
    kl_coef: float = 0.0
    track_initial_kl: bool = False
    initial_kl_every: int = 1
    diagnostics: bool = False
    lora_bound: bool = False
    sgrpo_alpha: int = 2
    sgrpo_p: float = 0.5
    sgrpo_k: int = 4
    dmpo_alpha: float = 1 / 15
    dmpo_weight: float = 2.0

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
            (self.initial_kl_every >= 1, "initial_kl_every must be at least 1"),
            (self.kl_coef >= 0 and math.isfinite(self.kl_coef), "--kl-coef must be a non-negative number"),
            (not self.lora_bound or self.lora, "lora_bound needs LoRA (lora=True)"),
            (0 <= self.sgrpo_alpha <= self.sgrpo_k and 0.0 <= self.sgrpo_p <= 1.0,
             "S-GRPO needs 0 <= sgrpo_alpha <= sgrpo_k and 0 <= sgrpo_p <= 1"),
            (self.dmpo_alpha > 0 and self.dmpo_weight >= 0, "DMPO needs dmpo_alpha > 0 and dmpo_weight >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def method_spec(name: str) -> tuple[str, str]:
    """``(gradproj strategy, loss kind)`` of a method; unknown names are a `ConfigError`."""
    if name in METHODS:
        return METHODS[name]
    known = gradproj.get_registry().strategies
    if name in known:
        return name, "reinforce"
    raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join([*METHODS, *sorted(known)])}")


def _dmpo_weights(model, roll, chunks, masks, old, group_ids, config, update: int) -> torch.Tensor:
    """DMPO's per-sequence weights at the current policy: from the sampling log-probs at the first
    update, from a no-grad forward once the policy has moved."""
    with torch.no_grad():
        logps = old if update == 0 else [token_logprobs(model, roll.ids[rows], roll.attention_mask[rows]) for rows in chunks]
        phi = torch.cat([(lp * m).sum(1) / m.sum(1).clamp(min=1) for lp, m in zip(logps, masks)])
    order = torch.cat(list(chunks))  # chunks are consecutive row ranges: phi is in row order
    return dmpo_weights(roll.rewards[order], phi, group_ids[order], alpha=config.dmpo_alpha,
                        weight=config.dmpo_weight)[torch.argsort(order)]


def clipped_loss(logp, logp_old, mask, advantages, clip_eps: float, scale: float):
    """PPO-clip, token-mean: ``-mean(min(r A, clip(r, 1-eps, 1+eps) A))`` with ``r = exp(logp - logp_old)``."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    mask = mask.to(logp.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1) * scale


def kl_penalty(logp, ref_logp, mask, scale: float):
    """Token-mean k3 KL penalty to the reference, ``exp(ref - logp) - (ref - logp) - 1`` (GRPO's)."""
    diff = ref_logp.to(logp.dtype) - logp
    per_token = torch.exp(diff) - diff - 1
    mask = mask.to(logp.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1) * scale


class InitialPolicy:
    """The policy at the start of training: the base model with LoRA adapters disabled, else a copy."""

    def __init__(self, model: torch.nn.Module, lora: bool) -> None:
        self.model = model
        self.copy = None
        if not lora:
            self.copy = copy.deepcopy(model).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self):
        """Context in which `module` computes the initial policy."""
        if self.copy is not None:
            yield self.copy
            return
        with self.model.disable_adapter():
            yield self.model

    @torch.no_grad()
    def logprobs(self, ids, attention_mask):
        """Token log-probs of the initial policy (no grad)."""
        with self.active() as module:
            return token_logprobs(module, ids, attention_mask)

    @torch.no_grad()
    def kl_from(self, model, roll: Rollout, chunks) -> float:
        """KL(policy ‖ initial policy) per response token on ``roll`` (exact over the vocabulary
        up to `EXACT_KL_MAX_VOCAB`, else the k3 estimator on the sampled tokens)."""
        exact = model.get_output_embeddings().weight.shape[0] <= EXACT_KL_MAX_VOCAB
        total, count = 0.0, 0
        for rows in chunks:
            ids, attn, mask = roll.ids[rows], roll.attention_mask[rows], roll.response_mask[rows]
            if exact:
                logp = F.log_softmax(_logits(model, ids, attn)[mask].double(), -1)
                with self.active() as module:
                    logq = F.log_softmax(_logits(module, ids, attn)[mask].double(), -1)
                total += float((logp.exp() * (logp - logq)).sum())
            else:
                now = token_logprobs(model, ids, attn)
                total += gradproj.policy_kl(self.logprobs(ids, attn), now, mask, "k3") * int(mask.sum())
            count += int(mask.sum())
        return total / max(count, 1)


#: Up to this vocabulary size the per-step KL is exact over the full distributions; above it, the
#: k3 estimator on the sampled tokens (full distributions of a 50k vocabulary do not fit).
EXACT_KL_MAX_VOCAB = 4096


def _logits(model, ids, attention_mask):
    """Logits at every position but the last, with the position ids `token_logprobs` uses (left
    padding shifts them), so every measurement sees the distributions the loss trains."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]


@torch.no_grad()
def _distribution_stats(model, roll: Rollout, chunks, keep: bool):
    """One forward per chunk before the step: the sampling policy's token log-probs (the loss's
    ``old_logp``), the token entropy on the response positions and, when ``keep``, the response
    positions' log-distributions (for the exact per-step KL)."""
    logdists, old, entropy_sum, count = [], [], 0.0, 0
    for rows in chunks:
        ids = roll.ids[rows]
        logits = _logits(model, ids, roll.attention_mask[rows])
        old.append(torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1))  # as token_logprobs
        logq = F.log_softmax(logits[roll.response_mask[rows]].double(), dim=-1)  # (tokens, V)
        entropy_sum += float(-(logq.exp() * logq).sum())
        count += logq.shape[0]
        if keep:
            logdists.append(logq)
    return logdists, old, entropy_sum / max(count, 1)


@torch.no_grad()
def step_kl(model, roll: Rollout, chunks, before_dists, before_logp) -> float:
    """KL(policy before the step || after) per response token, on the step's own sequences."""
    total, count = 0.0, 0
    for index, rows in enumerate(chunks):
        mask = roll.response_mask[rows]
        if before_dists:
            logq = F.log_softmax(_logits(model, roll.ids[rows], roll.attention_mask[rows])[mask].double(), dim=-1)
            logp = before_dists[index]
            total += float((logp.exp() * (logp - logq)).sum())
        else:
            after = token_logprobs(model, roll.ids[rows], roll.attention_mask[rows])
            total += gradproj.policy_kl(before_logp[index], after, mask, "k3") * int(mask.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def _evaluation(evaluate, model) -> dict[str, float]:
    """``evaluate(model)`` as a dict of measures (a bare number is the accuracy)."""
    measured = evaluate(model)
    return dict(measured) if isinstance(measured, dict) else {"accuracy": measured}


def _build(model_factory, config: GRPOLoopConfig, strategy: str):
    model = model_factory()
    if config.lora:
        from peft import LoraConfig, get_peft_model

        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"})
        model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0, target_modules=targets))
    else:  # full fine-tuning of every block; embeddings stay frozen (the same for every method)
        model.get_input_embeddings().weight.requires_grad_(False)
    initial = InitialPolicy(model, config.lora) if (config.kl_coef > 0 or config.track_initial_kl) else None
    params = [p for p in model.parameters() if p.requires_grad]
    options = {"diagnostics": True} if config.diagnostics else {}
    if config.lora_bound:
        options["lora_bound"] = True
    opt = gradproj.wrap(torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0), model, strategy, **options)
    return model, opt, initial


def run_method(
    name: str,
    model_factory: Callable[[], torch.nn.Module],
    tok: Any,
    task: Task,
    config: GRPOLoopConfig,
    evaluate: Callable[[torch.nn.Module], float | dict[str, float]],
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train a fresh policy with method ``name``; returns one record per step.

    Args:
        model_factory: builds the initial policy (called once; the same weights for every method).
        tok: its tokenizer (a ``PreTrainedTokenizer`` with left padding).
        task: a `gradproj.demo.tasks.Task`.
        evaluate: ``evaluate(model)`` on held-out problems: the accuracy, or a dict of measures
            (``{"accuracy": ..., "sampled_accuracy": ...}``) merged into the step's record.
        on_step: called with each record (progress bars, logging).
    """
    config.validate()
    strategy, loss_kind = method_spec(name)
    if config.kl_coef > 0 and (strategy != "none" or config.diagnostics):
        raise ConfigError(
            f"kl_coef={config.kl_coef} adds a per-token KL penalty, which gradproj cannot split per sequence "
            f"(method {name!r}{' with diagnostics' if config.diagnostics else ''}); use a baseline method "
            "(reinforce, grpo) without diagnostics, or kl_coef=0"
        )
    model, opt, initial = _build(model_factory, config, strategy)
    model.train()
    records = []
    records.append({"method": name, "step": 0, **_evaluation(evaluate, model)})
    for step in range(1, config.steps + 1):
        start = time.perf_counter()
        problems = task.train_problems(step, config.prompts_per_step, config.seed)
        roll = sample_rollout(model, tok, problems, config.group_size, task.max_new_tokens, config.temperature,
                              seed=config.seed * 1_000_003 + step, reward_fn=task.reward)
        advantages = group_advantages(roll.rewards, config.group_size, normalize_std=config.normalize_std)
        chunks = torch.arange(roll.ids.shape[0]).chunk(config.microbatches)
        exact = model.get_output_embeddings().weight.shape[0] <= EXACT_KL_MAX_VOCAB
        before, old, entropy = _distribution_stats(model, roll, chunks, keep=exact)
        timed = time.perf_counter() - start
        measure_initial = config.track_initial_kl and ((step - 1) % config.initial_kl_every == 0 or step == config.steps)
        initial_kl = initial.kl_from(model, roll, chunks) if measure_initial else None
        start = time.perf_counter()
        scale = 1.0 / len(chunks)
        group_ids = torch.arange(roll.ids.shape[0]) // config.group_size
        if config.diagnostics:
            opt.set_groups(group_ids, roll.rewards)
        masks = [roll.response_mask[rows] for rows in chunks]
        if loss_kind == "sgrpo":  # one selection per rollout, the same for each of its updates
            selector = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            masks = [sgrpo_token_mask(m, config.sgrpo_alpha, config.sgrpo_p, config.sgrpo_k, selector) for m in masks]
        if loss_kind == "tspmo":  # per-token weights of the whole rollout (they depend on tokens and rewards only)
            tspmo = tspmo_weights(roll.ids[:, 1:], roll.response_mask, roll.rewards, config.group_size)
        for _update in range(config.updates_per_rollout):
            dm_weights = _dmpo_weights(model, roll, chunks, masks, old, group_ids, config, _update) if loss_kind == "dmpo" else None
            for index, rows in enumerate(chunks):
                mask = masks[index]
                ref = initial.logprobs(roll.ids[rows], roll.attention_mask[rows]) if config.kl_coef > 0 else None
                logp = token_logprobs(model, roll.ids[rows], roll.attention_mask[rows])
                with opt.microbatch(logp, mask, group_ids=group_ids[rows] if config.diagnostics else None):
                    if loss_kind == "clip":
                        loss = clipped_loss(logp, old[index], mask, advantages[rows], config.clip_eps, scale)
                    elif loss_kind == "tspmo":
                        loss = tspmo_loss(logp, mask, tspmo[rows], old_logp=old[index] if _update else None,
                                          clip_eps=config.clip_eps)
                    else:  # the sampling policy's log-probs only once it has moved (ratio exactly 1 before)
                        loss = policy_loss(logp, mask, advantages[rows], scale, old_logp=old[index] if _update else None,
                                           aggregation="sequence_mean" if loss_kind == "sgrpo" else "token_mean",
                                           ratio_mask=roll.response_mask[rows])
                    if dm_weights is not None:
                        loss = loss + dmpo_loss(logp, mask, dm_weights[rows])
                    if ref is not None:
                        loss = loss + config.kl_coef * kl_penalty(logp, ref, mask, scale)
                    loss.backward()
            opt.step()
            opt.zero_grad()
        seconds = timed + time.perf_counter() - start
        kl = step_kl(model, roll, chunks, before, old)
        metrics = opt.metrics()
        record = {
            "method": name, "step": step, "reward": float(roll.rewards.mean()), "step_kl": kl,
            "entropy": entropy, "seconds": seconds,
        }
        projected = metrics.get(f"gradproj/{strategy}/projected_fraction", metrics.get("gradproj/proma/projected_fraction"))
        if projected is not None:  # strategies that project (none does not)
            record["projected_fraction"] = projected
        if initial_kl is not None:
            record["initial_kl"] = initial_kl
        for key in ("group_cos_abs_mean", "group_cos_below_0.15", "reward_std_mean"):
            if f"gradproj/diagnostics/{key}" in metrics:
                record[key] = metrics[f"gradproj/diagnostics/{key}"]
        if "gradproj/lora_bound/mu_mean" in metrics:
            record["lora_bound_mu_mean"] = metrics["gradproj/lora_bound/mu_mean"]
            record["lora_kl_bound_max"] = metrics["gradproj/lora_bound/kl_bound_max"]
        if step % config.eval_every == 0 or step == config.steps:
            record.update(_evaluation(evaluate, model))
        records.append(record)
        if on_step is not None:
            on_step(record)
    opt.detach()
    return records
