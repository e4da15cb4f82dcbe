"""Who may open the dashboard (``/dashboard``), and the CSRF defence of its forms.

A browser cannot send an API key with each page, so the dashboard takes the API's own credentials once, at sign-in
(``POST /dashboard/login``: an API key, or an OAuth2 access token from the hospital's IdP, checked exactly as the
API checks them), and hands back a session cookie: the principal's name, roles and expiry, signed with HMAC-SHA256
under a key kept in ``data_dir`` (0600) so every API process of a deployment sharing ``data_dir`` accepts it.
The cookie is ``HttpOnly``, ``SameSite=Strict``, path ``/dashboard`` and ``Secure`` when the API is served over
TLS. A request that carries ``X-API-Key`` or a bearer token is checked as an API call instead (scripts, tests).

In the sandbox (``settings.sandbox``) on a loopback API the pages are open, as operator, unless
``dashboard.open_in_sandbox`` is false: the demo's synthetic patients on the demo's own machine.

Forms that change something (retry, reassess, republish, sign-in, sign-out) carry a CSRF token: the HMAC of the
browser's ``sw_csrf`` cookie (random, ``SameSite=Strict``) under the same key, checked in constant time, and the
request's ``Origin``, when sent, must be the API's own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integration.config import Settings
from integration.entrypoints.api.security.policy import Principal, Role

SESSION_COOKIE = "sw_session"
CSRF_COOKIE = "sw_csrf"
COOKIE_PATH = "/dashboard"
KEY_FILE = "dashboard-session.key"
SANDBOX = Principal("sandbox", "sandbox", frozenset({Role.READ, Role.OPERATE}))
_MAX_COOKIE = 2048


class LoginRequired(Exception):
    """No valid dashboard credential: a page sends the browser to the sign-in form."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def session_key(data_dir: Path) -> bytes:
    """The signing key: made once (32 random bytes, 0600) in ``data_dir`` and reused."""
    path = data_dir / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another process made it first
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex())
    return key


@dataclass(frozen=True)
class DashboardAuth:
    key: bytes
    open_access: bool
    session_s: float
    secure_cookies: bool

    @classmethod
    def from_settings(cls, settings: Settings, *, loopback: bool) -> DashboardAuth:
        return cls(
            key=session_key(settings.data_dir),
            open_access=settings.sandbox and settings.dashboard.open_in_sandbox and loopback,
            session_s=settings.dashboard.session_hours * 3600.0,
            secure_cookies=settings.api_tls.cert is not None,
        )

    # -- sessions -------------------------------------------------------------------------------------------
    def issue(self, principal: Principal, now: float | None = None) -> str:
        body = {"who": principal.who, "method": principal.method, "roles": sorted(r.value for r in principal.roles)}
        return self.seal("session", body, self.session_s, now)

    def principal(self, cookie: str | None, now: float | None = None) -> Principal | None:
        """The signed-in principal, or None for a missing, forged, malformed or expired cookie."""
        body = self.unseal("session", cookie, now)
        if body is None:
            return None
        try:
            roles = frozenset(Role(r) for r in body["roles"])
            return Principal(str(body["who"]), f"dashboard:{body['method']}", roles)
        except (ValueError, KeyError, TypeError):
            return None

    def seal(self, purpose: str, body: Mapping[str, object], ttl_s: float, now: float | None = None) -> str:
        """``body`` as a signed, expiring cookie value for ``purpose`` (readable, not secret: no secrets in it)."""
        stamped = {**body, "exp": int((now or time.time()) + ttl_s)}
        payload = base64.urlsafe_b64encode(json.dumps(stamped, separators=(",", ":")).encode()).decode().rstrip("=")
        return f"{payload}.{self._mac(purpose, payload)}"

    def unseal(self, purpose: str, cookie: str | None, now: float | None = None) -> dict[str, Any] | None:
        if not cookie or len(cookie) > _MAX_COOKIE or "." not in cookie:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, self._mac(purpose, payload)):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            if not isinstance(body, dict) or float(body["exp"]) < (now or time.time()):
                return None
        except (ValueError, KeyError, TypeError):
            return None
        return body

    # -- CSRF -----------------------------------------------------------------------------------------------
    @staticmethod
    def new_csrf_cookie() -> str:
        return secrets.token_urlsafe(24)

    def csrf_token(self, csrf_cookie: str) -> str:
        return self._mac("csrf", csrf_cookie)

    def csrf_ok(self, csrf_cookie: str | None, token: str | None) -> bool:
        if not csrf_cookie or not token or len(csrf_cookie) > 128 or len(token) > 128:
            return False
        return hmac.compare_digest(self.csrf_token(csrf_cookie), token)

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self.key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()
