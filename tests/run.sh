#!/usr/bin/env bash
# The test command: sets up what it needs, then runs the whole suite.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh dev,deepspeed
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"
# Style first: lint and format are part of the suite (configured in pyproject.toml).
"$OGNET_PY" -m ruff check --quiet .
"$OGNET_PY" -m ruff format --check --quiet .
exec "$OGNET_PY" -m pytest tests "$@"
