"""The engine runs without the model's life cycle: importing it loads no torch, no modelling and no synth.

Each import runs in a fresh interpreter (this test process may have imported torch already).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "modelling", "synth")

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("module", ["integration.entrypoints.worker", "integration.bootstrap"])
def test_engine_imports_no_model_training_code(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    leaked = [name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert not leaked, f"importing {module} loaded {leaked}"


def test_what_the_worker_preloads_before_forking_imports_and_loads_no_training_code() -> None:
    probe = (
        "import importlib, json, sys\n"
        "from integration.entrypoints.worker import PRELOAD\n"
        "for m in PRELOAD: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
