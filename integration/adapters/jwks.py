"""Verifying signed JWTs against a JSON Web Key Set fetched over HTTP(S): the hospital identity provider's access
tokens (API) and the EHR's tokens (CDS Hooks "Trusting CDS Clients") go through the same code.

- Only RS256 and ES256 (RSA >= 2048 bits, EC P-256); ``none``, HMAC and everything else are refused before a
  key is looked up, so a public key can never be used as an HMAC secret.
- Keys are cached for a TTL and fetched again once when a token names an unknown ``kid`` (key rotation), at most
  every ``min_refetch_s`` so made-up ``kid`` values cannot turn the engine into a fetch loop against the IdP.
- Every fetch has a timeout and a size cap; a token larger than ``MAX_TOKEN_BYTES`` is refused before parsing.
- ``TokenError.reason`` says why a token was refused, for logs and the 401 answer; it never holds the token.

PyJWT (with ``cryptography``) does the cryptography; nothing here is hand-made.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from integration.adapters.tls import default_context

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256")
MAX_TOKEN_BYTES = 16 * 1024
MAX_JWKS_BYTES = 256 * 1024
MIN_RSA_BITS = 2048


class TokenError(Exception):
    """A token was refused; ``reason`` is short, specific, and free of the token's content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeySourceError(TokenError):
    """The JWKS could not be fetched or read: the token cannot be checked now (not the caller's fault)."""


def token_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS, once its size and algorithm are acceptable."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(f"token larger than {MAX_TOKEN_BYTES} bytes")
    if token.count(".") != 2:
        raise TokenError("not a JWT (compact JWS with three parts)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("malformed JWT header") from None
    if header.get("alg") not in ALGORITHMS:
        raise TokenError(f"algorithm {str(header.get('alg'))[:16]!r} not accepted (only {', '.join(ALGORITHMS)})")
    return header


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims before verification: only to choose which issuer's keys verify the token."""
    token_header(token)
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise TokenError("malformed JWT payload") from None
    if not isinstance(claims, dict):
        raise TokenError("JWT payload is not a JSON object")
    return claims


def verify(
    token: str,
    key: jwt.PyJWK,
    *,
    issuer: str,
    audience: str,
    leeway_s: float,
    require: Iterable[str] = ("iss", "aud", "exp"),
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The verified claims: signature with ``key``, ``iss``, ``aud``, ``exp``/``nbf`` (and ``iat`` not in the future)
    with ``leeway_s``; every claim in ``require`` present. Else ``TokenError`` saying which check failed."""
    header = token_header(token)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=[header["alg"]],
            issuer=issuer,
            audience=audience,
            leeway=leeway_s,
            options={"require": list(require), "strict_aud": False},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("token not yet valid (nbf or iat in the future)") from None
    except jwt.InvalidAudienceError:
        raise TokenError("token audience is not this service") from None
    except jwt.InvalidIssuerError:
        raise TokenError("token issuer is not the one configured") from None
    except jwt.MissingRequiredClaimError as err:
        raise TokenError(f"token lacks the {err.claim!r} claim") from None
    except jwt.InvalidSignatureError:
        raise TokenError("token signature does not verify") from None
    except jwt.PyJWTError as err:  # malformed claims (a non-numeric exp, ...) and key/algorithm mismatches
        raise TokenError(f"token refused ({type(err).__name__})") from None
    iat = claims.get("iat")
    if isinstance(iat, int | float) and iat > now() + leeway_s:  # PyJWT checks this too; not every version did
        raise TokenError("token not yet valid (nbf or iat in the future)")
    return claims


class JwksCache:
    """The keys of one JWKS URL, fetched when first needed, kept ``ttl_s``, refreshed on an unknown ``kid``.

    Thread-safe: the API verifies tokens on several worker threads. ``setting`` names the STROKEWATCH_* variable
    that holds ``url``, for error messages."""

    def __init__(
        self,
        url: str,
        *,
        setting: str,
        ttl_s: float = 300.0,
        timeout_s: float = 5.0,
        max_bytes: int = MAX_JWKS_BYTES,
        min_refetch_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.setting = setting
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.min_refetch_s = min_refetch_s
        self._clock = clock
        self._owns_client = client is None
        # No redirects: the key source is exactly the configured URL.
        self._client = client or httpx.Client(
            timeout=timeout_s, verify=tls or default_context(), follow_redirects=False
        )
        self._lock = threading.Lock()
        self._keys: list[dict[str, Any]] | None = None
        self._fetched_at = float("-inf")
        self.fetches = 0  # for tests and metrics: how often the URL was actually read

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The verification key for a token's ``kid`` and ``alg``; one refetch when the ``kid`` is unknown."""
        with self._lock:
            now = self._clock()
            if self._keys is None or now - self._fetched_at >= self.ttl_s:
                self._refresh(now)
            found = _select(self._keys or [], kid, alg)
            if found is None and now - self._fetched_at >= self.min_refetch_s:
                self._refresh(now)  # a rotated key: the IdP publishes it before signing with it
                found = _select(self._keys or [], kid, alg)
        if found is None:
            named = f"kid {kid[:64]!r}" if kid else "no kid"
            raise TokenError(f"no {alg} key with {named} in the JWKS at {self.url}")
        return found

    def _refresh(self, now: float) -> None:
        try:
            self._keys = self._fetch()
        except KeySourceError:
            self._fetched_at = now  # wait min_refetch_s before trying again; keep the keys we had, if any
            if self._keys is None:
                raise
            log.warning("JWKS %s could not be refreshed; using the keys fetched before", self.url)
            return
        self._fetched_at = now

    def _fetch(self) -> list[dict[str, Any]]:
        self.fetches += 1
        where = f"the JWKS at {self.url} ({self.setting})"
        try:
            with self._client.stream("GET", self.url, headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise KeySourceError(f"{where} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    raise KeySourceError(f"{where} is larger than {self.max_bytes} bytes")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise KeySourceError(f"{where} is larger than {self.max_bytes} bytes")
        except httpx.HTTPError as err:
            raise KeySourceError(f"{where} could not be fetched ({type(err).__name__})") from None
        try:
            document = json.loads(bytes(body))
        except ValueError:
            raise KeySourceError(f"{where} is not JSON") from None
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise KeySourceError(f"{where} has no 'keys' list")
        return [k for k in keys if isinstance(k, dict)]


def _select(keys: list[dict[str, Any]], kid: str | None, alg: str) -> jwt.PyJWK | None:
    """The one usable key for ``alg`` (with ``kid`` when the token names one; without, only if unambiguous)."""
    candidates = [k for k in keys if _usable(k, alg) and (kid is None or k.get("kid") == kid)]
    if not candidates or (kid is None and len(candidates) > 1):
        return None
    try:
        key = jwt.PyJWK(candidates[0], algorithm=alg)
    except jwt.PyJWTError:
        log.warning("a %s key in the JWKS could not be loaded; ignored", alg)
        return None
    material = key.key
    if isinstance(material, rsa.RSAPublicKey) and material.key_size < MIN_RSA_BITS:
        log.warning("an RSA key of %d bits in the JWKS is too short; ignored", material.key_size)
        return None
    if alg == "ES256" and not (isinstance(material, ec.EllipticCurvePublicKey) and material.curve.name == "secp256r1"):
        return None
    return key


def _usable(jwk: Mapping[str, Any], alg: str) -> bool:
    kty = {"RS256": "RSA", "ES256": "EC"}[alg]
    return (
        jwk.get("kty") == kty
        and jwk.get("use", "sig") == "sig"
        and jwk.get("alg", alg) == alg
        and "d" not in jwk  # a private key published by mistake is not used
    )
