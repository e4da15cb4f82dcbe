"""Deployment files that cannot run here (no Docker engine) are still validated offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


PROFILES = ("", "integration", "gpu", "dicom-push")
ENGINE_SERVICES = {"migrate", "api", "worker-ingest", "worker-assess", "beat", "scp"}


def compose_config(*, profile: str = "", env: dict[str, str] | None = None) -> dict[str, Any]:
    """``docker-compose config`` (Debian's Compose 1.29, offline) of the checkout's file, parsed."""
    import yaml

    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (deploy/local/setup.sh installs it)")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("STROKEWATCH_", "COMPOSE_"))}
    argv = [exe, "-f", str(ROOT / "docker-compose.yml"), *(["--profile", profile] if profile else []), "config"]
    out = subprocess.run(argv, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(yaml.safe_load(out.stdout))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_valid_and_every_long_running_service_has_a_health_check(profile: str) -> None:
    config = compose_config(profile=profile)
    services = config["services"]
    wanted = {"": ENGINE_SERVICES - {"scp"} | {"postgres", "redis"}, "integration": {"hapi", "hapi-db", "orthanc"},
              "gpu": {"triton"}, "dicom-push": {"scp"}}[profile]
    assert wanted <= set(services)
    for name in wanted:
        if profile:
            assert profile in services[name].get("profiles", []), name
        health = services[name].get("healthcheck", {})
        if name == "migrate":  # a one-shot: its exit status is what the others wait for
            assert health.get("test") == ["NONE"]  # compose's spelling of disable: true
            continue
        assert health.get("test") and health["test"] != ["NONE"], name


def test_the_gpu_profile_reserves_a_gpu_for_triton_and_serves_the_model_repository() -> None:
    triton = compose_config(profile="gpu")["services"]["triton"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    repo = next(a.split("=", 1)[1] for a in triton["command"] if a.startswith("--model-repository="))
    assert any(str(v).endswith(f"triton_models:{repo}:ro") or (isinstance(v, dict) and v.get("target") == repo)
               for v in triton["volumes"])
    assert (ROOT / "triton_models" / "stroke_fusion" / "config.pbtxt").exists()


def test_the_integration_profile_wires_the_engine_to_its_hapi_fhir_and_orthanc() -> None:
    services = compose_config(profile="integration")["services"]
    env = services["worker-ingest"]["environment"]
    assert env["STROKEWATCH_EHR__BASE_URL"] == "http://hapi:8080/fhir"
    assert env["STROKEWATCH_PACS__DICOMWEB_URL"] == "http://orthanc:8042/dicom-web"
    hapi = services["hapi"]
    assert hapi["image"].startswith("hapiproject/hapi:")
    assert hapi["environment"]["spring.datasource.url"] == "jdbc:postgresql://hapi-db:5432/hapi"
    assert hapi["depends_on"]["hapi-db"]["condition"] == "service_healthy"
    # HAPI's database password: one secret file, read by both (Spring's config tree; the postgres image's _FILE)
    (secret,) = hapi["secrets"]
    assert secret["target"] == "spring.datasource.password" and "configtree:/run/secrets/" in hapi["environment"][
        "spring.config.import"]
    assert services["hapi-db"]["environment"]["POSTGRES_PASSWORD_FILE"] == f"/run/secrets/{secret['source']}"
    orthanc = services["orthanc"]
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert orthanc["environment"]["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    assert [s["target"] for s in orthanc["secrets"]] == ["ORTHANC__REGISTERED_USERS"]
    assert env["STROKEWATCH_PACS__AUTH__MODE"] == "basic" and env["STROKEWATCH_PACS__AUTH__USERNAME"] == "strokewatch"


def test_no_secret_is_a_variable_every_secret_is_a_file() -> None:
    config = compose_config(profile="integration")
    for name, svc in config["services"].items():
        env = svc.get("environment", {})
        assert not any(k.endswith("PASSWORD") or k in ("STROKEWATCH_DATABASE_URL",) for k in env), name
        for secret in svc.get("secrets", []):
            assert Path(config["secrets"][secret["source"]]["file"]).parent.parent == ROOT, secret
    assert config["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    for name in ENGINE_SERVICES:
        svc = config["services"][name]
        (secret,) = svc["secrets"]
        assert f"/run/secrets/{secret['target']}" == svc["environment"]["STROKEWATCH_SECRETS_DIR"], name


def _make_secrets(tmp_path: Path) -> Path:
    """deploy/compose/make-secrets.sh run in a copy of the layout it expects; returns the copy's root."""
    script = tmp_path / "deploy" / "compose" / "make-secrets.sh"
    script.parent.mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "compose" / "make-secrets.sh", script)
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tmp_path


def test_make_secrets_writes_matching_random_passwords_once(tmp_path: Path) -> None:
    root = _make_secrets(tmp_path)
    password = (root / "secrets" / "postgres_password").read_text().strip()
    assert len(password) >= 32 and password != (root / "secrets" / "hapi_db_password").read_text().strip()
    url = (root / "secrets" / "strokewatch" / "database_url").read_text().strip()
    assert url == f"postgresql+psycopg://strokewatch:{password}@postgres:5432/strokewatch"
    _make_secrets_again = subprocess.run(["bash", str(root / "deploy/compose/make-secrets.sh")], capture_output=True,
                                         text=True, timeout=60)
    assert _make_secrets_again.returncode == 0
    assert (root / "secrets" / "postgres_password").read_text().strip() == password  # kept, never rotated silently
    # the integration Orthanc's one user and the engine's PACS password are the same random one
    users = json.loads((root / "secrets" / "orthanc_registered_users").read_text())
    assert users == {"strokewatch": (root / "secrets" / "strokewatch" / "pacs__auth__password").read_text().strip()}
    assert len(users["strokewatch"]) >= 32
    compose = (ROOT / "docker-compose.yml").read_text()
    for name in ("postgres_password", "hapi_db_password", "orthanc_registered_users", "strokewatch"):
        assert f"file: ./secrets/{name}" in compose and (root / "secrets" / name).exists()


def test_dockerfile_copies_what_exists() -> None:
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and not any("model" in line or "torch" in line for line in installs)  # serving needs no torch


def test_the_compose_api_refuses_to_start_without_a_credential_and_starts_with_an_api_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The API's environment as compose renders it, its secrets directory as make-secrets.sh writes it."""
    from integration.config import Settings
    from integration.entrypoints.api.security.guard import startup_problem

    secrets_dir = _make_secrets(tmp_path / "project") / "secrets" / "strokewatch"
    for key in [k for k in os.environ if k.startswith("STROKEWATCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no strokewatch.toml of the checkout

    def api_settings(settings_file: str) -> Settings:
        (tmp_path / "strokewatch.env").write_text(settings_file)
        env = compose_config(env={"STROKEWATCH_ENV_FILE": str(tmp_path / "strokewatch.env")})["services"]["api"][
            "environment"]
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        monkeypatch.setenv("STROKEWATCH_SECRETS_DIR", str(secrets_dir))  # where compose mounts ./secrets/strokewatch
        return Settings()

    settings = api_settings("")
    assert settings.api_host == "0.0.0.0" and settings.db_url.startswith("postgresql+psycopg://strokewatch:")
    assert settings.pacs.auth.mode == "basic" and settings.pacs.auth.password is not None  # the integration Orthanc
    problem = startup_problem(settings)
    assert problem is not None and "STROKEWATCH_API__KEYS__<NAME>" in problem

    line = "operate:" + "ab" * 32
    settings = api_settings(f'STROKEWATCH_API__KEYS={{"ops": "{line}"}}\n')
    assert startup_problem(settings) is None and len(settings.api.keys) == 1


def test_every_setting_is_settable_in_compose(tmp_path: Path) -> None:
    """Every setting the model declares, set in the settings file (the env_file) or in .env, reaches every engine
    service, except the few the compose file wires itself; every secret setting is a file of the secrets directory."""
    from integration.config import Settings, env_variable, secret_setting_paths, setting_paths

    secrets = set(secret_setting_paths(Settings))
    markers = {env_variable(p): f"marker-{i}" for i, p in enumerate(setting_paths(Settings)) if p not in secrets}
    assert len(markers) > 100  # derived from the model, not a hand list
    (tmp_path / "all.env").write_text("".join(f"{k}={v}\n" for k, v in markers.items()))
    # the same values in the shell too: settings that compose substitutes (${VAR:-default}) take them from there
    config = compose_config(profile="dicom-push", env={**markers, "STROKEWATCH_ENV_FILE": str(tmp_path / "all.env")})
    wired = {"STROKEWATCH_DATA_DIR", "STROKEWATCH_API_HOST", "STROKEWATCH_SCP__ENABLED", "STROKEWATCH_SCP__HOST"}
    for name in ENGINE_SERVICES:
        env = config["services"][name]["environment"]
        missing = [k for k, v in markers.items() if str(env.get(k)) != v and k not in wired]
        assert missing == [], (name, missing)
    # secret settings: files named after them in the mounted secrets directory (SecretFilesSource reads them)
    from integration.config import SecretFilesSource

    directory = tmp_path / "secrets"
    directory.mkdir()
    for path in secrets:
        (directory / "__".join(path)).write_text("secret-" + "__".join(path))
    values = SecretFilesSource(Settings, {"STROKEWATCH_SECRETS_DIR": str(directory)})()
    for path in secrets:
        group: Any = values
        for part in path:
            group = group[part]
        assert group == "secret-" + "__".join(path)


def test_the_settings_reference_is_generated_from_the_model() -> None:
    from integration.config import Settings, env_variable, secret_setting_paths, setting_paths
    from integration.settings_reference import REFERENCE, render

    assert REFERENCE.read_text() == render(), "python -m integration.settings_reference"
    text = REFERENCE.read_text()
    secrets = set(secret_setting_paths(Settings))
    for path in setting_paths(Settings):
        if path in secrets:
            assert f"# secret: file {'__'.join(path)}  ({env_variable(path)})" in text
        else:
            assert f"# {env_variable(path)}=" in text


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
    assert set(engine_services) >= ENGINE_SERVICES
    for name, svc in engine_services.items():
        targets = [str(v).split(":")[1] for v in svc.get("volumes", []) if isinstance(v, str) and ":" in v]
        assert volume in targets, (name, targets)
        assert svc.get("environment", {}).get("STROKEWATCH_DATA_DIR", volume) == volume, name
    beat = engine_services["beat"]["command"]
    schedule = beat[beat.index("--schedule") + 1]
    assert Path(schedule).parent == Path(volume)
