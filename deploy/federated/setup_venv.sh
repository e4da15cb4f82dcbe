#!/usr/bin/env bash
# Creates the virtual environment that runs learning across sites (`strokewatch federated ...`, tests/federated).
#
# Why a venv of its own: every flwr release pins fastapi/starlette/uvicorn (flwr >= 1.33: fastapi 0.138),
# cryptography < 51, typer < 0.21, rich < 15 and packaging < 26, below what the engine's .venv runs. The engine
# is installed here too (editable, with the model extra) so the clients read their site through the same code
# path as the engine; pip resolves the engine's own loose requirements to versions flwr accepts.
#
# Idempotent: returns at once when the venv already has what it needs and pyproject.toml has not changed.
# Used by deploy/local/setup.sh --federated (deploy/local/test.sh passes it).
#
#   deploy/federated/setup_venv.sh            # creates <repo>/.venv-federated
#   STROKEWATCH_FEDERATED_VENV=/x deploy/federated/setup_venv.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${STROKEWATCH_FEDERATED_VENV:-$ROOT/.venv-federated}"
PY=${PYTHON:-python3}
cd "$ROOT"

check() {
    [ -x "$VENV/bin/python" ] && [ -f "$VENV/.strokewatch-installed" ] && \
        [ ! pyproject.toml -nt "$VENV/.strokewatch-installed" ] || return 1
    "$VENV/bin/python" -c 'import flwr, opacus, torch, modelling, integration' 2>/dev/null
}

if check; then
    echo "federated venv ready: $VENV"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "installing into $VENV (torch pinned to the CPU build 2.13.0, flwr, opacus)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[model,federated,dev]"
touch "$VENV/.strokewatch-installed"
if ! check; then
    echo "error: federated venv at $VENV is incomplete after install (see pip output above)" >&2
    exit 1
fi
echo "federated venv ready: $VENV"
