"""Orthanc's change log as a ``ChangeFeed``: studies that became stable, from a persisted integer cursor.

``GET /changes?since=N&limit=M`` lists events in sequence order. A ``StableStudy`` event fires when no
instance has arrived for the study during Orthanc's ``StableAge`` seconds, i.e. the study is complete.

Delivery is at-least-once and the caller de-duplicates (the database, by StudyInstanceUID):
* a study that receives more instances after it was stable fires ``StableStudy`` again (so do re-sent
  instances when Orthanc is configured to overwrite them);
* a cursor beyond Orthanc's last sequence number means the change log was cleared or the PACS was
  rebuilt; the feed then returns Orthanc's ``Last`` (the cursor moves back) so new events are not skipped.
A study deleted between its event and our lookup is dropped silently (there is nothing to fetch).
"""

from __future__ import annotations

import logging
import ssl
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from integration.adapters.tls import default_context, tls_failure
from integration.domain.checks import CheckResult, env_name
from integration.domain.ids import is_orthanc_id, require_orthanc_id
from integration.domain.types import DomainError, Outcome, StableStudy

log = logging.getLogger(__name__)
LOOKUP = "POST /tools/lookup"


class OrthancChangeFeed:
    """``ChangeFeed`` over Orthanc's REST API; ``base_url`` is the REST root, e.g. ``http://pacs:8042``.
    ``tls``: the PACS's context from ``adapters.tls.ssl_context`` (default: TLS 1.2+, system trust store)."""

    def __init__(
        self,
        base_url: str,
        auth: httpx.Auth | None = None,
        client: httpx.Client | None = None,
        *,
        timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._owns_client = client is None
        self._tls = tls or default_context()
        self._client = client or httpx.Client(auth=auth, timeout=timeout, verify=self._tls)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _get(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        try:
            response = self._client.get(f"{self.base_url}{path}", params=params)
        except httpx.TransportError as err:
            problem = tls_failure(err, "pacs", env_name("pacs", "orthanc_url"), self._tls)
            if problem is not None:
                message = f"Orthanc TLS failed (GET {path}): {problem.explanation}; {problem.hint}"
                raise DomainError(Outcome.PACS_UNAVAILABLE, message) from err
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"Orthanc is unreachable (GET {path}): {err}") from err
        if response.status_code >= 500 or response.status_code in (401, 403, 408, 429):
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"Orthanc answered {response.status_code} to GET {path}")
        return response

    def _json(self, path: str, params: dict[str, str] | None = None) -> Any:
        response = self._get(path, params)
        if response.status_code >= 400:
            raise DomainError(Outcome.INTERNAL_ERROR, f"Orthanc answered {response.status_code} to GET {path}")
        try:
            return response.json()
        except ValueError as err:
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"Orthanc answered GET {path} with invalid JSON") from err

    def stable_studies(self, since: int, limit: int = 100) -> tuple[list[StableStudy], int, bool]:
        """(the studies of StableStudy events after ``since``, each once, in event order, new cursor, done)."""
        page = self._json("/changes", {"since": str(since), "limit": str(limit)})
        found: dict[str, StableStudy] = {}
        for change in page.get("Changes", []):
            if change.get("ChangeType") != "StableStudy":
                continue
            if not is_orthanc_id(change.get("ID")):
                log.warning("Orthanc change %s names no valid study id; skipped", change.get("Seq"))
                continue
            uid = self.study_uid(str(change["ID"]))
            if uid and uid not in found:
                found[uid] = StableStudy(uid, change_time(change.get("Date")))
        last = int(page.get("Last", since))
        if last < since:
            log.warning("Orthanc change log restarted (cursor %d > last %d): reading from %d", since, last, last)
        return list(found.values()), last, bool(page.get("Done", True))

    def is_stable(self, study_uid: str) -> bool | None:
        """Orthanc's ``IsStable`` for the study (``POST /tools/lookup`` finds its Orthanc id); None when Orthanc
        does not hold it. Orthanc keeps its stability timers in memory: a study received before a restart is
        stable after it, but no StableStudy event is ever emitted for it, hence this question."""
        try:
            response = self._client.post(f"{self.base_url}/tools/lookup", content=study_uid.encode("ascii"))
        except httpx.TransportError as err:
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"Orthanc is unreachable ({LOOKUP}): {err}") from err
        if response.status_code >= 400:
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"Orthanc answered {response.status_code} to {LOOKUP}")
        try:
            found = response.json()
        except ValueError as err:
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"Orthanc answered {LOOKUP} with invalid JSON") from err
        ids = [str(f.get("ID")) for f in found if isinstance(f, dict) and f.get("Type") == "Study"]
        if not ids or not is_orthanc_id(ids[0]):
            return None
        response = self._get(f"/studies/{ids[0]}")
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"Orthanc answered {response.status_code} for a study")
        return bool(response.json().get("IsStable", False))

    def latest_cursor(self) -> int:
        """The current end of the change log: start here to ignore what happened before."""
        return int(self._json("/changes", {"last": ""}).get("Last", 0))

    def study_uid(self, orthanc_id: str) -> str | None:
        """The StudyInstanceUID of an Orthanc study id (None when Orthanc no longer has it)."""
        if not orthanc_id:
            return None
        require_orthanc_id(orthanc_id)  # before it goes into a URL: no "../instances/x/file", no "x?y"
        response = self._get(f"/studies/{orthanc_id}")
        if response.status_code == 404:  # deleted since the event
            return None
        if response.status_code >= 400:
            raise DomainError(Outcome.INTERNAL_ERROR, f"Orthanc answered {response.status_code} for a study")
        uid = response.json().get("MainDicomTags", {}).get("StudyInstanceUID")
        return str(uid) if uid else None

    # -- preflight (`strokewatch doctor`) ------------------------------------------------------------------

    name = "pacs change feed"

    def probe(self, *, quick: bool, fallback: CheckResult | None = None) -> list[CheckResult]:
        """``pacs change feed``: Orthanc's /system and /changes answer this feed's client (nothing when ``quick``).

        When they do not, ``fallback`` says how studies are found instead (pacs.kind=auto: QIDO-RS polling);
        without one (pacs.kind=orthanc) the feed is required and the result fails, naming the settings.
        """
        if quick:
            return []
        try:
            system = _json_object(self._client.get(f"{self.base_url}/system"))
            changes = _json_object(self._client.get(f"{self.base_url}/changes", params={"limit": 0}))
        except (httpx.HTTPError, DomainError) as err:  # DomainError: an OAuth2 token could not be fetched
            problem = tls_failure(err, "pacs", env_name("pacs", "orthanc_url"), self._tls)
            if problem is not None:  # Orthanc may well be there: say why it cannot be reached
                return [CheckResult(self.name, False, f"{self.base_url}: TLS failed: {problem.explanation}",
                                    problem.hint)]
            system = changes = None
        if system is not None and "ApiVersion" in system and changes is not None:
            detail = f"Orthanc {system.get('Version', '?')} at {self.base_url}: /changes available"
            return [CheckResult(self.name, True, f"{detail} (last change {changes.get('Last')})")]
        return [fallback if fallback is not None else orthanc_missing(self.base_url)]


def polling_result(poll_seconds: float, lookback_hours: float) -> CheckResult:
    """``pacs change feed`` without Orthanc's feed (pacs.kind=generic, or auto and not Orthanc): QIDO-RS polling."""
    return CheckResult(
        OrthancChangeFeed.name,
        True,
        f"generic DICOMweb: new studies found by QIDO-RS polling every {poll_seconds:g} s "
        f"over a {lookback_hours:g} h window",
    )


def orthanc_missing(root: str | None) -> CheckResult:
    """``pacs change feed`` failed: pacs.kind=orthanc but Orthanc does not answer at ``root`` (or none is known)."""
    return CheckResult(
        OrthancChangeFeed.name,
        False,
        f"pacs.kind is orthanc but {root or '(no Orthanc URL)'} does not answer Orthanc's /system and /changes",
        f"set {env_name('pacs', 'orthanc_url')} to Orthanc's REST root, or {env_name('pacs', 'kind')}=generic",
    )


def change_time(stamp: object) -> datetime | None:
    """When an Orthanc change happened: its ``Date`` (``20261205T183522``, UTC, whole seconds) taken as the middle
    of that second (the event lies somewhere in it); None when absent or unreadable."""
    if not isinstance(stamp, str):
        return None
    try:
        second = datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return second + timedelta(milliseconds=500)


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's JSON object; None for an error status or anything but an object."""
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def is_orthanc(
    base_url: str,
    *,
    auth: httpx.Auth | None = None,
    client: httpx.Client | None = None,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """True when ``base_url`` (a REST root, or a DICOMweb root ending in /dicom-web) is Orthanc (GET /system)."""
    return orthanc_root(base_url, auth=auth, client=client, timeout=timeout, tls=tls) is not None


def orthanc_root(
    base_url: str,
    *,
    auth: httpx.Auth | None = None,
    client: httpx.Client | None = None,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> str | None:
    """The Orthanc REST root behind ``base_url``, or None when it is not Orthanc or does not answer."""
    url = base_url.rstrip("/")
    candidates = [url]
    if url.endswith("/dicom-web"):
        candidates.append(url[: -len("/dicom-web")])
    http = client or httpx.Client(auth=auth, timeout=timeout, verify=tls or default_context())
    try:
        for root in candidates:
            try:
                response = http.get(f"{root}/system")
                info = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                continue
            if isinstance(info, dict) and "ApiVersion" in info and "Version" in info and "DicomAet" in info:
                return root
        return None
    finally:
        if client is None:
            http.close()
