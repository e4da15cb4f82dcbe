"""Server-rendered pages for the dashboard: the templates, the security headers every page gets, and the CSRF
check of every form (``security.dashboard``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from integration.entrypoints.api.security.dashboard import COOKIE_PATH, CSRF_COOKIE, SESSION_COOKIE, DashboardAuth
from integration.entrypoints.api.security.guard import Guard

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
STATIC_DIR = HERE / "static"

#: Scripts, styles, images and form posts from the engine only; nothing else is loaded or sent anywhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'")


def dashboard_auth(request: Request) -> DashboardAuth:
    guard: Guard = request.app.state.guard
    return guard.dashboard


def render_page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    """A template with the CSRF token for its forms (the browser's ``sw_csrf`` cookie, made on first visit)."""
    auth = dashboard_auth(request)
    csrf_cookie = request.cookies.get(CSRF_COOKIE)
    fresh = not csrf_cookie or len(csrf_cookie) > 128
    if fresh:
        csrf_cookie = auth.new_csrf_cookie()
    principal = getattr(request.state, "principal", None)
    response = templates.TemplateResponse(
        request,
        name,
        {**context, "csrf_token": auth.csrf_token(str(csrf_cookie)), "principal": principal,
         "signed_in": request.cookies.get(SESSION_COOKIE) is not None},
        status_code=status_code,
    )
    if fresh:
        response.set_cookie(CSRF_COOKIE, str(csrf_cookie), path=COOKIE_PATH, httponly=True, samesite="strict",
                            secure=auth.secure_cookies)
    harden(response)
    return response


def harden(response: Response) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"  # pages carry patient data
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"


async def check_csrf(request: Request, csrf_token: Annotated[str, Form(max_length=128)] = "") -> None:
    """A form post must carry the token of the browser's CSRF cookie, and come from the API's own origin."""
    origin = request.headers.get("origin")
    if origin:
        host = urlsplit(origin).netloc
        if host != request.headers.get("host"):
            raise HTTPException(403, "cross-origin form post refused")
    if not dashboard_auth(request).csrf_ok(request.cookies.get(CSRF_COOKIE), csrf_token):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


Csrf = Depends(check_csrf)


def json_script(value: Any) -> Markup:
    """JSON safe to put inside <script type="application/json"> (no closing tag can be formed)."""
    text = json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
    return Markup(text.replace("&", "\\u0026"))  # noqa: S704 - escaped above for this context


templates.env.filters["json_script"] = json_script
