"""verl tests: run in .venv-verl (scripts/test.sh), one process = one gloo "cluster" of world size 1."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/helpers.py


@pytest.fixture(scope="session", autouse=True)
def verl_cpu():
    """verl on the CPU: platform, env, gloo (before anything imports verl's engine)."""
    from gradproj.testing.verl_cpu import start

    start()
    import gradproj.integrations.verl  # noqa: F401 - what external_lib does in each worker
