#!/usr/bin/env bash
# Make sure the LiteLLM proxy the router bench compares against is installed:
# a Python virtual environment under the target directory (not in git) with
# `litellm[proxy]` from the ordinary Python package index.
#
#   scripts/litellm-venv.sh        install when missing; print the proxy's executable
#
# Pin a version with LITELLM_SPEC (default `litellm[proxy]`, the newest).
# Idempotent: an environment whose proxy already starts is left alone. Exits
# non-zero, saying why, when Python, venv or the install fails; the bench then
# reports the router alone and says LiteLLM is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="$TARGET_DIR/bench/litellm/venv"
SPEC="${LITELLM_SPEC:-litellm[proxy]}"
PYTHON="${PYTHON:-python3}"

say() {
    echo "litellm-venv: $*" >&2
}

# The package and the proxy's server dependencies are there (importing the
# proxy itself takes a minute on a busy machine: the bench finds out if it fails).
installed() {
    [[ -x "$VENV/bin/litellm" ]] &&
        "$VENV/bin/python" -c 'import fastapi, uvicorn, backoff, yaml' >/dev/null 2>&1
}

if installed; then
    say "LiteLLM already installed in $VENV"
else
    command -v "$PYTHON" >/dev/null 2>&1 || { say "error: $PYTHON not found"; exit 1; }
    if [[ ! -x "$VENV/bin/pip" ]]; then
        say "creating $VENV"
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV" || { say "error: cannot create a venv (apt-get install python3-venv?)"; exit 1; }
    fi
    say "installing $SPEC (a few minutes the first time)"
    "$VENV/bin/pip" install --quiet "$SPEC" || { say "error: pip install $SPEC failed"; exit 1; }
    installed || { say "error: $VENV/bin/litellm does not start"; exit 1; }
fi
say "litellm $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')"
echo "$VENV/bin/litellm"
