"""The dashboard: server-rendered pages (Jinja2) with plots drawn in the browser by the vendored uPlot
(``static/``): the overview, a patient page, the failures with the operators' replays, and the sign-in form.

Who may open them: ``security.dashboard`` (an API credential, or a session cookie from the sign-in; open in the
sandbox on loopback). Forms post a CSRF token. Pages are never cached and allow scripts from the engine only.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from inference import contract as C
from integration.adapters.db import dashboard as views
from integration.adapters.db import queries
from integration.domain import latency
from integration.domain.drivers import drivers_in_note
from integration.entrypoints.api.deps import EngineDep, ServicesDep, SessionsDep, SettingsDep
from integration.entrypoints.api.security.dashboard import COOKIE_PATH, SESSION_COOKIE
from integration.entrypoints.api.security.guard import Guard, unauthorized
from integration.entrypoints.api.web import Csrf, dashboard_auth, render_page
from integration.services import picture
from integration.services.assess import reassess_patient
from integration.services.assess import republish as requeue_publish
from integration.services.studies import retry_study

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dashboard", include_in_schema=False)
#: Failure stages an operator can replay from the failures page, and what the replay does.
REPLAYS = {"ingest": "retry the study", "assess": "score the patient again", "publish": "write it to the EHR again"}
#: Rendered pictures kept per API process (newest used last), keyed by the assessment they show.
PICTURES_KEPT = 32


class PictureCache:
    """The latest pictures drawn by this process, at most ``size`` (the least recently shown go first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, picture.Picture] = OrderedDict()
        self._lock = threading.Lock()  # routes run in a thread pool

    def get(self, key: str) -> picture.Picture | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: str, value: picture.Picture) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()




# -- overview -------------------------------------------------------------------------------------------------
@router.get("", response_class=HTMLResponse)
def overview(request: Request, engine: EngineDep, sessions: SessionsDep, settings: SettingsDep) -> HTMLResponse:
    counts = engine.store.counts()
    snapshots = engine.store.stage_snapshots(settings.dashboard.latency_snapshots_kept)
    plots = _latency_plots(latency.series(snapshots), snapshots[0].taken_at if snapshots else None)
    return render_page(request, "overview.html", {
        "title": "Overview",
        "counts": counts,
        "queues": views.queue_depths(sessions),
        "failures": queries.open_failure_summary(sessions)[:50],
        "patients": views.recent_patients(sessions),
        "latency": plots,
        "snapshots": len(snapshots),
        "snapshot_s": settings.dashboard.latency_snapshot_s,
    })


def _latency_plots(all_series: list[latency.LatencySeries], start: datetime | None) -> dict[str, Any]:
    """uPlot data: one x axis (interval ends) shared by every stage that saw work, per percentile; ``start`` is
    when the oldest copy was taken (where the time axis begins)."""
    active = [s for s in all_series if any(s.counts)]
    times = sorted({t for s in active for t in s.times})
    first = _epoch(start) if start is not None else (times[0] if times else 0.0)
    plots: dict[str, Any] = {"stages": [s.stage for s in active], "times": times,
                             "range": _time_range(min([first, *times]), max([first, *times]))}
    for q in latency.QUANTILES:
        rows = []
        for s in active:
            by_time = dict(zip(s.times, s.percentiles[q], strict=True))
            rows.append([by_time.get(t) for t in times])
        plots[f"p{int(q * 100)}"] = rows
    return plots


# -- patient --------------------------------------------------------------------------------------------------
@router.get("/patients/{fhir_id}", response_class=HTMLResponse)
def patient(request: Request, fhir_id: str, sessions: SessionsDep, settings: SettingsDep) -> HTMLResponse:
    page = views.patient_page(sessions, fhir_id, ehr_base_url=settings.ehr.base_url,
                              max_assessments=settings.dashboard.max_assessments,
                              max_vitals=settings.dashboard.max_vitals)
    if page is None:
        raise HTTPException(404, "the engine does not follow this patient")
    note = page.current_note
    return render_page(request, "patient.html", {
        "title": f"Patient {fhir_id}",
        "horizon_days": C.HORIZON_DAYS,
        "p": page,
        "note": note,
        "drivers": drivers_in_note(note),
        "links": _links(settings, page),
        "vitals_plots": _vitals_plots(page),
        "risk_plot": _risk_plot(page),
        "image_url": f"/dashboard/patients/{quote(fhir_id, safe='')}/image.png" if page.studies else None,
    })


def _links(settings: Any, page: views.PatientPage) -> dict[str, Any]:
    ehr = (settings.ehr.base_url or "").rstrip("/")
    dicomweb = (settings.pacs.dicomweb_url or "").rstrip("/")
    observations = page.current_observations
    series = []
    for study in page.studies:
        if study.chosen_series_uid and dicomweb:
            series.append({"label": f"{study.modality or 'image'} series used ({study.study_uid})",
                           "url": f"{dicomweb}/studies/{study.study_uid}/series/{study.chosen_series_uid}"})
    return {
        "patient": f"{ehr}/Patient/{quote(page.fhir_id, safe='')}" if ehr else None,
        "risk_assessment": page.current.fhir_url if page.current else None,
        "observations": [f"{ehr}/{ref}" for ref in observations[:20]] if ehr else [],
        "more_observations": max(0, len(observations) - 20),
        "series": series,
    }


def _epoch(t: datetime) -> float:
    return round(t.timestamp(), 3)


def _time_range(first: float, last: float) -> list[float]:
    """A plot's time axis: from ``first`` to ``last``, or half a day either side of a single instant."""
    return [first - 43200.0, last + 43200.0] if last - first < 1.0 else [first, last]


def _vitals_plots(page: views.PatientPage) -> dict[str, Any] | None:
    """One plot per vital sign the model saw, in the contract's feature order, with its canonical unit, each over
    the assessment's whole window."""
    if page.window_start is None or page.window_end is None or not page.vitals:
        return None
    plots = []
    for feature in C.VITAL_FEATURES:
        mine = [p for p in page.vitals if p.feature == feature.key]
        if mine:
            plots.append({"key": feature.key, "label": feature.display, "unit": feature.unit,
                          "data": [[_epoch(p.effective) for p in mine], [p.value for p in mine]]})
    return {"start": _epoch(page.window_start), "end": _epoch(page.window_end), "plots": plots}


def _risk_plot(page: views.PatientPage) -> dict[str, Any]:
    ordered = sorted(page.assessments, key=lambda a: a.window_end)
    times = [_epoch(a.window_end) for a in ordered]
    return {"data": [times, [round(a.probability, 4) for a in ordered]],
            "range": _time_range(times[0], times[-1]) if times else None}


@router.get("/patients/{fhir_id}/image.png")
def patient_image(request: Request, fhir_id: str, services: ServicesDep) -> Response:
    """The key slice of the scored volume with its heat-map (``services.picture``), cached per assessment."""
    latest = services.store.latest_assessment(fhir_id)
    cache: PictureCache = request.app.state.__dict__.setdefault("pictures", PictureCache(PICTURES_KEPT))
    key = f"{fhir_id}|{latest.identifier if latest else ''}"
    found = cache.get(key)
    if found is None:
        found = picture.patient_picture(services, fhir_id)
        if found is None:
            raise HTTPException(404, "no image for this patient")
        cache.put(key, found)
    response = Response(found.png, media_type="image/png")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-StrokeWatch-Slice"] = str(found.slice_index)
    response.headers["X-StrokeWatch-Overlay"] = "1" if found.overlay else "0"
    return response


# -- failures -------------------------------------------------------------------------------------------------
@router.get("/failures", response_class=HTMLResponse)
def failures(
    request: Request,
    sessions: SessionsDep,
    stage: Annotated[str | None, Query(max_length=24)] = None,
    outcome: Annotated[str | None, Query(max_length=48)] = None,
    show: Annotated[str, Query(pattern="^(open|all)$")] = "open",
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    done: Annotated[str | None, Query(max_length=200)] = None,
) -> HTMLResponse:
    page = queries.list_failures(sessions, stage=stage or None, outcome=outcome or None, open_only=show == "open",
                                 offset=offset, limit=50)
    return render_page(request, "failures.html", {
        "title": "Failures", "page": page, "stage": stage or "", "outcome": outcome or "", "show": show,
        "replays": REPLAYS, "done": done,
        "next_offset": offset + 50 if offset + 50 < page.total else None,
        "prev_offset": max(0, offset - 50) if offset else None,
    })


@router.post("/failures/{failure_id}/replay", dependencies=[Csrf])
def replay(request: Request, failure_id: int, sessions: SessionsDep, services: ServicesDep) -> RedirectResponse:
    found = views.failure(sessions, failure_id)
    if found is None:
        raise HTTPException(404, "unknown failure")
    stage, subject = found
    if stage == "ingest":
        request.state.audit_studies = [subject]
        ok = retry_study(services, subject)
    elif stage == "assess":
        request.state.audit_patients = [subject]
        ok = services.store.get_patient(subject) is not None and reassess_patient(services, subject)
    elif stage == "publish":
        row = services.store.get_assessment(subject)
        request.state.audit_patients = [row.patient_fhir_id] if row else []
        ok = row is not None and requeue_publish(services, subject)
    else:
        raise HTTPException(400, f"failures of stage {stage} are not replayed from here")
    log.info("operator replay from the dashboard: failure %d (%s)", failure_id, stage)
    message = f"{REPLAYS[stage]}: queued" if ok else f"{REPLAYS[stage]}: not queued (it is being worked on now)"
    return RedirectResponse("/dashboard/failures?" + urlencode({"done": message}), status_code=303)


# -- sign-in --------------------------------------------------------------------------------------------------
def _safe_next(value: str | None) -> str:
    """Only a path of the dashboard itself: never another origin (``//host``) or a scheme."""
    if value and value.startswith("/dashboard") and "//" not in value and "\\" not in value:
        return value
    return "/dashboard"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: Annotated[str | None, Query(max_length=500)] = None) -> HTMLResponse:  # noqa: A002
    return render_page(request, "login.html", {"title": "Sign in", "next": _safe_next(next), "error": None})


@router.post("/login", dependencies=[Csrf])
async def login(
    request: Request,
    credential: Annotated[str, Form(max_length=8192)],
    next: Annotated[str, Form(max_length=500)] = "/dashboard",  # noqa: A002
) -> Response:
    guard: Guard = request.app.state.guard
    credential = credential.strip()
    is_key = credential.startswith("swk_")
    try:
        principal = await run_in_threadpool(
            guard.api_principal, credential if is_key else None, None if is_key else credential
        )
    except HTTPException as err:
        if err.status_code != 401:
            raise
        log.info("dashboard sign-in refused: %s", err.detail)
        return render_page(request, "login.html", {"title": "Sign in", "next": _safe_next(next),
                                             "error": "not signed in: that credential was not accepted"}, 401)
    if not principal.roles:
        return render_page(request, "login.html", {"title": "Sign in", "next": _safe_next(next),
                                             "error": "not signed in: that credential has no StrokeWatch role"}, 403)
    auth = dashboard_auth(request)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, auth.issue(principal), max_age=int(auth.session_s), path=COOKIE_PATH,
                        httponly=True, samesite="strict", secure=auth.secure_cookies)
    log.info("dashboard sign-in: %s", principal.who)
    return response


@router.post("/logout", dependencies=[Csrf])
def logout(request: Request) -> Response:
    if request.cookies.get(SESSION_COOKIE) is None and not dashboard_auth(request).open_access:
        raise unauthorized("not signed in")
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response
