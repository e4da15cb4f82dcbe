"""The DIMSE side of ``dimse.DimsePacs``: one association to the PACS and the messages run on it (C-ECHO, C-FIND,
C-GET, C-MOVE), each bounded before it is buffered.

``ScuAE`` proposes Study Root Query/Retrieve (FIND, GET, MOVE), Verification and, for C-GET, the CT/MR image storage
classes in the SCP role; its sockets (``ScuSocket``) set TCP_NODELAY and refuse a PDU longer than announced. ``Guard``
counts the bytes of each message as its PDUs arrive and aborts the association beyond a limit. ``Received`` decodes
the instances a C-GET sends back, as they arrive. ``Session`` runs the operations and names what went wrong.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from pydicom import uid as uids
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.transport import AssociationSocket

from integration.adapters.dicom_decode import SeriesSlices
from integration.adapters.dimse_query import Answer
from integration.domain.checks import env_name
from integration.domain.ids import is_dicom_uid, shown
from integration.domain.limits import too_large
from integration.domain.types import DomainError, Outcome

log = logging.getLogger(__name__)
_T = TypeVar("_T")

FIND = StudyRootQueryRetrieveInformationModelFind
GET = StudyRootQueryRetrieveInformationModelGet
MOVE = StudyRootQueryRetrieveInformationModelMove
QR_SYNTAXES = [uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian]
_COMPRESSED = (uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, uids.JPEGLossless, uids.JPEGLosslessSV1,
               uids.JPEGLSLossless, uids.JPEGLSNearLossless, uids.JPEG2000Lossless, uids.JPEG2000, uids.RLELossless,
               uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL, uids.HTJ2K)
#: One C-FIND answer (an identifier of a dozen attributes: a few hundred bytes) or one command set.
MAX_IDENTIFIER_BYTES = 1 << 20
_MAX_COMMAND_BYTES = 64 << 10
PENDING = (0xFF00, 0xFF01)
SUBOPERATIONS = ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
                  "NumberOfWarningSuboperations")


def setting(name: str) -> str:
    return env_name("pacs", "dimse", name)


def storage_syntaxes() -> list[list[str]]:
    """Transfer syntaxes proposed for instances sent back by C-GET, one presentation context per list: the native ones
    together, each compressed one a decoder is installed for alone (so the PACS sends what it stored, untranscoded)."""
    usable: list[list[str]] = [[str(s) for s in (*QR_SYNTAXES, uids.ExplicitVRBigEndian)]]
    for syntax in _COMPRESSED:
        try:
            if get_decoder(syntax).is_available:
                usable.append([str(syntax)])
        except NotImplementedError:
            continue
    return usable


def quiet_pynetdicom() -> None:
    """pynetdicom logs every C-FIND request and answer identifier (PatientID, names) at INFO, dumping them through
    pydicom's value conversion, whose warnings quote malformed values: both off, in every process using this adapter."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    logger = logging.getLogger("pynetdicom")
    if logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)


class Guard:
    """Bytes of the DIMSE message being received, counted from each P-DATA PDU as the socket reads it, before
    pynetdicom sees it: beyond a limit the PDU is not handed on and the connection is closed (nothing more is
    buffered), and ``error`` says why. ``cut`` closes it from another thread (the deadline, too many instances)."""

    def __init__(self, message_limit: int) -> None:
        self.message_limit = message_limit
        self.total_limit: int | None = None
        self.command = self.data = self.total = 0
        self.error: DomainError | None = None
        self.closed = False  # the connection was shut down here (the association ends without a release)

    def retrieving(self, message_limit: int, total_limit: int) -> None:
        self.message_limit, self.total_limit, self.total = message_limit, total_limit, 0

    def note(self, error: DomainError) -> None:
        """Remember why the operation fails (the first reason wins)."""
        if self.error is None:
            self.error = error

    def cut(self, error: DomainError, assoc: Association) -> None:
        """``note``, and shut the connection down: the reactor reads its end, pynetdicom ends the association
        (A-P-ABORT) and wakes whoever waits for a message. Never an A-ABORT from here: pynetdicom would still send the
        response of a C-STORE being handled, into an association it considers aborted (its reactor then dies)."""
        self.note(error)
        self.closed = True
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)

    def pdata(self, body: bytes | bytearray) -> DomainError | None:
        """Count one P-DATA-TF PDU's fragments (PS3.8 9.3.5); the reason when a limit is passed."""
        pos = 0
        while pos + 6 <= len(body):
            length = int.from_bytes(body[pos : pos + 4], "big")
            control = body[pos + 5]
            size = max(0, length - 2)
            if control & 1:  # a command fragment
                self.command += size
                if control & 2:  # the last one: a new message begins
                    self.command = self.data = 0
            else:
                self.data += size
                if self.total_limit is not None:  # the retrieval's data sets, not the queries before it
                    self.total += size
            pos += 4 + length
        if self.command > _MAX_COMMAND_BYTES:
            self.note(too_large(f"the PACS sent a command set of more than {_MAX_COMMAND_BYTES} bytes",
                                str(_MAX_COMMAND_BYTES), "(fixed)"))
        elif self.data > self.message_limit:
            setting = "MULTIPART_MAX_PART_BYTES" if self.total_limit is not None else "(fixed)"
            self.note(too_large(f"the PACS sent a data set of more than {self.message_limit} bytes",
                                str(self.message_limit), setting))
        elif self.total_limit is not None and self.total > self.total_limit:
            self.note(too_large(f"the PACS sent more than {self.total_limit} bytes for one series",
                                str(self.total_limit), "MAX_SERIES_BYTES"))
        else:
            return None
        self.closed = True
        return self.error


class ScuSocket(AssociationSocket):
    """The association's socket: TCP_NODELAY (no ~40 ms Nagle wait per message); a PDU longer than we announced refused
    before it is read (pynetdicom reads a PDU whole, as long as its header says); each P-DATA PDU counted by ``guard``
    before pynetdicom decodes it; read in large steps (pynetdicom's own reads are 4 KiB each)."""

    max_read = (1 << 20) + (64 << 10)
    guard: Guard | None = None
    _body_of: int | None = None  # the type of the PDU whose body the next read returns

    def _create_socket(self, address: Any) -> socket.socket:
        sock = super()._create_socket(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_read:
            log.warning("PACS: a PDU of %d bytes announced (we accept %d); connection closed", nr_bytes, self.max_read)
            raise OSError(f"PDU of {nr_bytes} bytes refused")
        data = self._read(nr_bytes)
        if self._body_of is None:  # pynetdicom reads a PDU's 6-byte header, then its body
            self._body_of = data[0] if nr_bytes == 6 and len(data) == 6 else None
            return data
        pdu_type, self._body_of = self._body_of, None
        if pdu_type == 0x04 and self.guard is not None and self.guard.pdata(data) is not None:
            raise OSError("a limit was passed; connection closed")  # the PDU never reaches pynetdicom's DIMSE
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` (fewer when the peer closed), read into one buffer allocated once (``nr_bytes`` is capped)."""
        raw = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            got = raw.recv_into(view[read:], nr_bytes - read)
            if not got:
                break
            read += got
        view.release()
        del buffer[read:]
        return buffer


class ScuAE(AE):
    """An AE whose associations use ``ScuSocket``."""

    max_read = ScuSocket.max_read

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> AssociationSocket:
        sock = ScuSocket(assoc, address=address)
        sock.max_read = self.max_read
        sock.tls_args = tls_args
        return sock


@dataclass
class RetrievalStats:
    """The latest retrieval of an adapter (for its log line and for tests): instances and bytes received."""

    method: str
    instances: int = 0
    bytes: int = 0
    seconds: float = 0.0


def _meta_element(element: int, value: bytes, vr: bytes = b"UI") -> bytes:
    if len(value) % 2:
        value += b"\x00"  # UI values are padded with NUL to an even length
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, DICM and file meta group (PS3.10 7.1, Explicit VR Little Endian): what turns a data set received by
    C-STORE into a Part 10 object. Written by hand: pydicom's writer costs more than the decoding of a small image."""
    body = b"".join((
        _meta_element(0x0001, b"\x00\x01", b"OB"),
        _meta_element(0x0002, sop_class_uid.encode("ascii")),
        _meta_element(0x0003, sop_instance_uid.encode("ascii")),
        _meta_element(0x0010, transfer_syntax.encode("ascii")),
        _meta_element(0x0012, str(uids.PYDICOM_IMPLEMENTATION_UID).encode("ascii")),
    ))
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


@dataclass
class Received:
    """The instances of one C-GET, decoded as their C-STOREs arrive (the handler runs in the caller's thread)."""

    series: SeriesSlices
    guard: Guard
    instances: int = 0

    def on_store(self, event: evt.Event) -> int:
        if self.guard.error is not None:
            return 0xA700
        try:
            self._take(event)
        except DomainError as err:  # refused; ``Session._follow`` then asks the PACS to stop (C-CANCEL)
            self.guard.note(err)
            return 0xA700 if err.outcome is Outcome.TOO_LARGE else 0xC000
        except Exception as exc:  # never raise into pynetdicom: the retrieval fails, named, the worker carries on
            self.guard.note(DomainError(Outcome.INTERNAL_ERROR, f"series {self.series.series_uid}: an instance could "
                                        f"not be decoded ({type(exc).__name__})"))
            return 0xC000
        return 0x0000

    def _take(self, event: evt.Event) -> None:
        request = cast(C_STORE, event.request)
        sop_class, sop_instance = str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or "")
        for what, uid in (("SOP Class UID", sop_class), ("SOP Instance UID", sop_instance)):
            if not is_dicom_uid(uid):
                raise DomainError(Outcome.INVALID_UID, f"series {self.series.series_uid}: the PACS sent an instance "
                                  f"whose {what} {shown(uid)} is not a DICOM UID (PS3.5 9.1)")
        if request.DataSet is None:
            raise DomainError(Outcome.CORRUPT_PIXEL_DATA, f"instance {sop_instance} came without a data set")
        view = request.DataSet.getbuffer()
        try:
            part = bytearray(part10_prefix(sop_class, sop_instance, str(event.context.transfer_syntax)))
            part += view
        finally:
            view.release()
        self.series.add(part, expect_sop_instance=sop_instance)
        self.instances += 1


@dataclass
class Found:
    """What one C-FIND matched: ``answers`` (at most as many as were kept), how many ``matched``, and whether the
    search ran to its end (False: more than the limit matched; the association was then aborted)."""

    answers: list[Answer] = field(default_factory=list)
    matched: int = 0
    complete: bool = True


class Session:
    """One established association and what runs on it."""

    def __init__(self, assoc: Association, guard: Guard, where: str) -> None:
        self.assoc = assoc
        self.guard = guard
        self.where = where
        self._message_id = 0

    def next_id(self) -> int:
        self._message_id += 1
        return self._message_id

    def cut(self, error: DomainError) -> None:
        self.guard.cut(error, self.assoc)

    def ended(self, what: str) -> DomainError:
        """The association ended mid-operation: the guard's reason, or the PACS's doing."""
        if self.guard.error is not None:
            return self.guard.error
        return DomainError(Outcome.PACS_UNAVAILABLE, f"{self.where}: the association ended during the {what} (aborted "
                           f"by the PACS, or no message within {setting('dimse_timeout_s')})")

    def not_offered(self, what: str, hint: str) -> DomainError:
        return DomainError(Outcome.PACS_UNAVAILABLE, f"{self.where} did not accept {what} from us: {hint}")

    def _send(self, what: str, hint: str, send: Callable[[], _T]) -> _T:
        """Start one operation: DomainErrors for an association already gone (a limit or the deadline cut it) or a
        presentation context the PACS did not accept."""
        if not self.assoc.is_established:
            raise self.ended(what)
        try:
            return send()
        except ValueError:  # no accepted presentation context for it
            raise self.not_offered(what, hint) from None
        except RuntimeError:  # the association ended meanwhile
            raise self.ended(what) from None

    def echo(self) -> int | None:
        status = self._send("Verification (C-ECHO)", "check the PACS's DICOM node settings",
                            lambda: self.assoc.send_c_echo(msg_id=self.next_id()))
        return int(status.Status) if status is not None and "Status" in status else None

    def get(self, identifier: Dataset, hint: str, *, series_uid: str, max_instances: int) -> Dataset:
        """A C-GET followed to its final status (returned); the instances arrive through the C-STORE handler."""
        message_id = self.next_id()
        responses = self._send("Study Root C-GET", hint,
                               lambda: self.assoc.send_c_get(identifier, GET, msg_id=message_id))
        return self._follow(responses, "C-GET", GET, message_id, max_instances, series_uid)

    def move(self, identifier: Dataset, destination: str, hint: str, *, series_uid: str,
             max_instances: int) -> Dataset:
        """A C-MOVE to ``destination`` followed to its final status (returned)."""
        message_id = self.next_id()
        responses = self._send("Study Root C-MOVE", hint,
                               lambda: self.assoc.send_c_move(identifier, destination, MOVE, msg_id=message_id))
        return self._follow(responses, "C-MOVE", MOVE, message_id, max_instances, series_uid)

    def find(self, identifier: Dataset, *, limit: int, keep: int | None = None,
             cancel_after: int | None = None) -> Found:
        """One Study Root C-FIND. Matches beyond ``limit`` abort the association; ``keep`` bounds the answers kept;
        ``cancel_after`` sends a C-CANCEL once that many matched (a PACS that ignores it is still counted)."""
        message_id = self.next_id()
        responses = self._send("Study Root C-FIND", "allow queries (C-FIND) for our AE title in the PACS",
                               lambda: self.assoc.send_c_find(identifier, FIND, msg_id=message_id))
        found = Found()
        for status, answer in responses:
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise self.ended("C-FIND")
            if code in PENDING:
                found.matched += 1
                if answer is not None and (keep is None or len(found.answers) < keep):
                    found.answers.append(Answer(answer))
                if found.matched > limit:
                    found.complete = False
                    self.assoc.abort()
                    return found
                if cancel_after is not None and found.matched == cancel_after:
                    with contextlib.suppress(RuntimeError, ValueError):  # gone meanwhile: the loop ends it
                        self.assoc.send_c_cancel(message_id, query_model=FIND)
                continue
            if code in (0x0000, 0xFE00):  # success, or cancelled as asked
                return found
            raise DomainError(Outcome.PACS_UNAVAILABLE, f"{self.where} answered C-FIND with status 0x{code:04X} "
                              f"({status_meaning(code)})")
        raise self.ended("C-FIND")

    def _follow(self, responses: Iterator[tuple[Dataset, Dataset | None]], what: str, model: str, message_id: int,
                max_instances: int, series_uid: str) -> Dataset:
        """The final status of a C-GET/C-MOVE. More sub-operations announced than ``max_instances`` cut it; after an
        instance was refused (``guard.error``) the PACS is asked to stop (C-CANCEL), and the rest are refused at once
        until it answers (or the deadline ends it): no A-ABORT while pynetdicom may still answer a C-STORE."""
        cancelled = False
        for status, _ in responses:
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise self.ended(what)
            if code not in PENDING:
                return status
            if self.guard.error is not None:
                if not cancelled:
                    cancelled = True
                    with contextlib.suppress(RuntimeError, ValueError):
                        self.assoc.send_c_cancel(message_id, query_model=model)
                continue
            total = sum(int(status.get(k) or 0) for k in SUBOPERATIONS)
            if total > max_instances:
                self.cut(too_large(f"series {series_uid}: the PACS announces {total} instances for the {what}",
                                   str(max_instances), "MAX_SLICES_PER_SERIES"))
        raise self.ended(what)


def status_meaning(code: int) -> str:
    if code == 0x0122:
        return "SOP class not supported"
    if code in (0xA700, 0xA701, 0xA702):
        return "out of resources at the PACS"
    if code == 0xA801:
        return "move destination unknown"
    if code == 0xA900:
        return "identifier does not match SOP class"
    if code == 0xFE00:
        return "cancelled"
    if code == 0xB000:
        return "some sub-operations failed"
    return "unable to process" if 0xC000 <= code <= 0xCFFF else "failure"
