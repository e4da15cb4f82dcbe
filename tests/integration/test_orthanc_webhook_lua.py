"""The shipped Orthanc Lua script (deploy/orthanc/strokewatch-webhook.lua) posts each StableStudy to the engine's
webhook with the bearer token, from a real Orthanc: the push hand-off that replaces polling its change feed. The
route itself (auth, registering the study) is tested in test_webhooks.py; here a recording HTTP server stands in."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from sandbox.orthanc import OrthancPeer, stable_study_webhook_lua
from tests.integration.test_dicomweb_orthanc import ct_series, store

TOKEN = "lua-webhook-token-0123456789abcdef"


class Recorder(BaseHTTPRequestHandler):
    calls: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Recorder.calls.append({"path": self.path, "auth": self.headers.get("Authorization"),
                               "type": self.headers.get("Content-Type"), "body": json.loads(body)})
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.peers
def test_orthanc_posts_each_stable_study_to_the_webhook_with_the_token(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Recorder.calls = []
    url = f"http://127.0.0.1:{server.server_address[1]}/webhooks/orthanc/stable-study"
    script = tmp_path / "webhook.lua"
    script.write_text(stable_study_webhook_lua(url, TOKEN))
    try:
        with OrthancPeer(tmp_path / "orthanc", stable_age=1, lua_scripts=[script]) as peer:
            study = generate_uid()
            store(peer, ct_series(study, n=3))
            deadline = time.monotonic() + 30
            while not Recorder.calls and time.monotonic() < deadline:
                time.sleep(0.1)
            assert Recorder.calls, f"Orthanc never called the webhook; see {peer.log_path}"
            [call] = Recorder.calls
            assert call["path"] == "/webhooks/orthanc/stable-study"
            assert call["auth"] == f"Bearer {TOKEN}" and call["type"] == "application/json"
            assert call["body"]["StudyInstanceUID"] == study and len(call["body"]["ID"]) == 44  # Orthanc's study id
    finally:
        server.shutdown()


def test_the_script_refuses_values_that_would_break_out_of_its_strings() -> None:
    with pytest.raises(ValueError, match="WEBHOOK_TOKEN"):
        stable_study_webhook_lua("http://127.0.0.1:8400/webhooks/orthanc/stable-study", 'x" .. os.exit() .. "')
