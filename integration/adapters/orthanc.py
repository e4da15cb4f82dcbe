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
from typing import Any

import httpx

from integration.domain.types import DomainError, Outcome

log = logging.getLogger(__name__)


class OrthancChangeFeed:
    """``ChangeFeed`` over Orthanc's REST API; ``base_url`` is the REST root, e.g. ``http://pacs:8042``."""

    def __init__(
        self,
        base_url: str,
        auth: httpx.Auth | None = None,
        client: httpx.Client | None = None,
        *,
        timeout: float = 30.0,
        verify: bool | str = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._owns_client = client is None
        self._client = client or httpx.Client(auth=auth, timeout=timeout, verify=verify)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _get(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        try:
            response = self._client.get(f"{self.base_url}{path}", params=params)
        except httpx.TransportError as err:
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

    def stable_studies(self, since: int, limit: int = 100) -> tuple[list[str], int, bool]:
        """(StudyInstanceUIDs of StableStudy events after ``since``, new cursor, done), in event order."""
        page = self._json("/changes", {"since": str(since), "limit": str(limit)})
        uids: list[str] = []
        for change in page.get("Changes", []):
            if change.get("ChangeType") != "StableStudy":
                continue
            uid = self.study_uid(str(change.get("ID", "")))
            if uid and uid not in uids:
                uids.append(uid)
        last = int(page.get("Last", since))
        if last < since:
            log.warning("Orthanc change log restarted (cursor %d > last %d): reading from %d", since, last, last)
        return uids, last, bool(page.get("Done", True))

    def latest_cursor(self) -> int:
        """The current end of the change log: start here to ignore what happened before."""
        return int(self._json("/changes", {"last": ""}).get("Last", 0))

    def study_uid(self, orthanc_id: str) -> str | None:
        """The StudyInstanceUID of an Orthanc study id (None when Orthanc no longer has it)."""
        if not orthanc_id:
            return None
        response = self._get(f"/studies/{orthanc_id}")
        if response.status_code == 404:  # deleted since the event
            return None
        if response.status_code >= 400:
            raise DomainError(Outcome.INTERNAL_ERROR, f"Orthanc answered {response.status_code} for a study")
        uid = response.json().get("MainDicomTags", {}).get("StudyInstanceUID")
        return str(uid) if uid else None


def is_orthanc(
    base_url: str,
    *,
    auth: httpx.Auth | None = None,
    client: httpx.Client | None = None,
    timeout: float = 5.0,
    verify: bool | str = True,
) -> bool:
    """True when ``base_url`` (a REST root, or a DICOMweb root ending in /dicom-web) is Orthanc (GET /system)."""
    return orthanc_root(base_url, auth=auth, client=client, timeout=timeout, verify=verify) is not None


def orthanc_root(
    base_url: str,
    *,
    auth: httpx.Auth | None = None,
    client: httpx.Client | None = None,
    timeout: float = 5.0,
    verify: bool | str = True,
) -> str | None:
    """The Orthanc REST root behind ``base_url``, or None when it is not Orthanc or does not answer."""
    url = base_url.rstrip("/")
    candidates = [url]
    if url.endswith("/dicom-web"):
        candidates.append(url[: -len("/dicom-web")])
    http = client or httpx.Client(auth=auth, timeout=timeout, verify=verify)
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
