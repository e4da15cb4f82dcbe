"""The one place that turns a peer's TLS settings into an ``ssl.SSLContext`` (every HTTP client of the engine uses it).

``ssl_context(settings.pacs.tls, ("pacs", "tls"))`` gives a client context that:
- speaks TLS 1.2 or newer, never less;
- verifies the server's certificate and host name against ``ca_bundle`` (or, without one, this machine's trust
  store) unless ``verify`` is off;
- presents ``client_cert`` (+ ``client_key``) when the server asks for one (mutual TLS).
A file that is missing, unreadable, oversized or not PEM stops start-up with a message naming the
``STROKEWATCH_*`` setting; a certificate that fails at run time is explained by ``tls_failure`` (which problem,
which setting), for the named outcome and for ``strokewatch doctor``. Nothing here is hand-made crypto: it is the
standard library's OpenSSL binding, configured.
"""

from __future__ import annotations

import logging
import ssl
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from integration.domain.checks import TlsProblem, chain_text, env_name, tls_problem

if TYPE_CHECKING:
    from integration.config import TlsSettings

log = logging.getLogger(__name__)

#: A CA bundle, certificate chain or key larger than this is refused before OpenSSL reads it (a system bundle of
#: every public CA is ~0.2 MiB).
MAX_PEM_BYTES = 4 * 1024 * 1024

#: The contexts built here that present a client certificate (see ``presents_client_cert``).
_WITH_CLIENT_CERT: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()


def ssl_context(
    tls: TlsSettings, setting: tuple[str, ...], context_class: type[ssl.SSLContext] = ssl.SSLContext
) -> ssl.SSLContext:
    """A client context for one peer. ``setting`` is where ``tls`` lives, e.g. ("pacs", "tls"), for error messages.

    ``context_class`` lets a library with its own socket type (gevent, under tritonclient's HTTP client) get the
    same configuration in its subclass of ``ssl.SSLContext``.
    """
    context = context_class(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.verify:
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        if tls.ca_bundle is not None:
            ca = _pem_file(tls.ca_bundle, (*setting, "ca_bundle"))
            try:
                context.load_verify_locations(cafile=str(ca))
            except ssl.SSLError as err:
                name = env_name(*setting, "ca_bundle")
                raise ValueError(f"{name}={ca}: not a PEM CA bundle ({err.reason})") from None
        else:
            _load_system_trust(context)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning("TLS certificate verification is off for %s", env_name(*setting))
    if tls.client_cert is not None:
        cert = _pem_file(tls.client_cert, (*setting, "client_cert"))
        key = _pem_file(tls.client_key, (*setting, "client_key")) if tls.client_key is not None else None
        try:
            context.load_cert_chain(str(cert), str(key) if key is not None else None, password=_encrypted_key)
        except _EncryptedKey:
            name = env_name(*setting, "client_key" if key is not None else "client_cert")
            problem = "the private key is encrypted; give an unencrypted PEM key (file mode 0600)"
            raise ValueError(f"{name}: {problem}") from None
        except ssl.SSLError as err:
            names = env_name(*setting, "client_cert") + (f" / {env_name(*setting, 'client_key')}" if key else "")
            what = "the key does not belong to the certificate" if "MISMATCH" in str(err) else (
                "not a PEM certificate and unencrypted PEM private key")
            raise ValueError(f"{names}: {what} ({err.reason})") from None
        _WITH_CLIENT_CERT.add(context)
    return context


def default_context() -> ssl.SSLContext:
    """A verifying TLS 1.2+ context on this machine's trust store: what a client gets when nothing is configured."""
    from integration.config import TlsSettings

    return ssl_context(TlsSettings(), ("tls",))


def presents_client_cert(context: ssl.SSLContext | None) -> bool:
    """Whether ``context`` (built by ``ssl_context``) presents a client certificate."""
    return context is not None and context in _WITH_CLIENT_CERT


def tls_failure(
    exc: BaseException, peer: str, url_setting: str | None = None, context: ssl.SSLContext | None = None
) -> TlsProblem | None:
    """What went wrong in a TLS handshake with ``peer`` ("pacs", "ehr") over ``context``, or None when ``exc`` is no
    TLS failure."""
    return tls_problem(chain_text(exc), env_name(peer, "tls"), url_setting, client_cert=presents_client_cert(context))


class _EncryptedKey(Exception):
    pass


def _encrypted_key() -> bytes:
    """The passphrase callback: never OpenSSL's own, which would wait for one on a terminal."""
    raise _EncryptedKey


def _pem_file(path: Path, setting: tuple[str, ...]) -> Path:
    name = env_name(*setting)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f"{name}={path}: no such file") from None
    except OSError as err:
        raise ValueError(f"{name}={path}: cannot be read ({err.strerror})") from None
    if not path.is_file():
        raise ValueError(f"{name}={path}: not a regular file")
    if size > MAX_PEM_BYTES:
        raise ValueError(f"{name}={path}: larger than {MAX_PEM_BYTES // (1024 * 1024)} MiB; is it the right file?")
    try:
        with path.open("rb") as handle:
            head = handle.read(64 * 1024)
    except OSError as err:
        problem = f"cannot be read ({err.strerror}); the engine's user needs read access"
        raise ValueError(f"{name}={path}: {problem}") from None
    if b"-----BEGIN " not in head:
        raise ValueError(f"{name}={path}: not a PEM file (no -----BEGIN line); convert DER with `openssl x509`")
    return path


def _load_system_trust(context: ssl.SSLContext) -> None:
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if context.cert_store_stats().get("x509_ca", 0) == 0:  # no system store (slim images): the public CAs of certifi
        try:
            import certifi
        except ImportError:
            return
        context.load_verify_locations(cafile=certifi.where())


def server_context(cert: Path, key: Path | None, client_ca: Path | None, require_client_cert: bool,
                   setting: tuple[str, ...]) -> ssl.SSLContext:
    """A server context for a listener of the engine (the DICOM SCP): TLS 1.2 or newer, ``cert`` (+ ``key``)
    presented; with ``client_ca`` a client's certificate is verified against it when sent, and required with
    ``require_client_cert`` (mutual TLS). ``setting`` names the settings group, e.g. ("scp", "tls")."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    chain = _pem_file(cert, (*setting, "cert"))
    private = _pem_file(key, (*setting, "key")) if key is not None else None
    try:
        context.load_cert_chain(str(chain), str(private) if private is not None else None, password=_encrypted_key)
    except _EncryptedKey:
        raise ValueError(f"{env_name(*setting, 'key' if private else 'cert')}: the private key is encrypted; give an "
                         "unencrypted PEM key (file mode 0600)") from None
    except ssl.SSLError as err:
        names = env_name(*setting, "cert") + (f" / {env_name(*setting, 'key')}" if private else "")
        what = "the key does not belong to the certificate" if "MISMATCH" in str(err) else (
            "not a PEM certificate and unencrypted PEM private key")
        raise ValueError(f"{names}: {what} ({err.reason})") from None
    if client_ca is not None:
        ca = _pem_file(client_ca, (*setting, "client_ca"))
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as err:
            raise ValueError(f"{env_name(*setting, 'client_ca')}={ca}: not a PEM CA bundle ({err.reason})") from None
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context
