"""HTTP plumbing shared by the PACS and EHR checks: auth as configured, and the messages for refusals."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus

import httpx

from integration.config import AuthSettings
from integration.services.doctor.result import CheckResult, env_name, short_error


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers["Authorization"] = self._header
        yield request


def prepare_auth(
    peer: str, auth: AuthSettings, client: httpx.Client, *, fetch_token: bool = True
) -> tuple[httpx.Auth | None, str | None, CheckResult | None]:
    """(httpx auth, a note for the auth check, a failed CheckResult if credentials could not even be obtained).

    ``fetch_token=False`` (the readiness probe) skips the OAuth2 token request: the probe only asks whether
    the peer answers, and a token per probe would load the identity provider for nothing.
    """
    if auth.mode == "basic" and auth.username and auth.password:
        return httpx.BasicAuth(auth.username, auth.password.get_secret_value()), "HTTP Basic", None
    if auth.mode == "bearer" and auth.token:
        return _Bearer(auth.token.get_secret_value()), "static bearer token", None
    if auth.mode == "oauth2" and not fetch_token:
        return None, None, None
    if auth.mode == "oauth2" and auth.token_url and auth.client_id and auth.client_secret:
        token, note, failure = _fetch_token(peer, auth, client)
        return (_Bearer(token) if token else None), note, failure
    return None, None, None


def _fetch_token(
    peer: str, auth: AuthSettings, client: httpx.Client
) -> tuple[str | None, str | None, CheckResult | None]:
    """OAuth2 client credentials (RFC 6749 4.4), client authenticated with HTTP Basic (client_secret_basic)."""
    assert auth.token_url and auth.client_id and auth.client_secret
    form = {"grant_type": "client_credentials"} | ({"scope": auth.scope} if auth.scope else {})
    # RFC 6749 2.3.1: id and secret are form-urlencoded before the Basic encoding.
    basic = httpx.BasicAuth(quote_plus(auth.client_id), quote_plus(auth.client_secret.get_secret_value()))
    name = f"{peer} auth"
    try:
        resp = client.post(auth.token_url, data=form, auth=basic, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        hint = f"check {env_name(peer, 'auth', 'token_url')}"
        return (
            None,
            None,
            CheckResult(name, False, f"token endpoint {auth.token_url} unreachable: {short_error(exc)}", hint),
        )
    body = json_body(resp)
    if resp.status_code != 200 or not body.get("access_token"):
        error = body.get("error") or f"HTTP {resp.status_code}"
        hint = f"check {env_name(peer, 'auth', 'client_id')} and {env_name(peer, 'auth', 'client_secret')}"
        if resp.status_code == 404:
            hint = f"check {env_name(peer, 'auth', 'token_url')}"
        return (
            None,
            None,
            CheckResult(name, False, f"token endpoint {auth.token_url} refused the client: {error}", hint),
        )
    expires = body.get("expires_in")
    note = f"OAuth2 client credentials: token fetched from {auth.token_url}" + (
        f" (expires in {expires} s)" if expires else ""
    )
    return str(body["access_token"]), note, None


def json_body(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def auth_rejected(peer: str, auth: AuthSettings, resp: httpx.Response) -> CheckResult:
    name, status = f"{peer} auth", resp.status_code
    challenge = resp.headers.get("WWW-Authenticate", "")
    offered = f" (server offers: {challenge})" if challenge else ""
    if status == 403:
        return CheckResult(
            name,
            False,
            f"HTTP 403: the credentials were accepted but lack permission{offered}",
            f"grant the account/client read and write access, or change {env_name(peer, 'auth', 'scope')}",
        )
    fields = {
        "none": f"set {env_name(peer, 'auth', 'mode')}=basic|bearer|oauth2 and its credentials",
        "basic": f"check {env_name(peer, 'auth', 'username')} and {env_name(peer, 'auth', 'password')}",
        "bearer": f"check {env_name(peer, 'auth', 'token')}",
        "oauth2": f"check {env_name(peer, 'auth', 'client_id')}, {env_name(peer, 'auth', 'client_secret')} and "
        f"{env_name(peer, 'auth', 'scope')}",
    }[auth.mode]
    what = (
        "the server demands authentication but none is configured"
        if auth.mode == "none"
        else (f"the server rejected the {auth.mode} credentials")
    )
    return CheckResult(name, False, f"HTTP 401: {what}{offered}", fields)


def unreachable(name: str, url: str, exc: Exception, setting: str) -> CheckResult:
    return CheckResult(
        name, False, f"{url} unreachable: {short_error(exc)}", f"check {setting} and that the server is up"
    )


def answers_without_token(auth: AuthSettings, resp: httpx.Response, quick: bool) -> bool:
    """In the probe, a 401 from a peer we did not fetch a token for still shows that it is up."""
    return quick and auth.mode == "oauth2" and resp.status_code == 401
