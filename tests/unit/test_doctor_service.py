"""The doctor service with fake probes: order, time-box, crashes, and what the settings alone add."""

from __future__ import annotations

import ast
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from integration.config import Settings
from integration.domain.checks import CheckResult
from integration.ports import Probe
from integration.services.doctor import OpenProbes, readiness, run_checks

DOCTOR = Path(__file__).resolve().parents[2] / "integration" / "services" / "doctor"


class FakeProbe:
    def __init__(self, name: str, *results: CheckResult, error: Exception | None = None) -> None:
        self.name = name
        self.results = list(results) or [CheckResult(name, True, f"{name} answers")]
        self.error = error
        self.calls: list[bool] = []

    def probe(self, *, quick: bool) -> list[CheckResult]:
        self.calls.append(quick)
        if self.error is not None:
            raise self.error
        return self.results[:1] if quick else self.results


class HungProbe:
    name = "ehr"

    def __init__(self) -> None:
        self.release = threading.Event()

    def probe(self, *, quick: bool) -> list[CheckResult]:
        self.release.wait(30)
        return [CheckResult(self.name, True, "late")]


def opener(probes: Sequence[Probe]) -> OpenProbes:
    @contextmanager
    def open_probes(settings: Settings) -> Iterator[Sequence[Probe]]:
        yield probes

    return open_probes


def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {"sandbox": True, "data_dir": tmp_path, "pacs": {"dicomweb_url": "http://pacs/dicom-web", "timezone": "UTC"},
         "ehr": {"base_url": "http://ehr/fhir"}}
    )


def test_results_in_probe_order_with_what_the_settings_say(tmp_path: Path) -> None:
    probes = [
        FakeProbe("database"),
        FakeProbe("pacs", CheckResult("pacs", True, "ok"), CheckResult("pacs auth", True, "ok")),
        FakeProbe("ehr", CheckResult("ehr", False, "down", "set STROKEWATCH_EHR__BASE_URL")),
        FakeProbe("model"),
    ]
    results = run_checks(settings(tmp_path), opener(probes))
    assert [r.name for r in results] == ["settings", "database", "pacs", "pacs auth", "pacs time zone", "ehr", "model"]
    assert "UTC (pacs.timezone)" in results[4].detail  # the EHR did not answer: no identifier-system statement
    assert all(p.calls == [False] for p in probes)


def test_a_crashing_or_hung_probe_fails_alone(tmp_path: Path) -> None:
    hung = HungProbe()
    probes: list[Probe] = [FakeProbe("database", error=RuntimeError("boom")), hung, FakeProbe("model")]
    try:
        results = readiness(probes, timeout_s=0.2)
    finally:
        hung.release.set()
    assert [(r.name, r.ok) for r in results] == [("database", False), ("ehr", False), ("model", True)]
    assert "boom" in results[0].detail and "no answer within" in results[1].detail


def test_readiness_is_quick_and_one_result_each() -> None:
    probes = [FakeProbe("pacs", CheckResult("pacs", True, "ok"), CheckResult("pacs auth", True, "ok"))]
    assert [r.name for r in readiness(probes)] == ["pacs"]
    assert probes[0].calls == [True]


def test_doctor_service_speaks_no_protocol_itself() -> None:
    forbidden = ("httpx", "sqlalchemy", "kombu", "tritonclient", "integration.adapters", "integration.bootstrap")
    for path in DOCTOR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            leaked = [n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
            assert not leaked, f"{path.name} imports {leaked}"
