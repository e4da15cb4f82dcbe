"""Secrets out of everything shown to people: the CLI, the API, `doctor`, log records, failure messages.

One place decides what a secret looks like in text: the password in a URL's user info
(``postgresql://user:***@db/x``), password-, secret- and token-like parameters (``?access_token=***``,
``password=***`` in a libpq DSN, ``"client_secret": "***"``) and HTTP credentials (``Bearer ***``).
Identifiers that are PHI (an MRN) cannot be recognised by their shape: a caller that knows them passes
them to ``describe_exception``, which replaces them with their pseudonym. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import overload

from integration.domain.identity import pseudonym

MASK = "***"

#: scheme://user:password@host -- the password runs to the last "@" of the URL (raw "@" and "/" in passwords
#: are common in hand-written URLs): an "@" in a path costs some over-masking, never a leak.
_URL_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*):(?P<password>\S*?)@(?=[^\s@]*(?:\s|$))")
_SECRET_WORDS = r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|signature|credential)"
#: key=value (query strings, DSNs, form bodies) whose key names a secret.
_SECRET_PARAM = re.compile(rf"(?i)(?P<key>\b[\w.\-]*{_SECRET_WORDS}[\w.\-]*=)(?P<value>[^\s&;,#'\"]+)")
#: "key": "value" (JSON) whose key names a secret.
_SECRET_JSON = re.compile(rf"(?i)(?P<key>\"[\w.\-]*{_SECRET_WORDS}[\w.\-]*\"\s*:\s*\")(?P<value>[^\"]*)(?=\")")
#: Authorization header values; a credential is long, so "basic auth" stays readable.
_AUTH_SCHEME = re.compile(r"(?i)\b(?P<scheme>bearer|basic)\s+(?P<value>[A-Za-z0-9\-._~+/]{12,}=*)")


def redact_text(text: str) -> str:
    """``text`` with every credential it carries replaced by ``***``; the rest left as it was."""
    text = _URL_USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _SECRET_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _SECRET_JSON.sub(lambda m: f"{m['key']}{MASK}", text)
    return _AUTH_SCHEME.sub(lambda m: f"{m['scheme']} {MASK}", text)


@overload
def redact_url(url: str) -> str: ...
@overload
def redact_url(url: None) -> None: ...
def redact_url(url: str | None) -> str | None:
    """A URL fit to show: ``redis://:***@host:6379/0``, ``postgresql://user:***@db/x``. None stays None."""
    return None if url is None else redact_text(url)


def describe_exception(exc: BaseException, identifiers: Iterable[str | None] = (), limit: int = 200) -> str:
    """An unexpected exception for a failure record or a log line: its type and the first line of its
    message, credentials redacted and each of ``identifiers`` (PHI the caller knows, e.g. the study's
    PatientID) replaced by its pseudonym; at most ``limit`` characters of message. Never ``repr(exc)``:
    a driver's exception can carry bound parameters and URLs."""
    lines = str(exc).splitlines()
    message = redact_text(lines[0]) if lines else ""
    for value in sorted({v for v in identifiers if v and len(v) >= 3}, key=len, reverse=True):
        message = re.sub(re.escape(value), pseudonym(value), message, flags=re.IGNORECASE)  # "p:<hex>": no escapes
    if len(message) > limit:
        message = message[:limit] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
