"""The layout is the architecture: no import in gradproj/ runs back up the layers, and no module
grows past what a reader takes in at once."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "gradproj"

#: what each part of the core may import (besides itself), bottom up
ALLOWED = {
    "errors": set(),
    "linalg": {"errors"},
    "plugins": {"errors"},
    "diagnostics": {"errors", "linalg"},
    "work": {"errors", "linalg"},
    "capture": {"errors", "linalg", "work", "plugins", "diagnostics"},
    "strategies": {"errors", "linalg", "work", "plugins"},
    "config": {"errors", "work", "plugins"},
    "state": {"errors", "config"},
    "microbatch_handle": {"errors"},
    "optimizer": {"errors", "capture", "config", "state", "microbatch_handle"},
    "wrapping": {"errors", "capture", "config", "optimizer", "plugins"},
}
#: the package itself re-exports the public API
ALLOWED["__init__"] = set(ALLOWED) - {"__init__"}
MAX_LINES = 400


def part(path: Path) -> str:
    """``capture`` for gradproj/capture/engine.py, ``config`` for gradproj/config.py."""
    relative = path.relative_to(CORE).parts
    return relative[0] if len(relative) > 1 else Path(relative[0]).stem


def imported_parts(path: Path) -> set[str]:
    """The parts of gradproj (and any other top-level package) a module imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "gradproj":
                found.add(pieces[1] if len(pieces) > 1 else "__init__")
    return found


def test_every_part_of_the_core_has_a_rule():
    assert {part(p) for p in CORE.rglob("*.py")} <= set(ALLOWED)


def test_no_import_runs_back_up_the_layers():
    wrong = []
    for path in sorted(CORE.rglob("*.py")):
        mine = part(path)
        for other in imported_parts(path) - {mine}:
            if other not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(CORE.parent)} imports gradproj.{other}")
    assert not wrong, "\n".join(wrong)


def test_the_core_never_imports_an_integration_or_the_demo():
    for path in CORE.rglob("*.py"):
        assert not imported_parts(path) & {"integrations", "demo", "testing"}, path


def test_no_module_of_the_core_is_longer_than_one_sitting():
    long = {str(p.relative_to(CORE)): n for p in CORE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_package_says_what_lives_there():
    for init in CORE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, init
