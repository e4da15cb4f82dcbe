"""Load a synthetic demo cohort into a PACS (STOW-RS) and an EHR (one FHIR transaction per patient).

Uses only the standards (PS3.18 STOW-RS, FHIR R4 transaction), so it loads any sandbox or test server.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class LoadedPatient:
    mrn: str
    study_uid: str
    n_instances: int
    n_observations: int
    true_probability: float


def stow(dicomweb_url: str, files: Iterable[Path], *, client: httpx.Client | None = None,
         headers: dict[str, str] | None = None) -> int:
    """STOW-RS the files as one multipart/related request. Returns how many were sent."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    count = 0
    for path in files:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
        count += 1
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    own = client is None
    client = client or httpx.Client(timeout=120)
    url = f"{dicomweb_url.rstrip('/')}/studies"
    request_headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        **(headers or {}),
    }
    try:
        try:
            resp = client.post(url, content=body, headers=request_headers)
        except httpx.RemoteProtocolError:
            # A kept-alive connection the server closed as it was reused: nothing was stored, and storing the same
            # instances twice is harmless (PS3.18 STOW-RS), so the request is sent once more on a new connection.
            resp = client.post(url, content=body, headers=request_headers)
        if resp.status_code not in (200, 202):
            raise RuntimeError(f"STOW-RS answered {resp.status_code}: {resp.text[:300]}")
    finally:
        if own:
            client.close()
    return count


def post_transaction(fhir_base_url: str, bundle: dict[str, Any], *, client: httpx.Client | None = None,
                     headers: dict[str, str] | None = None) -> dict[str, Any]:
    own = client is None
    client = client or httpx.Client(timeout=120)
    try:
        resp = client.post(fhir_base_url.rstrip("/"), json=bundle,
                           headers={"Content-Type": "application/fhir+json", **(headers or {})})
        if resp.status_code != 200:
            raise RuntimeError(f"FHIR transaction answered {resp.status_code}: {resp.text[:300]}")
        return dict(resp.json())
    finally:
        if own:
            client.close()


def load_cohort(
    n: int,
    seed: int,
    *,
    dicomweb_url: str,
    fhir_base_url: str,
    identifier_system: str,
    window_end: datetime | None = None,
    progress: Callable[[int], None] | None = None,
    patients: bool = True,
    studies: bool = True,
    utc_offset_minutes: int | None = None,
) -> list[LoadedPatient]:
    """Generate ``n`` synthetic patients (synth) and load their FHIR data and DICOM series.

    ``utc_offset_minutes`` puts every patient's site in that UTC offset (DICOM TimezoneOffsetFromUTC and
    the FHIR timestamps) instead of the generator's own choice: a site at the edge of the civil zones.
    """
    import synth

    window_end = window_end or datetime.now(UTC).replace(microsecond=0)
    loaded: list[LoadedPatient] = []
    with httpx.Client(timeout=120) as client, tempfile.TemporaryDirectory(prefix="sw-cohort-") as tmp:
        for i, patient in enumerate(synth.iter_cohort(n, seed)):
            if utc_offset_minutes is not None:
                patient = replace(patient, vitals=replace(patient.vitals, utc_offset_minutes=utc_offset_minutes))
            n_obs = 0
            if patients:
                resources = synth.fhir_resources(patient, identifier_system=identifier_system, window_end=window_end)
                post_transaction(fhir_base_url, synth.transaction_bundle(resources), client=client)
                n_obs = sum(1 for r in resources if r.get("resourceType") == "Observation")
            files: list[Path] = []
            study_uid = ""
            if studies:
                files = synth.write_dicom(patient, Path(tmp) / f"p{i}", window_end=window_end)
                stow(dicomweb_url, files, client=client)
                import pydicom

                study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            loaded.append(LoadedPatient(patient.mrn, study_uid, len(files), n_obs, float(patient.true_probability)))
            if progress:
                progress(i + 1)
    return loaded
