"""Held-out evaluation of a policy: greedy accuracy, and accuracy of samples at the training temperature.

Greedy accuracy is what a user deploys; the sampled accuracy (the mean reward of ``samples``
completions per held-out problem at the temperature the policy is trained at) is what the RL
objective raises directly, and with several samples per problem it is the less noisy of the two.
The sampling draws from a fixed generator state (restored afterwards), so every method and every
evaluation of a run sees the same random numbers: differences between methods are the policies',
not the dice's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradproj.demo.adder import greedy_accuracy

__all__ = ["make_evaluator", "sampled_accuracy"]

#: The generator seed of every sampled evaluation (common random numbers across methods).
EVAL_SAMPLING_SEED = 20_261_203


@torch.no_grad()
def sampled_accuracy(model, tok, task, problems, samples: int, temperature: float = 1.0, batch: int = 512) -> float:
    """Mean reward of ``samples`` completions per problem, sampled at ``temperature`` (no top-k/top-p)
    from a fixed generator state; the global RNG is left as it was."""
    was_training = model.training
    model.eval()
    prompts = [(p, a) for p, a in problems for _ in range(samples)]
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SAMPLING_SEED)
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=task.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            total += sum(task.reward(t, a) for t, (_, a) in zip(texts, chunk))
    model.train(was_training)
    return total / max(len(prompts), 1)


@torch.no_grad()
def _greedy_reward(model, tok, task, problems) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(problems), 16):
        chunk = problems[start : start + 16]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=task.max_new_tokens, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        total += sum(task.reward(t, a) for t, (_, a) in zip(texts, chunk))
    model.train(was)
    return total / max(len(problems), 1)


def make_evaluator(tok, task, pretrained: bool, samples: int = 0, temperature: float = 1.0) -> Callable:
    """``evaluate(model)`` on the task's held-out problems.

    Returns the greedy accuracy alone when ``samples`` is 0, else ``{"accuracy": greedy,
    "sampled_accuracy": ...}`` with ``samples`` completions per problem at ``temperature``.
    The default policy ends its answers with EOS, so it is scored greedily by whole-completion exact
    match; pretrained models by the task's own answer parser.
    """
    held_out = task.eval_problems()

    def evaluate(model):
        if pretrained:
            greedy = _greedy_reward(model, tok, task, held_out)
        else:
            greedy = greedy_accuracy(model, tok, held_out, max_new_tokens=task.max_new_tokens)
        if samples <= 0:
            return greedy
        return {"accuracy": greedy, "sampled_accuracy": sampled_accuracy(model, tok, task, held_out, samples, temperature)}

    return evaluate
