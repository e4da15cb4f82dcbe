"""DimsePacs against Orthanc's real DICOM port: C-FIND at study and series level, series selection, C-GET and C-MOVE
(to our own C-STORE SCP) giving the volume the DICOMweb adapter gives for the same study, limits, errors, DICOM TLS,
`strokewatch doctor`, and no PHI in logs or messages. Dates are relative to now; every zone is explicit."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

import sandbox.orthanc
from inference.preprocess import Slice, stack_slices, volume_tensor
from integration.adapters.db.session import upgrade
from integration.adapters.dicomweb import DicomWebPacs
from integration.adapters.dimse import DimsePacs
from integration.adapters.tls import ssl_context
from integration.bootstrap import bootstrap_push, build_spool, open_probes
from integration.config import Settings, TlsSettings
from integration.domain.checks import CheckResult
from integration.domain.limits import ImageLimits
from integration.domain.series import SeriesRules, choose
from integration.domain.studytime import detection_window
from integration.domain.types import DomainError, Outcome, SeriesRef
from integration.entrypoints.scp import ScpServer
from integration.services import doctor
from sandbox import OrthancPeer, free_port
from tests.integration.test_dicomweb_orthanc import (
    SLICE_GAP_MM,
    Z0_MM,
    ct_series,
    enhanced_ct,
    non_image,
    store,
    stored_values,
)
from tests.integration.test_tls import Pki, make_pki

pytestmark = pytest.mark.peers

TIMEOUTS = {"connect_timeout_s": 5.0, "acse_timeout_s": 10.0, "dimse_timeout_s": 30.0, "network_timeout_s": 30.0}


def dicom_when(when: datetime) -> tuple[str, str]:
    """StudyDate, StudyTime of an aware instant, in its own zone."""
    return when.strftime("%Y%m%d"), when.strftime("%H%M%S")


def recent_series(study_uid: str, n: int = 20, *, ago: timedelta = timedelta(hours=1), **kwargs: Any) -> list[Dataset]:
    day, clock = dicom_when(datetime.now(UTC) - ago)
    return ct_series(study_uid, n=n, study_date=day, study_time=clock, **kwargs)


def dimse_pacs(peer: OrthancPeer, **kwargs: Any) -> DimsePacs:
    return DimsePacs("127.0.0.1", peer.dicom_port, peer.aet, **{"study_timezone": UTC, **TIMEOUTS, **kwargs})


@pytest.fixture
def dimse(orthanc_peer: OrthancPeer) -> DimsePacs:
    return dimse_pacs(orthanc_peer)


@pytest.fixture
def dicomweb(orthanc_peer: OrthancPeer) -> Iterator[DicomWebPacs]:
    with DicomWebPacs(orthanc_peer.dicomweb_url, study_timezone=UTC) as client:
        yield client


def by_uid(series: list[SeriesRef]) -> list[SeriesRef]:
    return sorted(series, key=lambda s: s.series_uid)


def assert_same_slices(ours: list[Slice], theirs: list[Slice]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.position, a.orientation, a.pixel_spacing) == (b.position, b.orientation, b.pixel_spacing)
        assert a.pixels.dtype == b.pixels.dtype and np.array_equal(a.pixels, b.pixels)


# -- C-FIND ---------------------------------------------------------------------------------------------------------


def test_find_studies_over_a_detection_window_as_dicomweb_finds_them(orthanc_peer: OrthancPeer, dimse: DimsePacs,
                                                                     dicomweb: DicomWebPacs) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    recent, last_night, ahead, old, reports = (generate_uid() for _ in range(5))
    for uid, when in ((recent, now - timedelta(hours=1)), (last_night, now - timedelta(hours=20)),
                      (ahead, now + timedelta(minutes=5)), (old, now - timedelta(days=3))):
        day, clock = dicom_when(when)
        store(orthanc_peer, ct_series(uid, n=2, study_date=day, study_time=clock))
    sr = non_image(reports, "SR", "1.2.840.10008.5.1.4.1.1.88.11", "Report")
    sr.StudyDate, sr.StudyTime = dicom_when(now - timedelta(hours=1))
    store(orthanc_peer, [sr])
    ours = {recent, last_night, ahead, old, reports}

    window = detection_window(now, timedelta(hours=24), timedelta(minutes=15))
    found = {s.study_uid: s for s in dimse.find_studies(*window.query_dates()) if s.study_uid in ours}
    assert set(found) == {recent, last_night, ahead}  # old: outside the dates asked; the SR-only study: not CT/MR
    assert {uid for uid, ref in found.items() if window.contains(ref)} == {recent, last_night, ahead}
    ref = found[recent]
    assert ref.study_datetime == now - timedelta(hours=1) and not ref.date_only
    assert (ref.patient_id, ref.modalities, ref.description) == ("SW-TEST-1", ("CT",), "CT HEAD W/O")
    web = {s.study_uid: s for s in dicomweb.find_studies(*window.query_dates()) if s.study_uid in ours}
    assert found == web  # the same StudyRefs as QIDO-RS
    assert dimse.get_study(recent) == dicomweb.get_study(recent) == ref


def test_study_times_are_read_in_their_offset_or_the_pacs_zone(orthanc_peer: OrthancPeer) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    kiritimati = ZoneInfo("Pacific/Kiritimati")  # UTC+14 all year: its local date is often "tomorrow" in UTC
    naive, with_offset = generate_uid(), generate_uid()
    day, clock = dicom_when((now - timedelta(minutes=30)).astimezone(kiritimati))  # site time, no offset sent
    store(orthanc_peer, ct_series(naive, n=1, study_date=day, study_time=clock))
    day, clock = dicom_when((now - timedelta(hours=2)).astimezone(kiritimati))
    offset = ct_series(with_offset, n=1, study_date=day, study_time=clock)
    offset[0].TimezoneOffsetFromUTC = "+1400"
    store(orthanc_peer, offset)
    window = detection_window(now, timedelta(hours=24), timedelta(minutes=15))

    def found(zone: ZoneInfo) -> dict[str, Any]:
        refs = dimse_pacs(orthanc_peer, study_timezone=zone).find_studies(*window.query_dates())
        return {r.study_uid: r for r in refs if r.study_uid in (naive, with_offset)}

    at_site = found(kiritimati)
    assert at_site[naive].study_datetime == now - timedelta(minutes=30)
    assert at_site[with_offset].study_datetime == now - timedelta(hours=2)
    assert all(window.contains(r) for r in at_site.values())
    elsewhere = found(ZoneInfo("UTC"))  # a PACS zone set wrongly moves naive studies, never those with an offset
    assert elsewhere[naive].study_datetime == now - timedelta(minutes=30) + timedelta(hours=14)
    assert not window.contains(elsewhere[naive]) and window.contains(elsewhere[with_offset])


def test_list_series_gives_dicomwebs_series_and_the_same_choice(orthanc_peer: OrthancPeer, dimse: DimsePacs,
                                                                dicomweb: DicomWebPacs) -> None:
    study = generate_uid()
    good = recent_series(study, n=20)
    scout = recent_series(study, n=20, description="Scout", seed=3)
    short = recent_series(study, n=3, description="Head 5mm low dose", seed=4)
    extras = []
    for modality, sop_class, description in (("SR", "1.2.840.10008.5.1.4.1.1.88.22", "Dose Report"),
                                             ("PR", "1.2.840.10008.5.1.4.1.1.11.1", "Annotations")):
        ds = non_image(study, modality, sop_class, description)
        ds.StudyDate, ds.StudyTime, ds.StudyDescription = good[0].StudyDate, good[0].StudyTime, "CT HEAD W/O"
        extras.append(ds)
    store(orthanc_peer, [*good, *scout, *short, *extras])

    series = dimse.list_series(study)
    assert by_uid(series) == by_uid(dicomweb.list_series(study))  # every attribute series selection reads
    head = next(s for s in series if s.series_uid == good[0].SeriesInstanceUID)
    assert (head.modality, head.n_instances, head.body_part, head.rows, head.columns) == ("CT", 20, "HEAD", 64, 64)
    assert head.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0) and head.convolution_kernel == "H30s"
    chosen, decisions = choose(series, SeriesRules())
    assert chosen is not None and chosen.series.series_uid == good[0].SeriesInstanceUID
    reasons = {d.series.series_uid: d.outcome for d in decisions}
    assert reasons[extras[0].SeriesInstanceUID] is Outcome.NOT_IMAGE
    assert reasons[scout[0].SeriesInstanceUID] is Outcome.NOT_IMAGE
    assert reasons[short[0].SeriesInstanceUID] is Outcome.TOO_FEW_SLICES


# -- retrieval ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless])
def test_c_get_builds_the_volume_the_dicomweb_adapter_builds(orthanc_peer: OrthancPeer, dimse: DimsePacs,
                                                             dicomweb: DicomWebPacs, syntax: str | None) -> None:
    study = generate_uid()
    series = recent_series(study, n=20)
    if syntax is not None:
        for ds in series:
            ds.compress(syntax)
    store(orthanc_peer, series)
    modality, slices = dimse.retrieve_series(study, series[0].SeriesInstanceUID)
    assert modality == "CT" and dimse.last_retrieval is not None and dimse.last_retrieval.instances == 20
    assert [s.position[2] for s in slices] == [Z0_MM + SLICE_GAP_MM * k for k in range(20)]
    for k, s in enumerate(slices):
        np.testing.assert_array_equal(s.pixels, stored_values(k, 64).astype(np.float32) - 1024)  # HU
    web_modality, web_slices = dicomweb.retrieve_series(study, series[0].SeriesInstanceUID)
    assert modality == web_modality
    assert_same_slices(slices, web_slices)
    assert np.array_equal(volume_tensor(stack_slices(slices), modality),
                          volume_tensor(stack_slices(web_slices), web_modality))


def test_enhanced_multiframe_ct_by_c_get(orthanc_peer: OrthancPeer, dimse: DimsePacs) -> None:
    study = generate_uid()
    store(orthanc_peer, [enhanced_ct(study)])
    (series,) = dimse.list_series(study)
    assert (series.n_instances, series.frames_per_instance, series.n_slices) == (1, 20, 20)
    modality, slices = dimse.retrieve_series(study, series.series_uid)
    assert modality == "CT" and [s.position[2] for s in slices] == [Z0_MM + SLICE_GAP_MM * k for k in range(20)]


@pytest.fixture
def our_scp(tmp_path: Path, orthanc_peer: OrthancPeer) -> Iterator[Callable[..., tuple[Settings, ScpServer]]]:
    """Our C-STORE SCP in this process, known to Orthanc as a modality (for C-MOVE); removed on teardown."""
    started: list[tuple[Any, ScpServer, str]] = []

    def start(*, title: str = "SWMOVE", register: bool = True, senders: tuple[str, ...] = ()) -> tuple[Settings,
                                                                                                       ScpServer]:
        data = tmp_path / f"data{len(started)}"
        settings = Settings.model_validate({"data_dir": str(data), "scp": {
            "enabled": True, "ae_title": title, "port": free_port(), "quiet_period_s": 1,
            "allowed_calling_aets": list(senders or (orthanc_peer.aet,))}})
        engine = bootstrap_push(settings)
        server = ScpServer(engine.push, settings.scp).start()
        name = f"sw-{server.port}"
        if register:
            httpx.put(f"{orthanc_peer.url}/modalities/{name}", timeout=30,
                      json={"AET": title, "Host": "127.0.0.1", "Port": server.port}).raise_for_status()
        started.append((engine, server, name if register else ""))
        return settings, server

    yield start
    for engine, server, name in started:
        if name:
            httpx.delete(f"{orthanc_peer.url}/modalities/{name}", timeout=30)
        server.stop()
        engine.close()


def test_c_move_to_our_scp_builds_the_same_volume(orthanc_peer: OrthancPeer, dicomweb: DicomWebPacs,
                                                  our_scp: Any) -> None:
    settings, _ = our_scp(title="SWMOVE1")
    study = generate_uid()
    series = recent_series(study, n=16)
    store(orthanc_peer, series)
    moving = dimse_pacs(orthanc_peer, retrieve="c-move", move_destination="SWMOVE1", spool=build_spool(settings))
    modality, slices = moving.retrieve_series(study, series[0].SeriesInstanceUID)
    assert modality == "CT" and len(slices) == 16
    assert_same_slices(slices, dicomweb.retrieve_series(study, series[0].SeriesInstanceUID)[1])
    assert moving.last_retrieval is not None and moving.last_retrieval.method == "C-MOVE"

    unknown = dimse_pacs(orthanc_peer, retrieve="c-move", move_destination="NOBODY", spool=build_spool(settings))
    with pytest.raises(DomainError) as err:
        unknown.retrieve_series(study, series[0].SeriesInstanceUID)
    assert err.value.outcome is Outcome.PACS_UNAVAILABLE and err.value.retryable
    assert "'NOBODY' registered in the PACS" in err.value.message


def test_unknown_study_is_empty_not_an_error(dimse: DimsePacs) -> None:
    assert dimse.get_study("1.2.3.4.5.6.7.8.9") is None
    assert dimse.list_series("1.2.3.4.5.6.7.8.9") == []
    with pytest.raises(DomainError) as err:
        dimse.retrieve_series("1.2.3.4.5.6.7.8.9", "1.2.3.4.5.6.7.8.9.1")
    assert err.value.outcome is Outcome.NO_ELIGIBLE_SERIES and "not in the PACS" in err.value.message
    with pytest.raises(DomainError) as bad:
        dimse.list_series("1.2.3/../x")
    assert bad.value.outcome is Outcome.INVALID_UID


def test_pacs_down_or_refusing_is_pacs_unavailable(our_scp: Any) -> None:
    down = DimsePacs("127.0.0.1", free_port(), "ORTHANC", study_timezone=UTC, **TIMEOUTS)
    today = datetime.now(UTC).date()
    for call in (lambda: down.find_studies(today, today), lambda: down.get_study("1.2.3"),
                 lambda: down.list_series("1.2.3"), lambda: down.retrieve_series("1.2.3", "1.2.3.4")):
        with pytest.raises(DomainError) as err:
            call()
        assert err.value.outcome is Outcome.PACS_UNAVAILABLE and err.value.retryable
        assert "refused" in err.value.message and "STROKEWATCH_PACS__DIMSE__HOST" in err.value.message

    _, scp = our_scp(title="SWREFUSE", register=False, senders=("SOMEONE",))  # a real acceptor that refuses us
    for called, setting in (("ORTHANC", "CALLED_AET"), ("SWREFUSE", "CALLING_AET")):
        refusing = DimsePacs("127.0.0.1", scp.port, called, study_timezone=UTC, **TIMEOUTS)
        with pytest.raises(DomainError) as err:
            refusing.get_study("1.2.3")
        assert err.value.outcome is Outcome.PACS_UNAVAILABLE and "rejected the association" in err.value.message
        assert f"STROKEWATCH_PACS__DIMSE__{setting}" in err.value.message


def test_a_pdu_longer_than_announced_is_refused_before_it_is_read(caplog: pytest.LogCaptureFixture) -> None:
    """A hostile peer answers the association request with a PDU header announcing 100 MB: the connection is closed,
    nothing is allocated for it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)  # the A-ASSOCIATE-RQ
                conn.sendall(struct.pack(">BBL", 0x02, 0, 100_000_000) + b"\x00" * 1024)
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    conn.recv(1)  # until the client closes

        peer = threading.Thread(target=answer, daemon=True)
        peer.start()
        pacs = DimsePacs("127.0.0.1", server.getsockname()[1], "HOSTILE", study_timezone=UTC, **TIMEOUTS)
        with pytest.raises(DomainError) as err:
            pacs.get_study("1.2.3")
        peer.join(10)
    assert err.value.outcome is Outcome.PACS_UNAVAILABLE
    assert "a PDU of 100000000 bytes announced" in caplog.text


def test_limits_refuse_before_retrieval_from_the_c_find_counts(orthanc_peer: OrthancPeer) -> None:
    study = generate_uid()
    series = recent_series(study, n=20)
    store(orthanc_peer, series)
    uid = series[0].SeriesInstanceUID
    strict = dimse_pacs(orthanc_peer, limits=ImageLimits(max_slices_per_series=10))
    (ref,) = strict.list_series(study)
    with pytest.raises(DomainError) as listed:
        ImageLimits(max_slices_per_series=10).check_series(ref)  # what the ingest checks before retrieving
    assert listed.value.outcome is Outcome.TOO_LARGE
    with pytest.raises(DomainError) as err:
        strict.retrieve_series(study, uid)  # and the adapter itself, from its own C-FIND
    assert err.value.outcome is Outcome.TOO_LARGE and not err.value.retryable
    assert "refused before retrieval" in err.value.message and "MAX_SLICES_PER_SERIES" in err.value.message
    assert strict.last_retrieval is not None and strict.last_retrieval.instances == 0
    assert strict.last_retrieval.bytes == 0  # not a pixel moved


@pytest.mark.parametrize(("limits", "named"), [
    ({"max_series_bytes": 100_000}, "MAX_SERIES_BYTES"),
    ({"max_rows": 32, "max_columns": 32}, "MAX_ROWS"),
    ({"multipart_max_part_bytes": 4096}, "MULTIPART_MAX_PART_BYTES"),
])
def test_limits_cut_a_retrieval_while_it_arrives(orthanc_peer: OrthancPeer, limits: dict[str, int],
                                                 named: str) -> None:
    study = generate_uid()
    series = recent_series(study, n=20)
    store(orthanc_peer, series)
    pacs = dimse_pacs(orthanc_peer, limits=ImageLimits(**limits))
    with pytest.raises(DomainError) as err:
        pacs.retrieve_series(study, series[0].SeriesInstanceUID)
    assert err.value.outcome is Outcome.TOO_LARGE and named in err.value.message
    assert pacs.last_retrieval is not None and pacs.last_retrieval.instances < 20  # cut, not read to the end
    assert len(dimse_pacs(orthanc_peer).retrieve_series(study, series[0].SeriesInstanceUID)[1]) == 20


def test_a_retrieval_past_its_deadline_is_cut_off(orthanc_peer: OrthancPeer) -> None:
    study = generate_uid()
    series = recent_series(study, n=20)
    store(orthanc_peer, series)
    hasty = dimse_pacs(orthanc_peer, retrieve_deadline_s=0.001)
    with pytest.raises(DomainError) as err:
        hasty.retrieve_series(study, series[0].SeriesInstanceUID)
    assert err.value.outcome is Outcome.PACS_UNAVAILABLE and err.value.retryable
    assert "STROKEWATCH_PACS__RETRIEVE_DEADLINE_S" in err.value.message


def test_no_phi_in_logs_warnings_or_messages(orthanc_peer: OrthancPeer, caplog: pytest.LogCaptureFixture) -> None:
    mrn, name = "PHI-MRN-4711-" + "7" * 60, "Doe^Jane"  # a PatientID past LO's 64 characters: pydicom would warn
    study = generate_uid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own warning about the test's over-long value
        series = recent_series(study, n=4, patient_id=mrn)
    for ds in series:
        ds.PatientName = name
    series[2].PixelData = series[2].PixelData[:100]  # truncated pixels: an error naming the instance
    store(orthanc_peer, series)
    pacs = dimse_pacs(orthanc_peer)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = pacs.get_study(study)
        today = datetime.now(UTC).date()
        found = pacs.find_studies(today - timedelta(days=1), today)
        (series_ref,) = pacs.list_series(study)
        with pytest.raises(DomainError) as err:
            pacs.retrieve_series(study, series_ref.series_uid)
    assert ref is not None and ref.patient_id == mrn  # read, never logged
    assert any(s.study_uid == study for s in found)
    assert err.value.outcome is Outcome.CORRUPT_PIXEL_DATA and series[2].SOPInstanceUID in err.value.message
    said = caplog.text + " ".join(str(w.message) for w in caught) + err.value.message
    assert "PHI-MRN" not in said and "Doe" not in said and "Jane" not in said


# -- DICOM TLS (PS3.15 B.1) -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancPeer, Pki]]:
    """Orthanc with DICOM TLS on its DICOM port, requiring client certificates of the test CA."""
    pki = make_pki(tmp_path_factory.mktemp("dimse-pki"))
    plain = sandbox.orthanc.orthanc_config

    def with_dicom_tls(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {**plain(*args, **kwargs), "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server.cert),
                "DicomTlsPrivateKey": str(pki.server.key), "DicomTlsTrustedCertificates": str(pki.ca),
                "DicomTlsRemoteCertificateRequired": True}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sandbox.orthanc, "orthanc_config", with_dicom_tls)
        peer = OrthancPeer(tmp_path_factory.mktemp("orthanc-dicom-tls"), stable_age=1).start()
    try:
        yield peer, pki
    finally:
        peer.stop()


def test_dicom_tls_with_client_certificates(tls_orthanc: tuple[OrthancPeer, Pki]) -> None:
    peer, pki = tls_orthanc

    def over(tls: TlsSettings | None) -> DimsePacs:
        return dimse_pacs(peer, tls=ssl_context(tls, ("pacs", "dimse", "tls")) if tls else None)

    study = generate_uid()
    series = recent_series(study, n=16)
    store(peer, series)
    good = over(TlsSettings(ca_bundle=pki.ca, client_cert=pki.client.cert, client_key=pki.client.key))
    assert [r.ok for r in good.probe(quick=True)] == [True]
    assert len(good.retrieve_series(study, series[0].SeriesInstanceUID)[1]) == 16  # C-GET over TLS

    def failure(pacs: DimsePacs) -> str:
        with pytest.raises(DomainError) as err:
            pacs.get_study(study)
        assert err.value.outcome is Outcome.PACS_UNAVAILABLE
        return err.value.message

    assert "STROKEWATCH_PACS__DIMSE__TLS__CLIENT_CERT" in failure(over(TlsSettings(ca_bundle=pki.ca)))
    wrong_ca = TlsSettings(ca_bundle=pki.wrong_ca, client_cert=pki.client.cert, client_key=pki.client.key)
    assert "STROKEWATCH_PACS__DIMSE__TLS__CA_BUNDLE" in failure(over(wrong_ca))
    assert "STROKEWATCH_PACS__DIMSE__USE_TLS" in failure(over(None))  # plain DIMSE to a TLS port


# -- strokewatch doctor ---------------------------------------------------------------------------------------------


def doctor_settings(data_dir: Path, port: int, **dimse: Any) -> Settings:
    upgrade(f"sqlite:///{data_dir / 'strokewatch.db'}")
    return Settings.model_validate({
        "sandbox": True, "data_dir": data_dir, "ehr": {"base_url": f"http://127.0.0.1:{free_port()}/fhir"},
        "pacs": {"kind": "dimse", "dimse": {"host": "127.0.0.1", "port": port, "called_aet": "ORTHANC", **dimse}}})


def checks(settings: Settings) -> dict[str, CheckResult]:
    return {r.name: r for r in doctor.run_checks(settings, open_probes, timeout_s=5)}


def test_doctor_probes_the_dimse_pacs(orthanc_peer: OrthancPeer, tmp_path: Path) -> None:
    found = checks(doctor_settings(tmp_path, orthanc_peer.dicom_port))
    assert found["settings"].ok
    assert found["pacs"].ok and "C-ECHO" in found["pacs"].detail
    assert found["pacs c-find"].ok and "Study Root C-FIND answers" in found["pacs c-find"].detail
    assert found["pacs retrieval"].ok and "C-GET" in found["pacs retrieval"].detail
    assert "C-FIND polling" in found["pacs change feed"].detail and found["pacs time zone"].ok

    moving = doctor.run_checks(doctor_settings(tmp_path, orthanc_peer.dicom_port, retrieve="c-move"), open_probes,
                               timeout_s=5)
    retrieval = [r for r in moving if r.name == "pacs retrieval"]
    assert all(r.ok for r in moving if r.name.startswith("pacs")) and "C-MOVE to 'STROKEWATCH'" in retrieval[0].detail
    assert any(r.warning and "STROKEWATCH_SCP__ENABLED" in r.detail for r in retrieval)

    down = checks(doctor_settings(tmp_path, free_port()))
    assert not down["pacs"].ok and "refused" in down["pacs"].detail
    assert "STROKEWATCH_PACS__DIMSE__PORT" in (down["pacs"].hint or "")
