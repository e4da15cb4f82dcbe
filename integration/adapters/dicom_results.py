"""The ``ResultsArchive`` port: the engine's DICOM results written back to the source PACS.

- ``DicomWebResults``: reads the source series by WADO-RS (whole instances, bounded by the image limits), stores by
  STOW-RS (PS3.18 10.5: ``POST {root}/studies/{StudyInstanceUID}``, multipart/related application/dicom, a few
  instances per request) and looks instances up by QIDO-RS. It shares the ``DicomWebPacs``'s HTTP client (auth, TLS,
  timeouts). A 409 or a Failed SOP Sequence in the answer is ``pacs_rejected``; 5xx/408/429/timeouts are
  ``pacs_unavailable`` (retried).
- ``DimseResults``: a DIMSE-only PACS: C-GET of the series, C-STORE of the results, C-FIND for an instance, on
  associations with the PACS's node (``[pacs.dimse]``).
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
from pydicom import Dataset, dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt

from integration.adapters.dicomweb import DicomWebPacs, _body_chunks, _checked_uids, _retry_after, _unavailable
from integration.adapters.dicomweb_parse import MultipartReader, multipart_boundary
from integration.adapters.dimse import DimsePacs
from integration.adapters.dimse_query import query
from integration.adapters.dimse_session import ScuAE
from integration.domain.limits import too_large
from integration.domain.types import DomainError, Outcome

log = logging.getLogger(__name__)

SERIES_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Instances per STOW-RS request (a heat-map series of 500 slices is 16 requests, none of them huge).
STOW_BATCH = 32
FAILED_SOP_SEQUENCE = "00081198"
#: What the engine writes: Comprehensive 3D SR and (single-frame) Secondary Capture.
RESULT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7")


def encoded(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class DicomWebResults:
    """``ResultsArchive`` over DICOMweb, through the HTTP client of a ``DicomWebPacs``."""

    def __init__(self, pacs: DicomWebPacs) -> None:
        self.pacs = pacs

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = f"{self.pacs.base_url}{path}"
        try:
            response = self.pacs._client.request(method, url, **kwargs)
        except (httpx.TransportError, httpx.InvalidURL) as err:
            raise _unavailable(f"{method} {path}", err, self.pacs._tls) from err
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"PACS answered {response.status_code} to {method} {path}",
                              retry_after=_retry_after(response, self.pacs.retry_after_cap_s))
        if response.status_code in (401, 403):
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"PACS refused the credentials ({response.status_code}) for "
                                                        f"{method} {path}: check STROKEWATCH_PACS__AUTH__*")
        return response

    def source_instances(self, study_uid: str, series_uid: str) -> list[Dataset]:
        _checked_uids(study_uid, series_uid)
        path = f"/studies/{study_uid}/series/{series_uid}"
        limits = self.pacs.limits
        client = self.pacs._client
        request = client.build_request("GET", f"{self.pacs.base_url}{path}",
                                       headers={"Accept": SERIES_ACCEPT, "Accept-Encoding": "identity"})
        try:
            response = client.send(request, stream=True)
        except (httpx.TransportError, httpx.InvalidURL) as err:
            raise _unavailable(f"GET {path}", err, self.pacs._tls) from err
        try:
            if response.status_code >= 500 or response.status_code in (408, 429):
                raise DomainError(Outcome.PACS_UNAVAILABLE, f"PACS answered {response.status_code} to GET {path}")
            if response.status_code >= 400 or response.status_code == 204:
                raise DomainError(Outcome.NO_ELIGIBLE_SERIES, f"series {series_uid}: PACS answered "
                                                              f"{response.status_code}")
            reader = MultipartReader(
                multipart_boundary(response.headers.get("content-type", "")),
                max_header_bytes=limits.multipart_max_header_bytes,
                max_part_bytes=limits.multipart_max_part_bytes,
                max_parts=min(limits.multipart_max_parts, limits.max_slices_per_series),
            )
            received = 0
            parts: list[Dataset] = []
            for chunk in _body_chunks(response, path):
                received += len(chunk)
                if received > limits.max_series_bytes:
                    raise too_large(f"series {series_uid}: more than {limits.max_series_bytes} bytes",
                                    str(limits.max_series_bytes), "MAX_SERIES_BYTES")
                parts += [_read(part) for _, part in reader.feed(chunk)]
            parts += [_read(part) for _, part in reader.finish()]
        finally:
            response.close()
        return parts

    def store(self, datasets: Sequence[Dataset]) -> None:
        by_study: dict[str, list[Dataset]] = {}
        for ds in datasets:
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        for study_uid, items in by_study.items():
            _checked_uids(study_uid)
            for start in range(0, len(items), STOW_BATCH):
                self._stow(study_uid, items[start : start + STOW_BATCH])

    def _stow(self, study_uid: str, items: Sequence[Dataset]) -> None:
        boundary = uuid.uuid4().hex
        body = b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + encoded(ds) + b"\r\n"
            for ds in items
        ) + b"--" + boundary.encode() + b"--\r\n"
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        path = f"/studies/{study_uid}"
        response = self._request("POST", path, content=body, headers=headers)
        failed = _failed_count(response)
        if response.status_code >= 400 or failed:
            raise DomainError(
                Outcome.PACS_REJECTED,
                f"STOW-RS {path}: the PACS answered {response.status_code}"
                + (f" and refused {failed} of {len(items)} instance(s)" if failed else ""),
            )

    def find_instance(self, study_uid: str, sop_instance_uid: str) -> dict[str, str] | None:
        _checked_uids(study_uid, sop_instance_uid)
        path = f"/studies/{study_uid}/instances"
        response = self._request("GET", path, params={"SOPInstanceUID": sop_instance_uid,
                                                      "includefield": "0020000E"},
                                 headers={"Accept": "application/dicom+json"})
        if response.status_code in (204, 404) or not response.content:
            return None
        if response.status_code >= 400:
            raise DomainError(Outcome.PACS_REJECTED, f"QIDO-RS {path}: the PACS answered {response.status_code}")
        for item in response.json():
            if _value(item, "00080018") == sop_instance_uid:
                return {"SeriesInstanceUID": _value(item, "0020000E"), "SOPClassUID": _value(item, "00080016")}
        return None


def _read(part: bytes | bytearray) -> Dataset:
    try:
        return dcmread(io.BytesIO(bytes(part)))
    except Exception as err:  # pydicom raises many kinds for a bad file
        raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"the PACS sent an unreadable instance: {type(err).__name__}") \
            from err


def _value(item: dict[str, Any], tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _failed_count(response: httpx.Response) -> int:
    try:
        answer = response.json()
    except ValueError:
        return 0
    if not isinstance(answer, dict):
        return 0
    return len((answer.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or [])


class DimseResults:
    """``ResultsArchive`` over DIMSE, on the association settings of a ``DimsePacs``: the source series by C-GET
    (whole datasets, up to the image limits), the results by C-STORE, an instance looked up by C-FIND (IMAGE level).
    """

    def __init__(self, pacs: DimsePacs) -> None:
        self.pacs = pacs
        ae = ScuAE(ae_title=pacs.calling_aet)
        ae.connection_timeout = pacs.connect_timeout_s
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (pacs._query_ae.acse_timeout,
                                                                  pacs._query_ae.dimse_timeout,
                                                                  pacs._query_ae.network_timeout)
        for sop_class in RESULT_SOP_CLASSES:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._store_ae = ae

    def source_instances(self, study_uid: str, series_uid: str) -> list[Dataset]:
        _checked_uids(study_uid, series_uid)
        limits = self.pacs.limits
        kept: list[Dataset] = []
        sizes = [0]

        def on_store(event: evt.Event) -> int:
            if len(kept) >= limits.max_slices_per_series or sizes[0] > limits.max_series_bytes:
                return 0xA700  # out of resources: the C-GET ends with failures, reported below
            ds = event.dataset
            ds.file_meta = event.file_meta
            sizes[0] += len(ds.PixelData) if "PixelData" in ds else 0
            kept.append(ds)
            return 0x0000

        with self.pacs._association(f"results: source series {series_uid}", storage=True,
                                    on_store=on_store) as session:
            self.pacs._series_on_pacs(session, study_uid, series_uid)
            identifier = query("SERIES", (), StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
            self.pacs._get(session, identifier, series_uid)
        return kept

    def store(self, datasets: Sequence[Dataset]) -> None:
        pacs = self.pacs
        assoc = self._store_ae.associate(
            pacs.host, pacs.port, ae_title=pacs.called_aet, max_pdu=pacs.max_pdu_bytes,
            tls_args=(pacs.tls, pacs.host) if pacs.tls is not None else None,
        )
        if not assoc.is_established:
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"{pacs.where}: no association for C-STORE of the results")
        try:
            for ds in datasets:
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as err:  # the PACS accepted no presentation context for this SOP class
                    raise DomainError(Outcome.PACS_REJECTED, f"{pacs.where} does not accept {ds.SOPClassUID.name} "
                                                             "by C-STORE") from err
                code = int(status.Status) if status is not None and "Status" in status else None
                if code is None:
                    raise DomainError(Outcome.PACS_UNAVAILABLE, f"{pacs.where}: the association ended during a "
                                                                "C-STORE of the results")
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise DomainError(Outcome.PACS_REJECTED, f"{pacs.where} refused a C-STORE of the results "
                                                             f"(status 0x{code:04X})")
        finally:
            if assoc.is_established:
                assoc.release()

    def find_instance(self, study_uid: str, sop_instance_uid: str) -> dict[str, str] | None:
        _checked_uids(study_uid, sop_instance_uid)
        identifier = query("IMAGE", ("SeriesInstanceUID", "SOPClassUID"), StudyInstanceUID=study_uid,
                           SOPInstanceUID=sop_instance_uid)
        with self.pacs._association("results: C-FIND of an instance") as session:
            found = session.find(identifier, limit=10)
        for answer in found.answers:
            if answer.text("SOPInstanceUID") in ("", sop_instance_uid) and answer.text("SeriesInstanceUID"):
                return {"SeriesInstanceUID": answer.text("SeriesInstanceUID"),
                        "SOPClassUID": answer.text("SOPClassUID")}
        return None
