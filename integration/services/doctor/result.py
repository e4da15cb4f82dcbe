"""The value every doctor check returns, and helpers shared by the checks."""

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


def short_error(exc: Exception) -> str:
    text_ = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__
