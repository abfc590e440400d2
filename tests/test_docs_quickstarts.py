"""Every Python block a newcomer copies from README.md, docs/index.md and docs/getting-started.md is
a complete program that runs as written: the blocks are extracted from the Markdown itself (with the
``--8<--`` includes the docs build resolves), not kept as a second copy, and each runs in a fresh
interpreter from an empty folder. The quick start must train for real: a non-zero reward that
rises and a projected fraction above zero.

``scripts/check_wheel.sh`` runs the README's quick start the same way against the built wheel.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/index.md", "docs/getting-started.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
INCLUDE = re.compile(r'^--8<-- "([^"]+)"\s*$', re.M)


def code_blocks(page: str, language: str = "python") -> list[str]:
    """The fenced ``language`` blocks of a Markdown file, snippet includes resolved as the docs build does."""
    text = (ROOT / page).read_text()
    blocks = []
    for lang, body in FENCE.findall(text):
        if lang == language:
            blocks.append(INCLUDE.sub(lambda m: (ROOT / m.group(1)).read_text().rstrip("\n"), body))
    return blocks


def launcher(program: str) -> list[str]:
    """How the block says to run it: a first-line ``# name.py -- run: torchrun ... name.py`` comment,
    else plain ``python``."""
    first = program.splitlines()[0]
    match = re.match(r"#\s*(\S+\.py)\s*--\s*run:\s*(.+)$", first)
    if not match:
        return [sys.executable]
    words = shlex.split(match.group(2))
    assert words[0] == "torchrun" and words[-1] == match.group(1), first
    return [sys.executable, "-m", "torch.distributed.run", *words[1:-1]]


def run_program(program: str, folder: Path, python: str | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "program.py"
    script.write_text(program)
    command = launcher(program)
    if python is not None:
        command[0] = python
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    result = subprocess.run([*command, str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def distinct_programs() -> dict[str, list[str]]:
    """{program: [where it is shown]} -- the README and the docs show the quick start once each."""
    programs: dict[str, list[str]] = {}
    for page in PAGES:
        for n, block in enumerate(code_blocks(page)):
            programs.setdefault(block, []).append(f"{page}#{n}")
    return programs


def check_quick_start_output(out: str) -> None:
    """The quick start's printout: 10 steps, reward non-zero and rising, PROMA projecting."""
    steps = re.findall(r"step (\d+): reward ([\d.]+), projected fraction ([\d.]+)", out)
    assert len(steps) == 10, out
    rewards = [float(r) for _, r, _ in steps]
    projected = [float(p) for _, _, p in steps]
    assert min(rewards) > 0, rewards
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    assert min(projected) > 0, projected


def test_the_pages_show_complete_programs():
    programs = distinct_programs()
    assert len(programs) >= 5, list(programs.values())
    for program, where in programs.items():
        tree = ast.parse(program, str(where))
        elided = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value is Ellipsis]
        assert not elided, f"{where}: an elision (...) is not a program"
    readme = code_blocks("README.md")
    # GitHub shows the README without the docs' includes: its quick start is the docs' snippet, verbatim
    assert readme[0].rstrip("\n") == (ROOT / "docs/snippets/quickstart.py").read_text().rstrip("\n")
    assert any("quickstart.py" in line for line in (ROOT / "docs/index.md").read_text().splitlines())


@pytest.mark.parametrize("number", range(len(distinct_programs())))
def test_program_runs_as_written(number, tmp_path):
    program, where = list(distinct_programs().items())[number]
    out = run_program(program, tmp_path)
    assert out.strip(), f"{where} printed nothing"
    if "projected fraction" in program and "reward" in program:
        check_quick_start_output(out)


def test_quick_start_is_deterministic(tmp_path):
    """Same program, same numbers: the quick start is seeded."""
    program = code_blocks("README.md")[0]
    assert run_program(program, tmp_path / "a") == run_program(program, tmp_path / "b")
