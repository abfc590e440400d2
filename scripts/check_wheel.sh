#!/usr/bin/env bash
# The install page's "From a wheel" block, run as written in a fresh environment (HOME is a temporary
# folder, so ~/rl-env is new; pip keeps the user's pip.conf), in a copy of the checkout's files (so
# the checkout's own dist/ and build/ are left alone), then the README's quick start with that
# environment's Python from an empty folder -- gradproj imported from the installed wheel, not from
# this checkout. Also checks the wheel's metadata (twine check). Needs .venv (scripts/bootstrap.sh)
# for the Markdown extraction.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gradproj-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# the checkout's files (tracked and new, not ignored) in a copy: the page's block builds there
mkdir -p "$WORK/src"
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$WORK/src"
if [ -f "$HOME/.config/pip/pip.conf" ] && [ -z "${PIP_CONFIG_FILE:-}" ]; then
  export PIP_CONFIG_FILE="$HOME/.config/pip/pip.conf"  # (local wheel folders, mirrors)
fi
extract() {  # extract PAGE LANGUAGE INDEX -> the block's text
  .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); from test_docs_quickstarts import code_blocks; print(code_blocks(sys.argv[1], sys.argv[2])[int(sys.argv[3])], end='')" "$@"
}
extract docs/install.md bash 1 > "$WORK/install.sh"
extract README.md python 0 > "$WORK/quickstart.py"
grep -q "python -m build" "$WORK/install.sh"   # the right block
echo "== the install page's wheel block:"; cat "$WORK/install.sh"
mkdir -p "$WORK/home"
(cd "$WORK/src" && HOME="$WORK/home" PIP_DISABLE_PIP_VERSION_CHECK=1 bash -euo pipefail "$WORK/install.sh" 2>&1 | { grep -v -i -e "warning: location" -e "^ *!!" || true; })
PY="$WORK/home/rl-env/bin/python"
"$PY" -m pip install -q twine 2>&1 | { grep -v -i -e "warning: location" -e "^ *!!" || true; }
"$PY" -m twine check --strict "$WORK"/src/dist/*.whl
mkdir -p "$WORK/empty"
cd "$WORK/empty"
"$PY" -c "import gradproj, sys; assert gradproj.__file__.startswith('$WORK/home/rl-env/'), gradproj.__file__; print('gradproj', gradproj.__version__, 'from', gradproj.__file__)"
"$PY" -c "import gradproj; names = set(dict(gradproj.get_plugin_manager().list_name_plugin())); assert {'proma', 'intra_proma', 'linear', 'experts'} <= names, names; print('built-in plugins registered by their entry points')"
OMP_NUM_THREADS=1 "$PY" "$WORK/quickstart.py" | tee "$WORK/quickstart.out"
cd "$ROOT"
.venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); from test_docs_quickstarts import check_quick_start_output; check_quick_start_output(open(sys.argv[1]).read()); print('the quick start trains from the installed wheel')" "$WORK/quickstart.out"
