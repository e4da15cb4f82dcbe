"""`strokewatch federated` in a venv without Flower: a clear error naming the venv that has it, never a traceback."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from integration.entrypoints.cli import app


def test_federated_without_flower_names_its_venv(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    result = CliRunner().invoke(app, ["federated", "simulate", "--sites", "3"], terminal_width=300)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert ".venv-federated/bin/strokewatch federated simulate --sites 3" in text
    assert "flwr" in text and "setup.sh --federated" in text
