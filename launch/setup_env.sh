#!/usr/bin/env bash
# Prepares everything ognet needs on a fresh machine, and does nothing that is already done.
#   usage: source launch/setup_env.sh [extras]      (extras: e.g. "dev,deepspeed")
# Afterwards $OGNET_PY is the virtual environment's python.
# Environment: OGNET_VENV (default .venv), OGNET_TORCH (torch requirement installed first when the
# venv has no torch; default: torch==2.13.0 on machines without an NVIDIA driver, plain torch otherwise).
# A failed install stops here with pip's own error; the "installed" stamp is written only after the
# installed package was imported from outside the repository.
set -euo pipefail
OGNET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OGNET_VENV="${OGNET_VENV:-$OGNET_ROOT/.venv}"
OGNET_EXTRAS="${1:-}"

# Every failure below ends the set-up explicitly (`return` when sourced, `exit` when run), also
# where `set -e` does not apply (e.g. `source launch/setup_env.sh && ...`).

# pip, quietly; on failure its whole output and a line saying what failed, and status 1.
ognet_pip() {
  local log status=0
  log="$(mktemp)"
  "$OGNET_PY" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || status=$?
  if [ "$status" != 0 ]; then
    grep -v 'is ignored' "$log" >&2 || true
    echo "[setup] pip install $* failed (pip's output above)" >&2
  fi
  rm -f "$log"
  return "$status"
}

# 1. System library: open3d's wheel (the open3d extra, which dev includes) links against libusb-1.0.
if [[ ",$OGNET_EXTRAS," =~ ,(open3d|dev), ]] && ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing libusb-1.0-0 (needed by open3d)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0) >/dev/null \
      || { echo "[setup] apt-get install libusb-1.0-0 failed" >&2; return 1 2>/dev/null || exit 1; }
  else
    echo "[setup] warning: libusb-1.0-0 is missing and this is not root; ask your admin for" \
         "'apt-get install libusb-1.0-0' (Debian/Ubuntu) or 'dnf install libusb1' (RHEL)." >&2
  fi
fi

# 2. Virtual environment.
[ -x "$OGNET_VENV/bin/python" ] || { echo "[setup] creating $OGNET_VENV"; python3 -m venv "$OGNET_VENV"; }
OGNET_PY="$OGNET_VENV/bin/python"
export OGNET_PY

# 3. torch first, pinned, so that nothing later pulls a multi-GB CUDA build by accident.
if ! "$OGNET_PY" -c 'import torch' 2>/dev/null; then
  if [ -z "${OGNET_TORCH:-}" ]; then
    if command -v nvidia-smi >/dev/null; then OGNET_TORCH="torch"; else OGNET_TORCH="torch==2.13.0"; fi
  fi
  echo "[setup] installing $OGNET_TORCH"
  # shellcheck disable=SC2086  # OGNET_TORCH may carry pip options (--index-url ...)
  ognet_pip $OGNET_TORCH || { return 1 2>/dev/null || exit 1; }
  "$OGNET_PY" -W ignore -c 'import torch' || { echo "[setup] torch installed but does not import" >&2; return 1 2>/dev/null || exit 1; }
fi

# 4. The project itself, editable; skipped when its metadata (pyproject.toml) and the extras have not changed.
stamp="$OGNET_VENV/.ognet-installed"
want="$(sha256sum <"$OGNET_ROOT/pyproject.toml" | cut -c1-16) [$OGNET_EXTRAS]"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -f "$stamp"
  spec="$OGNET_ROOT"; [ -n "$OGNET_EXTRAS" ] && spec="$OGNET_ROOT[$OGNET_EXTRAS]"
  echo "[setup] installing ognet ${OGNET_EXTRAS:+with extras $OGNET_EXTRAS}"
  torch_pin="torch==$("$OGNET_PY" -W ignore -c 'import torch; print(torch.__version__.split("+")[0])')"
  ognet_pip -e "$spec" "$torch_pin" || { return 1 2>/dev/null || exit 1; }
  # From outside the repository, so that the check sees the installed package, not the source folder.
  found="$(cd / && "$OGNET_PY" -c 'import ognet; print(ognet.__file__)')" \
    || { echo "[setup] ognet installed but does not import from outside $OGNET_ROOT" >&2; return 1 2>/dev/null || exit 1; }
  case "$found" in
    "$OGNET_ROOT"/*) ;;
    *) echo "[setup] the venv imports ognet from $found, not from $OGNET_ROOT" >&2; return 1 2>/dev/null || exit 1 ;;
  esac
  echo "$want" > "$stamp"
fi
