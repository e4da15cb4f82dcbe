"""A real Orthanc PACS (Debian packages `orthanc`, `orthanc-dicomweb`) on 127.0.0.1 for the sandbox and tests.

    with OrthancPeer(tmp_path) as pacs:
        httpx.get(f"{pacs.dicomweb_url}/studies")

Its configuration is generated here (`orthanc_config`); deploy/orthanc/orthanc.json is the same
configuration with default ports, for running Orthanc by hand (a test keeps the two equal).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class OrthancTls:
    """HTTPS for a sandbox Orthanc (PEM files). With ``client_ca`` it requires client certificates issued by that
    CA (mutual TLS). ``ca`` (the CA of ``cert``) and ``client_cert``/``client_key`` are what the peer's own requests
    (readiness, reset) use; without ``ca`` they do not verify the server, which is the peer's own child."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def config(self, combined: Path) -> dict[str, Any]:
        """Orthanc 1.10's TLS settings; ``combined`` is where the key and certificate are written as one PEM."""
        combined.write_bytes(self.key.read_bytes().rstrip(b"\n") + b"\n" + self.cert.read_bytes())
        combined.chmod(0o600)
        config: dict[str, Any] = {"SslEnabled": True, "SslCertificate": str(combined)}
        if self.client_ca is not None:
            config |= {"SslVerifyPeers": True, "SslTrustedClientCertificates": str(self.client_ca)}
        return config

    def client_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca is not None:
            context.load_verify_locations(cafile=str(self.ca))
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            context.load_cert_chain(str(self.client_cert), str(self.client_key) if self.client_key else None)
        return context


_SHIM_SOURCE = """
void *SSL_get1_peer_certificate(const void *ssl);
void *SSL_get_peer_certificate(const void *ssl) { return SSL_get1_peer_certificate(ssl); }
"""


def civetweb_ssl_shim(directory: Path) -> Path | None:
    """A directory to put first in Orthanc's LD_LIBRARY_PATH so that its HTTPS works, or None when none is needed.

    Debian 12's civetweb (under Orthanc 1.10.1) loads ``libssl.so`` at run time and calls
    ``SSL_get_peer_certificate``, which OpenSSL 3 only has as a macro: the pointer is NULL and Orthanc crashes
    (SIGSEGV) on the first HTTPS request. The shim is a ``libssl.so`` defining that one function as OpenSSL 3's
    ``SSL_get1_peer_certificate`` and depending on the real libssl.so.3 for everything else (and a ``libcrypto.so``
    depending on libcrypto.so.3), built here with gcc.
    """
    try:
        libssl = ctypes.CDLL("libssl.so.3")
    except OSError:
        return None  # not OpenSSL 3
    if hasattr(libssl, "SSL_get_peer_certificate"):
        return None
    if (directory / "libssl.so").exists() and (directory / "libcrypto.so").exists():
        return directory
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SandboxError("Orthanc 1.10.1 needs a small libssl shim for HTTPS with OpenSSL 3 (it crashes otherwise); "
                           "building it needs a C compiler: apt-get install -y gcc")
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "civetweb_ssl_shim.c"
    source.write_text(_SHIM_SOURCE)
    for target, extra in (("libssl.so", [str(source), "-l:libssl.so.3"]), ("libcrypto.so", ["-l:libcrypto.so.3"])):
        command = [gcc, "-shared", "-fPIC", "-Wl,--no-as-needed", "-o", str(directory / target), *extra]
        if target == "libcrypto.so":
            command.insert(1, "-xc")
            command.insert(2, "/dev/null")
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise SandboxError(f"building the libssl shim for Orthanc's HTTPS failed: {done.stderr.strip()[:500]}")
    return directory


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
        tls: OrthancTls | None = None,
        lua_scripts: Sequence[Path] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.lua_scripts = [Path(p).resolve() for p in lua_scripts]
        self.aet = aet
        self.stable_age = stable_age
        self.modalities = dict(modalities or {})
        self.users = dict(users or {})
        self.binary = binary
        self.start_timeout = start_timeout
        self.tls = tls
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
        """Base of Orthanc's REST API, e.g. http://127.0.0.1:8042 (https:// with ``tls``)."""
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.http_port}"

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
        if self.lua_scripts:
            config["LuaScripts"] = [str(p) for p in self.lua_scripts]
        # Without TCP_NODELAY, DIMSE pays ~50 ms per instance (Nagle + delayed ACK).
        env = {"TCP_NODELAY": "1"}
        if self.tls is not None:
            config |= self.tls.config(self.workdir / "orthanc-server.pem")
            config["DicomWeb"]["Ssl"] = True
            shim = civetweb_ssl_shim(self.workdir / "ssl-shim")
            if shim is not None:
                env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(shim), os.environ.get("LD_LIBRARY_PATH")]))
        self.config_path.write_text(json.dumps(config, indent=2))
        self._process = ManagedProcess([self.binary, str(self.config_path)], self.log_path, env=env)
        self._process.start()
        self._process.wait_until(self._answers, self.start_timeout, f"Orthanc on port {self.http_port}")

    def _answers(self) -> bool:
        if self.tls is None:
            return http_status(f"{self.url}/system", self.auth_headers()) == 200
        try:
            self._request("GET", "/system", timeout=2)
        except (OSError, urllib.error.URLError):
            return False
        return True



    def reset(self) -> None:
        """Deletes every patient (so every study and instance) and clears the change log."""
        for patient in json.loads(self._request("GET", "/patients")):
            self._request("DELETE", f"/patients/{patient}")
        self._request("DELETE", "/changes")

    def _request(self, method: str, path: str, timeout: float = 30) -> bytes:
        request = urllib.request.Request(self.url + path, method=method, headers=self.auth_headers())
        context = self.tls.client_context() if self.tls is not None else None
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body: bytes = response.read()
            return body

    def wipe(self) -> None:
        """Stops Orthanc and deletes its storage."""
        self.stop()
        shutil.rmtree(self.storage_dir, ignore_errors=True)


WEBHOOK_LUA = Path(__file__).resolve().parent.parent / "deploy" / "orthanc" / "strokewatch-webhook.lua"


def stable_study_webhook_lua(webhook_url: str, token: str) -> str:
    """The shipped ``deploy/orthanc/strokewatch-webhook.lua`` with the engine's webhook URL and bearer token filled in
    (``STROKEWATCH_WEBHOOKS__ORTHANC__TOKEN``): Orthanc posts each StableStudy to the engine, no poll in between."""
    text = WEBHOOK_LUA.read_text()
    for name, value in (("WEBHOOK_URL", webhook_url), ("WEBHOOK_TOKEN", token)):
        if not value.isascii() or any(c in value for c in "\"\n\r"):
            raise ValueError(f"{name} must be plain ASCII without quotes or backslashes")
        text = text.replace(f"@{name}@", value)
    return text
