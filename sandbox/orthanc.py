"""A real Orthanc PACS (Debian packages `orthanc`, `orthanc-dicomweb`) on 127.0.0.1 for the sandbox and tests.

    with OrthancPeer(tmp_path) as pacs:
        httpx.get(f"{pacs.dicomweb_url}/studies")

Its configuration is generated here (`orthanc_config`); deploy/orthanc/orthanc.json is the same
configuration with default ports, for running Orthanc by hand (a test keeps the two equal).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from sandbox._process import (
    ManagedProcess,
    Peer,
    SandboxError,
    basic_auth_header,
    free_port,
    http_status,
)

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
HOST = "127.0.0.1"
_START_ATTEMPTS = 3  # with ports picked here, another process may take one first

# name -> (AET, host, DICOM port): C-MOVE destinations and C-STORE targets Orthanc knows
Modalities = dict[str, tuple[str, str, int]]


def orthanc_config(
    storage_dir: Path,
    http_port: int = 8042,
    dicom_port: int = 4242,
    aet: str = "ORTHANC",
    stable_age: int = 2,
    modalities: Modalities | None = None,
    users: dict[str, str] | None = None,
    dicomweb_plugin: str = DICOMWEB_PLUGIN,
) -> dict[str, Any]:
    """The Orthanc 1.10 configuration of a sandbox PACS."""
    return {
        "Name": "StrokeWatch sandbox PACS",
        "StorageDirectory": str(storage_dir),
        "IndexDirectory": str(storage_dir),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": False,
        # Orthanc 1.10 binds all interfaces; with this it refuses HTTP from anywhere but loopback.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        # Seconds without a new instance before a study/series is "stable" (default 60).
        "StableAge": stable_age,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
        "HttpDescribeErrors": True,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "Plugins": [dicomweb_plugin],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            # Written into the URLs of QIDO/WADO answers (RetrieveURL, BulkDataURI).
            "Host": f"{HOST}:{http_port}",
            "Ssl": False,
        },
    }


class OrthancPeer(Peer):
    """Orthanc with its own storage under `workdir`, on free ports unless given."""

    _what = "Orthanc"

    def __init__(
        self,
        workdir: Path,
        http_port: int | None = None,
        dicom_port: int | None = None,
        aet: str = "ORTHANC",
        stable_age: int = 2,
        modalities: Modalities | None = None,
        users: dict[str, str] | None = None,
        binary: str = ORTHANC_BINARY,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.stable_age = stable_age
        self.modalities = dict(modalities or {})
        self.users = dict(users or {})
        self.binary = binary
        self.start_timeout = start_timeout
        self._fixed_ports = (http_port, dicom_port)
        self.http_port = http_port or 0
        self.dicom_port = dicom_port or 0
        self.config_path = self.workdir / "orthanc.json"
        self.storage_dir = self.workdir / "storage"
        self.log_path = self.workdir / "orthanc.log"
        self._process: ManagedProcess | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        """HTTP base of Orthanc's REST API, e.g. http://127.0.0.1:8042."""
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"


    def auth_headers(self) -> dict[str, str]:
        """An Authorization header for the first registered user, if any."""
        if not self.users:
            return {}
        user, password = next(iter(self.users.items()))
        return {"Authorization": basic_auth_header(user, password)}

    def start(self) -> OrthancPeer:
        if self._process and self._process.running():
            return self
        if not os.access(self.binary, os.X_OK):
            raise SandboxError(f"Orthanc not found at {self.binary}: apt-get install -y orthanc orthanc-dicomweb")
        if not Path(DICOMWEB_PLUGIN).exists():
            raise SandboxError(f"DICOMweb plugin not found at {DICOMWEB_PLUGIN}: apt-get install -y orthanc-dicomweb")
        attempts = 1 if all(self._fixed_ports) else _START_ATTEMPTS
        for attempt in range(attempts):
            self.http_port = self._fixed_ports[0] or free_port()
            self.dicom_port = self._fixed_ports[1] or free_port()
            try:
                self._start_once()
                return self
            except SandboxError:
                if attempt == attempts - 1:
                    raise
        return self

    def _start_once(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        config = orthanc_config(self.storage_dir, self.http_port, self.dicom_port, self.aet, self.stable_age,
                                self.modalities, self.users)
        self.config_path.write_text(json.dumps(config, indent=2))
        # Without TCP_NODELAY, DIMSE pays ~50 ms per instance (Nagle + delayed ACK).
        self._process = ManagedProcess([self.binary, str(self.config_path)], self.log_path, env={"TCP_NODELAY": "1"})
        self._process.start()
        headers = self.auth_headers()
        self._process.wait_until(lambda: http_status(f"{self.url}/system", headers) == 200,
                                 self.start_timeout, f"Orthanc on port {self.http_port}")



    def reset(self) -> None:
        """Deletes every patient (so every study and instance) and clears the change log."""
        for patient in json.loads(self._request("GET", "/patients")):
            self._request("DELETE", f"/patients/{patient}")
        self._request("DELETE", "/changes")

    def _request(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(self.url + path, method=method, headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=30) as response:
            body: bytes = response.read()
            return body

    def wipe(self) -> None:
        """Stops Orthanc and deletes its storage."""
        self.stop()
        shutil.rmtree(self.storage_dir, ignore_errors=True)



