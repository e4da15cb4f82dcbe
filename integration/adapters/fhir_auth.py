"""Authentication to a FHIR server as ``httpx.Auth``: HTTP Basic, a static bearer token, OAuth2 client credentials.

Secrets and tokens never reach a log line or an error message: errors name the token endpoint and the
OAuth error code only. The preflight helpers at the end (``probe_token``, ``auth_rejected``) say which
``STROKEWATCH_*`` auth setting to fix.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import httpx

from integration.adapters.tls import default_context, presents_client_cert
from integration.domain.checks import CheckResult, chain_text, env_name, short_error, tls_problem
from integration.domain.retry import DEFAULT_RETRY_AFTER_CAP_S, parse_retry_after
from integration.domain.types import DomainError, Outcome

log = logging.getLogger(__name__)

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]


class BasicAuth(httpx.BasicAuth):
    """HTTP Basic (RFC 7617)."""

    def __repr__(self) -> str:  # httpx's default repr is harmless, but keep secrets out of any repr
        return "BasicAuth(***)"


class BearerAuth(httpx.Auth):
    """A static bearer token (RFC 6750), e.g. an API key issued by the EHR vendor."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("bearer token is empty")
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float  # clock() time after which a new token is fetched


class ClientCredentialsAuth(httpx.Auth):
    """OAuth2 client credentials (RFC 6749 section 4.4) with a client secret.

    The token is fetched on the first request, cached, and fetched again ``refresh_margin_s`` before it
    expires (at most half its lifetime early, so short-lived tokens are still reused). A 401 from the
    FHIR server discards the token and the request is sent once more with a fresh one. Safe to share
    between threads: one lock serialises token fetches. Synchronous clients only.
    """

    requires_response_body = False
    #: The ``auth.mode`` setting this class implements (a subclass authenticating the client otherwise names its own).
    mode = "oauth2"

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | None = None,
        client_auth: ClientAuthMethod = "client_secret_basic",
        refresh_margin_s: float = 60.0,
        default_lifetime_s: float = 300.0,
        timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
        tls_setting: str = env_name("ehr", "tls"),
        token_client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_after_cap_s: float = DEFAULT_RETRY_AFTER_CAP_S,
    ) -> None:
        self._require(token_url, client_id, client_secret)
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = client_secret
        self.scope = scope
        self.client_auth = client_auth
        self.refresh_margin_s = refresh_margin_s
        self.default_lifetime_s = default_lifetime_s
        self._tls = tls or default_context()
        self._http = token_client or httpx.Client(timeout=timeout, verify=self._tls)
        self.tls_setting = tls_setting  # the TLS settings of the peer these credentials are for, for messages
        self._owns_http = token_client is None
        self._clock = clock
        self._lock = threading.Lock()
        self._token: _Token | None = None
        #: The token endpoint's Retry-After is honoured up to this (settings ``retry_after_cap_s``).
        self.retry_after_cap_s = retry_after_cap_s
        #: How many tokens this object has fetched (for `strokewatch doctor` and tests).
        self.tokens_fetched = 0

    def _require(self, token_url: str, client_id: str, client_secret: str) -> None:
        """Refuses incomplete credentials (``SmartBackendAuth`` needs no secret)."""
        if not (token_url and client_id and client_secret):
            raise ValueError("OAuth2 client credentials need token_url, client_id and client_secret")

    def __repr__(self) -> str:
        return f"ClientCredentialsAuth(token_url={self.token_url!r}, client_id={self.client_id!r})"

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.access_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Revoked or expired early (clock skew, server restart): one more try with a new token.
            token = self.access_token(stale=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    async def async_auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        raise RuntimeError("ClientCredentialsAuth fetches tokens synchronously; use httpx.Client")
        yield request  # pragma: no cover - makes this an async generator

    def access_token(self, stale: str | None = None) -> str:
        """A valid token: the cached one unless it is due for refresh or equals ``stale``."""
        with self._lock:
            current = self._token
            if current is not None and current.value != stale and self._clock() < current.refresh_at:
                return current.value
            self._token = self._fetch()
            return self._token.value

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def _fetch(self) -> _Token:
        started = self._clock()
        try:
            response = self._request_token()
        except httpx.HTTPError as exc:
            problem = tls_problem(chain_text(exc), self.tls_setting, client_cert=presents_client_cert(self._tls))
            reason = f"TLS failed: {problem.explanation}; {problem.hint}" if problem else type(exc).__name__
            raise DomainError(
                Outcome.EHR_UNAVAILABLE, f"OAuth token endpoint {self.token_url} unreachable: {reason}"
            ) from None
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise DomainError(
                Outcome.EHR_UNAVAILABLE,
                f"OAuth token endpoint {self.token_url} answered {response.status_code}",
                retry_after=peer_retry_after(response, self.retry_after_cap_s),
            )
        return self._token_from(response, started)

    def _request_token(self) -> httpx.Response:
        """POST the client-credentials grant, the client authenticated as ``client_auth`` says."""
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        auth: httpx.Auth | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT
        if self.client_auth == "client_secret_basic":
            # RFC 6749 2.3.1: id and secret are form-urlencoded before they go into Basic credentials.
            auth = httpx.BasicAuth(_form_encode(self.client_id), _form_encode(self._client_secret))
        else:
            form |= {"client_id": self.client_id, "client_secret": self._client_secret}
        return self._http.post(self.token_url, data=form, auth=auth, headers={"Accept": "application/json"})

    def _token_from(self, response: httpx.Response, started: float) -> _Token:
        body = _json_object(response)
        if response.status_code != 200:
            error = body.get("error", "no error code")
            raise DomainError(
                Outcome.EHR_REJECTED,
                f"OAuth token endpoint {self.token_url} refused client {self.client_id!r}: "
                f"{response.status_code} {error} (check client id, secret and scope)",
            )
        value = body.get("access_token")
        token_type = str(body.get("token_type", "bearer"))
        if not isinstance(value, str) or not value or token_type.lower() != "bearer":
            raise DomainError(
                Outcome.EHR_REJECTED,
                f"OAuth token endpoint {self.token_url} returned no bearer access_token (token_type {token_type!r})",
            )
        lifetime = _seconds(body.get("expires_in")) or self.default_lifetime_s
        margin = min(self.refresh_margin_s, lifetime / 2)
        self.tokens_fetched += 1
        log.info("OAuth token fetched from %s for client %s, valid %.0f s", self.token_url, self.client_id, lifetime)
        return _Token(value, started + lifetime - margin)

    # -- preflight (`strokewatch doctor`, readiness) ----------------------------------------------------

    def probe_token(self, peer: str, *, quick: bool) -> CheckResult:
        """``{peer} auth``: a token requested exactly as the engine requests it (this ``client_auth``).

        ``quick`` (readiness) takes the cached token when it is still fresh, so probes do not load the
        identity provider; otherwise a new token is fetched now and kept for the requests that follow.
        The result names the settings to fix, never the secret.
        """
        name, url = f"{peer} auth", self.token_url
        if quick:
            try:
                self.access_token()
            except DomainError as err:
                return CheckResult(name, False, err.message, _client_hint(peer, self.client_auth))
            return CheckResult(name, True, f"OAuth2 client credentials ({self.client_auth}): token from {url}")
        started = self._clock()
        try:
            response = self._request_token()
        except httpx.HTTPError as exc:
            problem = tls_problem(chain_text(exc), env_name(peer, "tls"), env_name(peer, "auth", "token_url"),
                                  client_cert=presents_client_cert(self._tls))
            if problem is not None:
                detail = f"token endpoint {url}: TLS failed: {problem.explanation}"
                return CheckResult(name, False, detail, problem.hint)
            hint = f"check {env_name(peer, 'auth', 'token_url')}"
            return CheckResult(name, False, f"token endpoint {url} unreachable: {short_error(exc)}", hint)
        try:
            token = self._token_from(response, started)
        except DomainError:
            error = _json_object(response).get("error") or f"HTTP {response.status_code}"
            hint = _client_hint(peer, self.client_auth)
            if response.status_code == 404:
                hint = f"check {env_name(peer, 'auth', 'token_url')}"
            return CheckResult(name, False, f"token endpoint {url} refused the client: {error}", hint)
        with self._lock:
            self._token = token
        expires = _json_object(response).get("expires_in")
        return CheckResult(
            name,
            True,
            f"OAuth2 client credentials ({self.client_auth}): token fetched from {url}"
            + (f" (expires in {expires} s)" if expires else ""),
        )


def auth_mode(auth: httpx.Auth | None) -> str:
    """The ``auth.mode`` setting an ``httpx.Auth`` built by ``bootstrap.build_auth`` came from."""
    if isinstance(auth, ClientCredentialsAuth):
        return auth.mode
    if isinstance(auth, BearerAuth):
        return "bearer"
    if isinstance(auth, httpx.BasicAuth):
        return "basic"
    return "none"


def auth_note(auth: httpx.Auth | None, token: CheckResult | None = None) -> str:
    """How requests authenticate, for an accepted-credentials result (the token result's detail for OAuth2)."""
    if token is not None:
        return token.detail
    notes = {"basic": "HTTP Basic", "bearer": "static bearer token", "oauth2": "OAuth2 client credentials",
             "smart-backend": "SMART Backend Services"}
    return notes.get(auth_mode(auth), "no authentication")


def auth_rejected(peer: str, auth: httpx.Auth | None, response: httpx.Response) -> CheckResult:
    """``{peer} auth`` failed: a 401 or 403, with the settings of the configured auth mode to check."""
    name, status, mode = f"{peer} auth", response.status_code, auth_mode(auth)
    challenge = response.headers.get("WWW-Authenticate", "")
    offered = f" (server offers: {challenge})" if challenge else ""
    if status == 403:
        return CheckResult(
            name,
            False,
            f"HTTP 403: the credentials were accepted but lack permission{offered}",
            f"grant the account/client read and write access, or change {env_name(peer, 'auth', 'scope')}",
        )
    fields = {
        "none": f"set {env_name(peer, 'auth', 'mode')}=basic|bearer|oauth2|smart-backend and its credentials",
        "basic": f"check {env_name(peer, 'auth', 'username')} and {env_name(peer, 'auth', 'password')}",
        "bearer": f"check {env_name(peer, 'auth', 'token')}",
        "oauth2": f"check {env_name(peer, 'auth', 'client_id')}, {env_name(peer, 'auth', 'client_secret')} and "
        f"{env_name(peer, 'auth', 'scope')}",
        "smart-backend": f"check {env_name(peer, 'auth', 'client_id')}, {env_name(peer, 'auth', 'scope')} and that the "
        "JWKS printed by `strokewatch keys jwks` is registered for the client at the server",
    }[mode]
    what = (
        "the server demands authentication but none is configured"
        if mode == "none"
        else f"the server rejected the {mode} credentials"
    )
    return CheckResult(name, False, f"HTTP {status}: {what}{offered}", fields)


def _client_hint(peer: str, method: str) -> str:
    other = "client_secret_post" if method == "client_secret_basic" else "client_secret_basic"
    return (
        f"check {env_name(peer, 'auth', 'client_id')} and {env_name(peer, 'auth', 'client_secret')} "
        f"(sent as {method}; set {env_name(peer, 'auth', 'client_auth')}={other} if the server expects that)"
    )


def _form_encode(text: str) -> str:
    from urllib.parse import quote_plus

    return quote_plus(text)


def _json_object(response: httpx.Response) -> dict[str, object]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def peer_retry_after(response: httpx.Response, cap_s: float) -> float | None:
    """A response's ``Retry-After`` in seconds, clamped to ``cap_s`` (``domain.retry.parse_retry_after``)."""
    return parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC), cap_s)


def _seconds(raw: object) -> float | None:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None  # "inf" would cache a token forever
