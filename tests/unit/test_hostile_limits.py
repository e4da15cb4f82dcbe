"""Limits before allocation: the multipart reader, the DICOM decoder, series counts, the settings, UIDs and file
names at the services (pure code and fakes; the whole corpus against real peers is tests/integration/test_hostile.py).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.encaps import generate_frames
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from integration.adapters.dicom_decode import _codestream_size, decode_dataset, decode_part10
from integration.adapters.dicomweb_parse import MultipartReader, split_multipart
from integration.config import LimitsSettings, Settings
from integration.domain.ids import opaque_name
from integration.domain.limits import ImageLimits
from integration.domain.types import DomainError, Outcome, SeriesRef, StudyRef
from integration.services.context import Services
from integration.services.studies import detect_studies, ingest_study, register_study, volume_path
from tests.hostile import corpus as hostile
from tests.unit.fakes import NOW, SERIES, STUDY, FakeClock, FakeEhr, FakeFeed, FakeModel, FakePacs, FakeStore

B = hostile.BOUNDARY
DELIM = b"\r\n--" + B


def parts_of(raw: bytes, *, chunk: int | None = None, **limits: int) -> list[bytes]:
    reader = MultipartReader(B, **limits)
    got: list[bytes] = []
    step = chunk or len(raw) or 1
    for i in range(0, len(raw), step):
        got += [p for _, p in reader.feed(raw[i : i + step])]
    return got + [p for _, p in reader.finish()]


def outcome_of(call: object, *args: object, **kwargs: object) -> DomainError:
    with pytest.raises(DomainError) as err:
        call(*args, **kwargs)  # type: ignore[operator]
    return err.value


# -- multipart ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_a_content_length_too_long_never_switches_off_the_delimiter_search(chunk: int) -> None:
    payloads = [b"first part", b"second \r\n--not-the-boundary", b"third"]
    lengths: list[int | None] = [len(payloads[0]) + 40, None, len(payloads[2]) + 1000]  # the last runs past the end
    raw = hostile.multipart(payloads, lengths=lengths)
    assert parts_of(raw, chunk=chunk) == payloads


def test_a_declared_part_beyond_the_part_limit_is_refused_before_it_is_buffered() -> None:
    reader = MultipartReader(B, max_part_bytes=1 << 20)
    head = hostile.multipart([b"x"], lengths=[10**14])[:200]
    err = outcome_of(reader.feed, head)
    assert err.outcome is Outcome.TOO_LARGE and "MULTIPART_MAX_PART_BYTES" in err.message


def test_a_part_without_a_delimiter_stops_at_the_part_limit() -> None:
    reader = MultipartReader(B, max_part_bytes=1 << 20)
    reader.feed(b"--" + B + b"\r\nContent-Type: application/dicom\r\n\r\n")
    with pytest.raises(DomainError) as err:
        for _ in range(100):  # 6.4 MiB of a part that never ends
            reader.feed(bytes(64 * 1024))
    assert err.value.outcome is Outcome.TOO_LARGE
    assert len(reader._buf) <= (1 << 20) + 64 * 1024 + len(DELIM)  # never more than the limit and one chunk


def test_a_header_block_over_its_limit_is_refused_with_or_without_an_end() -> None:
    endless = b"--" + B + b"\r\nX-Pad: " + b"a" * 20_000
    assert outcome_of(parts_of, endless, chunk=512, max_header_bytes=16384).outcome is Outcome.TOO_LARGE
    ended = hostile.multipart([b"payload"], extra_header=b"X-Pad: " + b"a" * 20_000 + b"\r\n")
    assert outcome_of(parts_of, ended, max_header_bytes=16384).outcome is Outcome.TOO_LARGE
    ok = hostile.multipart([b"payload"], extra_header=b"X-Pad: " + b"a" * 1000 + b"\r\n")
    assert parts_of(ok, max_header_bytes=16384) == [b"payload"]


def test_more_parts_than_the_limit_are_refused() -> None:
    raw = hostile.multipart([b"p"] * 17)
    assert parts_of(raw, max_parts=17) == [b"p"] * 17
    err = outcome_of(parts_of, raw, max_parts=16)
    assert err.outcome is Outcome.TOO_LARGE and "MULTIPART_MAX_PARTS" in err.message


def test_an_answer_without_its_closing_boundary_is_a_named_outcome() -> None:
    for raw in (hostile.multipart([b"a", b"b"], close=False), hostile.multipart([b"a", b"b"]).removesuffix(b"--\r\n")):
        err = outcome_of(split_multipart, raw, B)
        assert err.outcome is Outcome.PACS_UNAVAILABLE and "closing boundary" in err.message


# -- the decoder ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instance_cases() -> dict[str, hostile.Case]:
    return {case.name: case for case in hostile.instance_cases()}


@pytest.mark.parametrize(
    "name",
    [
        "j2k_65535",
        "j2k_codestream_65535",
        "rle_65535",
        "jpeg_sof_65535",
        "frames_1e6",
        "pixels_truncated",
        "pixels_over_long",
        "syntax_j2k_over_native",
        "syntax_native_over_j2k",
        "deflate_640mib",
    ],
)
def test_each_hostile_instance_gets_its_outcome_and_its_good_neighbours_decode(
    instance_cases: dict[str, hostile.Case], name: str
) -> None:
    case = instance_cases[name]
    err = outcome_of(decode_part10, case.instances[0])
    assert err.outcome is case.expected, err.message
    good = decode_part10(case.instances[1])
    assert good.slices[0].pixels.shape == (hostile.SIZE, hostile.SIZE)


def test_limits_are_the_configured_ones_and_the_series_budget_counts() -> None:
    blob = hostile.part10(hostile.ct_slice(STUDY, SERIES, 0, "P", size=64))
    assert decode_part10(blob).slices[0].pixels.shape == (64, 64)
    err = outcome_of(decode_part10, blob, ImageLimits(max_rows=63))
    assert err.outcome is Outcome.TOO_LARGE and "MAX_ROWS" in err.message
    assert decode_part10(blob, None, 64 * 64 * 4).slices  # exactly what is left of the series budget
    err = outcome_of(decode_part10, blob, None, 64 * 64 * 4 - 1)
    assert err.outcome is Outcome.TOO_LARGE and "MAX_SERIES_BYTES" in err.message


def test_a_read_dataset_is_checked_before_pixel_array_too(instance_cases: dict[str, hostile.Case]) -> None:
    ds = pydicom.dcmread(io.BytesIO(instance_cases["rle_65535"].instances[0]))
    assert outcome_of(decode_dataset, ds).outcome is Outcome.TOO_LARGE
    ds = pydicom.dcmread(io.BytesIO(instance_cases["jpeg_sof_65535"].instances[0]))
    assert outcome_of(decode_dataset, ds).outcome is Outcome.CORRUPT_PIXEL_DATA


@pytest.mark.parametrize(("attribute", "value"), [("BitsAllocated", 12), ("Rows", 0), ("Columns", 0)])
def test_unusable_sizes_are_corrupt(attribute: str, value: int) -> None:
    ds = hostile.ct_slice(STUDY, SERIES, 0, "P")
    setattr(ds, attribute, value)
    assert outcome_of(decode_part10, hostile.part10(ds)).outcome is Outcome.CORRUPT_PIXEL_DATA


def test_a_private_transfer_syntax_is_unsupported_not_a_crash() -> None:
    blob = hostile.part10(hostile.ct_slice(STUDY, SERIES, 0, "P"), "1.2.3.4")
    assert outcome_of(decode_part10, blob).outcome is Outcome.UNSUPPORTED_TRANSFER_SYNTAX


def test_a_small_deflated_instance_still_decodes() -> None:
    ds = hostile.ct_slice(STUDY, SERIES, 0, "P")
    expected = decode_part10(hostile.part10(ds)).slices[0].pixels
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    np.testing.assert_array_equal(decode_part10(out.getvalue()).slices[0].pixels, expected)


def test_codestream_sizes_are_read_from_jpeg_and_jpeg_2000() -> None:
    assert _codestream_size(hostile.jpeg_declaring(300, 200)) == (300, 200)
    ds = hostile.compressed(hostile.ct_slice(STUDY, SERIES, 0, "P", size=64), JPEG2000Lossless)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert _codestream_size(frame) == (64, 64)
    assert _codestream_size(hostile.j2k_with_size(frame, 70000, 5)) == (70000, 5)
    assert _codestream_size(b"not a codestream") is None


# -- series, settings, services --------------------------------------------------------------------------------


def series(n: int, frames: int = 1, rows: int | None = None) -> SeriesRef:
    return SeriesRef(STUDY, SERIES, "CT", n, body_part="HEAD", frames_per_instance=frames, rows=rows, columns=rows)


def test_series_counts_and_declared_bytes_are_checked() -> None:
    limits = ImageLimits()
    limits.check_series(series(2000))
    limits.check_series(series(500, rows=512))  # a thin-slice head CT: 0.5 GiB decoded
    for refused in (series(2001), series(2, frames=1001), series(1100, rows=512)):
        with pytest.raises(DomainError) as err:
            limits.check_series(refused)
        assert err.value.outcome is Outcome.TOO_LARGE


def test_limit_settings_have_defaults_bounds_and_agree_with_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = LimitsSettings()
    assert (defaults.max_rows, defaults.max_slices_per_series, defaults.multipart_max_header_bytes) == (
        4096,
        2000,
        16384,
    )
    monkeypatch.setenv("STROKEWATCH_LIMITS__MAX_ROWS", "8192")
    assert Settings().limits.max_rows == 8192
    for wrong in (
        {"max_rows": 10},
        {"max_rows": 70000},
        {"max_slices_per_series": 3000},
        {"multipart_max_part_bytes": 2 << 30},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            LimitsSettings(**wrong)
    assert LimitsSettings(max_slices_per_series=3000, multipart_max_parts=3000).max_slices_per_series == 3000


@pytest.fixture()
def svc(tmp_path: Path) -> Iterator[Services]:
    clock = FakeClock()
    yield Services(
        store=FakeStore(clock),
        pacs=FakePacs(),
        ehr=FakeEhr(),
        model=FakeModel,
        clock=clock,
        volumes_dir=tmp_path / "data" / "volumes",
    )


BAD_UIDS = ["1.2.826.0.1/../../../../tmp/escaped", "1." + "2" * 198]


def test_detection_records_hostile_study_uids_under_derived_subjects(svc: Services) -> None:
    good = generate_uid()
    svc.pacs.find_studies = lambda first, last: [  # type: ignore[method-assign]
        StudyRef(uid, "MRN1", None, NOW - timedelta(hours=1)) for uid in [*BAD_UIDS, good]
    ]
    assert detect_studies(svc) == [good]
    failures = svc.store.failures  # type: ignore[attr-defined]
    assert {(f.stage, f.subject, f.outcome) for f in failures} == {
        ("detect", f"uid:{opaque_name(uid)[:40]}", Outcome.INVALID_UID) for uid in BAD_UIDS
    }
    assert all(len(f.subject) <= 64 and "/" not in f.subject for f in failures)
    assert svc.store.get_study(BAD_UIDS[0]) is None
    assert detect_studies(svc) == []  # the next poll sees them again: counted on the same rows, not added
    assert len(svc.store.failures) == 2 and {f.occurrences for f in svc.store.failures} == {2}  # type: ignore[attr-defined]


def test_the_orthanc_feed_path_drops_them_before_asking_the_pacs(svc: Services) -> None:
    feed = FakeFeed()
    feed.events = [*BAD_UIDS, STUDY]
    svc.feed, svc.changes_from_beginning = feed, True
    asked: list[str] = []
    real = svc.pacs.get_study

    def get_study(uid: str) -> StudyRef | None:
        asked.append(uid)
        return real(uid)

    svc.pacs.get_study = get_study  # type: ignore[method-assign,assignment]
    assert detect_studies(svc) == [STUDY]
    assert asked == [STUDY]
    assert [f.outcome for f in svc.store.failures] == [Outcome.INVALID_UID] * 2  # type: ignore[attr-defined]


def test_a_series_over_the_limit_is_refused_before_it_is_retrieved(svc: Services) -> None:
    svc.pacs.series = [series(2001)]  # type: ignore[attr-defined]
    register_study(svc, STUDY)
    result = ingest_study(svc, STUDY)
    assert (result.status, result.outcome) == ("failed", Outcome.TOO_LARGE.value)
    assert "MAX_SLICES_PER_SERIES" in (result.reason or "")
    assert svc.pacs.retrievals == 0  # type: ignore[attr-defined]
    svc.limits = ImageLimits(max_slices_per_series=2001, multipart_max_parts=2001)  # raised: an operator replays it
    svc.store.requeue_study(STUDY)
    assert ingest_study(svc, STUDY).status == "ready" and svc.pacs.retrievals == 1  # type: ignore[attr-defined]


def test_volume_files_are_named_by_a_digest_inside_the_volumes_dir(svc: Services, tmp_path: Path) -> None:
    for uid in [STUDY, *BAD_UIDS]:
        path = volume_path(svc.volumes_dir, uid)
        assert path.parent == svc.volumes_dir.resolve() and path.name == f"{opaque_name(uid)}.npy"
    register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "ready"
    row = svc.store.get_study(STUDY)
    assert row is not None and Path(row.volume_path or "").name == f"{opaque_name(STUDY)}.npy"
    elsewhere = tmp_path / "elsewhere.npy"
    os.symlink(elsewhere, svc.volumes_dir / f"{opaque_name('1.2.3')}.npy")  # a planted link is not followed
    assert outcome_of(volume_path, svc.volumes_dir, "1.2.3").outcome is Outcome.INTERNAL_ERROR
    assert not elsewhere.exists()
