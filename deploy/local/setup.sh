#!/usr/bin/env bash
# Installs everything StrokeWatch needs on a fresh Debian 12 machine (idempotent; re-runs are quick):
#   Debian: Orthanc + DICOMweb plugin, dcmtk (the sandbox PACS, DIMSE tools), docker-compose (validates the compose file),
#           chromium (the dashboard's browser tests drive it with Playwright),
#           dicom3tools (dciodvfy: the tests check the DICOM SR the engine writes)
#   Python: .venv with the engine, the model stack (torch pinned CPU build) and test tools
#   Node:   the FHIR sandbox's packages (deploy/fhir-sandbox)
#   --triton: also the Triton server's own venv (.venv-triton, numpy<2), used by tests and `sandbox up --triton`
#   --federated: also the venv for learning across sites (.venv-federated: Flower and Opacus, whose pins are below
#           the engine's), used by tests/federated and `.venv-federated/bin/strokewatch federated ...`
set -euo pipefail
cd "$(dirname "$0")/../.."
WITH_TRITON=0
WITH_FEDERATED=0
for arg in "$@"; do
  case "$arg" in
    --triton) WITH_TRITON=1 ;;
    --federated) WITH_FEDERATED=1 ;;
  esac
done
PY=${PYTHON:-python3}

need_apt=()
for pkg in orthanc orthanc-dicomweb dcmtk docker-compose chromium dicom3tools; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.strokewatch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> pip install (torch pinned to the CPU build 2.13.0)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[model,triton,dev]"
  touch "$stamp"
fi

if [ ! -d deploy/fhir-sandbox/node_modules/@medplum/fhir-router ]; then
  echo "==> npm ci (FHIR sandbox)"
  npm ci --prefix deploy/fhir-sandbox --no-audit --no-fund --loglevel=error
fi

if [ "$WITH_TRITON" = 1 ]; then
  bash deploy/triton/setup_venv.sh
fi
if [ "$WITH_FEDERATED" = 1 ]; then
  PYTHON="$PY" bash deploy/federated/setup_venv.sh
fi
echo "==> setup complete"
