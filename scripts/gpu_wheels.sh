#!/usr/bin/env bash
# make gpu-wheels: the wheels `make gpu-check` needs on a GPU machine without a network whose image holds torch,
# torchvision, lightning, torchmetrics, rich, numpy, scipy and PyYAML but not these. Each at the version this
# .venv has, for Python 3.12 on Linux x86-64 (the lent GPU machines'); PY=3.11 for another Python. They land in
# .whl/ (ignored by git), which travels with the tree to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-$([ -x .venv/bin/pip ] && echo .venv/bin/pip || echo "python3 -m pip")}
PY=${PY:-3.12}
mkdir -p .whl
for name in jsonargparse docstring-parser typeshed-client torchdata torch-fidelity; do
    version=$($PIP show "$name" | sed -n 's/^Version: //p')
    $PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$name==$version"
done
ls .whl
