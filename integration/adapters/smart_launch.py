"""SMART App Launch 2.x, EHR launch, for the dashboard: the EHR opens ``/dashboard/launch?iss=...&launch=...``,
the dashboard sends the browser to the EHR's authorization endpoint (authorization code with PKCE S256, a public
client: no secret), and exchanges the code for the launch context (the ``patient`` the clinician has open).

Only the configured EHR may launch it (``iss`` must be ``ehr.base_url``); its endpoints come from
``{iss}/.well-known/smart-configuration`` and must be https or loopback. The access token is not kept or logged:
the dashboard needs only the context and the fact that the EHR signed the clinician in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

log = logging.getLogger(__name__)

#: Answers from the EHR larger than this are refused before they are parsed.
MAX_ANSWER_BYTES = 256 * 1024


class LaunchRefused(Exception):
    """The launch cannot go on; the message says why (no token, no secret in it)."""


@dataclass(frozen=True)
class Endpoints:
    authorize: str
    token: str


@dataclass(frozen=True)
class LaunchContext:
    patient: str
    #: Who the EHR says signed in (``fhirUser`` or ``sub`` of the token answer), when it says.
    user: str | None


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, code_challenge) for PKCE S256 (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def _https_or_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"))


class SmartLauncher:
    def __init__(self, ehr_base_url: str, client_id: str, scope: str, *, timeout_s: float,
                 verify: ssl.SSLContext) -> None:
        self.iss = ehr_base_url.rstrip("/")
        self.client_id = client_id
        self.scope = scope
        self._http = httpx.Client(timeout=timeout_s, verify=verify, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def trusts(self, iss: str) -> bool:
        return iss.rstrip("/") == self.iss

    def endpoints(self) -> Endpoints:
        config = self._json("GET", f"{self.iss}/.well-known/smart-configuration")
        authorize, token = config.get("authorization_endpoint"), config.get("token_endpoint")
        if not isinstance(authorize, str) or not isinstance(token, str):
            raise LaunchRefused("the EHR's smart-configuration names no authorization or token endpoint")
        if not (_https_or_loopback(authorize) and _https_or_loopback(token)):
            raise LaunchRefused("the EHR's SMART endpoints must be https")
        return Endpoints(authorize, token)

    def authorize_url(self, endpoints: Endpoints, *, launch: str, redirect_uri: str, state: str,
                      challenge: str) -> str:
        query = urlencode({
            "response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri, "launch": launch,
            "scope": self.scope, "state": state, "aud": self.iss, "code_challenge": challenge,
            "code_challenge_method": "S256",
        })
        return f"{endpoints.authorize}{'&' if '?' in endpoints.authorize else '?'}{query}"

    def exchange(self, endpoints: Endpoints, *, code: str, verifier: str, redirect_uri: str) -> LaunchContext:
        answer = self._json("POST", endpoints.token, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": self.client_id, "code_verifier": verifier,
        })
        patient = answer.get("patient")
        if not isinstance(answer.get("access_token"), str) or not isinstance(patient, str) or not patient:
            raise LaunchRefused("the EHR's token answer carries no patient context")
        user = answer.get("fhirUser") or answer.get("sub")
        return LaunchContext(patient[:128], str(user)[:128] if isinstance(user, str) else None)

    def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        """One call to the EHR, its answer read up to ``MAX_ANSWER_BYTES`` (never more is held) as a JSON object."""
        try:
            with self._http.stream(method, url, headers={"Accept": "application/json"}, **kwargs) as response:
                if response.status_code != 200:
                    raise LaunchRefused(f"the EHR answered {response.status_code} to {urlsplit(url).path}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise LaunchRefused("the EHR's answer is too large")
        except httpx.HTTPError as err:
            raise LaunchRefused(f"the EHR could not be reached ({type(err).__name__})") from None
        try:
            value = json.loads(body)
        except ValueError:
            raise LaunchRefused("the EHR's answer is not JSON") from None
        if not isinstance(value, dict):
            raise LaunchRefused("the EHR's answer is not a JSON object")
        return value
