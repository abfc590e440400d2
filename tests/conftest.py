import importlib.metadata
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# verl pins transformers<5.11, so tests/verl run in their own environment (.venv-verl); the README's
# test command (scripts/test.sh) runs both suites.
def _installed(distribution: str) -> bool:
    try:  # (not find_spec: tests/ is on sys.path, so tests/verl would pass for a namespace package)
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


VERL_ENV = _installed("verl")
collect_ignore = [] if VERL_ENV else ["verl"]


def pytest_report_header(config):
    if not VERL_ENV:
        return "tests/verl: not in this environment (no verl); scripts/test.sh runs them in .venv-verl"
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
