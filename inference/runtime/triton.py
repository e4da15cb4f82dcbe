"""TritonModel: the RiskModel port served by NVIDIA Triton (KServe v2 over HTTP or gRPC via tritonclient).

Failure semantics, so that a Triton outage is a recorded, retried state and never a crashed worker:
- unreachable server, model not loaded/ready, wrong pinned version, timeouts -> ``ModelUnavailableError``
  (the engine records ``model_unavailable`` and scores the study later);
- the served model's metadata differs from ``inference.contract`` -> ``ModelContractError`` naming the tensor.
Transient errors (connection refused/reset, HTTP 5xx, gRPC UNAVAILABLE, timeouts) are retried with backoff;
after ``failure_threshold`` failed calls a circuit breaker fails fast for ``reset_timeout_s``, then lets one
probe through (half-open). ``FallbackModel`` optionally scores with the embedded runtime meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal, Protocol

import numpy as np

from inference import contract as C
from inference.runtime.base import (
    ModelContractError,
    ModelInputs,
    ModelUnavailableError,
    Prediction,
    predictions,
    stack_inputs,
)
from inference.runtime.transport import GrpcTransport, HttpTransport, Transport, TransportError, TritonTls

log = logging.getLogger(__name__)

Protocol_ = Literal["http", "grpc"]

#: URL scheme -> (protocol, TLS)
_SCHEMES: dict[str, tuple[Protocol_, bool]] = {
    "http": ("http", False),
    "https": ("http", True),
    "grpc": ("grpc", False),
    "grpcs": ("grpc", True),
}


class CircuitBreaker:
    """Closed -> (``failure_threshold`` consecutive failures) -> open -> (``reset_timeout_s``) -> half-open.

    Half-open lets exactly one call through as a probe: success closes the circuit, failure re-opens it.
    Thread-safe; ``clock`` is injectable for tests.
    """

    def __init__(
        self, failure_threshold: int = 3, reset_timeout_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> Literal["closed", "open", "half-open"]:
        with self._lock:
            return self._state()

    def _state(self) -> Literal["closed", "open", "half-open"]:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset_timeout_s:
            return "half-open"
        return "open"

    def before_call(self) -> None:
        """Raise ModelUnavailableError if the circuit is open (or a half-open probe is already running)."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return
            if state == "half-open" and not self._probing:
                self._probing = True
                return
            assert self._opened_at is not None
            wait = max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))
            raise ModelUnavailableError(
                f"Triton circuit open after {self._failures} consecutive failures; next probe in {wait:.0f}s"
            )

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
            self._probing = False


class TritonModel:
    """RiskModel over a Triton server. ``url`` is ``host:port`` or a URL: ``http://``, ``grpc://``, or with TLS
    ``https://``/``grpcs://`` (its scheme must agree with ``protocol``). ``tls`` configures TLS (CA, client
    certificate); an https/grpcs URL without it verifies against this machine's trust store. A plaintext URL with
    ``tls`` is refused: TLS settings that would silently not apply are a mistake."""

    def __init__(
        self,
        url: str,
        *,
        protocol: Protocol_ = "http",
        model_name: str = C.MODEL_NAME,
        model_version: str = "",
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.2,
        breaker: CircuitBreaker | None = None,
        tls: TritonTls | None = None,
    ) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        self.url, self.tls = _endpoint(url, protocol, tls)
        self.protocol: Protocol_ = protocol
        self.model_name = model_name
        self.pinned_version = str(model_version or "")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.breaker = breaker or CircuitBreaker()
        self.runtime_name = f"triton-{protocol}"
        self.scheme = ("https" if protocol == "http" else "grpcs") if self.tls is not None else protocol
        self._local = threading.local()  # one client per thread: tritonclient's clients are not thread-safe
        self._clients: list[Transport] = []
        self._clients_lock = threading.Lock()
        self._checked = False
        self._semantic_version = C.MODEL_VERSION
        self._trained = False
        self._ready_versions: list[str] = []
        #: what each scoring asks for: the contract's outputs and the optional ones the served model declares, less
        #: those asked for only on request (``on_request``, ``C.ON_REQUEST_OUTPUTS``: ``lesion_maps``)
        self.output_names: tuple[str, ...] = C.OUTPUT_NAMES
        self.on_request: tuple[str, ...] = ()

    # ------------------------------------------------------------------ RiskModel port
    @property
    def model_version(self) -> str:
        """Semantic model version from the served config's ``model_version`` parameter (known after check())."""
        return self._semantic_version

    @property
    def trained(self) -> bool:
        return self._trained

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        """Score the batch, sending at most contract.MAX_BATCH patients per request, in order."""
        feeds = stack_inputs(batch)  # validates shapes and dtypes against the contract first
        self.breaker.before_call()
        try:
            if not self._checked:
                self._check_once()
            results: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
            for start in range(0, len(batch), C.MAX_BATCH):
                chunk = {name: array[start : start + C.MAX_BATCH] for name, array in feeds.items()}
                outputs = self._infer(chunk)
                for name, arrays in results.items():
                    arrays.append(self._output(outputs, name, len(chunk[C.INPUT_NAMES[0]])))
        except ModelUnavailableError:
            self._checked = False  # whatever comes back up is verified again before it is trusted
            self.breaker.record_failure()
            raise
        except ModelContractError:
            self.breaker.record_success()  # the server answered; retrying cannot fix a contract mismatch
            self._checked = False  # ... but a model swapped since the check (fewer optional outputs) is read again
            raise
        self.breaker.record_success()
        out = {name: np.concatenate(arrays) for name, arrays in results.items()}
        terms = out.get("logit_terms")
        return predictions(out["probability"], out["logit"], self._semantic_version, self.runtime_name, terms)

    def lesion_maps(self, batch: Sequence[ModelInputs]) -> list[np.ndarray] | None:
        """Per patient the lesion maps (``C.LESION_KINDS``, *``C.LESION_MAP_SHAPE``), asked for alone; None when the
        served model declares none. Errors as ``predict``."""
        feeds = stack_inputs(batch)
        self.breaker.before_call()
        try:
            if not self._checked:
                self._check_once()
            if "lesion_map" not in self.on_request:
                self.breaker.record_success()
                return None
            maps = []
            for start in range(0, len(batch), C.MAX_BATCH):
                chunk = {name: array[start : start + C.MAX_BATCH] for name, array in feeds.items()}
                outputs = self._infer_outputs(chunk, ("lesion_map",))
                maps.append(self._output(outputs, "lesion_map", len(chunk[C.INPUT_NAMES[0]])))
        except ModelUnavailableError:
            self._checked = False
            self.breaker.record_failure()
            raise
        except ModelContractError:
            self.breaker.record_success()
            self._checked = False
            raise
        self.breaker.record_success()
        return list(np.concatenate(maps))

    # ------------------------------------------------------------------ start-up checks
    def check(self) -> None:
        """Server live+ready, model (pinned version) ready, metadata == contract. Raises the named errors."""
        self._checked = False
        self._check_once()

    def describe(self) -> dict[str, Any]:
        """For `strokewatch doctor`: runs check() (raising its errors) and reports what is served."""
        self.check()
        server = self._call("server metadata", lambda t: t.server_metadata())
        return {
            "url": self.url,
            "protocol": self.protocol,
            "tls": self.tls is not None,
            "server": {"name": server.get("name"), "version": server.get("version")},
            "model_name": self.model_name,
            "pinned_version": self.pinned_version or "latest",
            "ready_versions": list(self._ready_versions),
            "model_version": self._semantic_version,
            "trained": self._trained,
            "max_batch": C.MAX_BATCH,
            "breaker": self.breaker.state,
        }

    def _check_once(self) -> None:
        name, version = self.model_name, self.pinned_version
        if not self._call("server live", lambda t: t.server_live()):
            raise ModelUnavailableError(f"Triton at {self.url} is not live")
        if not self._call("server ready", lambda t: t.server_ready()):
            raise ModelUnavailableError(f"Triton at {self.url} is not ready (a model may have failed to load)")
        index = self._call("repository index", lambda t: t.repository_index())
        self._ready_versions = sorted(
            (str(m.get("version", "")) for m in index if m.get("name") == name and m.get("state") == "READY"),
            key=lambda v: (len(v), v),
        )
        if not self._call("model ready", lambda t: t.model_ready(name, version)):
            wanted = f"version {version} of model {name!r}" if version else f"model {name!r}"
            ready = ", ".join(self._ready_versions) or "none"
            raise ModelUnavailableError(
                f"{wanted} is not ready on Triton at {self.url} (ready versions: {ready}); "
                "load it (explicit model control) or fix STROKEWATCH_TRITON_MODEL_VERSION"
            )
        metadata = self._call("model metadata", lambda t: t.model_metadata(name, version))
        optional = check_served_metadata(metadata, name)
        self.output_names = (*C.OUTPUT_NAMES, *(n for n in optional if n not in C.ON_REQUEST_OUTPUTS))
        self.on_request = tuple(n for n in optional if n in C.ON_REQUEST_OUTPUTS)
        config = self._call("model config", lambda t: t.model_config(name, version))
        params = {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        self._semantic_version = params.get("model_version") or C.MODEL_VERSION
        self._trained = params.get("trained", "false").lower() == "true"
        self._checked = True

    # ------------------------------------------------------------------ transport with retries
    def _transport(self) -> Transport:
        transport: Transport | None = getattr(self._local, "transport", None)
        if getattr(self._local, "pid", None) != os.getpid():
            transport = None  # a forked worker (Celery prefork) must not share its parent's sockets/channels
        if transport is None:
            cls = HttpTransport if self.protocol == "http" else GrpcTransport
            transport = cls(self.url, self.timeout_s, self.tls)
            self._local.transport = transport
            self._local.pid = os.getpid()
            with self._clients_lock:
                self._clients.append(transport)
        return transport

    def _drop_transport(self) -> None:
        transport = getattr(self._local, "transport", None)
        self._local.transport = None
        if transport is not None:
            with self._clients_lock:
                if transport in self._clients:
                    self._clients.remove(transport)
            transport.close()

    def _call(self, what: str, fn: Callable[[Transport], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return fn(self._transport())
            except TransportError as err:
                if err.kind == "contract":
                    raise ModelContractError(f"Triton rejected the {what} request: {err}") from err
                if err.kind in ("not_found", "tls"):
                    raise ModelUnavailableError(f"Triton at {self.url}: {err}") from err
                self._drop_transport()  # a timed-out or reset connection is not reused
                if attempt >= self.retries:
                    raise ModelUnavailableError(
                        f"Triton at {self.url} unavailable ({what}, {attempt + 1} attempts): {err}"
                    ) from err
                delay = self.backoff_s * (2**attempt)
                log.warning("triton %s failed (%s); retry %d/%d in %.1fs", what, err, attempt + 1, self.retries, delay)
                time.sleep(delay)
                attempt += 1

    def _infer(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._infer_outputs(chunk, self.output_names)

    def _infer_outputs(self, chunk: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = self._call(
            "infer", lambda t: t.infer(self.model_name, self.pinned_version, chunk, outputs)
        )
        return result

    @staticmethod
    def _output(outputs: dict[str, np.ndarray], name: str, rows: int) -> np.ndarray:
        array = outputs.get(name)
        if array is None:
            raise ModelContractError(f"Triton response has no output tensor {name!r}")
        spec = C.output_spec(name)
        if tuple(array.shape) != (rows, *spec.dims):
            raise ModelContractError(f"output {name!r}: shape {tuple(array.shape)}, expected {(rows, *spec.dims)}")
        return array

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for transport in clients:
            transport.close()
        self._local = threading.local()


def _endpoint(url: str, protocol: Protocol_, tls: TritonTls | None) -> tuple[str, TritonTls | None]:
    """(host:port, TLS or None) from a Triton URL, refusing a scheme that disagrees with the protocol or the TLS."""
    scheme, sep, rest = url.strip().partition("://")
    address = (rest if sep else url.strip()).rstrip("/")
    if not sep:
        return address, tls  # host:port: TLS exactly when configured
    wanted = _SCHEMES.get(scheme.lower())
    if wanted is None:
        raise ValueError(
            f"STROKEWATCH_TRITON_URL {url!r}: unknown scheme {scheme!r}; use http://, https://, grpc:// or grpcs://"
        )
    scheme_protocol, secure = wanted
    if scheme_protocol != protocol:
        raise ValueError(
            f"STROKEWATCH_TRITON_URL is {scheme}:// but STROKEWATCH_TRITON_PROTOCOL is {protocol}: use {protocol}:// "
            f"or {'https' if protocol == 'http' else 'grpcs'}:// with this protocol, or change the protocol"
        )
    if not secure and tls is not None:
        raise ValueError(
            f"TLS is configured for Triton (STROKEWATCH_TRITON_TLS__*) but STROKEWATCH_TRITON_URL is plaintext "
            f"{scheme}://: use {scheme}s:// (or remove the TLS settings)"
        )
    return address, (tls or TritonTls()) if secure else None


def check_served_metadata(metadata: dict[str, Any], model_name: str) -> tuple[str, ...]:
    """Raise ModelContractError naming the first tensor whose name/dims/datatype differ from the contract; return
    the optional outputs (``C.OPTIONAL_OUTPUTS``) the served model declares, each checked like the others."""
    declared = {t["name"] for t in metadata.get("outputs", [])}
    optional = tuple(spec for spec in C.OPTIONAL_OUTPUTS if spec.name in declared)
    for kind, specs in (("inputs", C.INPUTS), ("outputs", (*C.OUTPUTS, *optional))):
        served = {t["name"]: t for t in metadata.get(kind, [])}
        for spec in specs:
            tensor = served.get(spec.name)
            if tensor is None:
                names = ", ".join(sorted(served)) or "none"
                raise ModelContractError(
                    f"served model {model_name!r} has no {kind[:-1]} tensor {spec.name!r} (it has: {names}); "
                    f"contract {C.MODEL_VERSION}"
                )
            shape = tuple(int(d) for d in tensor.get("shape", []))
            if shape != (-1, *spec.dims):
                raise ModelContractError(
                    f"tensor {spec.name!r}: served shape {list(shape)}, contract [-1, {', '.join(map(str, spec.dims))}]"
                )
            if tensor.get("datatype") != C.kserve_dtype(spec):
                raise ModelContractError(
                    f"tensor {spec.name!r}: served datatype {tensor.get('datatype')}, contract {C.kserve_dtype(spec)}"
                )
        extra = set(served) - {s.name for s in specs}
        if kind == "inputs" and extra:
            raise ModelContractError(f"served model {model_name!r} expects inputs not in the contract: {sorted(extra)}")
    return tuple(spec.name for spec in optional)


class _Model(Protocol):
    runtime_name: str

    @property
    def model_version(self) -> str: ...

    @property
    def trained(self) -> bool: ...

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]: ...


class FallbackModel:
    """Primary (Triton) first; on ModelUnavailableError the fallback (embedded ONNX Runtime) scores instead.

    Off by default (bootstrap builds it only when configured). Predictions made by the fallback say so in
    ``Prediction.runtime`` (e.g. ``"onnxruntime (fallback: triton unavailable)"``) for the assessment's note.
    Contract errors are not masked: they mean the deployment is wrong, not down.
    """

    def __init__(self, primary: _Model, fallback: _Model) -> None:
        self.primary = primary
        self.fallback = fallback

    @property
    def runtime_name(self) -> str:
        return self.primary.runtime_name

    @property
    def model_version(self) -> str:
        return self.primary.model_version

    @property
    def trained(self) -> bool:
        return self.primary.trained

    def lesion_maps(self, batch: Sequence[ModelInputs]) -> list[np.ndarray] | None:
        """The primary's lesion maps; the fallback's while the primary is unavailable (None from a runtime that
        cannot serve them)."""
        for model in (self.primary, self.fallback):
            serve = getattr(model, "lesion_maps", None)
            if serve is None:
                continue
            try:
                maps: list[np.ndarray] | None = serve(batch)
                return maps
            except ModelUnavailableError:
                if model is self.fallback:
                    raise
        return None

    def predict(self, batch: Sequence[ModelInputs]) -> list[Prediction]:
        try:
            return self.primary.predict(batch)
        except ModelUnavailableError as err:
            reason = self.primary.runtime_name.split("-")[0] + " unavailable"
            log.warning("scoring %d patient(s) with %s: %s", len(batch), self.fallback.runtime_name, err)
            return [replace(p, runtime=f"{p.runtime} (fallback: {reason})") for p in self.fallback.predict(batch)]
