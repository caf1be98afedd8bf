# Sourced by scripts/test, scripts/demo and scripts/bench: find Python >= 3.12,
# create .venv and install spendgate (with extras "$1") into it. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

find_python() {
  local candidates=(python3.13 python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    local root; root="$(pyenv root)"
    for v in "$root"/versions/3.13* "$root"/versions/3.12*; do
      [ -x "$v/bin/python" ] && candidates+=("$v/bin/python")
    done
  fi
  candidates+=(python3 python)
  for c in "${candidates[@]}"; do
    local p; p="$(command -v "$c" 2>/dev/null)" || continue
    # pyenv shims exist for versions that are not selected; ask the interpreter itself.
    if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  return 1
}

extras="${1:-}"
stamp=".venv/.spendgate-installed${extras:+-$extras}"
if [ ! -x .venv/bin/python ]; then
  PY="$(find_python)" || { echo "spendgate needs Python >= 3.12: install python3.12 (e.g. 'pyenv install 3.12') and retry" >&2; exit 1; }
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"

# The CA lives in SPENDGATE_HOME/certs (mitmproxy's confdir; the home is this checkout unless
# $SPENDGATE_HOME says otherwise). mitmproxy creates it on first start; create it now so clients
# can be pointed at it before the gateway ever ran.
if [ ! -f "${SPENDGATE_HOME:-$ROOT}/certs/mitmproxy-ca-cert.pem" ]; then
  spendgate ca >/dev/null
fi
