"""PACS checks: QIDO-RS answers, the credentials are accepted, and whether Orthanc's /changes feed is there."""

from __future__ import annotations

from typing import Any

import httpx

from integration.config import Settings
from integration.services.doctor.http import answers_without_token, auth_rejected, json_body, prepare_auth, unreachable
from integration.services.doctor.result import CheckResult, env_name


def check_pacs(settings: Settings, *, timeout_s: float, quick: bool = False) -> list[CheckResult]:
    """QIDO-RS answers; auth accepted; Orthanc and its /changes feed (doctor only)."""
    pacs, url_var = settings.pacs, env_name("pacs", "dicomweb_url")
    if not pacs.dicomweb_url:
        return [CheckResult("pacs", False, "no DICOMweb URL configured", f"set {url_var}")]
    base = pacs.dicomweb_url.rstrip("/")
    with httpx.Client(timeout=timeout_s, verify=pacs.verify_tls) as client:
        http_auth, note, failure = prepare_auth("pacs", pacs.auth, client, fetch_token=not quick)
        if failure:
            return [CheckResult("pacs", False, "not tried: no credentials", failure.hint), failure]
        qido = f"{base}/studies?limit=1"
        try:
            resp = client.get(qido, auth=http_auth, headers={"Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            return [unreachable("pacs", qido, exc, url_var)]
        if answers_without_token(pacs.auth, resp, quick):
            return [CheckResult("pacs", True, f"QIDO-RS {base}/studies answers (asks for the OAuth2 token)")]
        if resp.status_code in (401, 403):
            rejected = auth_rejected("pacs", pacs.auth, resp)
            return [CheckResult("pacs", False, f"QIDO-RS {qido}: HTTP {resp.status_code}", rejected.hint), rejected]
        if resp.status_code not in (200, 204):
            hint = f"{url_var} must be the DICOMweb root (for Orthanc: http://HOST:8042/dicom-web)"
            return [CheckResult("pacs", False, f"QIDO-RS {qido} answered HTTP {resp.status_code}", hint)]
        results = [CheckResult("pacs", True, f"QIDO-RS {base}/studies answers")]
        if quick:
            return results
        mode = note or "no authentication"
        results.append(CheckResult("pacs auth", True, f"{mode}: accepted"))
        results.append(_orthanc_feed(settings, client, http_auth))
        results.append(
            CheckResult(
                "pacs time zone",
                True,
                f"study dates without TimezoneOffsetFromUTC are read in {pacs.study_zone_name()}; "
                f"studies up to {pacs.clock_skew_s:g} s in the future are found (clock skew)",
            )
        )
    return results


def _orthanc_feed(settings: Settings, client: httpx.Client, http_auth: httpx.Auth | None) -> CheckResult:
    pacs = settings.pacs
    root = (pacs.orthanc_url or "").rstrip("/") or None
    if root is None and pacs.dicomweb_url and pacs.dicomweb_url.rstrip("/").endswith("/dicom-web"):
        root = pacs.dicomweb_url.rstrip("/")[: -len("/dicom-web")]
    generic = CheckResult(
        "pacs change feed",
        True,
        f"generic DICOMweb: new studies found by QIDO-RS polling every {pacs.poll_seconds:g} s "
        f"over a {pacs.lookback_hours:g} h window",
    )
    if pacs.kind == "generic":
        return generic
    system: dict[str, Any] = {}
    changes: dict[str, Any] | None = None
    if root:
        try:
            system = json_body(client.get(f"{root}/system", auth=http_auth))
            resp = client.get(f"{root}/changes", params={"limit": 0}, auth=http_auth)
            changes = json_body(resp) if resp.status_code == 200 else None
        except httpx.HTTPError:
            system, changes = {}, None
    if "ApiVersion" in system and changes is not None:
        return CheckResult(
            "pacs change feed",
            True,
            f"Orthanc {system.get('Version', '?')} at {root}: /changes available (last change {changes.get('Last')})",
        )
    if pacs.kind == "orthanc":
        return CheckResult(
            "pacs change feed",
            False,
            f"pacs.kind is orthanc but {root or '(no Orthanc URL)'} does not answer Orthanc's /system and /changes",
            f"set {env_name('pacs', 'orthanc_url')} to Orthanc's REST root, or {env_name('pacs', 'kind')}=generic",
        )
    return generic
