"""A one-minute, offline GRPO run on a tiny random causal LM, with and without PROMA.

Task: the prompt is a few random digits; every response token earns reward if it is the digit
7. A random model starts near 1/10; GRPO raises it within a few dozen steps. The
same prompts, samples and seeds are used for every strategy, so the printed per-step KL and
reward are directly comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import gradproj
from gradproj.integrations.torch.grpo import group_advantages, policy_loss, token_kl
from gradproj.integrations.torch.logprobs import token_logprobs

DIGITS = 10
PAD, BOS = 0, 1  # token ids; digit d is token d + 2
VOCAB = DIGITS + 2


@dataclass
class QuickstartConfig:
    """Sizes of the quickstart run (defaults finish in well under a minute on 2 CPU cores)."""

    steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 4
    microbatches: int = 4
    prompt_len: int = 4
    response_len: int = 6
    lr: float = 3e-3
    seed: int = 0
    strategies: list[str] = field(default_factory=lambda: ["none", "proma"])


def tiny_policy(seed: int):
    """A tiny random Qwen2-shaped causal LM (hidden 64, 2 layers) with every Linear trainable."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None,
        max_position_embeddings=64,
    )
    model = transformers.Qwen2ForCausalLM(cfg)
    for module in model.modules():
        keep = isinstance(module, torch.nn.Linear)
        for p in module.parameters(recurse=False):
            p.requires_grad_(keep)
    return model


def sample(model, prompts: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Sample ``length`` tokens after each prompt (temperature 1, no padding needed)."""
    ids = prompts
    with torch.no_grad():
        for _ in range(length):
            logits = model(input_ids=ids).logits[:, -1].double()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


TARGET = 7 + 2  # the token of digit 7


def reward(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Fraction of response tokens that are the digit 7."""
    return (ids[:, prompt_len:] == TARGET).double().mean(dim=1)


def run_strategy(cfg: QuickstartConfig, strategy: str, progress=None) -> list[dict]:
    """Train a fresh policy for ``cfg.steps`` GRPO steps with ``strategy``; per-step records."""
    model = tiny_policy(cfg.seed)
    inner = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    opt = gradproj.wrap(inner, model, strategy=strategy)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    p_len = 1 + cfg.prompt_len
    records = []
    for step in range(cfg.steps):
        digits = torch.randint(0, DIGITS, (cfg.prompts_per_step, cfg.prompt_len), generator=gen) + 2
        prompts = torch.cat([torch.full((cfg.prompts_per_step, 1), BOS), digits], 1)
        prompts = prompts.repeat_interleave(cfg.group_size, dim=0)
        ids = sample(model, prompts, cfg.response_len, gen)
        rewards = reward(ids, p_len)
        adv = group_advantages(rewards, cfg.group_size).float()
        mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
        mask[:, p_len - 1 :] = True
        with torch.no_grad():
            before = model(input_ids=ids).logits[:, :-1]
        start = time.perf_counter()
        for rows in torch.arange(ids.shape[0]).chunk(cfg.microbatches):
            logp = token_logprobs(model, ids[rows])
            with opt.microbatch(logp, mask[rows]):
                policy_loss(logp, mask[rows], adv[rows], scale=1.0 / cfg.microbatches).backward()
        opt.step()
        opt.zero_grad()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            after = model(input_ids=ids).logits[:, :-1]
        metrics = opt.metrics()
        records.append({
            "step": step, "reward": float(rewards.mean()), "step_kl": token_kl(before, after, mask),
            "projected_fraction": metrics.get("gradproj/proma/projected_fraction", 0.0), "seconds": seconds,
        })
        if progress is not None:
            progress.update(1)
    opt.detach()
    return records


def run_quickstart(cfg: QuickstartConfig | None = None, show_progress: bool = True) -> dict[str, list[dict]]:
    """Run every strategy in ``cfg.strategies`` and return their per-step records."""
    cfg = cfg or QuickstartConfig()
    from tqdm.auto import tqdm

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = {}
    with tqdm(total=cfg.steps * len(cfg.strategies), desc="GRPO steps", disable=not show_progress) as bar:
        for strategy in cfg.strategies:
            bar.set_postfix_str(strategy)
            out[strategy] = run_strategy(cfg, strategy, bar)
    return out


def summary_table(results: dict[str, list[dict]]) -> str:
    """A plain-text table: first/last-quarter reward, mean per-step KL, projected fraction, time."""
    lines = [f"{'strategy':<12}{'reward first':>14}{'reward last':>13}{'mean step KL':>14}{'proj. fraction':>16}{'s/step':>8}"]
    for name, recs in results.items():
        q = max(1, len(recs) // 4)
        first = sum(r["reward"] for r in recs[:q]) / q
        last = sum(r["reward"] for r in recs[-q:]) / q
        kl = sum(r["step_kl"] for r in recs) / len(recs)
        frac = sum(r["projected_fraction"] for r in recs) / len(recs)
        secs = sum(r["seconds"] for r in recs) / len(recs)
        lines.append(f"{name:<12}{first:>14.3f}{last:>13.3f}{kl:>14.2e}{frac:>16.3f}{secs:>8.3f}")
    return "\n".join(lines)
