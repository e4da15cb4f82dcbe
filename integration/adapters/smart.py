"""SMART Backend Services (SMART App Launch 2.x): OAuth2 client credentials with a signed client assertion.

The engine holds a private key (RS384 with RSA, ES384 with P-384); the EHR holds its public JWKS, registered
for the client id. Each token request carries a fresh JWT (``private_key_jwt``, RFC 7523): iss = sub = client
id, aud = the token URL, a unique ``jti``, ``exp`` at most five minutes ahead, the ``kid`` in its header. The
token URL is configured or read from ``{FHIR base}/.well-known/smart-configuration``. Tokens are cached and
refreshed as ``ClientCredentialsAuth`` does; a token granted without a requested scope is refused here, naming
the scope. Signing and key handling are PyJWT's and ``cryptography``'s, not ours. Messages never carry the key,
an assertion or a token.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from integration.adapters.fhir_auth import ClientCredentialsAuth, _json_object, peer_retry_after
from integration.domain.checks import CheckResult, chain_text, env_name, short_error, tls_problem
from integration.domain.redact import redact_text
from integration.domain.types import DomainError, Outcome

if TYPE_CHECKING:
    from integration.adapters.fhir_auth import _Token

log = logging.getLogger(__name__)

Alg = Literal["RS384", "ES384"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

ALGORITHMS: tuple[Alg, ...] = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: exp of an assertion, seconds ahead: SMART allows at most 300; the rest is room for clocks that differ a little.
ASSERTION_LIFETIME_S = 240
#: A key file or a discovery document larger than this is refused before it is read whole.
MAX_KEY_BYTES = 64 * 1024
MAX_DOCUMENT_BYTES = 256 * 1024
MIN_RSA_BITS = 2048
#: A Date header this far from our clock is reported as the likely reason for a refused assertion.
CLOCK_SKEW_NOTE_S = 60.0

# SMART v1 permission words as v2 letters.
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
#: An OAuth error description about the assertion's time claims.
_TIME_WORDS = re.compile(r"\b(exp|iat|nbf|expired|clock|skew|future|not yet valid)\b")
_SCOPE = re.compile(r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Za-z]+)\.(?P<perms>\*|read|write|[cruds]+)$")


# -- keys ----------------------------------------------------------------------------------------------------------


def load_private_key(path: Path, passphrase: str | None = None, *, setting: str | None = None) -> PrivateKey:
    """The PEM private key in ``path``: RSA (>= 2048 bits) or EC P-384. Errors name ``setting``, never key bytes."""
    where = f"{setting or env_name('ehr', 'auth', 'private_key_file')}={path}"
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file (make one with `strokewatch keys generate`)") from None
    except OSError as err:
        raise ValueError(f"{where}: cannot be read ({err.strerror}); the engine's user needs read access") from None
    if len(data) > MAX_KEY_BYTES:
        raise ValueError(f"{where}: larger than {MAX_KEY_BYTES} bytes; is it the private key?")
    secret = passphrase.encode() if passphrase else None
    try:
        key = serialization.load_pem_private_key(data, password=secret)
    except TypeError:  # encrypted without a passphrase, or a passphrase for a plain key
        fix = "set" if secret is None else "unset"
        raise ValueError(
            f"{where}: the key is {'encrypted' if secret is None else 'not encrypted'}; "
            f"{fix} {env_name('ehr', 'auth', 'private_key_passphrase')}"
        ) from None
    except ValueError:
        raise ValueError(
            f"{where}: not a PEM private key, or the passphrase ({env_name('ehr', 'auth', 'private_key_passphrase')}) "
            "is wrong"
        ) from None
    except Exception as err:  # an unsupported key format (cryptography raises UnsupportedAlgorithm)
        raise ValueError(f"{where}: unsupported private key ({type(err).__name__})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{where}: an RSA key of {key.key_size} bits; SMART needs at least {MIN_RSA_BITS}")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise ValueError(f"{where}: an EC key on {key.curve.name}; ES384 needs P-384 (secp384r1)")
        return key
    raise ValueError(f"{where}: a {type(key).__name__}; SMART needs an RSA (RS384) or P-384 EC (ES384) key")


def key_alg(key: PrivateKey, wanted: str | None = None, *, setting: str | None = None) -> Alg:
    """The signing algorithm for ``key``: RS384 for RSA, ES384 for P-384; ``wanted`` must agree with the key."""
    alg: Alg = "RS384" if isinstance(key, rsa.RSAPrivateKey) else "ES384"
    if wanted is not None and wanted != alg:
        raise ValueError(
            f"{setting or env_name('ehr', 'auth', 'alg')}={wanted} does not fit the private key, which signs {alg}"
        )
    return alg


def parse_alg(text: str) -> Alg:
    """``text`` as a supported algorithm (case-insensitive), or ValueError naming the ones there are."""
    for alg in ALGORITHMS:
        if text.upper() == alg:
            return alg
    raise ValueError(f"unsupported algorithm {text!r}: use {' or '.join(ALGORITHMS)}")


def generate_private_key(alg: Alg) -> PrivateKey:
    """A new key: RSA 3072 bits for RS384, P-384 for ES384."""
    if alg == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ec.generate_private_key(ec.SECP384R1())


def public_jwk(key: PrivateKey, alg: Alg, kid: str | None = None) -> dict[str, Any]:
    """The public half of ``key`` as a JWK with ``kid`` (default: its RFC 7638 thumbprint), ``alg``, ``use: sig``."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid or jwk_thumbprint(jwk), "alg": alg, "use": "sig", "key_ops": ["verify"]}


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 over the key's required members in lexical order, base64url without padding."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def jwks(key: PrivateKey, alg: Alg, kid: str | None = None) -> dict[str, Any]:
    """The JWK Set to register at the EHR for this key."""
    return {"keys": [public_jwk(key, alg, kid)]}


def write_key_pair(out_dir: Path, alg: Alg, passphrase: str | None = None) -> tuple[Path, Path]:
    """A new key pair in ``out_dir``: ``private-key.pem`` (0600, encrypted when ``passphrase``) and ``jwks.json``.
    Existing files are never overwritten."""
    private, public = out_dir / "private-key.pem", out_dir / "jwks.json"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists; choose another --out directory (keys are never overwritten)")
    key = generate_private_key(alg)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with os.fdopen(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(pem)
    public.write_text(json.dumps(jwks(key, alg), indent=2) + "\n")
    return private, public


def client_assertion(
    key: PrivateKey, alg: Alg, kid: str, client_id: str, audience: str, now: float,
    lifetime_s: float = ASSERTION_LIFETIME_S,
) -> str:
    """A signed ``private_key_jwt`` client assertion for one token request (a fresh ``jti`` each time)."""
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": str(uuid.uuid4()),
        "iat": int(now),
        "exp": int(now + lifetime_s),
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


# -- scopes --------------------------------------------------------------------------------------------------------


def _permissions(perms: str) -> set[str]:
    return set(_V1_PERMISSIONS.get(perms, perms))


def scope_covers(granted: str, wanted: str) -> bool:
    """Whether the granted scope allows all that ``wanted`` asks (SMART v1 and v2 syntax, ``*`` for any type)."""
    if granted == wanted:
        return True
    g, w = _SCOPE.match(granted), _SCOPE.match(wanted)
    if g is None or w is None or g["context"] != w["context"]:
        return False
    return g["type"] in ("*", w["type"]) and _permissions(w["perms"]) <= _permissions(g["perms"])


def missing_scopes(requested: str | None, granted: object) -> list[str]:
    """The requested scopes no granted scope covers. A response without ``scope`` grants what was asked
    (RFC 6749 section 5.1)."""
    if not requested or granted is None:
        return []
    have = str(granted).split()
    return [want for want in requested.split() if not any(scope_covers(g, want) for g in have)]


# -- the httpx.Auth ------------------------------------------------------------------------------------------------


class SmartBackendAuth(ClientCredentialsAuth):
    """SMART Backend Services: client credentials, the client authenticated by a signed JWT (``private_key_jwt``).

    ``token_url`` None: discovered on first use from ``{fhir_base_url}/.well-known/smart-configuration``, which
    must offer ``private_key_jwt`` (and this ``alg`` when it lists algorithms). ``wall_clock`` dates the
    assertions (Unix seconds); the inherited ``clock`` times the token cache. Other keyword options (timeout, TLS,
    token client, refresh margin) are ``ClientCredentialsAuth``'s.
    """

    mode = "smart-backend"

    def __init__(
        self,
        fhir_base_url: str | None,
        client_id: str,
        private_key: PrivateKey,
        *,
        alg: Alg,
        kid: str,
        token_url: str | None = None,
        scope: str | None = None,
        peer: str = "ehr",
        wall_clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        if not token_url and not fhir_base_url:
            raise ValueError(f"SMART Backend Services need {env_name(peer, 'auth', 'token_url')} (nothing to discover)")
        self.fhir_base_url = (fhir_base_url or "").rstrip("/")
        self.alg = alg
        self.kid = kid
        self.peer = peer
        self._key = private_key
        self._wall_clock = wall_clock
        super().__init__(token_url or "", client_id, "", scope=scope, **options)

    def _require(self, token_url: str, client_id: str, client_secret: str) -> None:
        if not client_id:
            raise ValueError(f"SMART Backend Services need {env_name(self.peer, 'auth', 'client_id')}")

    def __repr__(self) -> str:
        return f"SmartBackendAuth(token_url={self.token_url!r}, client_id={self.client_id!r}, kid={self.kid!r})"

    # -- token requests --------------------------------------------------------------------------------------------

    def _request_token(self) -> httpx.Response:
        url = self.token_endpoint()
        assertion = client_assertion(self._key, self.alg, self.kid, self.client_id, url, self._wall_clock())
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        if self.scope:
            form["scope"] = self.scope
        return self._http.post(url, data=form, headers={"Accept": "application/json"})

    def _token_from(self, response: httpx.Response, started: float) -> _Token:
        body = _json_object(response)
        if response.status_code != 200:
            detail, hint = self._refusal(response, body)
            raise DomainError(Outcome.EHR_REJECTED, f"{detail}; {hint}")
        missing = missing_scopes(self.scope, body.get("scope"))
        if missing:
            detail, hint = self._scope_shortfall(missing, body.get("scope"))
            raise DomainError(Outcome.EHR_REJECTED, f"{detail}; {hint}")
        return super()._token_from(response, started)

    def token_endpoint(self) -> str:
        """The token URL: configured, or read once from the EHR's SMART configuration (DomainError if it can't be)."""
        if not self.token_url:
            self.token_url = self._discover()
        return self.token_url

    def _discover(self) -> str:
        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
        fix = f"set {env_name(self.peer, 'auth', 'token_url')} to the EHR's token endpoint"
        try:
            with self._http.stream("GET", url, headers={"Accept": "application/json"}) as response:
                status, data = response.status_code, _read_capped(response, MAX_DOCUMENT_BYTES)
                wait = peer_retry_after(response, self.retry_after_cap_s)
        except httpx.HTTPError as exc:
            problem = tls_problem(chain_text(exc), self.tls_setting)
            reason = f"TLS failed: {problem.explanation}; {problem.hint}" if problem else type(exc).__name__
            raise DomainError(Outcome.EHR_UNAVAILABLE, f"SMART configuration {url} unreachable: {reason}") from None
        if status >= 500 or status in (408, 429):
            raise DomainError(Outcome.EHR_UNAVAILABLE, f"SMART configuration {url} answered {status}", retry_after=wait)
        try:
            document = json.loads(data) if status == 200 and data is not None else None
        except ValueError:
            document = None
        if not isinstance(document, dict):
            why = "larger than allowed" if data is None else f"HTTP {status}, not a JSON object"
            raise DomainError(Outcome.EHR_REJECTED, f"SMART configuration {url}: {why}; {fix}")
        token_url = document.get("token_endpoint")
        if not isinstance(token_url, str) or not re.match(r"^https?://[^\s/]+", token_url):
            raise DomainError(Outcome.EHR_REJECTED, f"SMART configuration {url} names no token_endpoint URL; {fix}")
        if url.startswith("https://") and not token_url.startswith("https://"):
            raise DomainError(Outcome.EHR_REJECTED, f"SMART configuration {url} names a plain-HTTP token endpoint")
        methods = document.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            offered = ", ".join(str(m) for m in methods) or "none"
            raise DomainError(
                Outcome.EHR_REJECTED,
                f"the EHR's token endpoint does not accept private_key_jwt (offers: {offered}); "
                f"use {env_name(self.peer, 'auth', 'mode')}=oauth2 with a client secret, or ask the EHR to enable "
                "SMART Backend Services",
            )
        algs = document.get("token_endpoint_auth_signing_alg_values_supported")
        if isinstance(algs, list) and self.alg not in algs:
            offered = ", ".join(str(a) for a in algs) or "none"
            raise DomainError(
                Outcome.EHR_REJECTED,
                f"the EHR does not accept {self.alg} assertions (accepts: {offered}); make a key for one of those "
                "with `strokewatch keys generate --alg ...` and register its JWKS",
            )
        log.info("SMART token endpoint %s discovered from %s", token_url, url)
        return token_url

    # -- what went wrong, and which setting fixes it -----------------------------------------------------------------

    def _refusal(self, response: httpx.Response, body: dict[str, object]) -> tuple[str, str]:
        """A refused token request: the server's error and description (sanitised), and the fix."""
        error = _printable(body.get("error")) or f"HTTP {response.status_code}"
        description = _printable(body.get("error_description"))
        detail = f"SMART token endpoint {self.token_url} refused client {self.client_id!r}: {error}" + (
            f" ({description})" if description else ""
        )
        skew = self._clock_skew(response)
        said = f"{error} {description}".lower()
        setting = partial_env(self.peer)
        jwks_cmd = "`strokewatch keys jwks --key <private key file>`"
        if error == "invalid_scope":
            hint = f"register the scopes for the client at the EHR, or change {setting('scope')}"
        elif skew is not None or _TIME_WORDS.search(said):
            clock = f"this machine's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the EHR's; " if (
                skew is not None) else ""
            hint = f"{clock}the assertion's time claims were refused: synchronise this machine's clock (NTP)"
        elif any(w in said for w in ("signature", "kid", "jwks", "key")):
            hint = (
                f"the EHR does not accept the key: register the JWKS printed by {jwks_cmd} for client "
                f"{self.client_id!r} at the EHR, or check {setting('private_key_file')} and {setting('kid')}"
            )
        elif "jti" in said or "replay" in said:
            hint = "the EHR saw this assertion id before; retry (each request signs a new jti)"
        elif error == "unauthorized_client":
            hint = f"the EHR does not let client {self.client_id!r} use the client_credentials grant"
        else:
            hint = (
                f"check {setting('client_id')} (registered at the EHR for SMART Backend Services) and that the "
                f"JWKS printed by {jwks_cmd} is registered for it"
            )
        return detail, hint

    def _scope_shortfall(self, missing: list[str], granted: object) -> tuple[str, str]:
        detail = (
            f"the EHR granted client {self.client_id!r} a token without {' '.join(missing)} "
            f"(granted: {_printable(granted) or 'nothing'})"
        )
        fix = f"register these scopes for the client at the EHR, or remove them from {partial_env(self.peer)('scope')}"
        return detail, fix

    def _clock_skew(self, response: httpx.Response) -> float | None:
        """Our clock minus the server's (from its Date header), when they differ by more than a minute."""
        raw = response.headers.get("Date")
        try:
            server = email.utils.parsedate_to_datetime(raw).timestamp() if raw else None
        except (TypeError, ValueError):
            server = None
        if server is None:
            return None
        skew = self._wall_clock() - server
        return skew if abs(skew) > CLOCK_SKEW_NOTE_S else None

    # -- preflight (`strokewatch doctor`, readiness) -----------------------------------------------------------------

    def probe_token(self, peer: str, *, quick: bool) -> CheckResult:
        """``{peer} auth``: discovery, then a token requested exactly as the engine requests it. Names a refused
        key, an expired assertion (clock skew), a refused client and a missing scope, with the setting to fix."""
        name = f"{peer} auth"
        how = f"SMART Backend Services ({self.alg}, kid {self.kid})"
        try:
            url = self.token_endpoint()
        except DomainError as err:
            return CheckResult(name, False, err.message, f"check {env_name(peer, 'auth', 'token_url')}")
        if quick:
            try:
                self.access_token()
            except DomainError as err:
                return CheckResult(name, False, err.message)
            return CheckResult(name, True, f"{how}: token from {url}")
        started = self._clock()
        try:
            response = self._request_token()
        except httpx.HTTPError as exc:
            problem = tls_problem(chain_text(exc), env_name(peer, "tls"), env_name(peer, "auth", "token_url"))
            if problem is not None:
                detail = f"token endpoint {url}: TLS failed: {problem.explanation}"
                return CheckResult(name, False, detail, problem.hint)
            hint = f"check {env_name(peer, 'auth', 'token_url')}"
            return CheckResult(name, False, f"token endpoint {url} unreachable: {short_error(exc)}", hint)
        body = _json_object(response)
        if response.status_code != 200:
            return CheckResult(name, False, *self._refusal(response, body))
        missing = missing_scopes(self.scope, body.get("scope"))
        if missing:
            return CheckResult(name, False, *self._scope_shortfall(missing, body.get("scope")))
        try:
            token = super()._token_from(response, started)
        except DomainError as err:
            return CheckResult(name, False, err.message, f"check {env_name(peer, 'auth', 'token_url')}")
        with self._lock:
            self._token = token
        granted = _printable(body.get("scope")) or self.scope or "as requested"
        return CheckResult(name, True, f"{how}: token fetched from {url} (scopes: {granted})")


def partial_env(peer: str) -> Callable[[str], str]:
    """``partial_env("ehr")("scope")`` -> STROKEWATCH_EHR__AUTH__SCOPE."""
    return lambda field: env_name(peer, "auth", field)


def _printable(value: object, limit: int = 200) -> str:
    """A server-supplied string fit for a message: printable, short, credentials redacted."""
    if value is None:
        return ""
    text = "".join(ch for ch in str(value) if ch.isprintable())[:limit]
    return redact_text(text)


def _read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (read no further)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
