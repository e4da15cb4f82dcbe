"""A stub DICOMweb PACS on 127.0.0.1 that serves hostile answers Orthanc would never write.

QIDO-RS answers (studies, series, instances) are built from each case's good slices, so they look harmless; the
WADO-RS series answer is the case's raw multipart body (or its instances, one per part). A case may declare more
instances than it holds (``Case.declared_instances``). Counts the WADO-RS requests per series: a series refused
from its QIDO-RS answer must never be requested.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hostile.corpus import BOUNDARY, CT_STORAGE, Case, multipart, taken

ROOT = "/dicom-web"


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _study(case: Case) -> dict[str, Any]:
    when = taken()
    return {
        "0020000D": _attr("UI", case.study_uid),
        "00080020": _attr("DA", f"{when:%Y%m%d}"),
        "00080030": _attr("TM", f"{when:%H%M%S}"),
        "00080061": _attr("CS", "CT"),
        "00081030": _attr("LO", "CT HEAD W/O"),
        "00100020": _attr("LO", case.patient_id),
    }


def _series(case: Case) -> dict[str, Any]:
    count = case.declared_instances if case.declared_instances is not None else len(case.instances)
    return {
        "0020000E": _attr("UI", case.series_uid),
        "00080060": _attr("CS", "CT"),
        "0008103E": _attr("LO", "Head 5mm"),
        "00180015": _attr("CS", "HEAD"),
        "00201209": _attr("IS", count),
    }


def _instance() -> dict[str, Any]:
    """What the good slices say (the hostile instance is not the one QIDO-RS shows)."""
    return {
        "00080016": _attr("UI", CT_STORAGE),
        "00080008": _attr("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
        "00180050": _attr("DS", 5.0),
        "00181210": _attr("SH", "H30s"),
        "00200037": _attr("DS", 1, 0, 0, 0, 1, 0),
        "00280008": _attr("IS", 1),
        "00280010": _attr("US", 16),
        "00280011": _attr("US", 16),
    }


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the engine hung up on a hostile answer: expected
            super().handle_error(request, client_address)


class StubPacs:
    """``with StubPacs(cases) as pacs:`` serves ``pacs.dicomweb_url``; ``pacs.retrievals[series_uid]`` counts."""

    def __init__(self, cases: list[Case]) -> None:
        self.cases = {case.study_uid: case for case in cases}
        self.retrievals: Counter[str] = Counter()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{ROOT}"

    def __enter__(self) -> StubPacs:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[str, bytes] | None:
        """(content type, body) for a GET, None for 404."""
        if not path.startswith(f"{ROOT}/studies"):
            return None
        rest = path[len(f"{ROOT}/studies") :]
        if rest == "":
            wanted = query.get("StudyInstanceUID", [None])[0]
            found = [_study(c) for uid, c in self.cases.items() if wanted is None or uid == wanted]
            return _json_page(found, query)
        study_uid, _, tail = rest.lstrip("/").partition("/series")
        case = self.cases.get(study_uid)
        if case is None:
            return None
        if tail == "":
            return _json_page([_series(case)], query)
        series_uid, _, level = tail.lstrip("/").partition("/")
        if series_uid != case.series_uid:
            return None
        if level == "instances":
            return _json_page([_instance()], query)
        if level == "":
            self.retrievals[series_uid] += 1
            body = case.answer if case.answer is not None else multipart(case.instances)
            content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'
            return content_type, body
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                parts = urlsplit(self.path)
                found = stub.answer(unquote(parts.path), parse_qs(parts.query))
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                content_type, body = found
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the engine stopped reading: what it should do
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        return Handler


def _json_page(items: list[dict[str, Any]], query: dict[str, list[str]]) -> tuple[str, bytes]:
    offset = int(query.get("offset", ["0"])[0])
    limit = int(query.get("limit", [str(len(items) or 1)])[0])
    return "application/dicom+json", json.dumps(items[offset : offset + limit]).encode()
