"""Which credential each route needs. One table of exceptions; every other route is protected by default:
GET/HEAD need the ``read`` role, any other method ``operate`` (which implies ``read``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from integration.config import ApiSettings
from integration.domain.cds import SERVICE_ID


class Access(StrEnum):
    PUBLIC = "public"  # no credentials
    READ = "read"  # API key or IdP JWT with the read (or operate) role
    OPERATE = "operate"  # API key or IdP JWT with the operate role
    CDS_CLIENT = "cds-client"  # a JWT from an EHR on the CDS Hooks allow-list
    WEBHOOK = "webhook"  # the source's HMAC signature or bearer token
    DASHBOARD = "dashboard"  # read/operate as above, or the dashboard's session cookie (``security.dashboard``)


class Role(StrEnum):
    READ = "read"
    OPERATE = "operate"


#: What each role may do: operate implies read.
GRANTS: dict[Role, frozenset[Access]] = {
    Role.READ: frozenset({Access.READ}),
    Role.OPERATE: frozenset({Access.READ, Access.OPERATE}),
}

#: Webhook routes and the source whose secret signs them.
WEBHOOK_SOURCES: dict[str, str] = {
    "/webhooks/orthanc/stable-study": "orthanc",
    "/webhooks/fhir/subscription": "fhir",
}

#: Routes whose answers or effects concern patients: each call is written to the audit log.
AUDITED_PREFIXES = ("/patients", "/studies", "/assessments", "/failures", "/cds-services/", "/webhooks/",
                    "/dashboard/patients", "/dashboard/failures")

#: The dashboard's sign-in form (open, so that a browser without a session can sign in), sign-out, and the SMART
#: App Launch from the EHR (the EHR's own sign-in is the credential there).
DASHBOARD_OPEN = ("/dashboard/login", "/dashboard/logout", "/dashboard/launch", "/dashboard/launch/callback")


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``who`` is ``key:NAME``, ``jwt:SUB``, ``cds:ISS``, ``webhook:SOURCE`` or ``anonymous``."""

    who: str
    method: str  # api-key | jwt | cds-client | webhook-hmac | webhook-bearer | none
    roles: frozenset[Role] = frozenset()

    def may(self, access: Access) -> bool:
        return any(access in GRANTS[role] for role in self.roles)


ANONYMOUS = Principal("anonymous", "none")


def required_access(method: str, route_path: str, api: ApiSettings) -> Access:
    """The access a route needs; ``route_path`` is the route's template (``/patients/{fhir_id}``)."""
    method = method.upper()
    if (method, route_path) in {("GET", "/health/live"), ("GET", "/cds-services")}:
        return Access.PUBLIC  # liveness; CDS Hooks discovery is open by the spec
    if (method, route_path) == ("GET", "/health/ready"):
        return Access.PUBLIC if api.ready_public else Access.READ
    if (method, route_path) == ("GET", "/metrics"):
        return Access.PUBLIC if api.metrics_public else Access.READ
    if (method, route_path) == ("POST", f"/cds-services/{SERVICE_ID}"):
        return Access.CDS_CLIENT
    if method == "POST" and route_path in WEBHOOK_SOURCES:
        return Access.WEBHOOK
    if route_path in DASHBOARD_OPEN and method in ("GET", "HEAD", "POST"):
        return Access.PUBLIC  # the form, the credential it posts (checked by the route), sign-out; CSRF-protected
    if route_path == "/dashboard" or route_path.startswith("/dashboard/"):
        return Access.DASHBOARD  # GET/HEAD need read, anything else operate (``guard.authorize``)
    return Access.READ if method in ("GET", "HEAD") else Access.OPERATE


def audited(route_path: str) -> bool:
    return route_path.startswith(AUDITED_PREFIXES)
