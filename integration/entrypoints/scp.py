"""The DICOM C-STORE SCP: where a PACS or a modality pushes studies (``strokewatch scp``; ``strokewatch run`` starts it
as its own process when ``scp.enabled``).

A pynetdicom AE answers C-ECHO and C-STORE. The door is guarded before anything is buffered: the sender's address
(``scp.allowed_hosts``), DICOM TLS when configured (PS3.15 B.1, the handshake done in the connection's own thread
within a timeout), the called and calling AE titles (``scp.ae_title``, ``scp.allowed_calling_aets``), and sizes: a
PDU larger than the SCP announced, or a data set larger than ``scp.max_instance_bytes``, aborts the association.
Each C-STORE handler translates the request and delegates to ``services.push.receive_instance``, which writes the
instance to the spool durably before the response is sent. When an association ends, its studies are handed to the
completion rule; a ticker thread registers complete studies and queues their ingest.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydicom import uid as uids
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from integration.config import ScpSettings, Settings, get_settings
from integration.domain.push import ReceivedInstance
from integration.domain.series import IMAGE_SOP_CLASSES
from integration.services.push import PushServices, association_closed, complete_due, receive_instance, recover

log = logging.getLogger("integration.entrypoints.scp")  # also when run as __main__

#: The largest PDU the SCP announces (A-ASSOCIATE-AC Maximum Length); a peer's PDU longer than this plus room for an
#: association request is refused before it is read.
MAX_PDU = 1 << 20
_MAX_PDU_READ = MAX_PDU + (64 << 10)
#: One command set (a few hundred bytes normally).
_MAX_COMMAND_BYTES = 64 << 10
#: How often complete studies are looked for.
TICK_S = 0.2
_TLS_HANDSHAKE_S = 30.0

_NATIVE = (uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian, uids.ExplicitVRBigEndian)
_COMPRESSED = (uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, uids.JPEGLossless, uids.JPEGLosslessSV1,
               uids.JPEGLSLossless, uids.JPEGLSNearLossless, uids.JPEG2000Lossless, uids.JPEG2000, uids.RLELossless,
               uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL, uids.HTJ2K)


def transfer_syntaxes() -> list[str]:
    """What the SCP accepts: the native syntaxes and every compressed one a decoder is installed for (the ingest
    decodes what was stored). Deflate is not offered: its data set would be inflated whole to be read."""
    usable = []
    for syntax in _COMPRESSED:
        try:
            if get_decoder(syntax).is_available:
                usable.append(str(syntax))
        except NotImplementedError:
            continue
    return [str(s) for s in _NATIVE] + usable


def startup_problem(settings: Settings) -> str | None:
    """Why the SCP must not start (None when it may): an inbound door needs its senders named outside the sandbox,
    and even in the sandbox it accepts anyone only on loopback."""
    scp = settings.scp
    if scp.allowed_calling_aets:
        return None
    if not settings.sandbox:
        return ("the DICOM SCP needs its senders named outside the sandbox: set STROKEWATCH_SCP__ALLOWED_CALLING_AETS "
                "to the calling AE titles of the PACS and modalities that push studies (JSON list, e.g. "
                '\'["PACS1", "CT_ER"]\')')
    if not _loopback(scp.host):
        return (f"STROKEWATCH_SCP__HOST={scp.host} listens beyond this machine and no sender is named: set "
                "STROKEWATCH_SCP__ALLOWED_CALLING_AETS, or STROKEWATCH_SCP__HOST=127.0.0.1")
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CappedSocket(AssociationSocket):
    """pynetdicom reads a PDU whole, as long as its header says: a PDU beyond what the SCP announced is refused
    before a byte of it is buffered (the association then ends as if the connection had dropped)."""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > _MAX_PDU_READ:
            log.warning("SCP: a PDU of %d bytes announced (the limit is %d); connection closed", nr_bytes,
                        _MAX_PDU_READ)
            raise OSError(f"PDU of {nr_bytes} bytes refused")
        return super().recv(nr_bytes)


@dataclass
class _Tally:
    """Per association: bytes of the message being received, and what became of its instances (for the log)."""

    command: int = 0
    data: int = 0
    stored: int = 0
    other: int = 0  # duplicates and discarded non-images: acknowledged, nothing new kept
    refused: int = 0


class _Handler(RequestHandler):
    """One connection: its address checked, its TLS handshake done here (not in the accepting thread, which a silent
    client would block), then the association run to its end, which is reported (released or not)."""

    server: _Server

    def handle(self) -> None:
        server = self.server
        address = str(self.client_address[0])
        if not server.host_allowed(address):
            log.warning("SCP: connection from %s refused: not in STROKEWATCH_SCP__ALLOWED_HOSTS", address)
            self._close()
            return
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(_TLS_HANDSHAKE_S)
                self.request.do_handshake()
                self.request.settimeout(None)
            except (OSError, ssl.SSLError) as err:
                log.warning("SCP: TLS handshake with %s failed: %s", address, type(err).__name__)
                self._close()
                return
        assoc = self._create_association()
        assoc.dul.socket.__class__ = _CappedSocket  # same object, capped reads (no second socket wrapper)
        server.opened(assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        server.ended(assoc, address)

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_RDWR)
        self.request.close()


class _Server(ThreadedAssociationServer):
    daemon_threads = True
    scp: ScpServer

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        # Responses leave at once (no Nagle delay). A sender must set it too (dcmtk and Orthanc: TCP_NODELAY=1), or
        # its own Nagle delay and our delayed ACKs cost ~40 ms per C-STORE.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:  # the handshake happens in the connection's thread (_Handler.handle)
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def host_allowed(self, address: str) -> bool:
        return self.scp.host_allowed(address)

    def opened(self, assoc: Association) -> None:
        self.scp.tallies[id(assoc)] = _Tally()

    def ended(self, assoc: Association, address: str) -> None:
        self.scp.ended(assoc, address)


class ScpServer:
    """The SCP: ``start()`` listens (non-blocking) and starts the completion ticker; ``stop()`` ends both."""

    def __init__(self, push: PushServices, scp: ScpSettings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.push = push
        self.settings = scp
        self.ssl_context = ssl_context
        self.networks = [ipaddress.ip_network(n, strict=False) for n in scp.allowed_hosts]
        self.tallies: dict[int, _Tally] = {}
        self._ae: AE | None = None
        self._server: _Server | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------------------------------

    def start(self) -> ScpServer:
        scp = self.settings
        recover(self.push)
        ae = AE(ae_title=scp.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(scp.allowed_calling_aets)  # empty: anyone (sandbox on loopback only)
        ae.maximum_associations = scp.max_associations
        ae.maximum_pdu_size = MAX_PDU
        ae.acse_timeout = min(30.0, scp.idle_timeout_s)
        ae.dimse_timeout = ae.network_timeout = scp.idle_timeout_s
        syntaxes = transfer_syntaxes()
        ae.add_supported_context(Verification)
        for sop_class in sorted(IMAGE_SOP_CLASSES):
            ae.add_supported_context(sop_class, syntaxes)
        if scp.accept_other_sop_classes:
            for context in AllStoragePresentationContexts:
                if context.abstract_syntax is not None and context.abstract_syntax not in IMAGE_SOP_CLASSES:
                    ae.add_supported_context(context.abstract_syntax, syntaxes)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        server = cast(_Server, ae.make_server((scp.host, scp.port), ae_title=scp.ae_title,
                                              ssl_context=self.ssl_context, evt_handlers=handlers,
                                              server_class=_Server, request_handler=_Handler))
        server.scp = self
        ae._servers.append(server)  # as AE.start_server does, so that AE.shutdown() stops it
        threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True).start()
        self._ae, self._server = ae, server
        self._ticker = threading.Thread(target=self._tick, name="scp-complete", daemon=True)
        self._ticker.start()
        mode = "TLS" if self.ssl_context else "plain DIMSE"
        senders = ", ".join(scp.allowed_calling_aets) or "any (sandbox)"
        log.info("DICOM SCP %s listening on %s:%d (%s); senders: %s", scp.ae_title, scp.host, self.port, mode, senders)
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.settings.port

    def stop(self) -> None:
        """Stop accepting, abort open associations (their studies complete after the quiet period, at the next
        start if not before), register what is complete now."""
        if self._ae is not None:
            self._ae.shutdown()
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(10)
        complete_due(self.push)

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                complete_due(self.push)
            except Exception:  # never let the ticker die: the next tick tries again
                log.exception("completing pushed studies failed")

    # -- the door -------------------------------------------------------------------------------------------------

    def host_allowed(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return any(ip in n or (mapped is not None and mapped in n) for n in self.networks)

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.warning("SCP: association from %s refused (calling AE %r, called AE %r)",
                    requestor.address, requestor.ae_title, getattr(event.assoc.acceptor, "ae_title", ""))

    def _on_pdu(self, event: evt.Event) -> None:
        """Bytes of the message being received, counted as its fragments arrive: a data set beyond
        ``max_instance_bytes`` (or a runaway command set) aborts the association before more is buffered."""
        items = getattr(event.pdu, "presentation_data_value_items", None)
        tally = self.tallies.get(id(event.assoc))
        if not items or tally is None:
            return
        for item in items:
            value = item.presentation_data_value or b""
            if value[:1] and value[0] & 1:  # a command fragment: a new message
                tally.command += len(value) - 1
                if value[0] & 2:
                    tally.command = tally.data = 0
            else:
                tally.data += max(0, len(value) - 1)
        if tally.data > self.push.max_instance_bytes or tally.command > _MAX_COMMAND_BYTES:
            log.warning("SCP: association from %r aborted: a message beyond %d bytes (STROKEWATCH_SCP__MAX_INSTANCE_"
                        "BYTES)", event.assoc.requestor.ae_title, self.push.max_instance_bytes)
            tally.data = tally.command = 0
            event.assoc.abort()

    # -- C-STORE --------------------------------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int | Dataset:
        request = cast(C_STORE, event.request)
        tally = self.tallies.setdefault(id(event.assoc), _Tally())
        if request.DataSet is None:
            tally.refused += 1
            return _status(0xC000, "no data set")
        buffer = request.DataSet.getbuffer()  # the received bytes, not copied
        try:
            result = receive_instance(self.push, ReceivedInstance(
                calling_aet=str(event.assoc.requestor.ae_title).strip(),
                association=id(event.assoc),
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
                sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                transfer_syntax=str(event.context.transfer_syntax),
                dataset=buffer,
            ))
        finally:
            buffer.release()
        if not result.ok:
            tally.refused += 1
            return _status(int(result.status), result.comment)
        if result.stored:
            tally.stored += 1
        else:
            tally.other += 1
        return 0x0000

    def ended(self, assoc: Association, address: str) -> None:
        """The association is over: its studies go to the completion rule (released or not)."""
        tally = self.tallies.pop(id(assoc), _Tally())
        released = bool(assoc.is_released)
        closed = association_closed(self.push, id(assoc), released=released)
        if closed:  # a released study is due now: registered here rather than at the next tick
            try:
                complete_due(self.push)
            except Exception:  # the ticker tries again
                log.exception("completing pushed studies failed")
        if tally.stored or tally.other or tally.refused:
            log.info("SCP: association from %r at %s %s: %d instance(s) stored, %d acknowledged without a new file, "
                     "%d refused; %d stud%s to complete", str(assoc.requestor.ae_title).strip(), address,
                     "released" if released else "ended without release", tally.stored, tally.other, tally.refused,
                     len(closed), "y" if len(closed) == 1 else "ies")


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


def serve(settings: Settings, enqueue: Callable[[str, list[str]], None],
          stop: threading.Event | None = None) -> None:
    """Run the SCP until SIGTERM/SIGINT (or ``stop``): the composition from ``bootstrap_push``, TLS from
    ``scp.tls``. Raises RuntimeError (naming the settings) when it must not start."""
    from integration.bootstrap import bootstrap_push, scp_tls_context

    problem = startup_problem(settings)
    if problem:
        raise RuntimeError(problem)
    context = scp_tls_context(settings)
    engine = bootstrap_push(settings, enqueue=enqueue)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    try:
        server = ScpServer(engine.push, settings.scp, ssl_context=context).start()
        try:
            stop.wait()
        finally:
            log.info("DICOM SCP stopping")
            server.stop()
    finally:
        engine.close()


def celery_enqueue(stage: str, ids: list[str]) -> None:
    from integration.entrypoints.worker import enqueue

    enqueue(stage, ids)


def _configure_celery() -> None:
    """Load the Celery app's configuration now, in the main thread: a bad broker setting fails at start, and the
    association threads never race to load it at their first ``send_task``."""
    from integration.entrypoints.worker import app

    _ = app.conf.broker_url


def main() -> int:
    """``python -m integration.entrypoints.scp`` (``strokewatch scp``): the SCP in the foreground."""
    os.umask(0o077)  # the spool holds PHI: the engine's user only
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # per-message chatter; its DEBUG dumps data sets
    try:
        _configure_celery()
        serve(settings, celery_enqueue)
    except (RuntimeError, ValueError, OSError) as err:  # a refusal, a TLS file, a port in use: said, exit 1
        log.error("the DICOM SCP did not start: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
