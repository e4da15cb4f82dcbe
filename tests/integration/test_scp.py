"""The C-STORE SCP against real senders on 127.0.0.1: pynetdicom SCUs, Orthanc pushing through its REST API, and the
SCP as its own process killed with SIGKILL mid-association. Checks what reaches the spool (and that it reads back as
the ingest reads it), what is registered in the database, and what is refused with which DIMSE status."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import transport as pynetdicom_transport
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    CTImageStorage,
    Verification,
)

from integration.adapters.db.session import make_engine, upgrade
from integration.adapters.db.store import SqlStore
from integration.adapters.dicom_decode import decode_file
from integration.adapters.spool import FileSpool
from integration.bootstrap import (
    PushEngine,
    bootstrap_push,
    build_spool,
    open_probes,
    retention_policy,
    scp_tls_context,
)
from integration.config import Settings
from integration.domain import stages
from integration.domain.ids import opaque_name
from integration.domain.push import SCP_SOURCE
from integration.domain.records import StudyStatus
from integration.domain.types import Outcome
from integration.entrypoints.processes import scp_listening
from integration.entrypoints.scp import ScpServer
from integration.services.retention import Housekeeping, prune
from sandbox import OrthancPeer, free_port
from tests.integration.test_dicomweb_orthanc import (
    SLICE_GAP_MM,
    Z0_MM,
    ct_series,
    dicom_bytes,
    non_image,
    stored_values,
)

pytestmark = pytest.mark.peers

ROOT = Path(__file__).resolve().parents[2]
SENDER = "MODALITY"
QUIET_S = 1.0


@pytest.fixture(autouse=True)
def senders_without_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test SCUs set TCP_NODELAY, as dcmtk and Orthanc do with TCP_NODELAY=1 (else ~40 ms per C-STORE)."""
    original = pynetdicom_transport.AssociationSocket._create_socket

    def create(self: Any, address: Any) -> socket.socket:
        sock = original(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    monkeypatch.setattr(pynetdicom_transport.AssociationSocket, "_create_socket", create)


def today() -> tuple[str, str]:
    """StudyDate/StudyTime of a study taken a few minutes ago (UTC), as DICOM strings."""
    taken = datetime.now(UTC) - timedelta(minutes=5)
    return taken.strftime("%Y%m%d"), taken.strftime("%H%M%S")


def series(study_uid: str, n: int = 12, **kwargs: Any) -> list[Dataset]:
    day, clock = today()
    return ct_series(study_uid, n=n, study_date=day, study_time=clock, **kwargs)


@dataclass
class Running:
    settings: Settings
    engine: PushEngine
    server: ScpServer
    queued: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def store(self) -> SqlStore:
        return self.engine.store

    @property
    def spool(self) -> FileSpool:
        return build_spool(self.settings)

    def spooled(self, study_uid: str) -> list[Path]:
        return sorted((self.settings.data_dir / "spool" / opaque_name(study_uid)).glob("*/*.dcm"))

    def ingests(self, study_uid: str) -> int:
        return sum(1 for stage, ids in self.queued if stage == "ingest" and study_uid in ids)


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*, sandbox: bool = False, ssl_context: ssl.SSLContext | None = None, limits: dict[str, Any] | None = None,
              **scp: Any) -> Running:
        values = {"enabled": True, "port": free_port(), "allowed_calling_aets": [SENDER, "ORTHANC"],
                  "quiet_period_s": QUIET_S, **scp}
        settings = Settings.model_validate({"data_dir": str(tmp_path / f"data{len(started)}"), "sandbox": sandbox,
                                            "pacs": {"timezone": "Pacific/Kiritimati"}, "scp": values,
                                            "limits": limits or {}})
        queued: list[tuple[str, list[str]]] = []
        engine = bootstrap_push(settings, enqueue=lambda stage, ids: queued.append((stage, list(ids))))
        running = Running(settings, engine, ScpServer(engine.push, settings.scp, ssl_context=ssl_context).start(),
                          queued)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.stop()
        running.engine.close()


def scu(title: str = SENDER, *extra: str, timeout: float = 30) -> AE:
    ae = AE(ae_title=title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in extra:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def associate(scp: Running, title: str = SENDER, *extra: str, called: str = "STROKEWATCH",
              tls: ssl.SSLContext | None = None) -> Association:
    return scu(title, *extra).associate("127.0.0.1", scp.port, ae_title=called,
                                        tls_args=(tls, "127.0.0.1") if tls else None)


def send(assoc: Association, datasets: list[Dataset]) -> list[int | None]:
    """Each C-STORE's status (None: no response, the association ended)."""
    out: list[int | None] = []
    for ds in datasets:
        status = assoc.send_c_store(ds) if assoc.is_established else None
        out.append(int(status.Status) if status is not None and "Status" in status else None)
    return out


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def registered(scp: Running, study_uid: str) -> bool:
    row = scp.store.get_study(study_uid)
    return row is not None and row.source == SCP_SOURCE


# -- C-ECHO, C-STORE, reading back ---------------------------------------------------------------------------------


def test_a_series_is_spooled_durably_registered_once_and_reads_back_as_the_ingest_reads_it(start_scp: Any) -> None:
    scp = start_scp()
    study = generate_uid()
    assoc = associate(scp)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    day, clock = today()
    datasets = ct_series(study, n=12, study_date=day, study_time=clock)
    assert send(assoc, datasets) == [0] * 12
    assert len(scp.spooled(study)) == 12 and not registered(scp, study)  # the association is still open
    assoc.release()
    wait_for("the study registered", lambda: registered(scp, study))
    assert scp.queued == [("prefetch", [study]), ("ingest", [study])]  # its vitals read ahead, then ingested

    row = scp.store.get_study(study)
    assert row is not None and row.status is StudyStatus.DETECTED and row.dicom_patient_id == "SW-TEST-1"
    assert row.completed_at is not None and row.completed_at <= row.detected_at  # released, then registered
    assert {h.stage: h.count for h in scp.store.stage_histograms()}["detect"] == 1
    taken = datetime.strptime(day + clock, "%Y%m%d%H%M%S").replace(tzinfo=ZoneInfo("Pacific/Kiritimati"))
    assert row.study_datetime == taken  # naive DICOM time read in pacs.timezone, whatever this machine's zone

    spool = scp.spool  # the ingest's view: the spool as a Pacs
    [ref] = spool.list_series(study)
    assert (ref.n_instances, ref.modality, ref.body_part, ref.rows) == (12, "CT", "HEAD", 64)
    reported: list[tuple[str, float]] = []
    with stages.reporting(lambda stage, seconds: reported.append((stage, seconds))):
        modality, slices = spool.retrieve_series(study, ref.series_uid)
    assert modality == "CT" and len(slices) == 12
    assert [stage for stage, _ in reported] == ["decode"] and reported[0][1] > 0  # its part of the retrieval
    for k, s in enumerate(slices):  # ordered along the normal, HU = stored + intercept
        assert s.position[2] == pytest.approx(Z0_MM + SLICE_GAP_MM * k)
        np.testing.assert_array_equal(s.pixels, stored_values(k, 64).astype(np.float32) - 1024)

    root = scp.settings.data_dir / "spool"
    for path in scp.spooled(study):
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
        assert study not in str(path)  # names are derived, never the UIDs
        assert decode_file(path).sop_instance_uid in {str(d.SOPInstanceUID) for d in datasets}
    assert not list((root / ".tmp").iterdir())  # nothing half written


def test_duplicates_are_kept_once_and_a_resent_study_is_not_registered_again(start_scp: Any) -> None:
    scp = start_scp()
    study = generate_uid()
    datasets = series(study, n=6)
    assoc = associate(scp)
    assert send(assoc, datasets + datasets[:3]) == [0] * 9  # duplicates within the association: acknowledged
    assoc.release()
    wait_for("the study registered", lambda: registered(scp, study))
    again = associate(scp)
    assert send(again, datasets) == [0] * 6  # the whole study sent again
    again.release()
    time.sleep(QUIET_S + 0.5)
    assert len(scp.spooled(study)) == 6 and scp.ingests(study) == 1


def test_a_study_over_two_concurrent_associations_completes_when_both_are_released(start_scp: Any) -> None:
    scp = start_scp()
    study = generate_uid()
    datasets = series(study, n=8)
    first, second = associate(scp), associate(scp)
    assert send(first, datasets[:4]) == [0] * 4 and send(second, datasets[4:]) == [0] * 4
    first.release()
    time.sleep(0.6)
    assert not registered(scp, study)  # the second association still brings instances
    second.release()
    wait_for("the study registered", lambda: registered(scp, study))
    assert len(scp.spooled(study)) == 8 and scp.ingests(study) == 1


def test_one_association_per_series_accumulates_and_completes_after_the_quiet_period(start_scp: Any) -> None:
    scp = start_scp(per_series_senders=[SENDER])
    study = generate_uid()
    axial, thin = series(study, n=6), series(study, n=5, description="Head 2mm", seed=3)
    for one in (axial, thin):
        assoc = associate(scp)
        assert send(assoc, one) == [0] * len(one)
        assoc.release()
        assert not registered(scp, study)  # a release from this sender says nothing
    wait_for("the study registered after the quiet period", lambda: registered(scp, study), QUIET_S + 5)
    assert sorted(s.n_instances for s in scp.spool.list_series(study)) == [5, 6]
    assert scp.ingests(study) == 1


def test_a_late_series_from_a_sender_that_releases_reopens_and_requeues_the_study(start_scp: Any) -> None:
    scp = start_scp()
    study = generate_uid()
    for n, seed in ((4, 0), (3, 5)):
        assoc = associate(scp)
        assert send(assoc, series(study, n=n, seed=seed)) == [0] * n
        assoc.release()
        wait_for("the study queued", lambda n=n: scp.ingests(study) == (1 if n == 4 else 2))
    assert len(scp.spooled(study)) == 7
    row = scp.store.get_study(study)
    assert row is not None and row.status is StudyStatus.RETRY  # queued again, with every instance


def test_an_aborted_association_keeps_what_was_acknowledged_and_completes_after_the_quiet_period(
    start_scp: Any,
) -> None:
    scp = start_scp()
    study = generate_uid()
    assoc = associate(scp)
    datasets = series(study, n=8)
    assert send(assoc, datasets[:5]) == [0] * 5
    assoc.abort()
    time.sleep(0.4)
    assert not registered(scp, study)  # no release: the quiet period decides
    wait_for("the study registered", lambda: registered(scp, study), QUIET_S + 5)
    kept = {decode_file(p).sop_instance_uid for p in scp.spooled(study)}
    assert kept == {str(d.SOPInstanceUID) for d in datasets[:5]}


# -- the door ---------------------------------------------------------------------------------------------------------


def test_unknown_calling_or_called_titles_and_hosts_are_refused_before_anything_is_stored(start_scp: Any) -> None:
    scp = start_scp()
    evil = associate(scp, "EVIL")
    assert evil.is_rejected and evil.acceptor.primitive.diagnostic == 3  # calling AE title not recognised
    wrong = associate(scp, called="SOMEONE_ELSE")
    assert wrong.is_rejected and wrong.acceptor.primitive.diagnostic == 7  # called AE title not recognised
    fenced = start_scp(allowed_hosts=["10.0.0.0/8"])
    assert not associate(fenced).is_established  # the connection is closed before an association
    busy = start_scp(max_associations=1)
    first = associate(busy)
    second = associate(busy)
    assert first.is_established and second.is_rejected
    assert (second.acceptor.primitive.result, second.acceptor.primitive.diagnostic) == (2, 2)  # local limit
    first.release()
    assert not (scp.settings.data_dir / "spool").exists() or not any(
        p for p in (scp.settings.data_dir / "spool").iterdir() if not p.name.startswith("."))


def test_the_sandbox_scp_without_named_senders_takes_anyone_on_loopback(start_scp: Any) -> None:
    scp = start_scp(sandbox=True, allowed_calling_aets=[])
    assoc = associate(scp, "ANYONE")
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()


def test_invalid_uids_and_non_images_get_the_right_status(start_scp: Any) -> None:
    scp = start_scp()
    study = generate_uid()
    bad_study, bad_sop, good = series(study, n=3)
    bad_study.StudyInstanceUID = "1.2.3.04"  # a leading zero: not a PS3.5 UID
    bad_sop.SOPInstanceUID = bad_sop.file_meta.MediaStorageSOPInstanceUID = "1.2.3.abc"
    report = non_image(study, "SR", BasicTextSRStorage, "Report")
    report.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    assoc = associate(scp, SENDER, BasicTextSRStorage)
    answers = [assoc.send_c_store(ds) for ds in (bad_study, bad_sop, good, report)]
    assoc.release()
    assert [int(a.Status) for a in answers] == [0xC000, 0xC000, 0, 0]
    assert "StudyInstanceUID '1.2.3.04' is not a DICOM UID" in str(answers[0].ErrorComment)
    assert len(scp.spooled(study)) == 1  # the good one; the report was acknowledged and not kept
    wait_for("the study registered", lambda: registered(scp, study))
    assert scp.store.counts()["open_failure_occurrences"].get(Outcome.INVALID_UID.value) == 2


def test_sizes_beyond_the_limits_are_refused_before_they_are_buffered(start_scp: Any) -> None:
    scp = start_scp(max_instance_bytes=1 << 20, limits={"max_rows": 256, "max_columns": 256})
    study = generate_uid()
    too_many_pixels = series(study, n=1, size=300)  # 300 x 300: beyond max_rows, within the byte limit
    assoc = associate(scp)
    answer = assoc.send_c_store(too_many_pixels[0])
    assert int(answer.Status) == 0xA700 and str(answer.ErrorComment) == "image too large"
    huge = series(study, n=1, size=1024)[0]  # 2 MiB of pixels: the association is aborted while it arrives
    assert send(assoc, [huge]) == [None]
    wait_for("the association aborted", lambda: not assoc.is_established)
    assert scp.spooled(study) == []

    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as raw:  # a PDU announcing 100 MB
        raw.sendall(struct.pack(">BBL", 0x01, 0, 100_000_000) + b"\x00" * 1024)
        raw.settimeout(5)
        assert raw.recv(1024) == b""  # closed, nothing allocated for it
    ok = associate(scp)  # and the SCP serves the next sender as before
    assert int(ok.send_c_echo().Status) == 0
    ok.release()


def test_dicom_tls_with_client_certificates(start_scp: Any, tmp_path: Path) -> None:
    from tests.integration.test_tls import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(pki.ca),
           "require_client_cert": True}
    probe = Settings.model_validate({"data_dir": str(tmp_path), "scp": {"enabled": True, "tls": tls}})
    scp = start_scp(tls=tls, ssl_context=scp_tls_context(probe))

    def client(with_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(pki.ca))
        if with_cert:
            context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        return context

    study = generate_uid()
    assoc = associate(scp, tls=client(True))
    assert assoc.is_established and send(assoc, series(study, n=2)) == [0, 0]
    assoc.release()
    wait_for("the study registered", lambda: registered(scp, study))
    assert not associate(scp, tls=client(False)).is_established  # no certificate: no association
    plain = scu().associate("127.0.0.1", scp.port, ae_title="STROKEWATCH")  # no TLS at all
    assert not plain.is_established


# -- Orthanc pushes -------------------------------------------------------------------------------------------------


def test_orthanc_sends_a_study_through_its_rest_api(start_scp: Any, orthanc_peer: OrthancPeer) -> None:
    scp = start_scp()
    study = generate_uid()
    datasets = series(study, n=10)
    name = f"strokewatch-{scp.port}"
    with httpx.Client(base_url=orthanc_peer.url, timeout=60) as http:
        for ds in datasets:
            http.post("/instances", content=dicom_bytes(ds),
                      headers={"Content-Type": "application/dicom"}).raise_for_status()
        [found] = http.post("/tools/lookup", content=study).raise_for_status().json()
        http.put(f"/modalities/{name}", json={"AET": "STROKEWATCH", "Host": "127.0.0.1",
                                              "Port": scp.port}).raise_for_status()
        try:
            echo = http.post(f"/modalities/{name}/echo", json={})
            assert echo.status_code == 200, echo.text
            answer = http.post(f"/modalities/{name}/store", json={"Resources": [found["ID"]], "Synchronous": True})
            assert answer.status_code == 200, answer.text
            assert answer.json().get("FailedInstancesCount", 0) == 0
        finally:
            http.delete(f"/modalities/{name}")
            http.delete(f"/studies/{found['ID']}")
    wait_for("the study registered", lambda: registered(scp, study))
    assert len(scp.spooled(study)) == 10 and scp.ingests(study) == 1
    [ref] = scp.spool.list_series(study)
    assert len(scp.spool.retrieve_series(study, ref.series_uid)[1]) == 10


# -- a killed SCP -------------------------------------------------------------------------------------------------


def _scp_process(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROKEWATCH_")}
    env.update({
        "STROKEWATCH_DATA_DIR": str(data_dir),
        "STROKEWATCH_SCP__ENABLED": "true",
        "STROKEWATCH_SCP__PORT": str(port),
        "STROKEWATCH_SCP__ALLOWED_CALLING_AETS": f'["{SENDER}"]',
        "STROKEWATCH_SCP__QUIET_PERIOD_S": str(QUIET_S),
        "STROKEWATCH_LOG_LEVEL": "INFO",
    })
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "integration.entrypoints.scp"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def test_sigkill_mid_association_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    data_dir, port, log = tmp_path / "data", free_port(), tmp_path / "scp.log"
    settings = Settings.model_validate({"data_dir": str(data_dir), "scp": {"port": port}})
    proc = _scp_process(data_dir, port, log)
    try:
        wait_for("the SCP listening", lambda: scp_listening(settings), 60)
        study = generate_uid()
        datasets = series(study, n=12, size=256)
        # A sender waiting for the answer of a killed peer gives up after its DIMSE timeout: a short one here.
        assoc = scu(timeout=3).associate("127.0.0.1", port, ae_title="STROKEWATCH")
        assert assoc.is_established
        acknowledged = [str(d.SOPInstanceUID) for d, status in zip(datasets[:5], send(assoc, datasets[:5]),
                                                                     strict=True) if status == 0]
        assert len(acknowledged) == 5
        rest = threading.Thread(target=send, args=(assoc, datasets[5:]), daemon=True)
        rest.start()  # the sixth instance is on the wire when the SCP dies
        time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        rest.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    spool = data_dir / "spool" / opaque_name(study)
    files = sorted(spool.glob("*/*.dcm"))
    kept = {decode_file(p).sop_instance_uid for p in files}  # every file whole and readable, none half written
    assert set(acknowledged) <= kept, log.read_text()[-3000:]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)

    restarted = _scp_process(data_dir, port, log)  # the study completes after the quiet period
    try:
        url = f"sqlite:///{data_dir / 'strokewatch.db'}"
        upgrade(url)
        store = SqlStore(make_engine(url))
        wait_for("the recovered study registered",
                 lambda: (row := store.get_study(study)) is not None and row.source == SCP_SOURCE, 60)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(30) == 0, log.read_text()[-3000:]


# -- retention and doctor -----------------------------------------------------------------------------------------


class _Later:
    def __init__(self, days: float) -> None:
        self.days = days

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(days=self.days)


def test_prune_removes_the_spool_of_failed_studies_after_the_retention_period(start_scp: Any) -> None:
    scp = start_scp()
    failed, pending = generate_uid(), generate_uid()
    assoc = associate(scp)
    send(assoc, series(failed, n=3))
    assoc.release()
    wait_for("the study registered", lambda: registered(scp, failed))
    scp.store.claim_study(failed, datetime.now(UTC))
    scp.store.set_study_outcome(failed, StudyStatus.FAILED, Outcome.NO_ELIGIBLE_SERIES, "scouts only", None)
    held_open = associate(scp)
    send(held_open, series(pending, n=2))  # never completed: the SCP completes it when it runs
    half = scp.settings.data_dir / "spool" / ".tmp" / "123.dead.part"
    half.write_bytes(b"half an instance")
    os.utime(half, (time.time() - 7200,) * 2)

    def housekeeping(days: float) -> Housekeeping:
        return Housekeeping(scp.store, scp.settings.data_dir / "volumes", retention_policy(scp.settings),
                            _Later(days), None, scp.spool)

    assert prune(housekeeping(1)).removed["spool"] == 1  # only the half-written file: 7 days have not passed
    assert prune(housekeeping(8), dry_run=True).removed["spool"] == 3 and len(scp.spooled(failed)) == 3
    assert prune(housekeeping(8)).removed["spool"] == 3
    assert scp.spooled(failed) == [] and len(scp.spooled(pending)) == 2
    held_open.release()


def test_doctor_echoes_the_running_scp_as_an_allowed_sender(start_scp: Any) -> None:
    scp = start_scp()
    with open_probes(scp.settings) as probes:
        [probe] = [p for p in probes if p.name == "scp"]
        results = probe.probe(quick=False)
    assert results[0].ok and "answers C-ECHO" in results[0].detail, results
    assert [r.name for r in results] == ["scp", "scp spool", "scp security"]
    wrong = scp.settings.model_copy(update={"scp": scp.settings.scp.model_copy(update={"allowed_calling_aets":
                                                                                         ["NOT_ALLOWED"]})})
    with open_probes(wrong) as probes:
        [probe] = [p for p in probes if p.name == "scp"]
        refused = probe.probe(quick=True)[0]
    assert not refused.ok and "calling AE title is not allowed" in refused.detail
