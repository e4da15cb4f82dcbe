"""CDS Hooks 2.0 "Trusting CDS Clients": the EHR signs a JWT for each call; the service accepts it only when

- ``iss`` is on the allow-list (``cds_hooks.issuers``), and the signing key comes from that issuer's JWKS URL,
  or from the token's ``jku`` header only when that URL is allow-listed for the same issuer;
- ``aud`` is this service's own URL (``cds_hooks.public_url`` + ``/cds-services/<id>``);
- ``exp`` has not passed, ``iat`` is not in the future (both with ``leeway_s``), and the token does not live
  longer than ``max_token_lifetime_s`` (the spec: at most 5 minutes);
- its ``jti`` has not been seen before from that issuer (a bounded cache, each entry kept until the token expires).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from integration.adapters.jwks import JwksCache, TokenError, token_header, unverified_claims, verify
from integration.config import CdsHooksSettings
from integration.domain.cds import SERVICE_ID
from integration.entrypoints.api.security.policy import Principal
from integration.entrypoints.api.security.replay import ReplayCache

log = logging.getLogger(__name__)
SETTING = "STROKEWATCH_CDS_HOOKS__ISSUERS"


def service_url(settings: CdsHooksSettings, api_base_url: str) -> str:
    """The ``aud`` a CDS client must send: the URL it calls the service at."""
    return f"{(settings.public_url or api_base_url).rstrip('/')}/cds-services/{SERVICE_ID}"


class CdsClientVerifier:
    def __init__(
        self, settings: CdsHooksSettings, audience: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.audience = audience
        self._clock = clock
        self._issuers = {issuer.iss: issuer for issuer in settings.issuers}
        self._jwks: dict[str, JwksCache] = {}
        self._lock = threading.Lock()
        self.seen = ReplayCache(settings.replay_cache_size, clock)

    def close(self) -> None:
        for cache in self._jwks.values():
            cache.close()

    def verify(self, token: str) -> Principal:
        if not self._issuers:
            raise TokenError(f"no CDS client is trusted: set {SETTING}")
        header = token_header(token)
        iss = unverified_claims(token).get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise TokenError("issuer not on the CDS Hooks allow-list")
        url = issuer.jwks_url
        jku = header.get("jku")
        if jku is not None:
            if jku not in (issuer.jwks_url, *issuer.jku):
                raise TokenError("jku not allow-listed for this issuer")
            url = jku
        key = self._cache(url).key(header.get("kid"), header["alg"])
        claims = verify(
            token,
            key,
            issuer=issuer.iss,
            audience=self.audience,
            leeway_s=self.settings.leeway_s,
            require=("iss", "aud", "exp", "iat", "jti"),
            now=self._clock,
        )
        self._check_lifetime(claims)
        jti = str(claims["jti"])[:256]
        if not self.seen.first_use(f"{issuer.iss} {jti}", float(claims["exp"]) + self.settings.leeway_s):
            raise TokenError("jti replayed: this token was used before")
        client = claims.get("sub") if isinstance(claims.get("sub"), str) else issuer.iss
        return Principal(f"cds:{client}", "cds-client")

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise TokenError("exp and iat must be numbers")
        if exp - iat > self.settings.max_token_lifetime_s:
            raise TokenError(f"token lives longer than {self.settings.max_token_lifetime_s:g} s")

    def _cache(self, url: str) -> JwksCache:
        with self._lock:
            if url not in self._jwks:  # only allow-listed URLs get here: the set is bounded by the settings
                self._jwks[url] = JwksCache(
                    url, setting=SETTING, ttl_s=self.settings.jwks_ttl_s, timeout_s=self.settings.timeout_s
                )
            return self._jwks[url]
