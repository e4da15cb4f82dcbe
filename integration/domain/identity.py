"""Deterministic assessment identity (the same inputs always give the same RiskAssessment.identifier), and
keyed pseudonyms that stand in for patient identifiers in logs and messages."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime


def assessment_identifier(patient_fhir_id: str, study_uid: str | None, window_end: datetime, model_version: str) -> str:
    """sha256 over (patient, study UID, vitals window end, model version), hex, 40 chars.

    A retry, a re-sent study or a replayed task computes the same value, so a conditional create on it
    never duplicates. New data (a new study, later vitals) or a new model gives a new identifier.
    ``window_end`` must come from the inputs alone (``domain.window.window_end``), never from the clock:
    an end clamped to "now" would give a future-dated study a new identity at every run.
    """
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    key = "|".join(
        [patient_fhir_id, study_uid or "-", window_end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), model_version]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:40]


#: A configured key shorter than this is refused (HMAC-SHA256 keys should carry at least 128 bits).
MIN_PSEUDONYM_KEY_BYTES = 16


class Pseudonymizer:
    """Keyed pseudonyms for logs and failure messages: ``p:`` + 16 hex of HMAC-SHA256(key, value).

    Stable for one key (the same MRN gives the same pseudonym, so log lines can be correlated), and
    without the key an MRN cannot be recovered by hashing candidate MRNs. The key never appears in a repr.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_PSEUDONYM_KEY_BYTES:
            raise ValueError(f"a pseudonym key needs at least {MIN_PSEUDONYM_KEY_BYTES} bytes")
        self._key = key

    def __call__(self, value: str | None) -> str:
        if not value:
            return "-"
        return "p:" + hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return "Pseudonymizer(key=***)"


# Until the composition root installs the configured key (``use_pseudonym_key``), a random key of this
# process: pseudonyms are keyed from the first one on, only not stable across processes.
_active = Pseudonymizer(secrets.token_bytes(32))


def use_pseudonym_key(key: bytes) -> None:
    """Install the deployment's key for ``pseudonym`` in this process (called by ``integration.bootstrap``)."""
    global _active
    _active = Pseudonymizer(key)


def pseudonym(value: str | None) -> str:
    """A keyed, stable stand-in for an identifier (PatientID, MRN) in logs and messages: PHI never appears."""
    return _active(value)
