"""The dashboard as a SMART app the EHR launches (``adapters.smart_launch``): ``/dashboard/launch`` sends the browser
to the EHR's authorization endpoint; ``/dashboard/launch/callback`` takes the code back, learns the patient the
clinician has open, signs the browser in (read role) and opens that patient's page.

Both are open routes (the EHR's sign-in is the credential); the state and the PKCE verifier travel in a signed
cookie that lives ten minutes, ``SameSite=Lax`` because the EHR sends the browser back from another site.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from integration.adapters.smart_launch import Endpoints, LaunchRefused, pkce_pair
from integration.config import Settings
from integration.entrypoints.api.deps import EngineDep, SettingsDep
from integration.entrypoints.api.security.dashboard import COOKIE_PATH, SESSION_COOKIE
from integration.entrypoints.api.security.guard import Guard
from integration.entrypoints.api.security.policy import Principal, Role
from integration.entrypoints.api.web import harden, templates

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dashboard/launch", include_in_schema=False)

STATE_COOKIE = "sw_smart"
STATE_TTL_S = 600.0


def _redirect_uri(settings: Settings) -> str:
    return f"{settings.api_base_url.rstrip('/')}/dashboard/launch/callback"


@router.get("")
async def launch(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    iss: Annotated[str, Query(max_length=2000)],
    launch: Annotated[str, Query(max_length=4000)],
) -> RedirectResponse:
    launcher = engine.smart_launch
    if launcher is None:
        raise HTTPException(404, "SMART launch is not configured (STROKEWATCH_DASHBOARD__SMART_CLIENT_ID)")
    if not launcher.trusts(iss):
        raise HTTPException(400, "launches are accepted from this engine's EHR only (STROKEWATCH_EHR__BASE_URL)")
    try:
        endpoints = await run_in_threadpool(launcher.endpoints)
    except LaunchRefused as err:
        log.warning("SMART launch refused: %s", err)
        raise HTTPException(502, f"SMART launch: {err}") from None
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    guard: Guard = request.app.state.guard
    sealed = guard.dashboard.seal("smart", {"state": state, "verifier": verifier, "authorize": endpoints.authorize,
                                            "token": endpoints.token}, STATE_TTL_S)
    url = launcher.authorize_url(endpoints, launch=launch, redirect_uri=_redirect_uri(settings), state=state,
                                 challenge=challenge)
    response = RedirectResponse(url, status_code=303)
    response.set_cookie(STATE_COOKIE, sealed, max_age=int(STATE_TTL_S), path=f"{COOKIE_PATH}/launch", httponly=True,
                        samesite="lax", secure=guard.dashboard.secure_cookies)
    return response


@router.get("/callback", response_class=HTMLResponse)
async def callback(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    code: Annotated[str, Query(max_length=4000)],
    state: Annotated[str, Query(max_length=200)],
) -> HTMLResponse:
    launcher = engine.smart_launch
    if launcher is None:
        raise HTTPException(404, "SMART launch is not configured")
    guard: Guard = request.app.state.guard
    sealed = guard.dashboard.unseal("smart", request.cookies.get(STATE_COOKIE))
    if sealed is None or not hmac.compare_digest(str(sealed.get("state", "")), state):
        raise HTTPException(400, "this launch was not started here, or took longer than ten minutes: launch again")
    endpoints = Endpoints(str(sealed["authorize"]), str(sealed["token"]))
    try:
        context = await run_in_threadpool(launcher.exchange, endpoints, code=code, verifier=str(sealed["verifier"]),
                                          redirect_uri=_redirect_uri(settings))
    except LaunchRefused as err:
        log.warning("SMART launch refused: %s", err)
        raise HTTPException(502, f"SMART launch: {err}") from None
    principal = Principal(f"smart:{context.user or 'ehr-user'}", "smart", frozenset({Role.READ}))
    request.state.principal = principal
    target = f"/dashboard/patients/{quote(context.patient, safe='')}"
    # A page, not a redirect: the session cookie is SameSite=Strict, and a navigation that began at the EHR (another
    # site) would not carry it; the page's own navigation does.
    response = templates.TemplateResponse(request, "launched.html", {"title": "Opening", "target": target})
    response.set_cookie(SESSION_COOKIE, guard.dashboard.issue(principal), max_age=int(guard.dashboard.session_s),
                        path=COOKIE_PATH, httponly=True, samesite="strict", secure=guard.dashboard.secure_cookies)
    response.delete_cookie(STATE_COOKIE, path=f"{COOKIE_PATH}/launch")
    harden(response)
    log.info("SMART launch: %s signed in", principal.who)
    return response
