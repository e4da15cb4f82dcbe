"""``deploy/settings.env``: every setting the engine reads, one commented line each with its default, generated
from ``integration.config.Settings`` (a test fails when the file and the model disagree).

Operators copy it, uncomment what they set and hand it to the engine: compose's ``env_file``
(``STROKEWATCH_ENV_FILE``), Kustomize's ``configMapGenerator`` ``envs``. Secret settings are listed as the
file names they take in the secrets directory (``STROKEWATCH_SECRETS_DIR``: compose's ``secrets``, a Kubernetes
Secret mounted as a volume), never as values. Regenerate: ``python -m integration.settings_reference``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from integration.config import Settings, env_variable, secret_setting_paths, setting_paths

REFERENCE = Path(__file__).resolve().parents[1] / "deploy" / "settings.env"

_HEADER = """\
# StrokeWatch settings: every STROKEWATCH_* variable the engine reads, with its default (generated from
# integration/config.py by `python -m integration.settings_reference`; do not edit, copy it).
# Copy this file, uncomment and set what your site needs:
#   docker compose: STROKEWATCH_ENV_FILE=./strokewatch.env in .env (compose's env_file)
#   Kubernetes:     the overlay's settings.env (configMapGenerator envs); docs/operating.md
# Values: as in a shell without quotes; lists and maps as JSON. An empty value is the default.
# Secret settings are files in the secrets directory (STROKEWATCH_SECRETS_DIR; compose secrets, a Kubernetes
# Secret) named as shown, or STROKEWATCH_<NAME>_FILE=/path. Never put their values in this file.
"""


def _default_text(path: tuple[str, ...]) -> str:
    """The default of one setting as its variable would spell it (read from the model, not this environment)."""
    value: Any = Settings.model_fields[path[0]].get_default(call_default_factory=True)
    for name in path[1:]:
        value = getattr(value, name)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps([v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value],
                          separators=(",", ":"))
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def render() -> str:
    secrets = set(secret_setting_paths(Settings))
    lines = [_HEADER]
    group = ""
    for path in setting_paths(Settings):
        top = path[0] if len(path) > 1 else ""
        if top != group:
            group = top
            lines.append(f"\n# -- {group} --")
        if path in secrets:
            lines.append(f"# secret: file {'__'.join(path)}  ({env_variable(path)})")
        else:
            lines.append(f"# {env_variable(path)}={_default_text(path)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        if REFERENCE.read_text() != render():
            print(f"{REFERENCE} is out of date: python -m integration.settings_reference", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(render())
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
