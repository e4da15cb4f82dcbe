"""The one dependency every route runs first (``FastAPI(dependencies=[Depends(authorize)])``): it finds the
access the route needs (``policy.required_access``) and checks the matching credential, so a route added later
is protected without anyone remembering to protect it. Also the start-up refusal without an auth configuration.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Annotated, Any

from fastapi import HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from integration.adapters.jwks import JwksCache, KeySourceError, TokenError, token_header, verify
from integration.config import ApiJwtSettings, Settings
from integration.entrypoints.api.security import keys
from integration.entrypoints.api.security.cds import CdsClientVerifier, service_url
from integration.entrypoints.api.security.dashboard import SANDBOX, SESSION_COOKIE, DashboardAuth, LoginRequired
from integration.entrypoints.api.security.policy import (
    ANONYMOUS,
    WEBHOOK_SOURCES,
    Access,
    Principal,
    Role,
    required_access,
)
from integration.entrypoints.api.security.replay import ReplayCacheFull
from integration.entrypoints.api.security.webhooks import WebhookRefused, WebhookVerifier

log = logging.getLogger(__name__)

AUTH_SETTINGS = (
    "STROKEWATCH_API__KEYS__<NAME> (make one with `strokewatch keys api-key NAME --role read|operate`) or "
    "STROKEWATCH_API__JWT__ISSUER, STROKEWATCH_API__JWT__AUDIENCE and STROKEWATCH_API__JWT__JWKS_URL"
)


class ApiStartRefused(RuntimeError):
    """The API must not start with these settings; the message says what to set."""


def startup_problem(settings: Settings) -> str | None:
    """Why the API must not start (None when it may): outside the sandbox it needs an auth configuration, and it
    never listens beyond loopback without one."""
    configured = bool(settings.api.keys) or settings.api.jwt.enabled
    if configured:
        return None
    if not settings.sandbox:
        return f"the API needs authentication outside the sandbox: set {AUTH_SETTINGS}"
    if not is_loopback(settings.api_host):
        return (f"STROKEWATCH_API_HOST={settings.api_host} listens beyond this machine, and no API credential is "
                f"configured: set {AUTH_SETTINGS}, or STROKEWATCH_API_HOST=127.0.0.1")
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class Guard:
    """The verifiers, built once per app from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.api = settings.api
        self.keys = keys.ApiKeys(settings.api.keys)
        self.jwt = JwtAuth(settings.api.jwt) if settings.api.jwt.enabled else None
        self.cds = CdsClientVerifier(settings.cds_hooks, service_url(settings.cds_hooks, settings.api_base_url))
        self.webhooks = WebhookVerifier(settings.webhooks)
        self.dashboard = DashboardAuth.from_settings(settings, loopback=is_loopback(settings.api_host))

    def close(self) -> None:
        self.cds.close()
        if self.jwt is not None:
            self.jwt.close()

    def api_principal(self, api_key: str | None, bearer: str | None) -> Principal:
        """The caller of a read/operate route, by API key or IdP JWT; 401 when neither is valid."""
        if api_key:
            principal = self.keys.match(api_key)
            if principal is None:
                raise unauthorized("unknown API key")
            return principal
        if bearer:
            if self.jwt is None:
                raise unauthorized("bearer tokens are not accepted here (no identity provider configured)")
            return self.jwt.principal(bearer)
        raise unauthorized(f"credentials required: an API key in {keys.HEADER} or an OAuth2 bearer token")


class JwtAuth:
    """The hospital IdP's access tokens: signature (JWKS), issuer, audience, exp/nbf; roles from a claim."""

    def __init__(self, settings: ApiJwtSettings) -> None:
        assert settings.jwks_url and settings.issuer and settings.audience
        self.settings = settings
        self.jwks = JwksCache(
            settings.jwks_url,
            setting="STROKEWATCH_API__JWT__JWKS_URL",
            ttl_s=settings.jwks_ttl_s,
            timeout_s=settings.timeout_s,
        )

    def close(self) -> None:
        self.jwks.close()

    def principal(self, token: str) -> Principal:
        try:
            header = token_header(token)
            key = self.jwks.key(header.get("kid"), header["alg"])
            claims = verify(
                token,
                key,
                issuer=str(self.settings.issuer),
                audience=str(self.settings.audience),
                leeway_s=self.settings.leeway_s,
            )
        except KeySourceError as err:
            log.warning("API bearer token not checked: %s", err.reason)
            raise HTTPException(503, "the identity provider's keys cannot be fetched; try again later") from None
        except TokenError as err:
            raise unauthorized(err.reason, invalid_token=True) from None
        subject = claims.get("sub") or claims.get("client_id") or claims.get("azp") or "unknown"
        return Principal(f"jwt:{str(subject)[:128]}", "jwt", self.roles(claims))

    def roles(self, claims: dict[str, Any]) -> frozenset[Role]:
        value: Any = claims
        for part in self.settings.roles_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        granted = set(value.split()) if isinstance(value, str) else {v for v in value or [] if isinstance(v, str)}
        if self.settings.operate_role in granted:
            return frozenset({Role.READ, Role.OPERATE})
        if self.settings.read_role in granted:
            return frozenset({Role.READ})
        return frozenset()


def unauthorized(reason: str, *, invalid_token: bool = False) -> HTTPException:
    challenge = 'Bearer realm="strokewatch"' + (', error="invalid_token"' if invalid_token else "")
    return HTTPException(401, reason, headers={"WWW-Authenticate": challenge})


_api_key = APIKeyHeader(name=keys.HEADER, auto_error=False, description="An API key (`strokewatch keys api-key`)")
_bearer = HTTPBearer(auto_error=False, description="An OAuth2 access token (JWT) from the identity provider")


async def authorize(
    request: Request,
    api_key: Annotated[str | None, Security(_api_key)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """Checks the credential the route needs and leaves the caller in ``request.state.principal``."""
    guard: Guard = request.app.state.guard
    route = request.scope["route"].path
    access = required_access(request.method, route, guard.api)
    request.state.principal = ANONYMOUS
    if access is Access.PUBLIC:
        return ANONYMOUS
    token = bearer.credentials if bearer is not None else None
    try:
        if access is Access.WEBHOOK:
            body = await request.body()  # the size limit applies before: see middleware.BodyLimit
            principal = guard.webhooks.verify(WEBHOOK_SOURCES[route], request.headers, body)
        elif access is Access.CDS_CLIENT:
            if token is None:
                raise unauthorized("a CDS Hooks call needs the EHR's JWT in Authorization: Bearer")
            principal = await run_in_threadpool(guard.cds.verify, token)
        elif access is Access.DASHBOARD:
            principal = await run_in_threadpool(_dashboard_principal, request, guard, api_key, token)
        else:
            principal = await run_in_threadpool(guard.api_principal, api_key, token)
    except WebhookRefused as err:
        log.info("webhook %s refused: %s", route, err.reason)
        raise unauthorized(err.reason) from None
    except KeySourceError as err:
        log.warning("CDS Hooks call not checked: %s", err.reason)
        raise HTTPException(503, "the CDS client's keys cannot be fetched; try again later") from None
    except TokenError as err:
        log.info("CDS Hooks call refused: %s", err.reason)
        raise unauthorized(err.reason, invalid_token=True) from None
    except ReplayCacheFull:
        log.warning("replay cache full on %s: refusing until entries expire", route)
        raise HTTPException(503, "too many recent calls; try again later", headers={"Retry-After": "30"}) from None
    request.state.principal = principal
    if access is Access.DASHBOARD:
        access = Access.READ if request.method in ("GET", "HEAD") else Access.OPERATE
    if access in (Access.READ, Access.OPERATE) and not principal.may(access):
        raise HTTPException(403, f"{principal.who} lacks the {access.value} role this route needs")
    return principal


def _dashboard_principal(request: Request, guard: Guard, api_key: str | None, bearer: str | None) -> Principal:
    """An API credential when one is sent; else the dashboard's session cookie; else, in the sandbox on loopback,
    the sandbox operator. A page without any of them sends the browser to sign in; a form post gets 401."""
    if api_key or bearer:
        return guard.api_principal(api_key, bearer)
    principal = guard.dashboard.principal(request.cookies.get(SESSION_COOKIE))
    if principal is not None and principal.method == "dashboard:api-key":
        current = guard.keys.named(principal.who.removeprefix("key:"))  # the key may be gone, or its role changed
        principal = Principal(principal.who, principal.method, current.roles) if current is not None else None
    if principal is not None:
        return principal
    if guard.dashboard.open_access:
        return SANDBOX
    if request.method in ("GET", "HEAD"):
        raise LoginRequired(request.url.path)
    raise unauthorized("sign in to the dashboard first (/dashboard/login)")
