"""A long-lived local sandbox (Orthanc + FHIR server) that outlives the command that started it.

`strokewatch sandbox up` calls `start_detached`, `down` calls `stop`, `status` calls `status`; what
they share is a JSON state file in `state_dir` with the pids, ports and URLs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from integration.entrypoints.api.security.keys import new_key, settings_line
from integration.entrypoints.api.security.policy import Role
from sandbox._process import SandboxError, http_status, pid_alive, stop_pid
from sandbox.fhir import FhirPeer
from sandbox.orthanc import Modalities, OrthancPeer

STATE_FILE = "sandbox.json"
#: STROKEWATCH_* settings that point the engine at this sandbox: the only thing the engine reads of it
#: (`strokewatch run` with no PACS/EHR configured), so the product never imports the sandbox.
ENGINE_ENV_FILE = "engine.env"


@dataclass(frozen=True)
class SandboxInfo:
    """Where the sandbox peers listen, and the processes that run them."""

    state_dir: str
    fhir_base_url: str
    fhir_pid: int
    orthanc_url: str
    dicomweb_url: str
    orthanc_dicom_port: int
    orthanc_aet: str
    orthanc_pid: int
    started_at: str
    orthanc_config: str = ""  # both paths appear in their process's command line:
    fhir_server: str = ""  # a check that a recorded pid was not reused by another program
    #: The engine's API key for this sandbox (the demo sends it; the engine gets only its hash, in engine.env).
    #: A test credential: made fresh at each start, kept in the 0600 state file, gone when the sandbox stops.
    api_key: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SandboxInfo:
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class SandboxStatus:
    info: SandboxInfo
    fhir_running: bool
    orthanc_running: bool

    @property
    def healthy(self) -> bool:
        return self.fhir_running and self.orthanc_running


def engine_env(info: SandboxInfo) -> dict[str, str]:
    """STROKEWATCH_* variables that point the engine at a running sandbox (and admit its API key)."""
    key_env = dict([settings_line("sandbox", Role.OPERATE, info.api_key).split("=", 1)]) if info.api_key else {}
    return {
        **key_env,
        "STROKEWATCH_SANDBOX": "true",
        "STROKEWATCH_PACS__DICOMWEB_URL": info.dicomweb_url,
        "STROKEWATCH_PACS__ORTHANC_URL": info.orthanc_url,
        "STROKEWATCH_PACS__KIND": "orthanc",
        "STROKEWATCH_PACS__POLL_SECONDS": "1",
        "STROKEWATCH_EHR__BASE_URL": info.fhir_base_url,
        "STROKEWATCH_EHR__POLL_SECONDS": "30",
    }


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def read_info(state_dir: Path) -> SandboxInfo | None:
    """The recorded sandbox, or None if there is none (or its file is unreadable)."""
    try:
        return SandboxInfo.from_json(state_path(state_dir).read_text())
    except (OSError, ValueError, TypeError):
        return None


def write_info(info: SandboxInfo) -> None:
    _write_private(state_path(Path(info.state_dir)), info.to_json())  # it holds the API key: 0600
    env = "".join(f"{k}={v}\n" for k, v in engine_env(info).items())
    # settings may carry credentials: 0600
    _write_private(Path(info.state_dir) / ENGINE_ENV_FILE, "# written by the sandbox; removed when it stops\n" + env)


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by this user only."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.replace(path)


def status(state_dir: Path) -> SandboxStatus | None:
    """None if no sandbox is recorded; else whether each peer's process runs and answers HTTP."""
    info = read_info(state_dir)
    if info is None:
        return None
    fhir_up = pid_alive(info.fhir_pid, info.fhir_server or None) and \
        http_status(f"{info.fhir_base_url}/metadata") == 200
    orthanc_up = pid_alive(info.orthanc_pid, info.orthanc_config or None) and \
        http_status(f"{info.orthanc_url}/system") in (200, 401)
    return SandboxStatus(info, fhir_up, orthanc_up)


def start_detached(
    state_dir: Path,
    fhir_port: int | None = None,
    orthanc_http_port: int | None = None,
    orthanc_dicom_port: int | None = None,
    aet: str = "ORTHANC",
    stable_age: int = 2,
    modalities: Modalities | None = None,
) -> SandboxInfo:
    """Starts Orthanc and the FHIR sandbox in the background and records them in `state_dir`.

    If a healthy sandbox is already recorded there it is returned as is; a half-dead one is stopped
    and replaced. Orthanc keeps its storage in `state_dir/orthanc` across restarts; FHIR data is
    in memory and lost on stop.
    """
    state_dir = Path(state_dir).resolve()
    current = status(state_dir)
    if current is not None:
        if current.healthy:
            return current.info
        stop(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)

    pacs = OrthancPeer(state_dir / "orthanc", orthanc_http_port, orthanc_dicom_port, aet, stable_age, modalities)
    ehr = FhirPeer(state_dir / "fhir", port=fhir_port)
    pacs.start()
    try:
        ehr.start()
    except BaseException:
        pacs.stop()
        raise
    info = SandboxInfo(
        state_dir=str(state_dir),
        fhir_base_url=ehr.base_url,
        fhir_pid=ehr.detach(),
        orthanc_url=pacs.url,
        dicomweb_url=pacs.dicomweb_url,
        orthanc_dicom_port=pacs.dicom_port,
        orthanc_aet=pacs.aet,
        orthanc_pid=pacs.detach(),
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        orthanc_config=str(pacs.config_path),
        fhir_server=str(ehr.server_path),
        api_key=new_key(),
    )
    write_info(info)
    return info


def stop(state_dir: Path) -> bool:
    """Stops a recorded sandbox (SIGTERM, then SIGKILL) and forgets it. Returns whether one was recorded."""
    info = read_info(state_dir)
    path = state_path(state_dir)
    (Path(state_dir) / ENGINE_ENV_FILE).unlink(missing_ok=True)
    if info is None:
        if path.exists():
            path.unlink()
        return False
    stop_pid(info.fhir_pid, info.fhir_server or None)
    stop_pid(info.orthanc_pid, info.orthanc_config or None)
    if pid_alive(info.fhir_pid, info.fhir_server or None) or pid_alive(info.orthanc_pid, info.orthanc_config or None):
        raise SandboxError(f"sandbox processes {info.fhir_pid}/{info.orthanc_pid} did not stop")
    path.unlink(missing_ok=True)
    return True
