"""`strokewatch demo`: sandbox peers, a synthetic cohort, the engine finding and scoring it, a summary.

The demo drives the engine as a user would: it starts the engine's processes and then reads progress and
results from the engine's own HTTP API (/studies, /patients/{id}, /status), never from its database.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from integration.config import Settings

#: The demo cohort (`strokewatch demo`'s defaults): also what the deployment-layout test scores.
DEMO_PATIENTS = 8
DEMO_SEED = 2026


def run_demo(
    console: Console, *, patients: int, seed: int, data_dir: Path, sandbox_dir: Path, timeout: float, keep_running: bool
) -> int:
    from integration.adapters.db.session import upgrade
    from integration.entrypoints.processes import start_engine, stop_engine, stop_pids
    from sandbox import state as sandbox
    from sandbox.cohort import load_cohort

    # A clean slate each time: the FHIR sandbox keeps data in memory, Orthanc on disk under sandbox_dir.
    stop_engine(data_dir)
    sandbox.stop(sandbox_dir)
    shutil.rmtree(sandbox_dir, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)

    with console.status("Starting the sandbox PACS (Orthanc + DICOMweb) and EHR (FHIR R4)..."):
        info = sandbox.start_detached(sandbox_dir)
    console.print(f"[bold]PACS[/bold] {info.dicomweb_url}   [bold]EHR[/bold] {info.fhir_base_url}")

    env = {**sandbox.engine_env(info), "STROKEWATCH_DATA_DIR": str(data_dir.resolve()),
           # results in the PACS are off by default; in the demo's PACS every band gets its SR and heat-map
           "STROKEWATCH_PACS_RESULTS__ENABLED": "true",
           "STROKEWATCH_PACS_RESULTS__BANDS": '["low", "moderate", "high"]'}
    os.environ.update(env)  # the children inherit it; this process reads the same settings
    settings = Settings()
    upgrade(settings.db_url)
    with console.status("Starting the engine (API + worker + scheduler)..."):
        procs, _children = start_engine(settings, env, detached=True)
    console.print(f"[bold]Engine[/bold] API {procs.api_url}  logs {procs.log_dir}")
    api = EngineApi(procs.api_url, info.api_key)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("Loading the demo cohort into PACS + EHR", total=patients)
        loaded = load_cohort(
            patients,
            seed,
            dicomweb_url=info.dicomweb_url,
            fhir_base_url=info.fhir_base_url,
            identifier_system=settings.ehr.patient_identifier_system or "urn:strokewatch:mrn",
            progress=lambda i: progress.update(task, completed=i),
        )
        wait = progress.add_task("Engine detecting, scoring and writing RiskAssessments", total=len(loaded))
        deadline = time.monotonic() + timeout
        study_uids = {p.study_uid for p in loaded}
        while time.monotonic() < deadline:
            studies = api.studies(study_uids)
            done = _published(api, studies)
            progress.update(wait, completed=len(done))
            if len(done) >= len(study_uids) or _all_settled(api, studies, study_uids):
                break
            time.sleep(1)

    rows = _summary_rows(api, api.studies(study_uids))
    table = Table(title="StrokeWatch demo")
    for header in ("patient (FHIR id)", "study (UID tail)", "probability", "band", "RiskAssessment"):
        table.add_column(header, overflow="fold")  # ids and links wrap; never cut with an ellipsis
    for r in rows:
        table.add_row(*r)
    console.print(table)
    _print_model_line(console, api, api.studies(study_uids))
    failures = api.get("/status").get("counts", {}).get("open_failures", {})
    if failures:
        console.print(f"[yellow]open failures: {failures}[/yellow] (see {procs.api_url}/failures)")
    published = sum(1 for r in rows if r[4].startswith("http"))
    console.print(f"{published}/{len(loaded)} patients have a RiskAssessment in the EHR.")
    sr_url = _one_sr_url(api, api.studies(study_uids), info.dicomweb_url)
    console.print(f"[bold]DICOM SR in the PACS[/bold] {sr_url}" if sr_url else "No DICOM SR in the PACS.",
                  soft_wrap=True)  # one line: the URL can be copied
    if keep_running:
        console.print(
            f"The API is at {procs.api_url} (OpenAPI docs: {procs.api_url}/docs); it wants the sandbox's API key in "
            f"X-API-Key (api_key in {Path(info.state_dir) / 'sandbox.json'}). Stop everything with `strokewatch stop`."
        )
        for line in dashboard_lines(procs.api_url, rows):
            console.print(line, soft_wrap=True)  # URLs whole, never folded
    else:
        api.close()
        stop_pids([procs.worker_pid, procs.api_pid])
        stop_engine(data_dir)
        sandbox.stop(sandbox_dir)
    return 0 if published == len(loaded) else 1


def dashboard_lines(api_url: str, rows: list[tuple[str, str, str, str, str]]) -> list[str]:
    """The demo's last lines: the dashboard's overview, and the page of the first patient scored."""
    lines = [f"Dashboard: {api_url}/dashboard (open without signing in: the sandbox, on this machine only)"]
    scored = next((r[0] for r in rows if r[0] and r[2]), None)
    if scored:
        lines.append(f"A patient's page: {api_url}/dashboard/patients/{scored}")
    return lines


class EngineApi:
    """The engine's HTTP API, as the demo reads it (with the sandbox's API key)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=30, headers={"X-API-Key": api_key})

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        response = self._http.get(path, params=params)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def studies(self, uids: set[str]) -> list[dict[str, Any]]:
        """The engine's record of these studies (those it has detected so far), oldest first."""
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self.get("/studies", offset=offset, limit=500)
            found += [s for s in page["items"] if s["study_uid"] in uids]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return sorted(found, key=lambda s: s["detected_at"])

    def latest_assessment(self, patient_fhir_id: str, study_uid: str) -> dict[str, Any] | None:
        """The newest assessment of the patient that used this study (assessments come newest first)."""
        patient = self.get(f"/patients/{patient_fhir_id}")
        return next((a for a in patient["assessments"] if a["study_uid"] == study_uid), None)


def _published(api: EngineApi, studies: list[dict[str, Any]]) -> set[str]:
    done = set()
    for study in studies:
        if study["status"] == "ready" and study["patient_fhir_id"]:
            a = api.latest_assessment(study["patient_fhir_id"], study["study_uid"])
            if a is not None and a["status"] == "published":
                done.add(study["study_uid"])
    return done


def _all_settled(api: EngineApi, studies: list[dict[str, Any]], study_uids: set[str]) -> bool:
    """Every study either published or failed for good (nothing left in flight)."""
    if len(studies) < len(study_uids):
        return False
    pending = {s["study_uid"] for s in studies if s["status"] != "failed"}
    return pending <= _published(api, studies)


def _summary_rows(api: EngineApi, studies: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    out: list[tuple[str, str, str, str, str]] = []
    for study in studies:
        short, patient = study["study_uid"][-16:], study["patient_fhir_id"]
        a = api.latest_assessment(patient, study["study_uid"]) if patient else None
        if a is None:
            out.append((patient or "-", short, "-", "-", f"{study['status']}: {study['outcome'] or ''}"))
            continue
        out.append((patient, short, f"{a['probability']:.3f}", a["band"], a["fhir_url"] or a["status"]))
    return out


def _print_model_line(console: Console, api: EngineApi, studies: list[dict[str, Any]]) -> None:
    for study in studies:
        a = api.latest_assessment(study["patient_fhir_id"], study["study_uid"]) if study["patient_fhir_id"] else None
        if a is None:
            continue
        state = "trained on the synthetic cohort" if a["trained"] else (
            "[red]UNTRAINED placeholder: scores are meaningless[/red]")
        console.print(f"Model stroke_fusion {a['model_version']} via {a['runtime']}: {state}.")
        return


def _one_sr_url(api: EngineApi, studies: list[dict[str, Any]], dicomweb_url: str) -> str | None:
    """The WADO-RS URL of the SR the engine wrote for one published assessment (its UIDs follow from the
    assessment's identifier), checked in the PACS."""
    from integration.domain.results import report_uids

    for study in studies:
        a = api.latest_assessment(study["patient_fhir_id"], study["study_uid"]) if study["patient_fhir_id"] else None
        if a is None or a["status"] != "published":
            continue
        uids = report_uids(a["identifier"])
        url = f"{dicomweb_url}/studies/{study['study_uid']}/series/{uids.sr_series}/instances/{uids.sr_instance}"
        if httpx.get(f"{url}/metadata", timeout=10).status_code == 200:
            return url
    return None
