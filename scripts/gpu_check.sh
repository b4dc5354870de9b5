#!/usr/bin/env bash
# make gpu-check: benchmarks/gpu_check.py on a GPU machine, from this tree, with the machine's own torch.
# Nothing is downloaded. Packages lit-ddpm needs that the machine lacks come from wheels in .whl/ (made where
# there is a network: `make gpu-wheels`, then carry .whl/ along), installed into a folder of their own.
#   make gpu-check                    # the results: benchmarks/results/gpu-check.json (rewritten row by row)
#   make gpu-check ARGS="--no-compile --peak-tflops 165"
#   DEVICE=cpu JSON=/tmp/check.json ARGS="--tiny --no-compile" scripts/gpu_check.sh   # the test suite's smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lit-ddpm-wheels .whl/*.whl
    export PYTHONPATH="/tmp/lit-ddpm-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import jsonargparse, lightning, torchdata, torch_fidelity, torchmetrics, rich" 2> /dev/null; then
    echo "gpu-check: $PYTHON lacks a package lit-ddpm needs; make gpu-wheels where there is a network, carry .whl/" >&2
    exit 2
fi
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
fi
# shellcheck disable=SC2086  # ARGS holds several arguments
exec "$PYTHON" -m benchmarks.gpu_check --device "$DEVICE" --json "${JSON:-benchmarks/results/gpu-check.json}" ${ARGS:-}
