#!/usr/bin/env bash
# Validate and measure the GPU path on a lent GPU machine, in one command (under 5 minutes):
#   bash benchmarks/gpu_check.sh [--variants ognet ...]
# Writes benchmarks/results/gpu.md (and, where the device tool sets $OUT, a copy there). The machine
# has its own Python with torch, Triton, numpy, tensorboard, pyyaml, tqdm, fsspec, scipy and
# fetches nothing: the project is installed without dependencies, and pure-Python wheels it
# lacks travel in .whl/ (carried): webdataset, braceexpand; for DeepSpeed also deepspeed, hjson,
# pydantic, pydantic-core (cp312), annotated-types, typing-inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ognet-site .whl/*.whl
  export PYTHONPATH=/tmp/ognet-site${PYTHONPATH:+:$PYTHONPATH}
fi
# the editable install gives the console scripts; the repo on the path is enough for the rest
"$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "gpu_check: editable install failed, using PYTHONPATH"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
timeout 300 "$PY" benchmarks/gpu_check.py --out benchmarks/results/gpu.md "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.md "$OUT/gpu.md"; fi
