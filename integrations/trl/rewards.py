"""Reward functions for TRL recipes, by import path (``reward_funcs: [gradproj.integrations.trl.rewards.NAME]``).

TRL calls each with the batch's ``completions`` (strings, or chat messages) and the data set's other
columns as keyword arguments; they return one float per completion.
"""

from __future__ import annotations

import re

__all__ = ["final_number_match"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return " ".join(str(message.get("content", "")) for message in completion if isinstance(message, dict))
    return str(completion)


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def final_number_match(completions, answer, **kwargs) -> list[float]:
    """1.0 when the last number of the completion equals the answer's final number (GSM8K's
    ``#### 42`` convention, or the answer itself), else 0.0."""
    out = []
    for completion, target in zip(completions, answer):
        target_text = str(target).split("####")[-1]
        want, got = _last_number(target_text), _last_number(_text(completion))
        out.append(1.0 if want is not None and got is not None and float(got) == float(want) else 0.0)
    return out
