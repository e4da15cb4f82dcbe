"""A tiny identity provider on loopback (keys made with `cryptography`, a JWKS served over real HTTP, tokens signed
with PyJWT) for the API's auth tests, and the tests of the JWKS verifier (`adapters/jwks.py`) against it.

The other API security tests import `Idp` from here.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from integration.adapters.jwks import JwksCache, KeySourceError, TokenError, token_header, verify


class Idp:
    """Signing keys and the JWKS that publishes their public halves, at ``jwks_url`` on 127.0.0.1.

    ``rogue`` keys sign with the same ``kid`` as the published ones but are not published (a forged signature).
    ``body`` replaces the served document (for size tests); ``delay_s`` stalls each answer (timeouts)."""

    def __init__(self, issuer: str = "https://idp.test/realms/hospital") -> None:
        self.issuer = issuer
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rogue_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kids = {"rsa": "rsa-1", "ec": "ec-1"}
        self.extra_keys: list[dict[str, Any]] = []
        self.body: bytes | None = None
        self.delay_s = 0.0
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Idp:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/jwks.json"

    def jwks(self) -> dict[str, Any]:
        keys = [
            {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": self.kids["rsa"], "use": "sig",
             "alg": "RS256"},
            {**ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": self.kids["ec"], "use": "sig",
             "alg": "ES256"},
        ]
        return {"keys": keys + self.extra_keys}

    def token(
        self,
        *,
        key: str = "rsa",
        headers: dict[str, Any] | None = None,
        lifetime_s: float = 300,
        issued_ago_s: float = 0,
        **claims: Any,
    ) -> str:
        """A signed JWT: ``key`` rsa | ec | rogue (same kid as rsa, not published). Claims default to this issuer,
        now, ``lifetime_s``, a fresh ``jti``; pass ``name=None`` to leave a claim out."""
        now = int(time.time() - issued_ago_s)
        payload: dict[str, Any] = {"iss": self.issuer, "iat": now, "exp": now + int(lifetime_s),
                                   "jti": str(uuid.uuid4()), "sub": "tester"}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        signer, alg, kid = {
            "rsa": (self.rsa, "RS256", self.kids["rsa"]),
            "ec": (self.ec, "ES256", self.kids["ec"]),
            "rogue": (self.rogue_rsa, "RS256", self.kids["rsa"]),
        }[key]
        return jwt.encode(payload, signer, algorithm=alg, headers={"kid": kid, "typ": "JWT", **(headers or {})})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                idp.requests.append(self.path)
                if idp.delay_s:
                    time.sleep(idp.delay_s)
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                body = idp.body if idp.body is not None else json.dumps(idp.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def idp() -> Iterator[Idp]:
    with Idp() as provider:
        yield provider


def _cache(idp: Idp, **kwargs: Any) -> JwksCache:
    return JwksCache(idp.jwks_url, setting="STROKEWATCH_TEST_JWKS", **kwargs)


def test_rs256_and_es256_tokens_verify_with_keys_fetched_once_and_cached(idp: Idp) -> None:
    cache = _cache(idp, ttl_s=300)
    for kind, alg in (("rsa", "RS256"), ("ec", "ES256")):
        token = idp.token(key=kind, aud="strokewatch-api")
        claims = verify(token, cache.key(idp.kids[kind], alg), issuer=idp.issuer, audience="strokewatch-api",
                        leeway_s=30)
        assert claims["sub"] == "tester"
    assert cache.fetches == 1 and idp.requests == ["/jwks.json"]


def test_an_unknown_kid_refetches_once_then_the_rotated_key_is_found(idp: Idp) -> None:
    clock = [1000.0]
    cache = _cache(idp, ttl_s=300, min_refetch_s=10, clock=lambda: clock[0])
    cache.key("rsa-1", "RS256")
    idp.kids["rsa"] = "rsa-2"  # the IdP rotates: a new kid is published
    clock[0] += 11
    assert cache.key("rsa-2", "RS256") is not None
    assert cache.fetches == 2
    # A made-up kid right after: refused without another fetch (no fetch loop on attacker-chosen kids).
    with pytest.raises(TokenError, match="no RS256 key with kid 'made-up'"):
        cache.key("made-up", "RS256")
    assert cache.fetches == 2
    clock[0] += 301  # the TTL passed: fetched again
    cache.key("rsa-2", "RS256")
    assert cache.fetches == 3


def test_a_jwks_over_the_size_cap_or_too_slow_is_refused_naming_the_setting(idp: Idp) -> None:
    idp.body = b'{"keys": [' + b" " * 300_000 + b"]}"
    with pytest.raises(KeySourceError, match="larger than 262144 bytes") as big:
        _cache(idp).key("rsa-1", "RS256")
    assert "STROKEWATCH_TEST_JWKS" in big.value.reason
    idp.body = None
    idp.delay_s = 1.5
    started = time.monotonic()
    with pytest.raises(KeySourceError, match="could not be fetched"):
        _cache(idp, timeout_s=0.5).key("rsa-1", "RS256")
    assert time.monotonic() - started < 1.4


@pytest.mark.parametrize("alg", ["none", "HS256", "RS512", "PS256"])
def test_algorithms_other_than_rs256_and_es256_are_refused_before_any_key_lookup(idp: Idp, alg: str) -> None:
    claims = {"iss": idp.issuer, "aud": "api", "exp": int(time.time()) + 60}
    signer: Any = {"none": None, "HS256": "a-shared-secret-of-32-characters"}.get(alg, idp.rsa)
    token = jwt.encode(claims, signer, algorithm=alg, headers={"kid": "rsa-1"})
    with pytest.raises(TokenError, match="not accepted"):
        token_header(token)
    key = _cache(idp).key("rsa-1", "RS256")  # even handed the right key, verify refuses the algorithm
    with pytest.raises(TokenError, match="not accepted"):
        verify(token, key, issuer=idp.issuer, audience="api", leeway_s=30)


def test_short_rsa_keys_and_published_private_keys_are_not_used(idp: Idp) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    idp.extra_keys = [{**RSAAlgorithm.to_jwk(weak.public_key(), as_dict=True), "kid": "weak"},
                      {**RSAAlgorithm.to_jwk(idp.rsa, as_dict=True), "kid": "private"}]
    cache = _cache(idp)
    for kid in ("weak", "private"):
        with pytest.raises(TokenError, match="no RS256 key"):
            cache.key(kid, "RS256")


def test_each_failed_check_says_which_without_the_token(idp: Idp) -> None:
    cache = _cache(idp)
    key = cache.key("rsa-1", "RS256")
    cases = {
        "token expired": idp.token(aud="api", lifetime_s=60, issued_ago_s=600),
        "token audience is not this service": idp.token(aud="another-api"),
        "token issuer is not the one configured": idp.token(aud="api", iss="https://evil.test"),
        "not yet valid": idp.token(aud="api", nbf=int(time.time()) + 600),
        "signature does not verify": idp.token(key="rogue", aud="api"),
        "lacks the 'exp' claim": idp.token(aud="api", exp=None),
    }
    for reason, token in cases.items():
        with pytest.raises(TokenError) as refused:
            verify(token, key, issuer=idp.issuer, audience="api", leeway_s=30)
        assert reason in refused.value.reason and token not in str(refused.value)
    # Within the leeway a token just expired still passes: clocks differ a little.
    verify(idp.token(aud="api", lifetime_s=60, issued_ago_s=80), key, issuer=idp.issuer, audience="api", leeway_s=30)
