#!/usr/bin/env bash
# The main job on a fresh machine: install, start the sandbox PACS + EHR, load a demo cohort, let the engine
# detect and score it, print the summary. Extra arguments go to `strokewatch demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
exec .venv/bin/strokewatch demo "$@"
