"""Ingest the hostile corpus in a process of its own, through the engine's real path, and report what it recorded.

``python -m tests.hostile.ingest_child CONFIG.json`` builds one engine per PACS in the config (``bootstrap`` with
the real DICOMweb adapter and the real SQLite store under ``data_dir``), detects the studies (Orthanc's change
feed read from its beginning, or QIDO-RS polling), ingests each listed study with ``services.studies.ingest_study``
in turn, and prints one JSON object: every result, the ``studies`` and ``failures`` rows, and its own peak RSS.

``--measure`` runs the same command as a child and prints ``{"returncode", "maxrss_kib", "report"}`` where
``maxrss_kib`` is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak resident memory of that ingest
process alone (this wrapper has no other child).

CONFIG: ``{"data_dir": str, "ehr_url": str, "pacs": [{"dicomweb_url": str, "orthanc_url": str | null,
"studies": [study UID, ...]}]}``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy import text

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"


def ingest(config: dict[str, Any]) -> dict[str, Any]:
    from integration.bootstrap import bootstrap
    from integration.config import EhrSettings, PacsSettings, Settings
    from integration.services.studies import detect_studies, ingest_study

    results: dict[str, Any] = {}
    detected: list[str] = []
    report: dict[str, Any] = {}
    for pacs in config["pacs"]:
        orthanc = pacs.get("orthanc_url")
        settings = Settings(
            sandbox=True,
            data_dir=Path(config["data_dir"]),
            pacs=PacsSettings(
                dicomweb_url=pacs["dicomweb_url"],
                kind="orthanc" if orthanc else "generic",
                orthanc_url=orthanc,
                changes_from_beginning=True,
                timezone="UTC",
                timeout_s=30,
            ),
            ehr=EhrSettings(
                base_url=config["ehr_url"],
                patient_identifier_system=MRN_SYSTEM,
                max_retries=1,
                backoff_s=0.05,
                timeout_s=10,
            ),
        )
        engine = bootstrap(settings)
        try:
            detected += detect_studies(engine.services)
            for uid in pacs["studies"]:
                results[uid] = asdict(ingest_study(engine.services, uid))
            with engine.store.engine.connect() as db:
                report["failures"] = [
                    dict(r._mapping)
                    for r in db.execute(text("SELECT stage, subject, outcome, message, retryable FROM failures"))
                ]
                report["studies"] = [
                    dict(r._mapping)
                    for r in db.execute(text("SELECT study_uid, status, outcome, volume_path FROM studies"))
                ]
        finally:
            engine.close()
    report.update(
        results=results, detected=detected, self_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return report


def measure(config_path: str) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, "-m", "tests.hostile.ingest_child", config_path], capture_output=True, text=True, check=False
    )
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in child.stdout.splitlines() if line.strip()]
    report = json.loads(lines[-1]) if child.returncode == 0 and lines else None  # the report is the last line
    return {
        "returncode": child.returncode,
        "maxrss_kib": usage.ru_maxrss,
        "report": report,
        "stderr_tail": child.stderr[-4000:],
    }


def main(argv: list[str]) -> None:
    if not argv or len(argv) > 2 or (len(argv) == 2 and argv[1] != "--measure"):
        sys.exit("usage: python -m tests.hostile.ingest_child CONFIG.json [--measure]")
    if len(argv) == 2:
        print(json.dumps(measure(argv[0])))
        return
    print(json.dumps(ingest(json.loads(Path(argv[0]).read_text())), default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
