"""What a preflight check says (`strokewatch doctor`, the readiness probe), shared by adapters and services.

A check names what it looked at, whether the engine can work that way, and (when not) the
``STROKEWATCH_*`` setting to change. Details carry URLs, status codes and counts only: never secrets,
never response bodies (they may hold PHI).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckResult:
    """One check. ``ok`` False means the engine cannot work this way; ``warning`` flags an ok-but-doubtful one."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None
    warning: bool = False


def env_name(*path: str) -> str:
    """The environment variable for a nested setting: ("ehr", "auth", "password") -> STROKEWATCH_EHR__AUTH__PASSWORD."""
    return "STROKEWATCH_" + "__".join(p.upper() for p in path)


def short_error(exc: BaseException) -> str:
    """The exception's type and the first line of its message (at most 200 characters)."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unreachable(
    name: str, url: str, exc: BaseException, setting: str, tls: str | None = None, client_cert: bool = False
) -> CheckResult:
    """A peer that did not answer at all (refused, timed out, TLS failed). ``tls`` is the peer's TLS settings group
    (e.g. STROKEWATCH_PACS__TLS): a failed handshake is then named exactly, with the setting that fixes it;
    ``client_cert``: a client certificate was presented (see ``tls_problem``)."""
    problem = tls_problem(chain_text(exc), tls, setting, client_cert=client_cert) if tls else None
    if problem is not None:
        return CheckResult(name, False, f"{url}: TLS failed: {problem.explanation}", problem.hint)
    hint = f"check {setting} and that the server is up"
    return CheckResult(name, False, f"{url} unreachable: {short_error(exc)}", hint)


# -- TLS failures, named -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsProblem:
    """A failed TLS handshake, classified. ``kind``: expired, not_yet_valid, unknown_ca, hostname, revoked,
    client_cert_refused, not_tls, old_protocol or verify_failed."""

    kind: str
    explanation: str
    hint: str


# (markers in OpenSSL's messages, kind). Alerts come first: they are the server refusing *our* certificate,
# and some share words with the verify messages about *its* certificate ("certificate expired").
_CLIENT_CERT_ALERTS = (
    ("ALERT_CERTIFICATE_REQUIRED", "it requires a client certificate and none was sent"),
    ("ALERT_UNKNOWN_CA", "it does not trust the CA that issued our client certificate"),
    ("ALERT_CERTIFICATE_EXPIRED", "our client certificate has expired"),
    ("ALERT_CERTIFICATE_REVOKED", "our client certificate is revoked"),
    ("ALERT_BAD_CERTIFICATE", "it rejected our client certificate as bad"),
    ("ALERT_CERTIFICATE_UNKNOWN", "it rejected our client certificate"),
    ("ALERT_UNSUPPORTED_CERTIFICATE", "it rejected the type of our client certificate"),
    ("ALERT_ACCESS_DENIED", "it denied access to our client certificate"),
    ("ALERT_HANDSHAKE_FAILURE", "the handshake failed (most often: no client certificate where one is required)"),
)
_SERVER_CERT = (
    (("certificate has expired",), "expired", "the server's certificate has expired"),
    (("certificate is not yet valid",), "not_yet_valid", "the server's certificate is not valid yet"),
    (("certificate revoked",), "revoked", "the server's certificate is revoked"),
    (("hostname mismatch", "ip address mismatch", "doesn't match", "does not match"), "hostname",
     "the server's certificate does not name the host in the URL (hostname mismatch)"),
    (("self-signed certificate", "self signed certificate", "unable to get local issuer certificate",
      "unable to get issuer certificate", "unable to verify the first certificate", "certificate signature failure"),
     "unknown_ca", "the server's certificate is not issued by a CA we trust (unknown or wrong CA)"),
)
# A server that checks client certificates after the handshake (Node, Python's asyncio) may just close the connection.
_CLOSED_WITHOUT_ANSWER = ("server disconnected without sending a response", "unexpected_eof",
                          "eof occurred in violation of protocol", "remote end closed connection without response")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE")
_OLD_PROTOCOL = ("UNSUPPORTED_PROTOCOL", "ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE", "VERSION_TOO_LOW")


def tls_problem(text: str, tls: str, url_setting: str | None = None, *, client_cert: bool = False) -> TlsProblem | None:
    """Name a TLS failure from the text of its exception (with the chain: ``chain_text``), or None if it is none.

    ``tls`` is the peer's TLS settings group as an environment prefix (``STROKEWATCH_PACS__TLS``); ``url_setting``
    the variable holding the peer's URL; ``client_cert``: we presented one, so a connection closed without an answer
    most likely means the server refused it. Messages name files and settings only, never key material.
    """
    upper = text.upper()
    refused_hint = (f"set {tls}__CLIENT_CERT (and {tls}__CLIENT_KEY) to a certificate, not expired, issued by a CA "
                    "the server trusts for clients")
    for marker, reason in _CLIENT_CERT_ALERTS:
        if marker in upper:
            return TlsProblem("client_cert_refused", f"the server refused our client certificate: {reason}",
                              refused_hint)
    lower = text.lower()
    for markers, kind, explanation in _SERVER_CERT:
        if any(m in lower for m in markers):
            return TlsProblem(kind, explanation, _server_cert_hint(kind, tls, url_setting))
    if any(m in upper for m in _NOT_TLS):
        where = url_setting or "the URL"
        return TlsProblem("not_tls", "the server does not speak TLS on this port",
                          f"use http:// in {where}, or the port where the server serves HTTPS")
    if any(m in upper for m in _OLD_PROTOCOL):
        return TlsProblem("old_protocol", "the server offers no TLS version we accept (TLS 1.2 or newer)",
                          "enable TLS 1.2 or 1.3 on the server; older versions are refused")
    if "CERTIFICATE_VERIFY_FAILED" in upper or "certificate verify failed" in lower:
        return TlsProblem("verify_failed", "the server's certificate failed verification",
                          f"check {tls}__CA_BUNDLE and the server's certificate chain")
    if client_cert and any(m in lower for m in _CLOSED_WITHOUT_ANSWER):
        explanation = ("the server closed the connection without an answer after the TLS handshake: most likely it "
                       "refused our client certificate (its log says why)")
        return TlsProblem("client_cert_refused", explanation, refused_hint)
    return None


def _server_cert_hint(kind: str, tls: str, url_setting: str | None) -> str:
    if kind in ("expired", "not_yet_valid", "revoked"):
        clock = " (or this machine's clock is wrong)" if kind != "revoked" else ""
        return f"the server needs a new certificate{clock}; no setting here fixes that (never set {tls}__VERIFY=false)"
    if kind == "hostname":
        where = url_setting or "the URL"
        return f"put a host name the certificate is issued for in {where}, or reissue it naming this host (SAN)"
    return f"set {tls}__CA_BUNDLE to the PEM file of the CA that issued the server's certificate"


def chain_text(exc: BaseException) -> str:
    """The messages of an exception and of those it was raised from (libraries wrap the ``ssl`` error)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(str(current))
        message = getattr(current, "verify_message", None)  # ssl.SSLCertVerificationError
        if message:
            parts.append(f"verify code {getattr(current, 'verify_code', '?')}: {message}")
        current = current.__cause__ or current.__context__
    return " | ".join(parts)
