#!/usr/bin/env bash
# The test command: sets up what it needs, then runs the whole suite.
#   bash tests/run.sh [pytest args]      (OGNET_TEST_WORKERS=N: N pytest-xdist workers, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh dev,deepspeed
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"

# System packages the tests use, installed before pytest starts: a real SLURM cluster on localhost
# (slurm-wlm, munge). Without root they cannot be installed: the SLURM tests then skip, saying so
# (and fail under CI, where nothing may skip).
if ! PATH="$PATH:/usr/sbin:/sbin" command -v slurmctld >/dev/null || ! PATH="$PATH:/usr/sbin:/sbin" command -v munged >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[tests] installing slurm-wlm and munge (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null
  else
    echo "[tests] slurm-wlm and munge are missing and this is not root: the SLURM tests will not run" >&2
  fi
fi

# Style first: lint and format are part of the suite (configured in pyproject.toml).
"$OGNET_PY" -m ruff check --quiet .
"$OGNET_PY" -m ruff format --check --quiet .
# Three workers on the 2 cores CI has (pytest-xdist): multi-process tests spend part of their time
# waiting on their processes, and a third worker fills those gaps (the parallel part of the same
# code, quiet: 472 s on 2 workers, 420 s on 3). tests/conftest.py keeps a module on one worker when its tests share a module fixture,
# so that it is made once, and hands out the slow tests first (hence --no-loadscope-reorder). Then
# the tests that assert wall-clock bounds run alone, so that the others' load cannot make them fail.
# OGNET_TEST_WORKERS=0 runs everything in one process.
workers="${OGNET_TEST_WORKERS:-3}"
if [ "$workers" = 0 ]; then
  exec "$OGNET_PY" -m pytest tests "$@"
fi
status=0
"$OGNET_PY" -m pytest tests -n "$workers" --dist loadgroup --no-loadscope-reorder -m "not serial" "$@" || status=$?
rc=0
# Only the files that hold serial tests: collecting all of tests/ again would cost seconds of the
# serial part (a file marks them with `pytest.mark.serial`).
mapfile -t serial_files < <(grep -l "mark\.serial" tests/test_*.py)
"$OGNET_PY" -m pytest "${serial_files[@]}" -m serial "$@" || rc=$?
[ "$rc" = 5 ] || [ "$rc" = 0 ] || status=$rc  # 5: the arguments selected no serial test
exit "$status"
