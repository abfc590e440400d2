"""Independent training runs (a method x a random seed), run in parallel, each kept as it finishes.

A comparison is a list of `RunSpec`. Each run trains a fresh policy with
`gradproj.demo.grpo_loop.run_method` and is written, when it finishes, to
``<out>/runs/<label>/seed<k>.json`` (written to a temporary name, then renamed: a killed run leaves
no half file) with a *fingerprint* of everything that determines its numbers. Running the same
comparison again reuses every run whose file has the same fingerprint and trains only the rest, so
an interrupted demo resumes where it stopped and produces the same results.

**Threads.** Each run uses ``threads`` torch threads (default 1) and ``workers`` runs go at once
(default: one per available core). A small model gains little from a second thread, and a thread
that waits at every OpenMP barrier for a sibling the OS has descheduled -- on a machine where
anything else is running -- makes each step many times slower; single-threaded runs side by side
degrade gracefully instead. The thread count is part of the fingerprint: the same settings give
the same numbers bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import queue as queue_module
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunSpec", "Setup", "available_cores", "run_file", "load_finished", "execute"]

_FORMAT = 1


@dataclass(frozen=True)
class Setup:
    """What every run of a comparison shares: the policy, the task, the evaluation, the threads."""

    model: str | None = None
    smollm2: bool = False
    task: str = "addition"
    eval_samples: int = 0
    eval_count: int | None = None
    threads: int = 1

    @property
    def pretrained(self) -> bool:
        """Whether the policy is a pretrained language model (``--model`` or ``--smollm2``)."""
        return self.model is not None or self.smollm2


@dataclass
class RunSpec:
    """One training run: ``method`` with ``config`` (whose ``seed`` is the run's random seed),
    under a ``label`` its seeds share (the method name unless a comparison needs more), with
    ``tags`` copied into every record."""

    method: str
    config: Any  # GRPOLoopConfig
    label: str = ""
    tags: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.method

    @property
    def seed(self) -> int:
        """The run's random seed."""
        return int(self.config.seed)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "run"


def run_file(out: Path, spec: RunSpec) -> Path:
    """Where run ``spec`` is kept under ``out``."""
    return Path(out) / "runs" / _slug(spec.label) / f"seed{spec.seed}.json"


def fingerprint(spec: RunSpec, setup: Setup, policy: str) -> str:
    """A hash of everything that determines a run's numbers."""
    described = {"format": _FORMAT, "method": spec.method, "label": spec.label, "tags": spec.tags,
                 "config": asdict(spec.config), "setup": asdict(setup), "policy": policy, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_finished(out: Path, spec: RunSpec, expected: str | None) -> dict | None:
    """The kept result of ``spec`` (``{"records", "seconds", ...}``), or None when there is none or its
    fingerprint differs from ``expected`` (``None``: accept any)."""
    path = run_file(out, spec)
    if not path.exists():
        return None
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if expected is not None and kept.get("fingerprint") != expected:
        return None
    return kept


def _write_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".writing-", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# one run (in this process or in a worker)

_CONTEXT: dict[str, Any] = {}


def _prepare(setup: Setup) -> dict[str, Any]:
    """The policy factory, tokenizer, task and evaluator of ``setup`` (built once per process)."""
    if _CONTEXT.get("setup") != setup:
        from gradproj.demo.evaluation import make_evaluator
        from gradproj.demo.policies import load_policy
        from gradproj.demo.tasks import make_task

        factory, tok, description = load_policy(setup.model, setup.smollm2, progress=False)
        task = make_task(setup.task, few_shot=setup.pretrained, eval_count=setup.eval_count)
        _CONTEXT.clear()
        _CONTEXT.update(setup=setup, factory=factory, tok=tok, task=task, description=description,
                        evaluate=make_evaluator(tok, task, setup.pretrained, samples=setup.eval_samples))
    return _CONTEXT


def _train(spec: RunSpec, setup: Setup, path: Path, expected: str, on_step: Callable[[dict], None]) -> dict:
    from gradproj.demo.grpo_loop import run_method

    context = _prepare(setup)
    start = time.perf_counter()
    records = [{**r, "label": spec.label, "seed": spec.seed, **spec.tags}
               for r in run_method(spec.method, context["factory"], context["tok"], context["task"], spec.config,
                                   context["evaluate"], on_step)]
    kept = {"fingerprint": expected, "method": spec.method, "label": spec.label, "seed": spec.seed,
            "seconds": round(time.perf_counter() - start, 2), "threads": setup.threads, "records": records}
    _write_atomically(path, kept)
    return kept


_QUEUE: Any = None


def _worker_init(threads: int, events) -> None:
    global _QUEUE
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    _QUEUE = events


def _worker_run(spec: RunSpec, setup: Setup, path: str, expected: str) -> dict:
    key = (spec.label, spec.seed)
    kept = _train(spec, setup, Path(path), expected, lambda record: _QUEUE.put(key))
    return {k: v for k, v in kept.items() if k != "records"}


# ---------------------------------------------------------------------------------------------
# a whole comparison


def execute(specs: list[RunSpec], setup: Setup, out: Path, policy: str, *, workers: int | None = None,
            progress: bool = True, report_only: bool = False) -> dict[tuple[str, int], dict]:
    """Run (or reuse) every run of ``specs``; returns ``{(label, seed): kept}`` for the runs that exist.

    Args:
        setup: what the runs share; ``setup.threads`` torch threads per run.
        policy: the policy's description (part of the fingerprint: another policy is another run).
        workers: runs at once (default: `available_cores`, at most the number of runs to train);
            1 runs them in this process.
        report_only: train nothing; return the kept runs whose settings match (the others count as
            missing).
    """
    out = Path(out)
    results: dict[tuple[str, int], dict] = {}
    todo: list[tuple[RunSpec, str]] = []
    for spec in specs:
        expected = fingerprint(spec, setup, policy)
        kept = load_finished(out, spec, expected)  # a run with other settings is not this run, even to report
        if kept is not None:
            results[(spec.label, spec.seed)] = kept
        elif not report_only:
            todo.append((spec, expected))
    if not todo:
        return results
    from tqdm.auto import tqdm

    workers = max(1, min(workers or available_cores(), len(todo)))
    total = sum(spec.config.steps for spec, _ in todo)
    bar = tqdm(total=total, desc="GRPO steps", disable=not progress, smoothing=0.05)
    if results:
        bar.write(f"resuming: {len(results)} of {len(specs)} runs already done in {out / 'runs'}")

    def finished(spec: RunSpec, kept: dict) -> None:
        results[(spec.label, spec.seed)] = kept
        bar.set_postfix_str(f"{len(results)}/{len(specs)} runs done")
        bar.write(f"  {spec.label} seed {spec.seed}: {kept['seconds']:.0f} s")

    try:
        if workers == 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(setup.threads)
            try:
                for spec, expected in todo:
                    bar.set_postfix_str(f"{spec.label} seed {spec.seed}")
                    finished(spec, _train(spec, setup, run_file(out, spec), expected, lambda record: bar.update(1)))
            finally:
                torch.set_num_threads(previous)
        else:
            _prepare(setup)  # builds (and caches on disk) the policy once, before the workers load it
            context = multiprocessing.get_context("spawn")
            events = context.Queue()
            with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                     initargs=(setup.threads, events)) as pool:
                pending = {pool.submit(_worker_run, spec, setup, str(run_file(out, spec)), expected): spec
                           for spec, expected in todo}
                while pending:
                    done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    while True:
                        try:
                            events.get_nowait()
                        except queue_module.Empty:
                            break
                        bar.update(1)
                    for future in done:
                        spec = pending.pop(future)
                        future.result()  # a failed run raises here
                        kept = load_finished(out, spec, None)
                        if kept is None:
                            raise RuntimeError(f"run {spec.label} seed {spec.seed} finished but {run_file(out, spec)} is missing")
                        finished(spec, kept)
    finally:
        bar.close()
    return results
