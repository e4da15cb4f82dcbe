"""`strokewatch doctor`'s look at the C-STORE SCP: a C-ECHO to it as one of the allowed senders, and its spool's disk.

The echo goes where a sender's would (host, port, called AE title, TLS) with a calling AE title the SCP allows, so
a "refused" here is what a PACS would see. Details name AE titles, addresses and counts only.
"""

from __future__ import annotations

import logging
import shutil
import ssl
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from integration.domain.checks import CheckResult, env_name

log = logging.getLogger(__name__)

_REJECT_REASONS = {
    3: f"the calling AE title is not allowed ({env_name('scp', 'allowed_calling_aets')})",
    7: f"the called AE title is not the SCP's ({env_name('scp', 'ae_title')})",
}


class ScpProbe:
    """A Probe of the SCP (``strokewatch doctor`` only: the SCP is its own process, the API's readiness does not
    depend on it)."""

    name = "scp"

    def __init__(self, host: str, port: int, called_aet: str, calling_aet: str, *, spool_dir: Path,
                 min_free_bytes: int, tls: ssl.SSLContext | None = None, client_cert_required: bool = False,
                 timeout_s: float = 5.0, notes: tuple[str, ...] = ()) -> None:
        self.host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        self.port = port
        self.called_aet = called_aet
        self.calling_aet = calling_aet
        self.spool_dir = spool_dir
        self.min_free_bytes = min_free_bytes
        self.tls = tls
        self.client_cert_required = client_cert_required
        self.timeout_s = timeout_s
        self.notes = notes

    def probe(self, *, quick: bool) -> list[CheckResult]:
        results = [self._echo()]
        if not quick:
            results.append(self._disk())
            results += [CheckResult("scp security", True, note, None, warning=note.startswith("warning"))
                        for note in self.notes]
        return results

    def _echo(self) -> CheckResult:
        where = f"{self.called_aet}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")
        if self.client_cert_required:
            return CheckResult("scp", True, f"{where}: senders need a client certificate; C-ECHO not tried")
        ae = AE(ae_title=self.calling_aet)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        tls_args = (self.tls, self.host) if self.tls is not None else None
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, tls_args=tls_args)
        except Exception as exc:  # pynetdicom raises for a few socket errors instead of returning
            return self._down(where, type(exc).__name__)
        try:
            if assoc.is_rejected:
                answer = getattr(assoc.acceptor, "primitive", None)
                reason = _REJECT_REASONS.get(int(getattr(answer, "diagnostic", 0) or 0), "rejected")
                hint = f"add {self.calling_aet!r} to {env_name('scp', 'allowed_calling_aets')}, or check the title"
                return CheckResult("scp", False, f"{where}: association rejected: {reason}", hint)
            if not assoc.is_established:
                return self._down(where, "no association")
            status = assoc.send_c_echo()
            code = int(status.Status) if status is not None and "Status" in status else None
            if code != 0:
                return CheckResult("scp", False, f"{where}: C-ECHO answered {code!r}", "see the SCP's log")
            return CheckResult("scp", True, f"{where} answers C-ECHO from {self.calling_aet!r}")
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

    def _down(self, where: str, why: str) -> CheckResult:
        return CheckResult(
            "scp", False, f"{where}: no association ({why})",
            f"is the SCP running (`strokewatch run` with {env_name('scp', 'enabled')}=true, or `strokewatch scp`)? "
            f"check {env_name('scp', 'host')}, {env_name('scp', 'port')}, {env_name('scp', 'allowed_hosts')} and "
            f"{env_name('scp', 'tls')}",
        )

    def _disk(self) -> CheckResult:
        directory = self.spool_dir if self.spool_dir.exists() else self.spool_dir.parent
        try:
            free = shutil.disk_usage(directory).free
        except OSError as err:
            return CheckResult("scp spool", False, f"{self.spool_dir}: {err.strerror}", "check STROKEWATCH_DATA_DIR")
        detail = f"{self.spool_dir}: {free / 2**30:.1f} GiB free"
        if free < self.min_free_bytes:
            hint = f"free disk space, or lower {env_name('scp', 'min_free_disk_bytes')}"
            return CheckResult("scp spool", False, f"{detail}, below the {self.min_free_bytes} bytes needed", hint)
        return CheckResult("scp spool", True, detail)
