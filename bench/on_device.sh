#!/usr/bin/env bash
# On the lent GPU machine (device tool, carry [".whl"]): install the carried wheels (`make gpu-wheels` here) into
# /tmp/site, then run the arguments with them on PYTHONPATH and unbuffered output, e.g.
#   bash bench/on_device.sh python3 bench/bench_gpu.py --stages nerf mesh --no-pieces --iters 10
#   bash bench/on_device.sh make gpu-test PY=python3
set -euo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'make gpu-wheels' here and carry .whl" >&2; exit 2; }
# A process killed while nvdiffrast JIT-builds leaves its lock behind, and the next build waits on it for good.
rm -f "$HOME"/.cache/torch_extensions/*/nvdiffrast*/lock 2>/dev/null || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$@"
