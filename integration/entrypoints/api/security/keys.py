"""API keys for machine clients: 256 random bits, shown once, stored only as their SHA-256 (a hash of a
high-entropy key needs no salt or slow KDF), matched in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from integration.entrypoints.api.security.policy import Principal, Role

PREFIX = "swk_"
MAX_KEY_LENGTH = 256
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
HEADER = "X-API-Key"


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def settings_line(name: str, role: Role, key: str) -> str:
    """The variable that admits ``key`` (its hash, never the key): ``STROKEWATCH_API__KEYS__NAME=role:sha256``."""
    if not NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: use lower-case letters, digits and '_' (at most 40, a letter first)")
    return f"STROKEWATCH_API__KEYS__{name.upper()}={role.value}:{digest(key)}"


class ApiKeys:
    """The configured keys (``api.keys``: name -> ``role:sha256 hex``)."""

    def __init__(self, configured: dict[str, str]) -> None:
        self._entries: list[tuple[str, Role, bytes]] = []
        for name, value in configured.items():
            role, _, hexdigest = value.partition(":")
            self._entries.append((name, Role(role), bytes.fromhex(hexdigest)))

    def __bool__(self) -> bool:
        return bool(self._entries)

    def match(self, presented: str) -> Principal | None:
        """The key's principal, or None. Every entry is compared (no early exit), each in constant time."""
        if not presented or len(presented) > MAX_KEY_LENGTH:
            return None
        seen = hashlib.sha256(presented.encode(errors="surrogateescape")).digest()
        found: Principal | None = None
        for name, role, stored in self._entries:
            if hmac.compare_digest(seen, stored):
                roles = frozenset({Role.READ, Role.OPERATE}) if role is Role.OPERATE else frozenset({Role.READ})
                found = Principal(f"key:{name}", "api-key", roles)
        return found

    def named(self, name: str) -> Principal | None:
        """The principal of the key configured under ``name`` now (its current role), or None when there is none:
        a dashboard session made with a key ends when the key is removed, and follows a change of its role."""
        for configured, role, _ in self._entries:
            if configured == name:
                roles = frozenset({Role.READ, Role.OPERATE}) if role is Role.OPERATE else frozenset({Role.READ})
                return Principal(f"key:{name}", "api-key", roles)
        return None
