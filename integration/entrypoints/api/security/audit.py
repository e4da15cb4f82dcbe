"""The audit trail: every call to a route that touches patient data, as one JSON line in
``data_dir/audit/audit.log`` (folder 0700, file 0600): when, who (key name, JWT ``sub``, CDS client, webhook
source), the route, the patients (FHIR ids) and studies (UIDs) concerned, and the outcome. FHIR ids and DICOM
UIDs only: never a name, an MRN or a birth date, and never a credential.

With ``api.audit_fhir`` each record is also sent to the EHR as a FHIR ``AuditEvent``, in the background; a
failure to send is logged, never fatal to the request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from integration.domain.ids import is_dicom_uid
from integration.domain.types import DomainError

log = logging.getLogger(__name__)

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: AuditEvents waiting to be sent; beyond this they are dropped (and counted in the log), not queued without end.
MAX_PENDING = 1000


@dataclass(frozen=True)
class AuditRecord:
    at: str
    who: str
    auth: str
    method: str
    route: str
    status: int
    outcome: str  # allowed | denied | failed
    patients: list[str]
    studies: list[str]


def record(
    *, who: str, auth: str, method: str, route: str, status: int, patients: list[str], studies: list[str]
) -> AuditRecord:
    """An audit record; ids that are not FHIR ids or DICOM UIDs are left out (they could be anything typed)."""
    outcome = "allowed" if status < 400 else ("denied" if status in (401, 403) else "failed")
    return AuditRecord(
        at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        who=who,
        auth=auth,
        method=method,
        route=route,
        status=status,
        outcome=outcome,
        patients=sorted({p for p in patients if FHIR_ID.fullmatch(p)}),
        studies=sorted({s for s in studies if is_dicom_uid(s)}),
    )


class AuditLog:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "audit" / "audit.log"
        self._lock = threading.Lock()
        self._send: Callable[[dict[str, Any]], object] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0

    def forward_to(self, send: Callable[[dict[str, Any]], object]) -> None:
        """Also hand each record, as a FHIR AuditEvent, to ``send`` (the EHR adapter's create), in the background."""
        self._send = send
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-event")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def write(self, entry: AuditRecord) -> None:
        line = (json.dumps(asdict(entry), separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path.parent, 0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, line)
            finally:
                os.close(fd)
        if self._pool is not None:
            with self._lock:
                if self._pending >= MAX_PENDING:
                    log.warning("audit: %d AuditEvents waiting for the EHR; this one is only in the file", MAX_PENDING)
                    return
                self._pending += 1
            self._pool.submit(self._deliver, audit_event(entry))

    def _deliver(self, resource: dict[str, Any]) -> None:
        assert self._send is not None
        try:
            self._send(resource)
        except DomainError as err:
            log.warning("audit: the EHR did not take an AuditEvent (%s); it is in the audit log", err.outcome.value)
        except Exception as exc:  # never let auditing break the API; the file has the record
            log.warning("audit: sending an AuditEvent failed (%s); it is in the audit log", type(exc).__name__)
        finally:
            with self._lock:
                self._pending -= 1


def audit_event(entry: AuditRecord) -> dict[str, Any]:
    """The record as a FHIR R4 ``AuditEvent`` (a RESTful operation on the StrokeWatch API)."""
    entities: list[dict[str, Any]] = [{"what": {"reference": f"Patient/{p}"}} for p in entry.patients]
    entities += [
        {"what": {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}}, "name": "study"}
        for uid in entry.studies
    ]
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": "urn:strokewatch:api-route", "code": f"{entry.method} {entry.route}"}],
        "action": "R" if entry.method in ("GET", "HEAD") else "E",
        "recorded": entry.at,
        "outcome": "0" if entry.outcome == "allowed" else ("4" if entry.outcome == "denied" else "8"),
        "outcomeDesc": f"HTTP {entry.status}",
        "agent": [{"who": {"display": entry.who}, "requestor": True}],
        "source": {"observer": {"display": "StrokeWatch API"}},
    }
    if entities:
        event["entity"] = entities
    return event
