#!/usr/bin/env bash
# Submit a training job and an evaluation job that starts only when training has succeeded.
#
#   slurm/submit.sh [SBATCH_OPTION ...] -- --config FILE [key=value ...]
#
#   slurm/submit.sh --nodes=2 --gpus-per-node=8 --partition=gpu --account=me --time=2-00:00:00 -- \
#       --config configs/market/ognet-circle.yaml run_dir=runs/market-ognet
#
# The sbatch options apply to both jobs; OGNET_EVAL_SBATCH adds options for the evaluation only
# (e.g. OGNET_EVAL_SBATCH="--nodes=1 --time=2:00:00"). The config and overrides are checked here
# first. Training writes <run_dir>; the evaluation reads <run_dir>/model_last.pt and writes
# <run_dir>/eval. Logs: runs/slurm-logs/ below the current folder (the submit directory).
# Prints the two job ids.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { echo "usage: $0 [SBATCH_OPTION ...] -- --config FILE [key=value ...]" >&2; exit 2; }
sbatch_opts=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do sbatch_opts+=("$1"); shift; done
[ $# -gt 0 ] || usage
shift
config=() overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    --config) [ $# -ge 2 ] || usage; config=(--config "$2"); shift 2 ;;
    --config=*) config=(--config "${1#--config=}"); shift ;;
    -*) echo "unknown option $1 (sbatch options go before --)" >&2; usage ;;
    *) overrides+=("$1"); shift ;;
  esac
done

if [ -n "${OGNET_PY:-}" ]; then py=$OGNET_PY
elif [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python
else py=python3
fi
# Fails here, with the config's own error message, rather than in a queued job.
run_dir=$("$py" -c 'import sys
from ognet.config import load_config
print(load_config(sys.argv[1] or None, sys.argv[2:]).run_dir)' "${config[1]:-}" "${overrides[@]}")

export OGNET_ROOT=$root
mkdir -p runs/slurm-logs
train=$(sbatch --parsable "${sbatch_opts[@]}" "$root/slurm/train.sbatch" "${config[@]}" "${overrides[@]}")
# shellcheck disable=SC2086  # OGNET_EVAL_SBATCH is a list of options
evaluation=$(sbatch --parsable --dependency="afterok:${train%%;*}" --kill-on-invalid-dep=yes \
  "${sbatch_opts[@]}" ${OGNET_EVAL_SBATCH:-} "$root/slurm/evaluate.sbatch" \
  --checkpoint "$run_dir/model_last.pt" "${config[@]}" "${overrides[@]}" "run_dir=$run_dir/eval")
echo "training   job ${train%%;*}  -> $run_dir  (logs: runs/slurm-logs/*-<job id>.out)"
echo "evaluation job ${evaluation%%;*}  -> $run_dir/eval  (after training succeeds)"
