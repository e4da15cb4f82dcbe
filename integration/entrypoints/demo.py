"""`strokewatch demo`: sandbox peers, a synthetic cohort, the engine finding and scoring it, a summary."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from integration.config import Settings


def run_demo(
    console: Console, *, patients: int, seed: int, data_dir: Path, sandbox_dir: Path, timeout: float, keep_running: bool
) -> int:
    from integration.adapters.db.session import make_engine, upgrade
    from integration.adapters.db.store import SqlStore
    from integration.entrypoints.processes import sandbox_env, start_engine, stop_engine, stop_pids
    from integration.sandbox import state as sandbox
    from integration.sandbox.cohort import load_cohort

    # A clean slate each time: the FHIR sandbox keeps data in memory, Orthanc on disk under sandbox_dir.
    stop_engine(data_dir)
    sandbox.stop(sandbox_dir)
    shutil.rmtree(sandbox_dir, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)

    with console.status("Starting the sandbox PACS (Orthanc + DICOMweb) and EHR (FHIR R4)..."):
        info = sandbox.start_detached(sandbox_dir)
    console.print(f"[bold]PACS[/bold] {info.dicomweb_url}   [bold]EHR[/bold] {info.fhir_base_url}")

    env = {**sandbox_env(info), "STROKEWATCH_DATA_DIR": str(data_dir.resolve())}
    os.environ.update(env)  # the children inherit it; this process reads the same settings
    settings = Settings()
    upgrade(settings.db_url)
    with console.status("Starting the engine (API + worker + scheduler)..."):
        procs, _children = start_engine(settings, env, detached=True)
    console.print(f"[bold]Engine[/bold] API {procs.api_url}  logs {procs.log_dir}")

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
        store = SqlStore(make_engine(settings.db_url))
        wait = progress.add_task("Engine detecting, scoring and writing RiskAssessments", total=len(loaded))
        deadline = time.monotonic() + timeout
        study_uids = {p.study_uid for p in loaded}
        while time.monotonic() < deadline:
            done = _published(store, study_uids)
            progress.update(wait, completed=len(done))
            if len(done) >= len(study_uids) or _all_settled(store, study_uids):
                break
            time.sleep(1)

    rows = _summary_rows(store, study_uids, info.fhir_base_url)
    table = Table(title="StrokeWatch demo")
    for header in ("patient (FHIR id)", "study (UID tail)", "probability", "band", "RiskAssessment"):
        table.add_column(header, overflow="fold")  # ids and links wrap; never cut with an ellipsis
    for r in rows:
        table.add_row(*r)
    console.print(table)
    _print_model_line(console, store)
    counts = store.counts()
    failures = counts.get("open_failures", {})
    if failures:
        console.print(f"[yellow]open failures: {failures}[/yellow] (see {procs.api_url}/failures)")
    published = sum(1 for r in rows if r[4].startswith("http"))
    console.print(f"{published}/{len(loaded)} patients have a RiskAssessment in the EHR.")
    if keep_running:
        console.print(
            f"The API is at {procs.api_url} (OpenAPI docs: {procs.api_url}/docs). "
            "Stop everything with `strokewatch stop`."
        )
    else:
        stop_pids([procs.worker_pid, procs.api_pid])
        stop_engine(data_dir)
        sandbox.stop(sandbox_dir)
    return 0 if published == len(loaded) else 1


def _published(store: object, study_uids: set[str]) -> set[str]:
    from sqlalchemy import select

    from integration.adapters.db.models import Assessment

    with store.sessions() as s:  # type: ignore[attr-defined]
        rows = s.execute(
            select(Assessment.study_uid).where(Assessment.status == "published", Assessment.study_uid.in_(study_uids))
        ).all()
    return {r[0] for r in rows}


def _all_settled(store: object, study_uids: set[str]) -> bool:
    """Every study either published or failed for good (nothing left in flight)."""
    from sqlalchemy import select

    from integration.adapters.db.models import Study

    with store.sessions() as s:  # type: ignore[attr-defined]
        rows = dict(s.execute(select(Study.study_uid, Study.status).where(Study.study_uid.in_(study_uids))).all())
    if len(rows) < len(study_uids):
        return False
    pending = {u for u, st in rows.items() if st != "failed"}
    return pending <= _published(store, study_uids)


def _summary_rows(store: object, study_uids: set[str], fhir_base: str) -> list[tuple[str, str, str, str, str]]:
    from sqlalchemy import select

    from integration.adapters.db.models import Assessment, Study

    out: list[tuple[str, str, str, str, str]] = []
    with store.sessions() as s:  # type: ignore[attr-defined]
        for study in s.scalars(select(Study).where(Study.study_uid.in_(study_uids)).order_by(Study.id)):
            a = s.scalar(
                select(Assessment)
                .where(Assessment.study_uid == study.study_uid)
                .order_by(Assessment.id.desc())
                .limit(1)
            )
            short = study.study_uid[-16:]
            if a is None:
                out.append((study.patient_fhir_id or "-", short, "-", "-", f"{study.status}: {study.outcome or ''}"))
                continue
            link = f"{fhir_base}/RiskAssessment/{a.fhir_id}" if a.fhir_id else a.status
            out.append((a.patient_fhir_id, short, f"{a.probability:.3f}", a.band, link))
    return out


def _print_model_line(console: Console, store: object) -> None:
    from sqlalchemy import select

    from integration.adapters.db.models import Assessment

    with store.sessions() as s:  # type: ignore[attr-defined]
        row = s.execute(select(Assessment.model_version, Assessment.runtime, Assessment.trained).limit(1)).first()
    if row is None:
        return
    version, runtime, trained = row
    state = "trained on the synthetic cohort" if trained else "[red]UNTRAINED placeholder: scores are meaningless[/red]"
    console.print(f"Model stroke_fusion {version} via {runtime}: {state}.")
