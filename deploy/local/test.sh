#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, makes sure PostgreSQL and Redis run,
# checks the import contracts and strict typing of the core, then runs pytest (unit, integration against
# real peers, e2e with real Celery workers).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh --triton --federated

# The machine's own services: start them if they are down (the commands the machine image uses).
if ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi

.venv/bin/lint-imports                                   # the domain does no I/O; layers point inwards
.venv/bin/mypy integration/domain integration/services integration/adapters integration/ports.py \
  integration/bootstrap.py                               # strict (pyproject)
# Two runs, both counted: the engine's suite in .venv, then learning across sites in .venv-federated (Flower and
# Opacus pin versions below the engine's; tests/conftest.py leaves tests/federated out of the first run).
status=0
.venv/bin/python -m pytest tests "$@" || status=$?
.venv-federated/bin/python -m pytest tests/federated --federated || status=$((status ? status : $?))
exit "$status"
