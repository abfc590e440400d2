"""What the wheel ships: every package folder of the project, under the names pyproject.toml maps
them to (a folder missing from the list installs a gradproj that fails at import -- it happened to
gradproj.work), and the metadata an index shows. scripts/check_wheel.sh builds and installs it."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_in_the_wheel():
    setuptools = PROJECT["tool"]["setuptools"]
    folders = {name: Path(path) for name, path in setuptools["package-dir"].items()}
    found = set()
    for top, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((top, *relative)))
    # a folder mapped on its own (gradproj.integrations -> integrations/) is not also a gradproj/ subfolder
    assert set(setuptools["packages"]) == found


def test_index_metadata():
    project = PROJECT["project"]
    for field in ("name", "version", "description", "readme", "requires-python", "license", "authors",
                  "keywords", "classifiers"):
        assert project.get(field), field
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
    assert any(c.startswith("Development Status ::") for c in project["classifiers"])
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {project['version']}" in changelog
