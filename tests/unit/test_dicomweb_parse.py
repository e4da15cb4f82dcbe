"""DICOMweb wire formats: multipart/related splitting and DICOM JSON values (pure functions)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from integration.adapters.dicomweb_parse import (
    MultipartReader,
    attr_floats,
    attr_int,
    attr_str,
    attr_strs,
    dicom_datetime,
    multipart_boundary,
    split_multipart,
)
from integration.domain.types import DomainError, Outcome


def body(parts: list[bytes], boundary: bytes = b"b0undary", *, lengths: bool = False, preamble: bytes = b"") -> bytes:
    out = preamble
    for p in parts:
        headers = b"Content-Type: application/dicom\r\n"
        if lengths:
            headers += b"Content-Length: %d\r\n" % len(p)
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("lengths", [False, True])
def test_parts_are_split_exactly(lengths: bool) -> None:
    payloads = [b"DICM first", b"", b"\r\n--b0undar not quite a delimiter \r\n", bytes(range(256)) * 10]
    parts = list(split_multipart(body(payloads, lengths=lengths, preamble=b"ignored preamble\r\n"), b"b0undary"))
    assert [bytes(p) for _, p in parts] == payloads
    assert {ct for ct, _ in parts} == {"application/dicom"}


def test_payload_containing_the_delimiter_is_kept_whole_when_length_is_given() -> None:
    tricky = b"abc\r\n--b0undary\r\nxyz"
    parts = list(split_multipart(body([tricky, b"next"], lengths=True), b"b0undary"))
    assert [bytes(p) for _, p in parts] == [tricky, b"next"]


def test_parts_without_headers_and_empty_bodies() -> None:
    raw = b"--x\r\n\r\npayload\r\n--x--"
    assert [(ct, bytes(p)) for ct, p in split_multipart(raw, b"x")] == [("", b"payload")]
    assert list(split_multipart(b"", b"x")) == []


@pytest.mark.parametrize("chunk", [1, 3, 17, 4096])
@pytest.mark.parametrize("lengths", [False, True])
def test_parts_arrive_whatever_the_chunking(chunk: int, lengths: bool) -> None:
    payloads = [b"DICM" + bytes(range(256)) * 3, b"x", b"\r\n--b0undar\r\n", b"last part"]
    raw = body(payloads, lengths=lengths, preamble=b"preamble --b0und\r\n")
    reader = MultipartReader(b"b0undary")
    got: list[bytes] = []
    for i in range(0, len(raw), chunk):
        got.extend(p for _, p in reader.feed(raw[i : i + chunk]))
    reader.finish()
    assert got == payloads and reader.closed


def test_wrong_content_length_falls_back_to_the_delimiter() -> None:
    raw = b"--x\r\nContent-Length: 3\r\n\r\npayload\r\n--x--"
    assert [bytes(p) for _, p in split_multipart(raw, b"x")] == [b"payload"]


def test_truncated_multipart_is_an_error() -> None:
    raw = body([b"complete", b"cut short"])[:-30]
    with pytest.raises(DomainError) as err:
        list(split_multipart(raw, b"b0undary"))
    assert err.value.outcome is Outcome.PACS_UNAVAILABLE and "truncated" in err.value.message


@pytest.mark.parametrize(
    ("header", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary=abc-123', b"abc-123"),
        ('multipart/related; boundary="quoted:value"; type="application/dicom"', b"quoted:value"),
        ("Multipart/Related;Boundary=UPPER", b"UPPER"),
    ],
)
def test_boundary_from_content_type(header: str, boundary: bytes) -> None:
    assert multipart_boundary(header) == boundary


def test_non_multipart_answer_is_refused() -> None:
    with pytest.raises(DomainError, match="not multipart"):
        multipart_boundary("application/dicom+json")
    with pytest.raises(DomainError, match="boundary"):
        multipart_boundary("multipart/related; type=application/dicom")


def test_dicom_json_values() -> None:
    item = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00201209": {"vr": "IS", "Value": [34]},
        "00200037": {"vr": "DS", "Value": [1, 0, 0, 0, 1, 0]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]},
        "00081030": {"vr": "LO"},  # present, empty
        "00280008": {"vr": "IS", "Value": ["12"]},
    }
    assert attr_str(item, "00100010") == "Doe^Jane"
    assert attr_int(item, "00201209") == 34 and attr_int(item, "00280008") == 12
    assert attr_floats(item, "00200037", 6) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert attr_floats(item, "00200037", 3) is None
    assert attr_strs(item, "00080008") == ("ORIGINAL", "PRIMARY")
    assert attr_str(item, "00081030") == "" and attr_int(item, "0020000D") is None


def test_dicom_dates_and_times() -> None:
    assert dicom_datetime("20240305", "101502.25") == datetime(2024, 3, 5, 10, 15, 2, 250000)
    assert dicom_datetime("20240305", "1015") == datetime(2024, 3, 5, 10, 15)
    assert dicom_datetime("20240305", "") == datetime(2024, 3, 5)
    assert dicom_datetime("2024.03.05", "10:15:00") == datetime(2024, 3, 5, 10, 15)  # ACR-NEMA forms
    assert dicom_datetime("20240305", "101500", "-0500") == datetime(
        2024, 3, 5, 10, 15, tzinfo=timezone(-timedelta(hours=5))
    )
    assert dicom_datetime("", "101500") is None and dicom_datetime("2024", "") is None
    assert dicom_datetime("20240231", "") is None  # no such day


def test_series_answers_are_read_from_the_socket_in_large_pieces() -> None:
    """httpcore's per-read size is what DicomWebPacs raises (see ``read_http_bodies_in_large_pieces``): this fails if
    an httpcore upgrade renames the attribute, instead of the retrieval silently going back to 64 KiB reads."""
    import httpcore

    from integration.adapters.dicomweb import HTTP_READ_BYTES, DicomWebPacs

    with DicomWebPacs("http://127.0.0.1:9/dicom-web"):
        assert httpcore.HTTP11Connection.READ_NUM_BYTES == HTTP_READ_BYTES >= 1 << 20
