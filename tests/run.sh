#!/usr/bin/env bash
# The test command: sets up what it needs, then runs the whole suite.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh dev
exec "$OGNET_PY" -m pytest tests "$@"
