#!/usr/bin/env bash
# Make sure llama.cpp is installed for the inference bench, which runs it on the
# same GGUF model as Colony's embedded engine to compare the two side by side.
# Not a product dependency: a Python virtual environment under target/ (not in
# git) with a pinned `llama-cpp-python`, which compiles llama.cpp from source.
#
#   scripts/llamacpp-venv.sh       install when missing; print the venv's python
#
# Pin another version with LLAMACPP_SPEC. Idempotent: an environment that
# already imports llama_cpp is left alone. Exits non-zero, saying why, when
# Python, venv or the build fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=target/llamacpp-env
SPEC="${LLAMACPP_SPEC:-llama-cpp-python==0.3.36}"
PYTHON="${PYTHON:-python3}"

say() {
    echo "llamacpp-venv: $*" >&2
}

installed() {
    "$VENV/bin/python" -c 'import llama_cpp' >/dev/null 2>&1
}

if installed; then
    say "llama_cpp already installed in $VENV"
else
    command -v "$PYTHON" >/dev/null 2>&1 || { say "error: $PYTHON not found"; exit 1; }
    if [[ ! -x "$VENV/bin/pip" ]]; then
        say "creating $VENV"
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV" || { say "error: cannot create a venv (apt-get install python3-venv?)"; exit 1; }
    fi
    # A source build for this CPU (needs a C++ compiler; pip fetches CMake as a
    # wheel). AMX stays off: on CPUs that have it, llama.cpp's AMX matmul
    # segfaults on the first multi-token batch (llama.cpp issue 20824). No pip
    # cache, so that a wheel built without these flags is never reused.
    amx_off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    say "installing $SPEC: compiles llama.cpp, about 7 minutes on 2 idle cores (longer on a busy machine)"
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DCMAKE_C_FLAGS='$amx_off' -DCMAKE_CXX_FLAGS='$amx_off'" \
        "$VENV/bin/pip" install --quiet --no-cache-dir "$SPEC" ||
        { say "error: pip install $SPEC failed (g++ missing?)"; exit 1; }
    installed || { say "error: $VENV/bin/python cannot import llama_cpp"; exit 1; }
fi
say "llama_cpp $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
echo "$VENV/bin/python"
