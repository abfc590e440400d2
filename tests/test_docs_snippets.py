"""The runnable snippets the docs pages include (pymdownx.snippets) run as written."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ROOT / "docs" / "snippets"
PAGES = {
    "none": "docs/strategies/none.md",
    "proma": "docs/strategies/proma.md",
    "intra_proma": "docs/strategies/intra_proma.md",
    "variance_scaling": "docs/strategies/variance_scaling.md",
    "isopo": "docs/strategies/isopo.md",
    "diagnostics": "docs/guides/stacking.md",
    "plugin": "docs/guides/write-a-strategy.md",
    "host_syncs": "docs/guides/write-a-strategy.md",
    "monitoring": "docs/guides/monitoring.md",
    "sgrpo": "docs/methods/sgrpo.md",
    "dmpo": "docs/methods/dmpo.md",
    "tspmo": "docs/methods/tspmo.md",
}


def program(name: str) -> str:
    """What the page shows: the shared set-up, then the page's snippet."""
    return (SNIPPETS / "setup.py").read_text() + "\n" + (SNIPPETS / f"{name}.py").read_text()


def test_every_page_includes_its_snippet():
    for name, page in PAGES.items():
        text = (ROOT / page).read_text()
        assert f'--8<-- "docs/snippets/{name}.py"' in text, page
        assert '--8<-- "docs/snippets/setup.py"' in text, page


def test_plain_pytorch_guide_loop_runs(capsys):
    page = (ROOT / "docs" / "guides" / "plain-pytorch.md").read_text()
    assert '--8<-- "docs/snippets/plain_pytorch_loop.py"' in page
    code = (SNIPPETS / "plain_pytorch_loop.py").read_text()
    exec(compile(code, "docs/snippets/plain_pytorch_loop.py", "exec"), {"__name__": "__main__"})
    steps = re.findall(r"step \d+: reward ([\d.]+), projected ([\d.]+)", capsys.readouterr().out)
    rewards, projected = [float(r) for r, _ in steps], [float(p) for _, p in steps]
    assert len(steps) == 8 and min(rewards) > 0 and min(projected) > 0, steps
    assert sum(rewards[-3:]) > sum(rewards[:3]), rewards  # it learns, not only runs


def test_layer_handler_guide_example_runs(capsys):
    """The handler page's example registers a handler, covers its module and matches autograd."""
    page = (ROOT / "docs" / "guides" / "write-a-layer-handler.md").read_text()
    assert '--8<-- "docs/snippets/layer_handler.py"' in page
    code = (SNIPPETS / "layer_handler.py").read_text()
    exec(compile(code, "docs/snippets/layer_handler.py", "exec"), {"__name__": "__main__"})
    assert "gradient equals plain autograd's" in capsys.readouterr().out
    assert "layer_scale" not in dict(gradproj_plugins())


def gradproj_plugins():
    import gradproj

    return gradproj.get_plugin_manager().list_name_plugin()


def test_trl_guide_example_runs(tmp_path):
    page = (ROOT / "docs" / "guides" / "trl.md").read_text()
    assert '--8<-- "docs/snippets/trl_example.py"' in page
    result = subprocess.run([sys.executable, str(SNIPPETS / "trl_example.py")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gradproj/proma/projected_fraction" in result.stdout


@pytest.mark.parametrize("name", [n for n in PAGES if n != "plugin"])
def test_strategy_page_snippet_runs(name, capsys):
    exec(compile(program(name), f"docs/snippets/{name}.py", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip()


def test_write_a_strategy_walkthrough(tmp_path):
    """Install the example plugin package as the page says, then use its strategies by name in a
    fresh interpreter: the entry point alone makes them known to gradproj."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "examples" / "gradproj-example-plugin", source)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", program("plugin")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "G <- decay G + g_m" in result.stdout
    # without the package the name is unknown, with a clear message
    result = subprocess.run([sys.executable, "-c", program("plugin")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "unknown gradproj strategy" in result.stderr and "entry point" in result.stderr
