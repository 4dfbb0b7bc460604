#!/usr/bin/env bash
# The live-ComfyUI tests (tests/test_comfyui_live.py) against the ComfyUI source beside this repository.
#
#   bash .ci/comfyui_live.sh [pytest args...]      (make test-comfyui; .ci/run calls it after make test)
#
# COMFYUI_SRC (default: ../shared/comfyui, relative to this repository) is read-only where CI sees it, so it is
# copied to .cache/comfyui/src on every run. ComfyUI's own Python environment (its requirements.txt minus
# torchaudio, which pulls its own torch and torchvision, plus this pack's requirements.txt) is built once in
# .cache/comfyui/venv and reused while both requirement files are unchanged (a hash of them is its stamp).
# DREAMFLOW_REQUIRE_COMFYUI=1 makes the live tests fail instead of skipping when no ComfyUI is found.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SRC=${COMFYUI_SRC:-$ROOT/../shared/comfyui}
CACHE=$ROOT/.cache/comfyui
PYTHON=${PYTHON:-python3}
PY=${PY:-$ROOT/.venv/bin/python}

if [ ! -f "$SRC/main.py" ]; then
    echo "comfyui_live: no ComfyUI source at $SRC (set COMFYUI_SRC)" >&2
    exit 2
fi
mkdir -p "$CACHE"

# 1. ComfyUI's venv, once per requirements hash.
want=$(cat "$SRC/requirements.txt" requirements.txt | sha256sum | cut -c1-16)
if [ "$(cat "$CACHE/venv/.stamp" 2>/dev/null)" != "$want" ]; then
    t0=$(date +%s)
    echo "comfyui_live: building ComfyUI's venv in $CACHE/venv (once; several minutes)"
    rm -rf "$CACHE/venv"
    "$PYTHON" -m venv "$CACHE/venv"
    grep -v -i '^torchaudio' "$SRC/requirements.txt" > "$CACHE/requirements-comfyui.txt"
    "$CACHE/venv/bin/python" -m pip install -q -r "$CACHE/requirements-comfyui.txt" -r requirements.txt
    echo "$want" > "$CACHE/venv/.stamp"
    echo "comfyui_live: venv ready in $(( $(date +%s) - t0 )) s"
fi

# 2. A fresh writable copy of the source (the server writes user data and a database beside it).
rm -rf "$CACHE/src"
cp -r "$SRC" "$CACHE/src"
chmod -R u+w "$CACHE/src"

# 3. The live tests, not skipped.
export COMFYUI_DIR=$CACHE/src COMFYUI_PYTHON=$CACHE/venv/bin/python DREAMFLOW_REQUIRE_COMFYUI=1
"$PY" -m pytest -q -m comfyui "$@" tests/test_comfyui_live.py
