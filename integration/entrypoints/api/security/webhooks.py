"""Webhook callers prove who they are: an HMAC-SHA256 signature per source, or a static bearer token.

Signed calls carry two headers::

    X-StrokeWatch-Timestamp: 1767225600                 (unix seconds when the call was made)
    X-StrokeWatch-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + raw body, keyed with the source's secret>

The signature is compared in constant time; a timestamp outside ``webhooks.replay_window_s`` of this machine's
clock is stale, and a signature already accepted within the window is a replay. Either is refused, as is a call
without credentials. ``Authorization: Bearer <token>`` is the simpler alternative (no replay protection).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping

from integration.config import WebhookSettings, WebhookSourceSettings
from integration.entrypoints.api.security.policy import Principal
from integration.entrypoints.api.security.replay import ReplayCache

TIMESTAMP_HEADER = "X-StrokeWatch-Timestamp"
SIGNATURE_HEADER = "X-StrokeWatch-Signature"
SCHEME = "sha256="


class WebhookRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-StrokeWatch-Signature`` value for ``body`` sent at ``timestamp`` (what a sender computes)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


class WebhookVerifier:
    def __init__(self, settings: WebhookSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self.seen = ReplayCache(settings.replay_cache_size, clock)

    def verify(self, source: str, headers: Mapping[str, str], body: bytes) -> Principal:
        config: WebhookSourceSettings = getattr(self.settings, source)
        variable = f"STROKEWATCH_WEBHOOKS__{source.upper()}"
        if config.secret is None and config.token is None:
            raise WebhookRefused(f"webhooks from {source} are not enabled: set {variable}__SECRET (or __TOKEN)")
        if SIGNATURE_HEADER.lower() in headers or TIMESTAMP_HEADER.lower() in headers:
            if config.secret is None:
                raise WebhookRefused(f"signed webhooks from {source} are not enabled: set {variable}__SECRET")
            self._check_signature(source, config.secret.get_secret_value(), headers, body)
            return Principal(f"webhook:{source}", "webhook-hmac")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if config.token is not None and scheme.lower() == "bearer" and token:
            if hmac.compare_digest(token.strip().encode(), config.token.get_secret_value().encode()):
                return Principal(f"webhook:{source}", "webhook-bearer")
            raise WebhookRefused("bearer token does not match")
        wanted = f"{SIGNATURE_HEADER} and {TIMESTAMP_HEADER}" if config.secret is not None else "a bearer token"
        raise WebhookRefused(f"unsigned webhook: send {wanted}")

    def _check_signature(self, source: str, secret: str, headers: Mapping[str, str], body: bytes) -> None:
        stamp = headers.get(TIMESTAMP_HEADER.lower(), "").strip()
        sent = headers.get(SIGNATURE_HEADER.lower(), "").strip()
        if not stamp.isdigit() or len(stamp) > 12:
            raise WebhookRefused(f"{TIMESTAMP_HEADER} must be unix seconds")
        if not sent.startswith(SCHEME):
            raise WebhookRefused(f"{SIGNATURE_HEADER} must be '{SCHEME}<hex>'")
        window = self.settings.replay_window_s
        at = int(stamp)
        if abs(self._clock() - at) > window:
            raise WebhookRefused(f"stale webhook: timestamp more than {window:g} s from this server's clock")
        if not hmac.compare_digest(sent.encode(), signature(secret, stamp, body).encode()):
            raise WebhookRefused("signature does not match the body and timestamp")
        if not self.seen.first_use(f"{source}:{sent}", at + window):  # only verified signatures take a place
            raise WebhookRefused("replayed webhook: this signature was accepted before")
