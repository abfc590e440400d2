#!/usr/bin/env bash
# Chromium for the docs' browser test (tests/test_docs_site.py: formulas typeset, API reference
# clean): Debian's chromium package, installed once. Needs root (or sudo) and Debian's package index.
set -euo pipefail
for browser in chromium chromium-browser google-chrome; do
  if command -v "$browser" >/dev/null 2>&1; then exit 0; fi
done
if [ -n "${GRADPROJ_CHROMIUM:-}" ]; then exit 0; fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
chromium --version
