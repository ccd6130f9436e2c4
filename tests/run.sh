#!/usr/bin/env bash
# The test command: sets up what it needs, then runs the whole suite.
#   bash tests/run.sh [pytest args]      (OGNET_TEST_WORKERS=N: N pytest-xdist workers, default 2)
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
# Two workers (pytest-xdist; tests/conftest.py keeps a module on one worker when its tests share a
# module fixture, so that it is made once), then the tests
# that assert wall-clock bounds alone, so that the other worker's load cannot make them fail.
# OGNET_TEST_WORKERS=0 runs everything in one process.
workers="${OGNET_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec "$OGNET_PY" -m pytest tests "$@"
fi
status=0
"$OGNET_PY" -m pytest tests -n "$workers" --dist loadgroup -m "not serial" "$@" || status=$?
rc=0
"$OGNET_PY" -m pytest tests -m serial "$@" || rc=$?
[ "$rc" = 5 ] || [ "$rc" = 0 ] || status=$rc  # 5: the arguments selected no serial test
exit "$status"
