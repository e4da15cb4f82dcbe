"""The two KServe v2 transports of TritonModel (tritonclient HTTP and gRPC) behind one small interface.

Each transport normalises what the two client libraries return (gRPC's JSON gives int64 as strings,
wraps the config in ``{"config": ...}``) and turns every library/network error into a ``TransportError``
whose ``kind`` says how TritonModel should react:
- ``transient``: connection refused/reset, timeouts, HTTP 5xx/429, gRPC UNAVAILABLE/DEADLINE_EXCEEDED/...:
  retry with backoff, then report the model unavailable;
- ``not_found``: the model or version is not loaded (HTTP 404 / gRPC NOT_FOUND, "unknown model"):
  unavailable now, no point retrying at once;
- ``contract``: the server rejected the request itself (HTTP 400 / gRPC INVALID_ARGUMENT): a mismatch;
- ``tls``: the TLS handshake failed (certificate not trusted, expired, wrong host, client certificate refused):
  unavailable until the certificates or settings are fixed, no point retrying at once.

With a ``TritonTls`` the transports speak TLS (https / grpcs): HTTP through the SSL context the engine's shared
builder makes, gRPC with the same PEM files (gRPC always verifies the server and reads the files itself).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from inference import contract as C

Kind = Literal["transient", "not_found", "contract", "tls"]
T = TypeVar("T")

_TRANSIENT_GRPC = {
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "INTERNAL",
    "UNKNOWN",
    "CANCELLED",
}


@dataclass(frozen=True)
class TritonTls:
    """TLS to Triton. ``http_context(cls)`` builds the HTTP client's context as an instance of ``cls`` (gevent's
    SSLContext under tritonclient.http); None: TLS 1.2+ verified against this machine's trust store. The PEM paths
    are for gRPC (and document what ``http_context`` loads); ``client_key`` None: the key is in ``client_cert``."""

    http_context: Callable[[type[ssl.SSLContext]], ssl.SSLContext] | None = None
    verify: bool = True
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


def _default_http_context(cls: type[ssl.SSLContext]) -> ssl.SSLContext:
    context = cls(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


class TransportError(Exception):
    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind: Kind = kind


class Transport(Protocol):
    def server_live(self) -> bool: ...
    def server_ready(self) -> bool: ...
    def model_ready(self, name: str, version: str) -> bool: ...
    def server_metadata(self) -> dict[str, Any]: ...
    def model_metadata(self, name: str, version: str) -> dict[str, Any]: ...
    def model_config(self, name: str, version: str) -> dict[str, Any]: ...
    def repository_index(self) -> list[dict[str, Any]]: ...
    def infer(
        self, name: str, version: str, feeds: dict[str, np.ndarray], outputs: Sequence[str] = C.OUTPUT_NAMES
    ) -> dict[str, np.ndarray]: ...
    def close(self) -> None: ...


def _classify(exc: BaseException) -> TransportError:
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "").replace("StatusCode.", "")
        message = exc.message() or str(exc)
        if status in ("404", "NOT_FOUND") or "unknown model" in message.lower():
            return TransportError("not_found", message)
        if status in ("400", "INVALID_ARGUMENT"):
            return TransportError("contract", message)
        if "handshake failed" in message.lower() or "CERTIFICATE_VERIFY_FAILED" in message:  # gRPC's TLS failure
            return TransportError("tls", f"TLS failed: {message}")
        if status.isdigit() and not (status.startswith("5") or status == "429"):
            return TransportError("not_found", f"HTTP {status}: {message}")
        if status and not status.isdigit() and status not in _TRANSIENT_GRPC:
            return TransportError("not_found", f"{status}: {message}")
        return TransportError("transient", f"{status or 'error'}: {message}")
    if isinstance(exc, ssl.SSLError):
        return TransportError("tls", f"TLS failed: {exc}")
    if isinstance(exc, TimeoutError):
        return TransportError("transient", f"timed out ({exc})")
    return TransportError("transient", f"{type(exc).__name__}: {exc}")


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except TransportError:
        raise
    except ssl.SSLError as exc:  # before ValueError: a failed certificate check is one (SSLCertVerificationError)
        raise _classify(exc) from exc
    except (ValueError, TypeError, KeyError, AttributeError):
        raise  # programming errors are not outages
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - gevent's Timeout is a BaseException; every library/network
        raise _classify(exc) from exc  # failure becomes a classified TransportError


class HttpTransport:
    """tritonclient.http; ``timeout_s`` bounds connecting and each network read/write; ``tls``: HTTPS."""

    def __init__(self, url: str, timeout_s: float, tls: TritonTls | None = None) -> None:
        import tritonclient.http as httpclient

        self._mod = httpclient
        self.tls = tls
        options: dict[str, Any] = {}
        if tls is not None:
            import gevent.ssl

            build = tls.http_context or _default_http_context
            # geventhttpclient calls the factory (with a cafile it would load: ignored, ours is in the context) and
            # then forces hostname checks unless ``insecure``: that is only right when verification is off.
            options = {
                "ssl": True,
                "ssl_context_factory": lambda *_, **__: build(gevent.ssl.SSLContext),
                "insecure": not tls.verify,
            }
        self._client = httpclient.InferenceServerClient(
            url, connection_timeout=timeout_s, network_timeout=timeout_s, concurrency=1, **options
        )

    def server_live(self) -> bool:
        return bool(_guard(self._client.is_server_live))

    def server_ready(self) -> bool:
        return bool(_guard(self._client.is_server_ready))

    def model_ready(self, name: str, version: str) -> bool:
        return bool(_guard(lambda: self._client.is_model_ready(name, version)))

    def server_metadata(self) -> dict[str, Any]:
        return dict(_guard(self._client.get_server_metadata))

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        return dict(_guard(lambda: self._client.get_model_metadata(name, version)))

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        return dict(_guard(lambda: self._client.get_model_config(name, version)))

    def repository_index(self) -> list[dict[str, Any]]:
        return list(_guard(self._client.get_model_repository_index))

    def infer(
        self, name: str, version: str, feeds: dict[str, np.ndarray], outputs: Sequence[str] = C.OUTPUT_NAMES
    ) -> dict[str, np.ndarray]:
        inputs = []
        for spec in C.INPUTS:
            tensor = self._mod.InferInput(spec.name, list(feeds[spec.name].shape), C.kserve_dtype(spec))
            tensor.set_data_from_numpy(feeds[spec.name], binary_data=True)
            inputs.append(tensor)
        requested = [self._mod.InferRequestedOutput(name_, binary_data=True) for name_ in outputs]
        result = _guard(lambda: self._client.infer(name, inputs, model_version=version, outputs=requested))
        return {n: result.as_numpy(n) for n in outputs if result.as_numpy(n) is not None}

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection must not raise
            self._client.close()


class GrpcTransport:
    """tritonclient.grpc; ``timeout_s`` is the client-side deadline of every call; ``tls``: grpcs."""

    def __init__(self, url: str, timeout_s: float, tls: TritonTls | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self._mod = grpcclient
        self._timeout = timeout_s
        self.tls = tls
        options: dict[str, Any] = {}
        if tls is not None:
            if not tls.verify:
                raise ValueError(
                    "gRPC cannot skip certificate verification: set STROKEWATCH_TRITON_TLS__CA_BUNDLE to the CA of "
                    "Triton's certificate instead of STROKEWATCH_TRITON_TLS__VERIFY=false"
                )
            options = {
                "ssl": True,
                "root_certificates": tls.ca_bundle,  # None: gRPC's default roots
                "private_key": (tls.client_key or tls.client_cert) if tls.client_cert else None,
                "certificate_chain": tls.client_cert,
            }
        self._client = grpcclient.InferenceServerClient(url, **options)

    def server_live(self) -> bool:
        return bool(_guard(lambda: self._client.is_server_live(client_timeout=self._timeout)))

    def server_ready(self) -> bool:
        return bool(_guard(lambda: self._client.is_server_ready(client_timeout=self._timeout)))

    def model_ready(self, name: str, version: str) -> bool:
        return bool(_guard(lambda: self._client.is_model_ready(name, version, client_timeout=self._timeout)))

    def server_metadata(self) -> dict[str, Any]:
        return dict(_guard(lambda: self._client.get_server_metadata(as_json=True, client_timeout=self._timeout)))

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        meta = _guard(
            lambda: self._client.get_model_metadata(name, version, as_json=True, client_timeout=self._timeout)
        )
        for kind in ("inputs", "outputs"):  # proto JSON writes int64 as strings
            for tensor in meta.get(kind, []):
                tensor["shape"] = [int(d) for d in tensor.get("shape", [])]
        return dict(meta)

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        reply = _guard(lambda: self._client.get_model_config(name, version, as_json=True, client_timeout=self._timeout))
        return dict(reply.get("config", {}))

    def repository_index(self) -> list[dict[str, Any]]:
        reply = _guard(lambda: self._client.get_model_repository_index(as_json=True, client_timeout=self._timeout))
        return list(reply.get("models", []))

    def infer(
        self, name: str, version: str, feeds: dict[str, np.ndarray], outputs: Sequence[str] = C.OUTPUT_NAMES
    ) -> dict[str, np.ndarray]:
        inputs = []
        for spec in C.INPUTS:
            tensor = self._mod.InferInput(spec.name, list(feeds[spec.name].shape), C.kserve_dtype(spec))
            tensor.set_data_from_numpy(feeds[spec.name])
            inputs.append(tensor)
        requested = [self._mod.InferRequestedOutput(n) for n in outputs]
        result = _guard(
            lambda: self._client.infer(
                name, inputs, model_version=version, outputs=requested, client_timeout=self._timeout
            )
        )
        return {n: result.as_numpy(n) for n in outputs if result.as_numpy(n) is not None}

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken channel must not raise
            self._client.close()
