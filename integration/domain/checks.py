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


def unreachable(name: str, url: str, exc: BaseException, setting: str) -> CheckResult:
    """A peer that did not answer at all (refused, timed out, TLS failed)."""
    hint = f"check {setting} and that the server is up"
    return CheckResult(name, False, f"{url} unreachable: {short_error(exc)}", hint)
