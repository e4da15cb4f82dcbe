"""A real NVIDIA Triton Inference Server as a local peer (tests, benchmarks, `strokewatch sandbox up --triton`).

The server is the ``tritonserver`` binary shipped in the nvidia-pytriton wheel (python backend only),
installed in its own virtual environment because its backend stub needs numpy<2
(``deploy/triton/setup_venv.sh``). The binary is run directly on a model repository such as the one
``sandbox.triton_pybackend.write_repository`` generates, bound to 127.0.0.1 on free ports, with
explicit model control. Shut down with SIGTERM (Triton drains and unloads), then its shared-memory
regions are removed: each peer gets a unique ``shm-region-prefix-name`` so peers never collide.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from inference import contract as C
from sandbox._process import SandboxError, free_port, pid_alive, stop_pid

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO_ROOT / "deploy" / "triton" / "setup_venv.sh"


class TritonPeerError(SandboxError):
    """The local Triton peer could not be set up, started or driven (the message says what to do)."""


def default_venv() -> Path:
    return Path(os.environ.get("STROKEWATCH_TRITON_VENV", REPO_ROOT / ".venv-triton"))


def ensure_venv(venv: Path | None = None, *, create: bool = True) -> Path:
    """Return the Triton venv, creating it with deploy/triton/setup_venv.sh when ``create`` (idempotent)."""
    venv = venv or default_venv()
    if create:
        env = {**os.environ, "STROKEWATCH_TRITON_VENV": str(venv)}
        done = subprocess.run(["bash", str(SETUP_SCRIPT)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise TritonPeerError(f"{SETUP_SCRIPT} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    _server_home(venv)  # raises a clear error when incomplete
    return venv


def _server_home(venv: Path) -> Path:
    matches = sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    if not matches:
        raise TritonPeerError(
            f"no Triton venv at {venv}: create it with `bash deploy/triton/setup_venv.sh` "
            "(installs nvidia-pytriton==0.7.0, numpy<2 and onnxruntime into .venv-triton; "
            "STROKEWATCH_TRITON_VENV picks another path)"
        )
    return matches[0].parent.parent


class TritonPeer:
    """One tritonserver process on 127.0.0.1 (HTTP, gRPC, metrics on free ports kept across restarts)."""

    def __init__(
        self,
        model_repository: Path | str,
        *,
        load_models: Sequence[str] = (C.MODEL_NAME,),
        venv: Path | None = None,
        workdir: Path | None = None,
        startup_timeout_s: float = 90.0,
        exit_timeout_s: int = 3,
        log_verbose: int = 0,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.load_models = tuple(load_models)
        self.venv = venv or default_venv()
        self.startup_timeout_s = startup_timeout_s
        # On SIGTERM Triton waits up to this long for open client connections and in-flight requests.
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        # Logs and the gathered backend live here; a directory we created is deleted by close().
        self._owns_workdir = workdir is None
        self._workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="strokewatch-triton-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._backends: Path | None = None
        self._shm_prefix = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None
        atexit.register(self.close)

    # ---------------------------------------------------------------- addresses
    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self._workdir / "tritonserver.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> TritonPeer:
        if self.running:
            return self
        home = _server_home(self.venv)
        backends = self._backend_dir(home)
        # Unique per start: a restarted server must not meet regions a killed one may have left.
        self._shm_prefix = f"swtriton{os.getpid()}x{uuid.uuid4().hex[:8]}x"
        cmd = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.load_models),
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
        ]
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's lifetime
        self._log_file = log_file
        self._proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self._env(), cwd=self._workdir, start_new_session=True
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("triton peer up: http %s grpc %s", self.http_url, self.grpc_url)
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (Triton unloads models and exits), SIGKILL to the group if it hangs; then free its shm."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            timeout_s = timeout_s if timeout_s is not None else self.exit_timeout_s + 15.0
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit %.0fs after SIGTERM; killing its process group", timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            # Stub processes share the server's session; none may outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        self._remove_shm()

    def restart(self) -> TritonPeer:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and delete the work directory (logs included)."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        atexit.unregister(self.close)

    def detach(self) -> tuple[int, str]:
        """Leave the server running beyond this process: returns (pid, shm prefix) for stop_detached()."""
        if self._proc is None or not self.running:
            raise TritonPeerError("tritonserver is not running")
        pid = self._proc.pid
        self._proc.returncode = 0  # Popen must not warn about a child it no longer owns
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        atexit.unregister(self.close)
        return pid, self._shm_prefix

    def __enter__(self) -> TritonPeer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- explicit model control
    def load_model(self, name: str = C.MODEL_NAME) -> None:
        self._post(f"/v2/repository/models/{name}/load")

    def unload_model(self, name: str = C.MODEL_NAME) -> None:
        self._post(f"/v2/repository/models/{name}/unload")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    # ---------------------------------------------------------------- internals
    def _backend_dir(self, home: Path) -> Path:
        # The python backend looks for its stub next to libtriton_python.so: gather the three files.
        if self._backends is None:
            target = self._workdir / "backends" / "python"
            target.mkdir(parents=True, exist_ok=True)
            for src in (
                home / "backends" / "python" / "libtriton_python.so",
                home / "backends" / "python" / "triton_python_backend_utils.py",
                home / "python_backend_stubs" / "3.11" / "triton_python_backend_stub",
            ):
                shutil.copy2(src, target / src.name)
            self._backends = target.parent
        return self._backends

    def _env(self) -> dict[str, str]:
        python = self.venv / "bin" / "python"
        libdir = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        env = dict(os.environ)
        # The stub must load the venv's libpython (not the distribution's), and `python3` must be the venv's
        # so that model.py imports numpy<2 and onnxruntime from it.
        # The copied stub loses its $ORIGIN rpath to the wheel's bundled libraries (libcudart): add them too.
        bundled = str(_server_home(self.venv).parent.parent / "nvidia_pytriton.libs")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, bundled, env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(self.venv / "bin"), env.get("PATH", "")))
        env["VIRTUAL_ENV"] = str(self.venv)
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        return env

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise TritonPeerError(f"tritonserver exited with {code} during start-up:\n{self.log_tail()}")
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.1)
        raise TritonPeerError(f"tritonserver not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except OSError:
            return None

    def _post(self, path: str) -> None:
        request = urllib.request.Request(self.http_url + path, data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60):
                return
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            with contextlib.suppress(ValueError):
                body = json.loads(body).get("error", body)
            raise TritonPeerError(f"POST {path}: HTTP {err.code}: {body}") from err

    def _remove_shm(self) -> None:
        if not self._shm_prefix:
            return
        for region in glob.glob(f"/dev/shm/{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                os.unlink(region)


# ------------------------------------------------------------------ `strokewatch sandbox up --triton`
STATE_FILE = "triton.json"


def start_detached(state_dir: Path, onnx_path: Path | None = None) -> str:
    """Start a background Triton serving model.onnx (python backend) and record it; returns its HTTP URL.

    A healthy recorded server is reused. Its model repository and logs live in ``state_dir/triton``.
    """
    from inference.runtime import DEFAULT_MODEL_PATH
    from sandbox.triton_pybackend import write_repository

    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    if state and pid_alive(int(state["pid"]), state["marker"]):
        return str(state["http_url"])
    stop_detached(state_dir)
    home = state_dir / "triton"
    repo = home / "models"
    write_repository(repo, onnx_path or DEFAULT_MODEL_PATH)
    peer = TritonPeer(repo, venv=ensure_venv(), workdir=home)
    peer.start()
    pid, shm_prefix = peer.detach()
    record: dict[str, str | int] = {
        "pid": pid,
        "marker": str(peer.model_repository),  # in the process's command line: guards against pid reuse
        "http_url": peer.http_url,
        "grpc_url": peer.grpc_url,
        "metrics_url": peer.metrics_url,
        "shm_prefix": shm_prefix,
        "log": str(peer.log_path),
    }
    (state_dir / STATE_FILE).write_text(json.dumps(record, indent=2))
    return peer.http_url


def stop_detached(state_dir: Path) -> bool:
    """Stop a recorded background Triton (SIGTERM, then SIGKILL) and free its shared memory."""
    state = _read_state(Path(state_dir))
    if state is None:
        return False
    stop_pid(int(state["pid"]), state["marker"], timeout=20.0)
    for region in glob.glob(f"/dev/shm/{state['shm_prefix']}*"):
        with contextlib.suppress(OSError):
            os.unlink(region)
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return True


def _read_state(state_dir: Path) -> dict[str, str] | None:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and {"pid", "marker", "shm_prefix"} <= set(data) else None
