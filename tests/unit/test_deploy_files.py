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
