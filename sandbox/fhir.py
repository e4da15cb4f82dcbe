"""The FHIR R4 sandbox (deploy/fhir-sandbox, Node + Medplum packages) on 127.0.0.1 for the sandbox and tests.

    with FhirPeer(tmp_path, test_controls=True) as ehr:
        httpx.post(f"{ehr.base_url}/Patient", json={"resourceType": "Patient"})
        ehr.inject_fault(status=429, count=2, retry_after=1)

The server is in-memory: stopping it loses everything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox._process import ManagedProcess, Peer, SandboxError, basic_auth_header

HOST = "127.0.0.1"
_READY = re.compile(r"^ready (https?://\S+)$", re.MULTILINE)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def fhir_sandbox_dir() -> Path:
    """Where server.mjs lives: $STROKEWATCH_FHIR_SANDBOX_DIR, else deploy/fhir-sandbox in this checkout."""
    configured = os.environ.get("STROKEWATCH_FHIR_SANDBOX_DIR")
    return Path(configured) if configured else repo_root() / "deploy" / "fhir-sandbox"


def require_node_modules(app_dir: Path | None = None) -> Path:
    """Returns the sandbox directory, or raises if Node or the npm packages are missing."""
    app_dir = app_dir or fhir_sandbox_dir()
    if not (app_dir / "server.mjs").exists():
        raise SandboxError(f"FHIR sandbox not found at {app_dir} (set STROKEWATCH_FHIR_SANDBOX_DIR)")
    if not (app_dir / "node_modules" / "@medplum" / "fhir-router").is_dir():
        prefix = app_dir.relative_to(repo_root()) if app_dir.is_relative_to(repo_root()) else app_dir
        raise SandboxError(f"FHIR sandbox dependencies are not installed: run `npm ci --prefix {prefix}`")
    if shutil.which("node") is None:
        raise SandboxError("Node.js (>= 20) is needed for the FHIR sandbox: `node` is not on PATH")
    return app_dir


@dataclass(frozen=True)
class SmartClient:
    """A SMART Backend Services client: its public JWKS (a JSON file, e.g. from `strokewatch keys jwks`) and the
    system scopes it may be granted (space-separated; None: every system scope)."""

    jwks_file: Path
    scopes: str | None = None

    def arg(self, client_id: str) -> str:
        if "=" in client_id or ":" in str(self.jwks_file):
            raise SandboxError("a SMART client id may not contain '=', nor its JWKS path ':'")
        return f"{client_id}={self.jwks_file}" + (f":{self.scopes}" if self.scopes else "")


@dataclass(frozen=True)
class FhirAuth:
    """Authentication the sandbox demands. Any mix; none set means no authentication.

    basic: (user, password) for HTTP Basic. bearer: a static token. oauth_clients: client_id -> secret
    for OAuth2 client credentials at `FhirPeer.token_url`. smart_clients: client_id -> SmartClient for SMART
    Backend Services (private_key_jwt at the same endpoint; tokens limited to the granted scopes). Issued
    tokens last `token_ttl` seconds.
    """

    basic: tuple[str, str] | None = None
    bearer: str | None = None
    oauth_clients: dict[str, str] = field(default_factory=dict)
    smart_clients: dict[str, SmartClient] = field(default_factory=dict)
    token_ttl: int = 3600

    def args(self) -> list[str]:
        argv: list[str] = []
        if self.basic:
            argv += ["--auth-basic", f"{self.basic[0]}:{self.basic[1]}"]
        if self.bearer:
            argv += ["--auth-bearer", self.bearer]
        for client_id, secret in self.oauth_clients.items():
            argv += ["--oauth-client", f"{client_id}:{secret}"]
        for client_id, client in self.smart_clients.items():
            argv += ["--smart-client", client.arg(client_id)]
        if self.oauth_clients or self.smart_clients:
            argv += ["--oauth-token-ttl", str(self.token_ttl)]
        return argv


@dataclass(frozen=True)
class FhirTls:
    """HTTPS for the sandbox (PEM files); with ``client_ca`` it requires client certificates issued by that CA.
    ``ca`` (the CA of ``cert``) and ``client_cert``/``client_key`` are for the peer's own test-control requests."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def args(self) -> list[str]:
        argv = ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        return argv + (["--tls-client-ca", str(self.client_ca)] if self.client_ca is not None else [])

    def client_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca is not None:
            context.load_verify_locations(cafile=str(self.ca))
        else:  # the peer's own child process
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            context.load_cert_chain(str(self.client_cert), str(self.client_key) if self.client_key else None)
        return context


class FhirPeer(Peer):
    """The FHIR sandbox server; `port=None` lets it pick a free port (reported on its ready line)."""

    _what = "FHIR sandbox"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        omit_total: bool = False,
        test_controls: bool = False,
        auth: FhirAuth | None = None,
        base_path: str = "/fhir",
        app_dir: Path | None = None,
        start_timeout: float = 60.0,
        tls: FhirTls | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.tls = tls
        self.port = port
        self.omit_total = omit_total
        self.test_controls = test_controls
        self.auth = auth or FhirAuth()
        self.base_path = "/" + base_path.strip("/")
        self.app_dir = app_dir
        self.start_timeout = start_timeout
        self.log_path = self.workdir / "fhir-sandbox.log"
        self.server_path: Path | None = None
        self._base_url: str | None = None
        self._process: ManagedProcess | None = None

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (benchmarks read its CPU time)."""
        return self._process.pid if self._process else None

    @property
    def base_url(self) -> str:
        """FHIR base, e.g. http://127.0.0.1:8080/fhir."""
        if self._base_url is None:
            raise SandboxError("FHIR sandbox not started")
        return self._base_url

    @property
    def url(self) -> str:
        """Server origin, e.g. http://127.0.0.1:8080."""
        return self.base_url[: -len(self.base_path)]

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"


    def command(self, app_dir: Path) -> list[str]:
        argv = ["node", str(app_dir / "server.mjs"), "--host", HOST, "--port", str(self.port or 0),
                "--base-path", self.base_path]
        if self.omit_total:
            argv.append("--omit-total")
        if self.test_controls:
            argv.append("--enable-test-controls")
        return argv + self.auth.args() + (self.tls.args() if self.tls is not None else [])

    def start(self) -> FhirPeer:
        if self._process and self._process.running():
            return self
        app_dir = require_node_modules(self.app_dir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")  # the ready line is read from a fresh log
        self.server_path = app_dir / "server.mjs"
        self._process = ManagedProcess(self.command(app_dir), self.log_path, cwd=app_dir)
        self._process.start()
        self._process.wait_until(self._read_ready_line, self.start_timeout, "FHIR sandbox")
        return self

    def _read_ready_line(self) -> bool:
        match = _READY.search(self.log_path.read_text(errors="replace"))
        if match:
            self._base_url = match.group(1)
        return match is not None





    # Test controls (only with test_controls=True): they bypass authentication and fault injection.

    def _control(self, method: str, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self.test_controls:
            raise SandboxError("start FhirPeer with test_controls=True to use test controls")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/$test/{action}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        context = self.tls.client_context() if self.tls is not None else None
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            result: dict[str, Any] = json.load(response)
            return result

    def reset(self) -> None:
        """Deletes all resources and clears any pending fault (issued OAuth tokens stay valid)."""
        self._control("POST", "reset")

    def inject_fault(
        self,
        status: int | None = None,
        count: int = 1,
        retry_after: int | str | None = None,
        delay_ms: int | None = None,
        drop: bool = False,
        path: str | None = None,
    ) -> None:
        """Makes the next `count` requests (whose path contains `path`, if given) answer `status`
        (with Retry-After if given: seconds, or any text sent as is, e.g. "inf" or an HTTP-date), or be delayed by
        `delay_ms` first, or lose their connection."""
        spec: dict[str, Any] = {"count": count}
        for key, value in (("status", status), ("retryAfter", retry_after), ("delayMs", delay_ms), ("path", path)):
            if value is not None:
                spec[key] = value
        if drop:
            spec["drop"] = True
        self._control("POST", "faults", spec)

    def clear_faults(self) -> None:
        self._control("DELETE", "faults")

    def stats(self) -> dict[str, Any]:
        """Counters: requests and faulted (since start or reset), tokensIssued and tokenRequests (since start),
        and the pending fault."""
        return self._control("GET", "stats")

    def auth_headers(self) -> dict[str, str]:
        """Headers that pass the configured static authentication (Basic or bearer), if any."""
        if self.auth.bearer:
            return {"Authorization": f"Bearer {self.auth.bearer}"}
        if self.auth.basic:
            return {"Authorization": basic_auth_header(*self.auth.basic)}
        return {}
