"""Any DICOMweb PACS through QIDO-RS (search) and WADO-RS (retrieve): the ``Pacs`` port (PS3.18).

Queries stay within characters no server needs percent-decoded (Orthanc 1.10 does not decode QIDO
values): date ranges ``YYYYMMDD-YYYYMMDD``, UIDs, keywords, repeated ``includefield`` parameters.
Modality filtering happens here, on the answers; exact date/time filtering in ``domain.studytime``.

Retrieval asks for a whole series as ``multipart/related; type="application/dicom"`` in whatever
transfer syntax the PACS stored (``transfer-syntax=*``), splits the multipart stream itself and decodes
each part as soon as it has arrived with ``dicom_decode`` (uncompressed pixels are read in place;
compressed ones by pydicom + pylibjpeg). Measured 1.5-2x faster than dicomweb-client + ``pixel_array``
on a 160x512x512 CT (bench/bench_retrieve.py).

Errors: connection failures, timeouts, 5xx and 429 -> DomainError(PACS_UNAVAILABLE) (retried by the
task layer, with ``retry_after`` when the PACS said); undecodable pixels -> CORRUPT_PIXEL_DATA naming
the SOP Instance. One immediate retry on a dropped keep-alive connection only (Orthanc closes the
connection after every WADO-RS answer). Never logs patient identifiers.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, tzinfo
from itertools import islice
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

from inference.preprocess import Slice
from integration.adapters.dicom_decode import SeriesSlices, sorted_along_normal
from integration.adapters.dicomweb_parse import (
    MultipartReader,
    attr_float,
    attr_floats,
    attr_int,
    attr_str,
    attr_strs,
    dicom_datetime,
    multipart_boundary,
)
from integration.adapters.fhir_auth import ClientCredentialsAuth, auth_note, auth_rejected
from integration.adapters.tls import default_context, presents_client_cert, tls_failure
from integration.domain import stages
from integration.domain.checks import CheckResult, env_name, unreachable
from integration.domain.ids import is_dicom_uid, shown
from integration.domain.limits import ImageLimits, too_large
from integration.domain.retry import DEFAULT_RETRY_AFTER_CAP_S, parse_retry_after
from integration.domain.studytime import localize
from integration.domain.types import DomainError, Outcome, SeriesRef, StudyRef
from integration.localzone import machine_zone

if TYPE_CHECKING:
    from integration.ports import Probe

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
SERIES_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'

_STUDY_FIELDS = ("StudyDate", "StudyTime", "TimezoneOffsetFromUTC", "ModalitiesInStudy", "StudyDescription",
                 "PatientID", "IssuerOfPatientID")
_SERIES_FIELDS = ("Modality", "SeriesDescription", "BodyPartExamined", "NumberOfSeriesRelatedInstances",
                  "StudyDescription")
_INSTANCE_FIELDS = ("SOPClassUID", "ImageType", "SliceThickness", "ConvolutionKernel", "ImageOrientationPatient",
                    "NumberOfFrames", "Rows", "Columns")


#: Bytes httpcore asks the socket for per read of an HTTP/1.1 body (its default: 64 KiB). A series answer is tens of
#: MiB (a 160-slice 512^2 CT: 80 MiB, 1,280 reads of 64 KiB, each through h11's event parser); 1 MiB reads cut that
#: overhead (that CT's retrieve + decode + tensor, the read size alone changed, median of 9 in one process: 0.189 ->
#: 0.162 s; bench/bench_retrieve.py prints the whole path) and still bound what one read holds. A read returns what has
#: arrived, so small answers are unaffected.
HTTP_READ_BYTES = 1 << 20


def read_http_bodies_in_large_pieces() -> None:
    """Set httpcore's per-read size (``HTTP11Connection.READ_NUM_BYTES``, a class attribute) to ``HTTP_READ_BYTES``
    for this process; never lowers it. Called by ``DicomWebPacs``; a test fails if httpcore drops the attribute."""
    current = getattr(httpcore.HTTP11Connection, "READ_NUM_BYTES", None)
    if isinstance(current, int) and current < HTTP_READ_BYTES:
        httpcore.HTTP11Connection.READ_NUM_BYTES = HTTP_READ_BYTES


class DicomWebPacs:
    #: Decode planes finer than the model's grid as block means (``inference.preprocess.block_means``): what the
    #: engine's ingest needs, at a fraction of the time and memory. Off: the stored pixels exactly (tools, tests).
    reduce_planes: bool = False
    """``Pacs`` over DICOMweb. ``base_url`` is the service root, e.g. ``http://pacs:8042/dicom-web``.

    Naive DICOM dates/times (no TimezoneOffsetFromUTC) are read in ``study_timezone`` (the PACS's zone,
    with its DST rules; default: this machine's local zone); ``StudyRef.study_datetime`` is always
    timezone-aware. ``tls`` is the context from ``adapters.tls.ssl_context`` (default: TLS 1.2+, verified against
    this machine's trust store).
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
        client: httpx.Client | None = None,
        study_modalities: tuple[str, ...] = ("CT", "MR"),
        page_size: int = 100,
        study_timezone: tzinfo | None = None,
        max_pages: int = 1000,
        limits: ImageLimits | None = None,
        retrieve_deadline_s: float = 600.0,
        retry_after_cap_s: float = DEFAULT_RETRY_AFTER_CAP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._owns_client = client is None
        self._tls = tls or default_context()
        self._client = client or httpx.Client(auth=auth, timeout=timeout, verify=self._tls)
        read_http_bodies_in_large_pieces()
        self.study_modalities = tuple(m.upper() for m in study_modalities)
        self.page_size = page_size
        self.study_timezone: tzinfo = study_timezone or machine_zone()
        self.max_pages = max_pages
        #: Sizes of series, instances and multipart answers, checked before anything is allocated for them.
        self.limits = limits or ImageLimits()
        #: One series retrieval, request to last byte, takes at most this long (a trickling PACS is cut off).
        self.retrieve_deadline_s = retrieve_deadline_s
        #: A Retry-After beyond this is clamped to it; garbage is no hint.
        self.retry_after_cap_s = retry_after_cap_s
        self._clock = clock

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> DicomWebPacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP -------------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, params: list[tuple[str, str]] | None = None,
              headers: dict[str, str] | None = None, stream: bool = False) -> httpx.Response:
        url = f"{self.base_url}{path}"
        for attempt in (1, 2):
            try:
                request = self._client.build_request(method, url, params=tuple(params or ()), headers=headers)
                response = self._client.send(request, stream=stream)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
                if attempt == 1:  # a keep-alive connection the server had closed: one immediate retry
                    continue
                raise _unavailable(f"{method} {path}", err, self._tls) from err
            except (httpx.TransportError, httpx.InvalidURL) as err:
                raise _unavailable(f"{method} {path}", err, self._tls) from err
            if response.status_code >= 500 or response.status_code in (408, 429):
                if stream:
                    response.close()
                raise DomainError(
                    Outcome.PACS_UNAVAILABLE,
                    f"PACS answered {response.status_code} to {method} {path}",
                    retry_after=_retry_after(response, self.retry_after_cap_s),
                )
            if response.status_code in (401, 403):
                if stream:
                    response.close()
                raise DomainError(
                    Outcome.PACS_UNAVAILABLE,
                    f"PACS refused the credentials ({response.status_code}) for {method} {path}: "
                    "check STROKEWATCH_PACS__AUTH__*",
                )
            return response
        raise AssertionError("unreachable")

    def _qido(self, path: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        response = self._send("GET", path, params=params, headers={"Accept": DICOM_JSON})
        if response.status_code in (204, 404) or not response.content.strip():
            return []
        if response.status_code >= 400:
            raise DomainError(
                Outcome.INTERNAL_ERROR,
                f"PACS rejected the query {path} ({response.status_code}): {response.text[:200]}",
            )
        try:
            body = response.json()
        except ValueError as err:
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"PACS answered {path} with invalid JSON") from err
        if not isinstance(body, list):
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"PACS answered {path} with JSON that is not a list")
        return [item for item in body if isinstance(item, dict)]

    def _qido_pages(self, path: str, params: list[tuple[str, str]], key: str) -> Iterator[dict[str, Any]]:
        """All matches over limit/offset pages. Stops at a page with nothing new, so a server that caps
        pages below ``limit`` or ignores ``offset`` is still read completely and never loops."""
        seen: set[str] = set()
        offset = 0
        for _ in range(self.max_pages):
            page = self._qido(path, [*params, ("limit", str(self.page_size)), ("offset", str(offset))])
            fresh = 0
            for item in page:
                uid = attr_str(item, key)
                if uid and uid not in seen:
                    seen.add(uid)
                    fresh += 1
                    yield item
            if not fresh:
                return
            offset += len(page)
        log.warning("QIDO %s: stopped after %d pages", path, self.max_pages)

    # -- Pacs port ---------------------------------------------------------------------------------------

    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        """CT/MR studies whose StudyDate lies in [first, last] (QIDO-RS date-range matching on the PACS's
        local dates). A superset of a detection window: ``StudyWindow.contains`` then decides exactly."""
        if last < first:
            raise ValueError("find_studies: last date before first")
        params = [("StudyDate", f"{first:%Y%m%d}-{last:%Y%m%d}"), *(("includefield", f) for f in _STUDY_FIELDS)]
        studies: list[StudyRef] = []
        for item in self._qido_pages("/studies", params, "0020000D"):
            ref = self._study_ref(item)
            if ref is not None and self._wanted_modalities(ref):
                studies.append(ref)
        return studies

    def get_study(self, study_uid: str) -> StudyRef | None:
        _checked_uids(study_uid)
        params = [("StudyInstanceUID", study_uid), *(("includefield", f) for f in _STUDY_FIELDS)]
        for item in self._qido("/studies", params):
            if attr_str(item, "0020000D") == study_uid:
                return self._study_ref(item)
        return None

    def list_series(self, study_uid: str) -> list[SeriesRef]:
        _checked_uids(study_uid)
        params = [("includefield", f) for f in _SERIES_FIELDS]
        answers = list(self._qido_pages(f"/studies/{study_uid}/series", params, "0020000E"))
        study_description: str | None = None
        refs: list[SeriesRef] = []
        refused: list[str] = []
        for item in answers:
            series_uid = attr_str(item, "0020000E")
            if not is_dicom_uid(series_uid):  # it would go into the next URLs: skipped, said, never used
                refused.append(shown(series_uid))
                log.warning("study %s: series %s skipped: not a DICOM UID (PS3.5 9.1)", study_uid, shown(series_uid))
                continue
            instance = self._first_instance(study_uid, series_uid)
            n_instances = attr_int(item, "00201209")
            if n_instances is None:
                n_instances = self._count_instances(study_uid, series_uid)
            description = attr_str(item, "00081030")
            if not description:
                if study_description is None:
                    study = self.get_study(study_uid)
                    study_description = study.description if study else ""
                description = study_description
            refs.append(
                SeriesRef(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    modality=attr_str(item, "00080060") or attr_str(instance, "00080060"),
                    n_instances=n_instances,
                    body_part=attr_str(item, "00180015") or attr_str(instance, "00180015"),
                    series_description=attr_str(item, "0008103E"),
                    study_description=description,
                    sop_class_uid=attr_str(instance, "00080016"),
                    image_type=attr_strs(instance, "00080008"),
                    slice_thickness=attr_float(instance, "00180050"),
                    convolution_kernel=attr_str(instance, "00181210"),
                    orientation=attr_floats(instance, "00200037", 6),
                    frames_per_instance=attr_int(instance, "00280008") or 1,
                    rows=attr_int(instance, "00280010"),
                    columns=attr_int(instance, "00280011"),
                )
            )
        if refused and not refs:
            raise DomainError(Outcome.INVALID_UID, f"study {study_uid}: no series has a DICOM UID (PS3.5 9.1): "
                                                   f"{', '.join(refused[:3])}")
        return refs

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        """(modality, slices ordered along the slice normal), decoded from one WADO-RS request.

        Parts are decoded as they arrive, so decoding overlaps the transfer and only about one
        instance is buffered at a time. Bounded by ``limits``: the bytes received and decoded, the image planes,
        and the multipart answer's header blocks, part sizes and part count (TOO_LARGE beyond one).
        """
        _checked_uids(study_uid, series_uid)
        path = f"/studies/{study_uid}/series/{series_uid}"
        headers = {"Accept": SERIES_ACCEPT, "Accept-Encoding": "identity"}
        started = self._clock()
        response = self._send("GET", path, headers=headers, stream=True)
        series = SeriesSlices(series_uid, self.limits, reduce=self.reduce_planes)
        try:
            if response.status_code in (404, 204):
                raise DomainError(Outcome.NO_ELIGIBLE_SERIES, f"series {series_uid} is not in the PACS (deleted?)")
            if response.status_code >= 400:
                raise DomainError(
                    Outcome.INTERNAL_ERROR,
                    f"PACS rejected the retrieval of series {series_uid} ({response.status_code})",
                )
            limits = self.limits
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limits.max_series_bytes:
                raise too_large(f"series {series_uid}: the PACS announces {declared} bytes",
                                str(limits.max_series_bytes), "MAX_SERIES_BYTES")
            reader = MultipartReader(
                multipart_boundary(response.headers.get("content-type", "")),
                max_header_bytes=limits.multipart_max_header_bytes,
                max_part_bytes=limits.multipart_max_part_bytes,
                max_parts=limits.multipart_max_parts,
            )
            received = 0

            def take(content_type: str, part: bytes | bytearray) -> None:
                if content_type and not content_type.lower().startswith("application/dicom"):
                    raise DomainError(
                        Outcome.CORRUPT_PIXEL_DATA, f"series {series_uid}: PACS sent a {shown(content_type)} part"
                    )
                series.add(part)

            for chunk in _body_chunks(response, path):
                received += len(chunk)
                if self._clock() - started > self.retrieve_deadline_s:
                    raise self._past_deadline(series_uid, received)
                if received > limits.max_series_bytes:
                    raise too_large(f"series {series_uid}: the PACS sent more than {limits.max_series_bytes} bytes",
                                    str(limits.max_series_bytes), "MAX_SERIES_BYTES")
                for content_type, part in reader.feed(chunk):
                    take(content_type, part)
            for content_type, part in reader.finish():
                take(content_type, part)
        finally:
            response.close()
        if not series.slices:
            raise DomainError(Outcome.NO_ELIGIBLE_SERIES, f"series {series_uid} returned no image")
        stages.report(stages.DECODE, series.decoding_s)  # the rest of the call is the retrieval
        return series.modality, sorted_along_normal(series.slices)

    def _past_deadline(self, series_uid: str, received: int) -> DomainError:
        setting = env_name("pacs", "retrieve_deadline_s")
        return DomainError(
            Outcome.PACS_UNAVAILABLE,
            f"series {series_uid}: retrieval cut off after {self.retrieve_deadline_s:g} s ({setting}) with "
            f"{received} bytes received: the PACS sends too slowly; retried later",
        )

    def check(self) -> str:
        """One cheap QIDO request, for readiness probes and `strokewatch doctor`; raises DomainError."""
        self._qido("/studies", [("limit", "1")])
        return f"QIDO-RS answers at {self.base_url}"

    # -- preflight (`strokewatch doctor`, readiness) -------------------------------------------------------

    name = "pacs"

    def probe(self, *, quick: bool, feed: Probe | None = None) -> list[CheckResult]:
        """``pacs``: one QIDO-RS study search with this adapter's client and auth answers; (doctor) ``pacs auth``
        says the credentials were accepted, then ``feed``'s results (how new studies are found) follow."""
        url_var = env_name("pacs", "dicomweb_url")
        auth = self._client.auth
        token = auth.probe_token("pacs", quick=quick) if isinstance(auth, ClientCredentialsAuth) else None
        if token is not None and not token.ok:
            if quick:
                return [CheckResult("pacs", False, token.detail, token.hint)]
            return [CheckResult("pacs", False, "not tried: no credentials", token.hint), token]
        qido = f"{self.base_url}/studies?limit=1"
        try:
            response = self._client.get(qido, headers={"Accept": DICOM_JSON})
        except httpx.HTTPError as exc:
            tls = env_name("pacs", "tls")
            return [unreachable("pacs", qido, exc, url_var, tls, presents_client_cert(self._tls))]
        except DomainError as err:  # the token, fetched on the request when ``quick`` found none
            return [CheckResult("pacs", False, err.message, f"check {env_name('pacs', 'auth', 'token_url')}")]
        if response.status_code in (401, 403):
            rejected = auth_rejected("pacs", auth, response)
            return [CheckResult("pacs", False, f"QIDO-RS {qido}: HTTP {response.status_code}", rejected.hint), rejected]
        if response.status_code not in (200, 204):
            hint = f"{url_var} must be the DICOMweb root (for Orthanc: http://HOST:8042/dicom-web)"
            return [CheckResult("pacs", False, f"QIDO-RS {qido} answered HTTP {response.status_code}", hint)]
        results = [CheckResult("pacs", True, f"QIDO-RS {self.base_url}/studies answers")]
        if quick:
            return results
        results.append(CheckResult("pacs auth", True, f"{auth_note(auth, token)}: accepted"))
        return results + (feed.probe(quick=False) if feed is not None else [])

    # -- helpers -----------------------------------------------------------------------------------------

    def _first_instance(self, study_uid: str, series_uid: str) -> dict[str, Any]:
        _checked_uids(study_uid, series_uid)  # the series UID comes from the PACS's answer
        params = [("limit", "1"), *(("includefield", f) for f in _INSTANCE_FIELDS)]
        found = self._qido(f"/studies/{study_uid}/series/{series_uid}/instances", params)
        return found[0] if found else {}

    def _count_instances(self, study_uid: str, series_uid: str) -> int:
        _checked_uids(study_uid, series_uid)
        path = f"/studies/{study_uid}/series/{series_uid}/instances"
        # Counted up to one past the limit: a series beyond it is refused whatever its true size.
        cap = self.limits.max_slices_per_series + 1
        return sum(1 for _ in islice(self._qido_pages(path, [("includefield", "SOPInstanceUID")], "00080018"), cap))

    def _study_ref(self, item: dict[str, Any]) -> StudyRef | None:
        uid = attr_str(item, "0020000D")
        if not uid:
            return None
        study_time = attr_str(item, "00080030")
        when = dicom_datetime(attr_str(item, "00080020"), study_time, attr_str(item, "00080201"))
        if when is not None:
            when = localize(when, self.study_timezone)
        return StudyRef(
            study_uid=uid,
            patient_id=attr_str(item, "00100020"),
            issuer=attr_str(item, "00100021") or None,
            study_datetime=when,
            modalities=attr_strs(item, "00080061"),
            description=attr_str(item, "00081030"),
            date_only=when is not None and not study_time,
        )

    def _wanted_modalities(self, ref: StudyRef) -> bool:
        if not self.study_modalities or not ref.modalities:  # unknown: let series selection decide
            return True
        return any(m.upper() in self.study_modalities for m in ref.modalities)


def _checked_uids(*uids: str) -> None:
    """UIDs go into WADO-RS/QIDO-RS paths and queries: refuse anything but a DICOM UID before a request is made."""
    for uid in uids:
        if not is_dicom_uid(uid):
            raise DomainError(Outcome.INVALID_UID, f"refused {shown(uid)}: not a DICOM UID (PS3.5 9.1)")


def _body_chunks(response: httpx.Response, path: str) -> Iterator[bytes]:
    # Without a content coding the raw chunks are the body: skip httpx's decoder and re-chunking copies.
    identity = response.headers.get("content-encoding", "identity").lower() in ("", "identity")
    try:
        yield from response.iter_raw() if identity else response.iter_bytes()
    except httpx.TransportError as err:
        raise _unavailable(f"GET {path} (body)", err) from err


def _retry_after(response: httpx.Response, cap_s: float) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC), cap_s)


def _unavailable(what: str, err: Exception, tls: ssl.SSLContext | None = None) -> DomainError:
    problem = tls_failure(err, "pacs", env_name("pacs", "dicomweb_url"), tls)
    if problem is not None:  # retried like any outage: it works once the certificates are fixed
        return DomainError(Outcome.PACS_UNAVAILABLE, f"PACS TLS failed ({what}): {problem.explanation}; {problem.hint}")
    kind = "timed out" if isinstance(err, httpx.TimeoutException) else "is unreachable"
    return DomainError(Outcome.PACS_UNAVAILABLE, f"PACS {kind} ({what}): {type(err).__name__}: {err}")

