"""Any PACS through DIMSE (PS3.4 Annex C, PS3.7): the ``Pacs`` port for PACS without DICOMweb (``pacs.kind=dimse``).

Each call opens one association to the PACS (its AE title ``pacs.dimse.called_aet``, ours ``calling_aet``),
optionally over DICOM TLS (PS3.15 B.1), and releases it:

* ``find_studies`` / ``get_study``: Study Root C-FIND at STUDY level (StudyDate range matching; the study UID);
* ``list_series``: C-FIND at SERIES level, then per series one IMAGE-level C-FIND for the attributes series selection
  scores (SOP class, ImageType, thickness, kernel, orientation, frames, rows, columns) of one instance;
* ``retrieve_series``: a SERIES-level C-FIND first (the series must exist, and its NumberOfSeriesRelatedInstances be
  within the limits: refused before a byte of pixels moves), then
  - C-GET (default): the PACS sends the instances back as C-STORE sub-operations on the same association; each is
    decoded by ``dicom_decode`` as it arrives (no inbound port, no destination to register, nothing on disk);
  - C-MOVE to our own C-STORE SCP (``move_destination``): the instances land in the spool (``data_dir/spool``),
    which is then read like a pushed study's (``spool``).

Every input is bounded before it is buffered: PDUs longer than we announced close the connection; a C-FIND answer
beyond 1 MiB, an instance beyond ``limits.multipart_max_part_bytes``, a series beyond ``limits.max_series_bytes``
(counted from each PDU as it is read, before pynetdicom decodes it) or more sub-operations than
``limits.max_slices_per_series`` close it too; matches beyond ``max_find_results`` stop the search. The whole
retrieval has ``retrieve_deadline_s``.

Errors are DomainErrors: no connection, a rejected or aborted association, a timeout, a failed sub-operation ->
PACS_UNAVAILABLE (retried) naming the ``STROKEWATCH_PACS__DIMSE__*`` setting to check; sizes -> TOO_LARGE; pixels ->
the decoder's outcomes. Messages and logs carry AE titles, addresses, UIDs and counts only: C-FIND answers are read
without pydicom's value conversion (``dimse_query``), and pynetdicom's logging of identifiers is turned off.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, tzinfo
from typing import TYPE_CHECKING, Any, Literal, cast

from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from inference.preprocess import Slice
from integration.adapters.dicom_decode import SeriesSlices, sorted_along_normal
from integration.adapters.dimse_query import STUDY_KEYS, query, study_ref
from integration.adapters.dimse_series import list_series
from integration.adapters.dimse_session import (
    FIND,
    GET,
    MAX_IDENTIFIER_BYTES,
    MOVE,
    QR_SYNTAXES,
    SUBOPERATIONS,
    Guard,
    Received,
    RetrievalStats,
    ScuAE,
    ScuSocket,
    Session,
    quiet_pynetdicom,
    setting,
    status_meaning,
    storage_syntaxes,
)
from integration.adapters.tls import presents_client_cert
from integration.domain.checks import CheckResult, chain_text, env_name, short_error, tls_problem
from integration.domain.ids import is_dicom_uid, shown
from integration.domain.limits import ImageLimits, too_large
from integration.domain.series import IMAGE_SOP_CLASSES
from integration.domain.types import DomainError, Outcome, SeriesRef, StudyRef
from integration.localzone import machine_zone

if TYPE_CHECKING:
    from integration.ports import Pacs, Probe

log = logging.getLogger(__name__)

_REJECTED = {  # (source, diagnostic) of an A-ASSOCIATE-RJ (PS3.8 9.3.4) -> what it means, which setting fixes it
    (1, 2): "application context not supported",
    (1, 3): f"our calling AE title is not known to the PACS ({setting('calling_aet')}: register it "
            "in the PACS as a DICOM node)",
    (1, 7): f"the called AE title is not the PACS's ({setting('called_aet')})",
    (2, 2): "protocol version not supported",
    (3, 1): "the PACS is busy (temporary congestion); retried later",
    (3, 2): "the PACS's association limit is reached; retried later",
}

Retrieve = Literal["c-get", "c-move"]


def _checked_uids(*values: str) -> None:
    for value in values:
        if not is_dicom_uid(value):
            raise DomainError(Outcome.INVALID_UID, f"refused {shown(value)}: not a DICOM UID (PS3.5 9.1)")


class DimsePacs:
    """``Pacs`` over DIMSE. ``retrieve``: "c-get" (default) or "c-move" to ``move_destination`` (our SCP's AE title;
    ``spool`` reads what it received). Naive study dates are read in ``study_timezone`` (default: this machine's zone).
    ``tls``: a client context from ``adapters.tls.ssl_context`` for DICOM TLS, None for plain DIMSE."""

    #: As ``DicomWebPacs.reduce_planes`` (C-GET; a C-MOVE reads the spool, which has its own).
    reduce_planes: bool = False

    name = "pacs"

    def __init__(
        self,
        host: str,
        port: int,
        called_aet: str,
        calling_aet: str = "STROKEWATCH",
        *,
        retrieve: Retrieve = "c-get",
        move_destination: str | None = None,
        spool: Pacs | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout_s: float = 10.0,
        acse_timeout_s: float = 30.0,
        dimse_timeout_s: float = 60.0,
        network_timeout_s: float = 60.0,
        retrieve_deadline_s: float = 600.0,
        max_pdu_bytes: int = 1 << 20,
        max_find_results: int = 10_000,
        study_modalities: tuple[str, ...] = ("CT", "MR"),
        study_timezone: tzinfo | None = None,
        limits: ImageLimits | None = None,
        notes: tuple[CheckResult, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retrieve == "c-move" and (spool is None or not move_destination):
            raise ValueError("C-MOVE retrieval needs the destination AE title and the spool its SCP writes to")
        self.host, self.port, self.called_aet, self.calling_aet = host, port, called_aet, calling_aet
        self.retrieve: Retrieve = retrieve
        self.move_destination = move_destination
        self.spool = spool
        self.tls = tls
        self.connect_timeout_s = connect_timeout_s
        self.retrieve_deadline_s = retrieve_deadline_s
        self.max_pdu_bytes = max_pdu_bytes
        self.max_find_results = max_find_results
        self.study_modalities = tuple(m.upper() for m in study_modalities)
        self.study_timezone: tzinfo = study_timezone or machine_zone()
        self.limits = limits or ImageLimits()
        self.notes = notes
        self._clock = clock
        #: The latest retrieval (instances, bytes, seconds), for its log line and for tests.
        self.last_retrieval: RetrievalStats | None = None
        quiet_pynetdicom()
        timeouts = (connect_timeout_s, acse_timeout_s, dimse_timeout_s, network_timeout_s)
        self._query_ae = self._ae(False, timeouts)
        self._storage_ae = self._ae(True, timeouts)

    def _ae(self, storage: bool, timeouts: tuple[float, float, float, float]) -> ScuAE:
        ae = ScuAE(ae_title=self.calling_aet)
        ae.max_read = self.max_pdu_bytes + (64 << 10)
        ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = timeouts
        ae.maximum_pdu_size = self.max_pdu_bytes
        for model in (FIND, GET, MOVE, Verification):
            ae.add_requested_context(model, QR_SYNTAXES)
        if storage:
            for sop_class in sorted(IMAGE_SOP_CLASSES):
                for syntaxes in storage_syntaxes():
                    ae.add_requested_context(sop_class, syntaxes)
        return ae

    @property
    def where(self) -> str:
        return f"PACS {self.called_aet}@{self.host}:{self.port}" + (" (TLS)" if self.tls is not None else "")

    def close(self) -> None:  # one association per call: nothing held between calls
        pass

    def __enter__(self) -> DimsePacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- associations ---------------------------------------------------------------------------------------------

    @contextmanager
    def _association(self, what: str, *, storage: bool = False, on_store: Callable[[evt.Event], int] | None = None,
                     guard: Guard | None = None) -> Iterator[Session]:
        guard = guard or Guard(MAX_IDENTIFIER_BYTES)
        handlers: list[Any] = []
        roles: list[Any] | None = None
        if storage:
            handlers.append((evt.EVT_C_STORE, on_store or (lambda event: 0xA700)))
            roles = [build_role(sop_class, scp_role=True) for sop_class in sorted(IMAGE_SOP_CLASSES)]
        ae = self._storage_ae if storage else self._query_ae
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, max_pdu=self.max_pdu_bytes,
                                 ext_neg=roles, tls_args=(self.tls, self.host) if self.tls is not None else None,
                                 evt_handlers=handlers)
        except Exception as exc:  # pynetdicom raises for a few socket errors instead of returning
            raise self._no_association(what, None, exc) from None
        if not assoc.is_established:
            raise self._no_association(what, assoc, None)
        cast(ScuSocket, assoc.dul.socket).guard = guard  # before our first request: the PACS sends nothing before
        session = Session(assoc, guard, self.where)
        try:
            yield session
        finally:
            if guard.closed:  # cut (a limit, the deadline): the connection is down, only the threads remain to end
                assoc.kill()
            elif assoc.is_established:
                try:
                    assoc.release()
                except Exception:  # a peer gone mid-release: nothing left to release
                    assoc.abort()

    def _no_association(self, what: str, assoc: Association | None, exc: Exception | None) -> DomainError:
        if assoc is not None and assoc.is_rejected:
            answer = getattr(assoc.acceptor, "primitive", None)
            key = (int(getattr(answer, "result_source", 0) or 0), int(getattr(answer, "diagnostic", 0) or 0))
            reason = _REJECTED.get(key, f"source {key[0]}, reason {key[1]}")
            return DomainError(Outcome.PACS_UNAVAILABLE, f"{self.where} rejected the association ({what}): {reason}")
        problem = self._connection_problem()
        if problem is not None:
            return DomainError(Outcome.PACS_UNAVAILABLE, f"{self.where} is unreachable ({what}): {problem}")
        cause = f" ({short_error(exc)})" if exc is not None else ""
        how = "aborted the association request" if assoc is not None and assoc.is_aborted else (
            f"accepts connections, but no association within {setting('acse_timeout_s')}")
        tls = f"{setting('use_tls')} (it may expect DICOM TLS), " if self.tls is None else ""
        return DomainError(Outcome.PACS_UNAVAILABLE, f"{self.where} {how} ({what}){cause}: check {tls}"
                           f"{setting('called_aet')}, and that {setting('calling_aet')}={self.calling_aet!r} is known "
                           "to the PACS")

    def _connection_problem(self) -> str | None:
        """Why no association came about when the connection is the reason (found by connecting once more, with the
        TLS handshake); None when a connection opens."""
        where = f"check {setting('host')}, {setting('port')} and that the PACS is up"
        try:
            with socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s) as raw:
                if self.tls is not None:
                    with self.tls.wrap_socket(raw, server_hostname=self.host) as wrapped:
                        # TLS 1.3: a server refuses our certificate (or its absence) after the handshake, in an alert
                        wrapped.settimeout(min(1.0, self.connect_timeout_s))
                        try:
                            closed = wrapped.recv(1) == b""
                        except TimeoutError:  # the connection stands, waiting for our association request
                            closed = False
                        if closed:
                            return (f"the PACS closes the TLS connection at once: it may require a client "
                                    f"certificate ({setting('tls')}__CLIENT_CERT) issued by a CA it trusts")
        except (OSError, ValueError) as err:
            if self.tls is not None:
                problem = tls_problem(chain_text(err), setting("tls"), setting("host"),
                                      client_cert=presents_client_cert(self.tls))
                if problem is not None:
                    hint = problem.hint if problem.kind != "not_tls" else (
                        f"set {setting('use_tls')}=false, or {setting('port')} to the PACS's DICOM TLS port")
                    return f"TLS failed: {problem.explanation}; {hint}"
            if isinstance(err, ConnectionRefusedError):
                return f"the connection was refused; {where}"
            if isinstance(err, TimeoutError):
                return f"no connection within {self.connect_timeout_s:g} s ({setting('connect_timeout_s')}); {where}"
            return f"{short_error(err)}; {where}"
        return None

    # -- Pacs port --------------------------------------------------------------------------------------------------

    def find_studies(self, first: date, last: date) -> list[StudyRef]:
        """CT/MR studies whose StudyDate lies in [first, last] (C-FIND date-range matching on the PACS's local dates).
        A superset of a detection window: ``StudyWindow.contains`` then decides exactly."""
        if last < first:
            raise ValueError("find_studies: last date before first")
        identifier = query("STUDY", STUDY_KEYS, StudyDate=f"{first:%Y%m%d}-{last:%Y%m%d}")
        with self._association("C-FIND of studies") as session:
            found = session.find(identifier, limit=self.max_find_results)
        if not found.complete:
            log.warning("%s: more than %d studies dated %s..%s; the rest are found once these are older (raise %s)",
                        self.where, self.max_find_results, first, last, setting("max_find_results"))
        refs = [study_ref(answer, self.study_timezone) for answer in found.answers]
        return [ref for ref in refs if ref is not None and self._wanted_modalities(ref)]

    def get_study(self, study_uid: str) -> StudyRef | None:
        _checked_uids(study_uid)
        with self._association("C-FIND of a study") as session:
            found = session.find(query("STUDY", STUDY_KEYS, StudyInstanceUID=study_uid), limit=self.max_find_results)
        for answer in found.answers:
            if answer.text("StudyInstanceUID") == study_uid:
                return study_ref(answer, self.study_timezone)
        return None

    def list_series(self, study_uid: str) -> list[SeriesRef]:
        _checked_uids(study_uid)
        with self._association("C-FIND of series") as session:
            return list_series(session, study_uid, max_find_results=self.max_find_results,
                               max_instances=self.limits.max_slices_per_series)

    def retrieve_series(self, study_uid: str, series_uid: str) -> tuple[str, list[Slice]]:
        """(modality, slices ordered along the slice normal) by C-GET (decoded as they arrive) or C-MOVE (then read
        from the spool). Refused before retrieval when the series is unknown or counts more instances than allowed."""
        _checked_uids(study_uid, series_uid)
        started = self._clock()
        stats = self.last_retrieval = RetrievalStats(self.retrieve.upper())
        guard = Guard(MAX_IDENTIFIER_BYTES)
        received = (Received(SeriesSlices(series_uid, self.limits, reduce=self.reduce_planes), guard)
                    if self.retrieve == "c-get" else None)
        try:
            with (self._association(f"retrieval of series {series_uid}", guard=guard, storage=received is not None,
                                    on_store=received.on_store if received is not None else None) as session,
                  self._deadline(session, started, series_uid)):
                modality = self._series_on_pacs(session, study_uid, series_uid)
                identifier = query("SERIES", (), StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
                if received is not None:
                    self._get(session, identifier, series_uid)
                else:
                    stats.instances = self._move(session, identifier, series_uid)
        finally:
            stats.seconds, stats.bytes = self._clock() - started, guard.total
            if received is not None:
                stats.instances = received.instances
        if received is None:
            assert self.spool is not None
            log.info("series %s: %d instance(s) moved by C-MOVE from %s to %s in %.2f s", series_uid, stats.instances,
                     self.where, self.move_destination, stats.seconds)
            modality_read, slices = self.spool.retrieve_series(study_uid, series_uid)
            return modality_read or modality, slices
        if not received.series.slices:
            raise DomainError(Outcome.NO_ELIGIBLE_SERIES, f"series {series_uid} returned no image")
        log.info("series %s: %d instance(s) retrieved by C-GET from %s in %.2f s", series_uid, received.instances,
                 self.where, stats.seconds)
        return received.series.modality or modality, sorted_along_normal(received.series.slices)

    @contextmanager
    def _deadline(self, session: Session, started: float, series_uid: str) -> Iterator[None]:
        """``retrieve_deadline_s`` from ``started``: past it the association is aborted, whatever it is waiting for."""
        left = max(0.0, self.retrieve_deadline_s - (self._clock() - started))
        timer = threading.Timer(left, session.cut, (self._past_deadline(series_uid),))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    # -- retrieval ------------------------------------------------------------------------------------------------

    def _series_on_pacs(self, session: Session, study_uid: str, series_uid: str) -> str:
        """The series as C-FIND sees it (its modality): absent -> NO_ELIGIBLE_SERIES, too many instances -> TOO_LARGE,
        both before a pixel moves."""
        identifier = query("SERIES", ("Modality", "NumberOfSeriesRelatedInstances"), StudyInstanceUID=study_uid,
                           SeriesInstanceUID=series_uid)
        found = session.find(identifier, limit=self.max_find_results)
        match = next((a for a in found.answers if a.text("SeriesInstanceUID") in ("", series_uid)), None)
        if match is None:
            raise DomainError(Outcome.NO_ELIGIBLE_SERIES, f"series {series_uid} is not in the PACS (deleted?)")
        count = match.integer("NumberOfSeriesRelatedInstances")
        limit = self.limits.max_slices_per_series
        if count is not None and count > limit:
            raise too_large(f"series {series_uid} holds {count} instances (C-FIND): refused before retrieval",
                            str(limit), "MAX_SLICES_PER_SERIES")
        return match.text("Modality").upper()

    def _get(self, session: Session, identifier: Dataset, series_uid: str) -> None:
        roles = [c for c in session.assoc.accepted_contexts if c.abstract_syntax in IMAGE_SOP_CLASSES and c.as_scp]
        if not roles:
            raise session.not_offered("CT/MR image storage in the SCP role (needed by C-GET)",
                                      f"allow C-GET for our AE title in the PACS, or set {setting('retrieve')}=c-move")
        limits = self.limits
        session.guard.retrieving(limits.multipart_max_part_bytes, limits.max_series_bytes)
        hint = f"allow C-GET for our AE title in the PACS, or set {setting('retrieve')}=c-move"
        final = session.get(identifier, hint, series_uid=series_uid, max_instances=limits.max_slices_per_series)
        if session.guard.error is not None:
            raise session.guard.error
        self._check_final(final, "C-GET", series_uid)

    def _move(self, session: Session, identifier: Dataset, series_uid: str) -> int:
        """The C-MOVE to our SCP; returns how many instances the PACS sent."""
        assert self.move_destination is not None
        hint = f"allow C-MOVE for our AE title in the PACS, or set {setting('retrieve')}=c-get"
        final = session.move(identifier, self.move_destination, hint, series_uid=series_uid,
                             max_instances=self.limits.max_slices_per_series)
        if session.guard.error is not None:
            raise session.guard.error
        self._check_final(final, "C-MOVE", series_uid)
        return int(final.get("NumberOfCompletedSuboperations") or 0)

    def _check_final(self, status: Dataset, what: str, series_uid: str) -> None:
        code = int(status.Status)
        completed, failed, warned = (int(status.get(k) or 0) for k in SUBOPERATIONS[1:])
        if code == 0x0000 and not failed:
            return
        sent = f"sent {completed} of {completed + failed + warned} instance(s)" if completed + failed + warned else (
            "sent nothing")
        hint = ""
        if what == "C-MOVE":
            hint = (f"; is {self.move_destination!r} registered in the PACS as a DICOM node at this engine's SCP "
                    "(STROKEWATCH_SCP__HOST/PORT), and does the SCP allow the PACS's calling AE title "
                    "(STROKEWATCH_SCP__ALLOWED_CALLING_AETS)? Refusals are failures of stage receive")
        raise DomainError(Outcome.PACS_UNAVAILABLE, f"series {series_uid}: {self.where} answered the {what} with "
                          f"status 0x{code:04X} ({status_meaning(code)}) and {sent}{hint}")

    def _past_deadline(self, series_uid: str) -> DomainError:
        return DomainError(Outcome.PACS_UNAVAILABLE, f"series {series_uid}: retrieval cut off after "
                           f"{self.retrieve_deadline_s:g} s ({env_name('pacs', 'retrieve_deadline_s')}): the PACS "
                           "sends too slowly; retried later")

    def _wanted_modalities(self, ref: StudyRef) -> bool:
        if not self.study_modalities or not ref.modalities:  # unknown: let series selection decide
            return True
        return any(m.upper() in self.study_modalities for m in ref.modalities)

    # -- preflight (`strokewatch doctor`, readiness) ---------------------------------------------------------------

    def probe(self, *, quick: bool, feed: Probe | None = None) -> list[CheckResult]:
        """``pacs``: an association and a C-ECHO; (doctor) ``pacs c-find``: a study search answers; ``pacs retrieval``:
        the PACS accepts the configured way of retrieving; then ``feed``'s result (how new studies are found)."""
        hint = (f"check {setting('host')}, {setting('port')}, {setting('called_aet')}, {setting('calling_aet')} "
                f"and {setting('use_tls')}")
        try:
            with self._association("C-ECHO", storage=not quick) as session:  # doctor: what C-GET would need too
                code = session.echo()
                if code != 0x0000:
                    return [CheckResult("pacs", False, f"{self.where} answered C-ECHO with {code!r}", hint)]
                results = [CheckResult("pacs", True, f"{self.where} answers C-ECHO from {self.calling_aet!r}")]
                if quick:
                    return results
                results.append(self._retrieval_check(session))
        except DomainError as err:
            return [CheckResult("pacs", False, err.message, hint)]
        results.insert(1, self._find_check())
        results += self.notes
        return results + (feed.probe(quick=False) if feed is not None else [])

    def _find_check(self) -> CheckResult:
        today = datetime.now(self.study_timezone).date()
        try:
            with self._association("C-FIND") as session:
                found = session.find(query("STUDY", ("StudyInstanceUID",), StudyDate=f"{today:%Y%m%d}"),
                                     limit=self.max_find_results, keep=0)
        except DomainError as err:
            return CheckResult("pacs c-find", False, err.message, "allow C-FIND (Study Root) for our AE title")
        more = "" if found.complete else " or more"
        return CheckResult("pacs c-find", True, f"Study Root C-FIND answers: {found.matched}{more} stud"
                           f"{'y' if found.matched == 1 else 'ies'} dated {today:%Y-%m-%d}")

    def _retrieval_check(self, session: Session) -> CheckResult:
        accepted = session.assoc.accepted_contexts
        syntaxes = {c.abstract_syntax for c in accepted}
        if self.retrieve == "c-move":
            if MOVE not in syntaxes:
                return CheckResult("pacs retrieval", False, f"{self.where} does not accept Study Root C-MOVE from us",
                                   f"allow C-MOVE in the PACS, or set {setting('retrieve')}=c-get")
            return CheckResult("pacs retrieval", True, f"C-MOVE to {self.move_destination!r} (our C-STORE SCP): the "
                               "PACS must know that AE title with this engine's SCP host and port")
        storing = {c.abstract_syntax for c in accepted if c.abstract_syntax in IMAGE_SOP_CLASSES and c.as_scp}
        if GET not in syntaxes or not storing:
            what = "Study Root C-GET" if GET not in syntaxes else "CT/MR image storage in our SCP role (for C-GET)"
            return CheckResult("pacs retrieval", False, f"{self.where} does not accept {what} from us",
                               f"allow C-GET for {self.calling_aet!r} in the PACS, or set {setting('retrieve')}=c-move "
                               "(the PACS then sends to our C-STORE SCP)")
        return CheckResult("pacs retrieval", True, f"C-GET on the query association (no inbound port): accepted, with "
                           f"our storage role for {len(storing)} CT/MR image SOP class(es)")


def polling_result(poll_seconds: float, lookback_hours: float) -> CheckResult:
    """``pacs change feed`` for a DIMSE PACS: new studies are found by C-FIND polling."""
    return CheckResult("pacs change feed", True, f"DIMSE: new studies found by C-FIND polling every {poll_seconds:g} s "
                       f"over a {lookback_hours:g} h window")
