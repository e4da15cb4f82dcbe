"""ASGI middleware around the routes: trusted Host headers, CORS only when configured, the request body limit,
and the audit trail of calls that concern patients."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from integration.config import Settings
from integration.entrypoints.api.security.audit import AuditLog, record
from integration.entrypoints.api.security.policy import ANONYMOUS, Principal, audited

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def install(app: FastAPI, settings: Settings, audit_log: AuditLog) -> None:
    """Outermost first: Host check, CORS (if any origin is configured), body limit, audit."""
    app.add_middleware(AuditTrail, audit_log=audit_log)
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_body_bytes)
    if settings.api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings))


def allowed_hosts(settings: Settings) -> list[str]:
    """The loopback names, ``api_host`` (as `strokewatch run` polls it), the host of ``public_base_url`` and
    ``api.allowed_hosts``: another name the hospital's DNS gives the engine must be listed (DNS rebinding defence)."""
    hosts = ["127.0.0.1", "localhost", "[::1]"]
    for host in (settings.api_host, urlsplit(settings.public_base_url or "").hostname, *settings.api.allowed_hosts):
        if host and host not in hosts:
            hosts.append(host)
    return hosts


async def _plain(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413 before the app sees it: by its Content-Length, or, for a
    chunked body, as soon as the bytes read pass the limit (at most ``max_bytes`` are ever held)."""

    def __init__(self, app: App, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body larger than {self.max_bytes} bytes (STROKEWATCH_API__MAX_BODY_BYTES)"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    await _plain(send, 400, "Content-Length is not a number")
                    return
                if int(value) > self.max_bytes:
                    await _plain(send, 413, too_large)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _plain(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)


class AuditTrail:
    """After each call to an audited route (``policy.audited``), one audit record with the final status."""

    def __init__(self, app: App, audit_log: AuditLog) -> None:
        self.app = app
        self.audit_log = audit_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            if isinstance(path, str) and audited(path):
                self._write(scope, path, status)

    def _write(self, scope: Scope, route: str, status: int) -> None:
        state = scope.get("state") or {}
        principal: Principal = state.get("principal", ANONYMOUS)
        params = scope.get("path_params") or {}
        patients = list(state.get("audit_patients", []))
        studies = list(state.get("audit_studies", []))
        if "fhir_id" in params and status < 400:  # an id that was not found may be anything someone typed
            patients.append(str(params["fhir_id"]))
        if "study_uid" in params:
            studies.append(str(params["study_uid"]))
        entry = record(
            who=principal.who,
            auth=principal.method,
            method=str(scope.get("method", "")),
            route=route,
            status=status,
            patients=patients,
            studies=studies,
        )
        try:
            self.audit_log.write(entry)
        except OSError as err:  # the request has been answered; say loudly that the trail has a gap
            log.error("audit log %s could not be written (%s): a record is missing", self.audit_log.path, err.strerror)
