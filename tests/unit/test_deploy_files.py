"""Deployment files that cannot run here (no Docker engine) are still validated offline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_docker_compose_file_is_valid() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (deploy/local/setup.sh installs it)")
    env = {**os.environ, "POSTGRES_PASSWORD": "example-only", "STROKEWATCH_EHR__BASE_URL": "http://ehr/fhir"}
    out = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for service in ("api:", "worker:", "beat:", "triton:", "postgres:", "redis:", "migrate:"):
        assert f"  {service}" in out.stdout
    # the engine is configured only through STROKEWATCH_* variables, never with secrets in the file
    assert "STROKEWATCH_BROKER_URL: redis://redis:6379/0" in out.stdout


def test_compose_refuses_to_start_without_required_secrets() -> None:
    exe = shutil.which("docker-compose") or "docker-compose"
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "STROKEWATCH_EHR__BASE_URL")}
    out = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], env=env,
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode != 0 and "POSTGRES_PASSWORD" in out.stderr


def test_dockerfile_copies_what_exists() -> None:
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and not any("model" in line or "torch" in line for line in installs)  # serving needs no torch


def _compose_api_env(extra: dict[str, str]) -> dict[str, str]:
    import yaml

    exe = shutil.which("docker-compose") or "docker-compose"
    env = {**os.environ, "POSTGRES_PASSWORD": "example-only", "STROKEWATCH_EHR__BASE_URL": "http://ehr/fhir", **extra}
    out = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {k: str(v) for k, v in yaml.safe_load(out.stdout)["services"]["api"]["environment"].items()}


def test_the_compose_api_refuses_to_start_without_a_credential_and_starts_with_an_api_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from integration.config import Settings
    from integration.entrypoints.api.security.guard import startup_problem

    for key in [k for k in os.environ if k.startswith("STROKEWATCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no strokewatch.toml of the checkout
    for name, value in _compose_api_env({}).items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.api_host == "0.0.0.0"
    problem = startup_problem(settings)
    assert problem is not None and "STROKEWATCH_API__KEYS__<NAME>" in problem

    line = "operate:" + "ab" * 32
    for name, value in _compose_api_env({"STROKEWATCH_API__KEYS": f'{{"ops": "{line}"}}'}).items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert startup_problem(settings) is None and len(settings.api.keys) == 1


# -- the image's data_dir: created and owned by the engine's user before it becomes a volume ----------------------


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments and blank lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def _env_pairs(arguments: str) -> dict[str, str]:
    import shlex

    return dict(part.split("=", 1) for part in shlex.split(arguments) if "=" in part)


def _volume_paths(arguments: str) -> list[str]:
    import json

    return [str(p) for p in json.loads(arguments)] if arguments.startswith("[") else arguments.split()


def test_the_image_data_dir_is_made_and_owned_by_the_engine_user_before_it_becomes_a_volume() -> None:
    import re

    steps = _dockerfile_instructions((ROOT / "deploy/docker/Dockerfile").read_text())
    kinds = [kind for kind, _ in steps]
    users = [args for kind, args in steps if kind == "USER"]
    assert len(users) == 1, users
    user = users[0].split(":")[0]
    assert user not in ("root", "0") and any(kind == "RUN" and re.search(rf"useradd\b.*\b{user}\b", args)
                                             for kind, args in steps), user
    volumes = [(i, args) for i, (kind, args) in enumerate(steps) if kind == "VOLUME"]
    assert len(volumes) == 1, volumes
    volume_at, volume = volumes[0]
    paths = _volume_paths(volume)
    data_dirs = [_env_pairs(args)["STROKEWATCH_DATA_DIR"] for kind, args in steps
                 if kind == "ENV" and "STROKEWATCH_DATA_DIR" in _env_pairs(args)]
    assert data_dirs and paths == [data_dirs[-1]], (data_dirs, paths)
    data_dir = data_dirs[-1]
    # made and chowned as root: before USER (a RUN after it runs as the engine's user), and before VOLUME
    # (changes to a volume's path after VOLUME are discarded)
    user_at = kinds.index("USER")
    prepared = [args for kind, args in steps[: min(user_at, volume_at)] if kind == "RUN"]
    assert any(re.search(rf"mkdir\b[^&;]*\s{re.escape(data_dir)}(\s|$)", args) for args in prepared), prepared
    assert any(re.search(rf"chown\s+(-R\s+)?{user}(:{user})?\s+{re.escape(data_dir)}(\s|$)", args)
               for args in prepared), prepared


def test_compose_mounts_the_engine_volume_at_the_image_data_dir() -> None:
    import yaml

    steps = _dockerfile_instructions((ROOT / "deploy/docker/Dockerfile").read_text())
    volume = _volume_paths(next(args for kind, args in steps if kind == "VOLUME"))[0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    engine_services = {name: svc for name, svc in compose["services"].items()
                       if str(svc.get("image", "")).startswith("strokewatch/engine")}
    assert {"api", "worker", "beat", "migrate"} <= set(engine_services)
    for name, svc in engine_services.items():
        targets = [str(v).split(":")[1] for v in svc.get("volumes", []) if isinstance(v, str) and ":" in v]
        assert volume in targets, (name, targets)
        assert svc.get("environment", {}).get("STROKEWATCH_DATA_DIR", volume) == volume, name
    beat = engine_services["beat"]["command"]
    schedule = beat[beat.index("--schedule") + 1]
    assert Path(schedule).parent == Path(volume)
