"""The built site as a reader sees it: every formula typeset by the vendored KaTeX (offline, no CDN),
no raw Sphinx roles or garbled sections in the API reference -- checked in a real browser (Debian's
Chromium, headless; ``scripts/bootstrap_browser.sh`` installs it, and the README's test command runs
that script).

Set ``GRADPROJ_SCREENSHOTS=<folder>`` to keep screenshots of the concepts page, a strategy page and
the API reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]
SCREENSHOT_PAGES = ["concepts/proma", "strategies/proma", "reference/api"]


def chromium() -> str:
    for name in (os.environ.get("GRADPROJ_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    pytest.fail("no Chromium to check the rendered docs with: run `bash scripts/bootstrap_browser.sh` "
                "(Debian's chromium package), or point GRADPROJ_CHROMIUM at a Chromium binary")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Open ``page`` (a file: URL, so nothing but the site's own files can load) in headless Chromium."""
    command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=10000", *extra, page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rendered_dom(page: Path, tmp_path: Path) -> str:
    return browse(page, tmp_path, "--dump-dom").stdout


class Formulas(HTMLParser):
    """Walks a rendered DOM: each ``arithmatex`` element (a formula the Markdown wrote), whether
    KaTeX typeset it or reported an error, and the text a reader sees outside code."""

    HIDDEN = {"script", "style", "code", "pre", "annotation", "textarea"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, set[str]]] = []
        self.formulas: list[dict] = []
        self.errors: list[str] = []
        self.visible: list[str] = []  # outside code: where raw TeX would show
        self.text: list[str] = []  # everything a reader sees, code included

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        if tag in self.VOID:
            return
        if "arithmatex" in classes:
            self.formulas.append({"typeset": False, "source": ""})
        if self.formulas and "katex" in classes and any("arithmatex" in c for _, c in self.stack + [(tag, classes)]):
            self.formulas[-1]["typeset"] = True
        if "katex-error" in classes:
            self.errors.append("")
        self.stack.append((tag, classes))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self.stack and any("katex-error" in c for _, c in self.stack) and self.errors:
            self.errors[-1] += data
        if self.stack and any("arithmatex" in c for _, c in self.stack) and self.formulas:
            if not any(t == "annotation" for t, _ in self.stack):
                self.formulas[-1]["source"] += data
        if not any(t in self.HIDDEN for t, _ in self.stack):
            self.visible.append(data)
        if not any(t in ("script", "style", "annotation") for t, _ in self.stack):
            self.text.append(data)


def pages_with_formulas(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("index.html") if 'class="arithmatex"' in p.read_text())


def test_the_renderer_is_vendored_not_fetched(site):
    """The pages load KaTeX from the site itself: no CDN, so formulas render offline."""
    page = (site / "concepts" / "proma" / "index.html").read_text()
    for asset in ("assets/vendor/katex/katex.min.js", "assets/vendor/katex/contrib/auto-render.min.js",
                  "assets/javascripts/katex-init.js", "assets/vendor/katex/katex.min.css"):
        assert asset in page, asset
        assert (site / asset).is_file(), asset
    assert "cdn.jsdelivr" not in page and "unpkg.com" not in page and "mathjax" not in page.lower()
    fonts = list((site / "assets" / "vendor" / "katex" / "fonts").glob("*.woff2"))
    assert len(fonts) >= 20


def test_every_formula_is_typeset_in_a_browser(site, tmp_path):
    pages = pages_with_formulas(site)
    names = {p.parent.relative_to(site).as_posix() for p in pages}
    assert {"concepts/proma", "strategies/proma", "strategies/intra_proma"} <= names, names
    total = 0
    for page in pages:
        dom = Formulas()
        dom.feed(rendered_dom(page, tmp_path))
        where = page.parent.relative_to(site).as_posix()
        assert dom.formulas, f"{where}: no formula elements in the rendered DOM"
        raw = [f["source"][:80] for f in dom.formulas if not f["typeset"]]
        assert not raw, f"{where}: {len(raw)} formulas not typeset, e.g. {raw[:3]}"
        assert not dom.errors, f"{where}: KaTeX could not parse {dom.errors[:3]}"
        text = "".join(dom.visible)
        assert "\\(" not in text and "\\[" not in text, f"{where}: raw TeX delimiters left in the page"
        total += len(dom.formulas)
    assert total >= 100, total


def test_api_reference_reads_cleanly(site, tmp_path):
    dom = Formulas()
    dom.feed(rendered_dom(site / "reference" / "api" / "index.html", tmp_path))
    text = " ".join("".join(dom.text).split())
    for role in (":class:", ":func:", ":meth:", ":mod:", ":attr:", ":data:"):
        assert role not in text, f"raw Sphinx role {role} in the API reference"
    # wrap's Returns section: the type, then the prose (not the prose's first word read as a name)
    start = text.index("Returns:", text.index("gradproj.wrap("))
    assert text[start:].startswith("Returns: GradProjOptimizer – The GradProjOptimizer; use it exactly"), text[start:start + 200]


def test_screenshots(site, tmp_path):
    """Screenshots of the pages the issue names; kept in $GRADPROJ_SCREENSHOTS when set."""
    keep = Path(os.environ["GRADPROJ_SCREENSHOTS"]) if os.environ.get("GRADPROJ_SCREENSHOTS") else tmp_path
    keep.mkdir(parents=True, exist_ok=True)
    for name in SCREENSHOT_PAGES:
        png = keep / (name.replace("/", "_") + ".png")
        browse(site / name / "index.html", tmp_path, f"--screenshot={png}", "--window-size=1280,1800")
        assert png.stat().st_size > 20_000, png  # a rendered page, not a blank one
