"""Settings: environment with nested groups, a TOML file, validation messages, placeholder secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from integration.config import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the STROKEWATCH_* variables it sets."""
    for name in list(os.environ):
        if name.startswith("STROKEWATCH_"):
            monkeypatch.delenv(name)


def test_defaults_need_no_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.db_url == f"sqlite:///{(tmp_path / 'strokewatch.db').resolve()}"
    assert s.embedded_broker and s.celery_broker_url.startswith("sqla+sqlite:///")
    assert s.pacs.auth.mode == "none" and s.ehr.auth.mode == "none"
    assert s.api_base_url == "http://127.0.0.1:8400"


def test_nested_groups_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "STROKEWATCH_PACS__DICOMWEB_URL": "http://pacs.example:8042/dicom-web",
        "STROKEWATCH_PACS__KIND": "generic",
        "STROKEWATCH_PACS__LOOKBACK_HOURS": "6.5",
        "STROKEWATCH_PACS__AUTH__MODE": "basic",
        "STROKEWATCH_PACS__AUTH__USERNAME": "engine",
        "STROKEWATCH_PACS__AUTH__PASSWORD": "a-real-password",
        "STROKEWATCH_EHR__BASE_URL": "https://ehr.example/fhir",
        "STROKEWATCH_EHR__AUTH__MODE": "oauth2",
        "STROKEWATCH_EHR__AUTH__TOKEN_URL": "https://idp.example/token",
        "STROKEWATCH_EHR__AUTH__CLIENT_ID": "strokewatch",
        "STROKEWATCH_EHR__AUTH__CLIENT_SECRET": "s3cr3t-from-vault",
        "STROKEWATCH_EHR__ISSUER_SYSTEMS": '{"HOSP-A": "urn:oid:1.2.3.4"}',
        "STROKEWATCH_POLICY__HIGH_AT_OR_ABOVE": "0.4",
        "STROKEWATCH_BROKER_URL": "redis://127.0.0.1:6379/0",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.pacs.dicomweb_url == "http://pacs.example:8042/dicom-web" and s.pacs.kind == "generic"
    assert s.pacs.lookback_hours == 6.5
    assert s.pacs.auth.password is not None and s.pacs.auth.password.get_secret_value() == "a-real-password"
    assert s.ehr.auth.mode == "oauth2" and s.ehr.auth.client_id == "strokewatch"
    assert s.policy.high_at_or_above == 0.4
    assert not s.embedded_broker
    assert s.identifier_system_for("HOSP-A") == "urn:oid:1.2.3.4"
    assert s.identifier_system_for("OTHER") == s.ehr.patient_identifier_system
    assert "s3cr3t-from-vault" not in repr(s)  # secrets stay out of reprs (and so out of logs)


def test_toml_file_supplies_defaults_that_the_environment_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "strokewatch.toml"
    config.write_text(
        'log_level = "DEBUG"\n'
        "[pacs]\n"
        'dicomweb_url = "http://from-file:8042/dicom-web"\n'
        "min_slices = 24\n"
        "[ehr]\n"
        'base_url = "http://from-file/fhir"\n'
        "[ehr.auth]\n"
        'mode = "bearer"\n'
        'token = "token-from-the-file"\n'
    )
    monkeypatch.setenv("STROKEWATCH_CONFIG", str(config))
    monkeypatch.setenv("STROKEWATCH_EHR__BASE_URL", "http://from-env/fhir")
    s = Settings()
    assert s.log_level == "DEBUG"
    assert s.pacs.dicomweb_url == "http://from-file:8042/dicom-web" and s.pacs.min_slices == 24
    assert s.ehr.base_url == "http://from-env/fhir"
    assert s.ehr.auth.mode == "bearer" and s.ehr.auth.token is not None


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("STROKEWATCH_CONFIG", str(missing))
    with pytest.raises(ValueError, match="nope.toml"):
        Settings()


def test_unknown_keys_in_the_file_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("log_levl = 'DEBUG'\n")
    monkeypatch.setenv("STROKEWATCH_CONFIG", str(config))
    with pytest.raises(ValidationError, match="log_levl"):
        Settings()


@pytest.mark.parametrize(
    ("mode", "given", "missing"),
    [
        ("basic", {"USERNAME": "engine"}, "password"),
        ("bearer", {}, "token"),
        ("oauth2", {"CLIENT_ID": "engine", "CLIENT_SECRET": "a-real-secret"}, "token_url"),
    ],
)
def test_auth_mode_names_what_it_lacks(
    monkeypatch: pytest.MonkeyPatch, mode: str, given: dict[str, str], missing: str
) -> None:
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__MODE", mode)
    for key, value in given.items():
        monkeypatch.setenv(f"STROKEWATCH_EHR__AUTH__{key}", value)
    with pytest.raises(ValidationError) as err:
        Settings()
    assert f"auth mode '{mode}' needs" in str(err.value) and missing in str(err.value)
    assert err.value.errors()[0]["loc"][:2] == ("ehr", "auth")


def test_unknown_auth_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_PACS__AUTH__MODE", "kerberos")
    with pytest.raises(ValidationError, match="basic"):
        Settings()


@pytest.mark.parametrize("secret", ["changeme", "password", "Secret", "abc"])
def test_placeholder_secret_refused_outside_the_sandbox(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__MODE", "basic")
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__USERNAME", "engine")
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__PASSWORD", secret)
    with pytest.raises(ValidationError, match="ehr.auth has a placeholder secret"):
        Settings()
    monkeypatch.setenv("STROKEWATCH_SANDBOX", "true")
    s = Settings()
    assert s.sandbox and s.ehr.auth.password is not None and s.ehr.auth.password.get_secret_value() == secret


def test_placeholder_client_secret_refused_for_the_pacs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_PACS__AUTH__MODE", "oauth2")
    monkeypatch.setenv("STROKEWATCH_PACS__AUTH__TOKEN_URL", "https://idp.example/token")
    monkeypatch.setenv("STROKEWATCH_PACS__AUTH__CLIENT_ID", "engine")
    monkeypatch.setenv("STROKEWATCH_PACS__AUTH__CLIENT_SECRET", "changeme")
    with pytest.raises(ValidationError, match="pacs.auth has a placeholder secret"):
        Settings()


def test_policy_thresholds_must_be_ordered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_POLICY__LOW_BELOW", "0.5")
    monkeypatch.setenv("STROKEWATCH_POLICY__HIGH_AT_OR_ABOVE", "0.2")
    with pytest.raises(ValidationError, match="low_below <= high_at_or_above"):
        Settings()


def test_explicit_settings_ignore_nothing_and_validate_too() -> None:
    s = Settings.model_validate(
        {"sandbox": True, "ehr": {"base_url": "http://x/fhir", "auth": {"mode": "bearer", "token": "t0k3n-value"}}}
    )
    assert s.ehr.auth.token is not None
    with pytest.raises(ValidationError):
        Settings.model_validate({"no_such_setting": 1})


def test_pacs_timezone_is_an_iana_zone_with_dst_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    monkeypatch.setenv("STROKEWATCH_PACS__TIMEZONE", "Australia/Sydney")
    zone = Settings().pacs.study_zone()
    assert zone == ZoneInfo("Australia/Sydney")
    assert datetime(2026, 1, 1, 12, tzinfo=zone).utcoffset() == timedelta(hours=11)  # summer there
    assert Settings().pacs.clock_skew_s == 900.0
    monkeypatch.setenv("STROKEWATCH_PACS__TIMEZONE", "Mars/Olympus_Mons")
    with pytest.raises(ValidationError, match="not an IANA time zone"):
        Settings()
    monkeypatch.setenv("STROKEWATCH_PACS__TIMEZONE", "UTC")
    monkeypatch.setenv("STROKEWATCH_PACS__CLOCK_SKEW_S", "-5")
    with pytest.raises(ValidationError, match="clock_skew_s"):
        Settings()


def test_default_pacs_zone_is_the_machines_named_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    from zoneinfo import ZoneInfo

    from integration.localzone import machine_zone, machine_zone_name

    monkeypatch.setenv("TZ", "America/New_York")
    assert machine_zone_name() == "America/New_York" and machine_zone() == ZoneInfo("America/New_York")
    assert "America/New_York (this machine's zone" in Settings().pacs.study_zone_name()
    monkeypatch.setenv("TZ", "XYZ+3")  # a POSIX rule: no IANA name, today's fixed offset instead
    assert machine_zone_name() is None
    assert not isinstance(machine_zone(), ZoneInfo)


# -- secret settings from files (Docker/Kubernetes secrets) -----------------------------------------------------


def _secret_file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_every_secret_setting_is_found_by_its_type() -> None:
    from integration.config import secret_setting_paths

    names = {"__".join(p) for p in secret_setting_paths(Settings)}
    assert {"database_url", "broker_url", "privacy__pseudonym_key", "pacs__auth__password", "pacs__auth__token",
            "pacs__auth__client_secret", "ehr__auth__password", "ehr__auth__token",
            "ehr__auth__client_secret"} <= names
    assert "ehr__base_url" not in names and "pacs__auth__username" not in names


def test_any_secret_setting_comes_from_its_file_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each secret setting (found by type, so new ones are covered too) through STROKEWATCH_<NAME>_FILE."""
    from integration.config import secret_setting_paths

    monkeypatch.setenv("STROKEWATCH_SANDBOX", "true")  # lets auth modes stay "none" while their secrets are set
    for path in secret_setting_paths(Settings):
        name = "__".join(path)
        value = f"value-of-{name}-0123456789"
        monkeypatch.setenv(f"STROKEWATCH_{name.upper()}_FILE", str(_secret_file(tmp_path, name, value + "\n")))
        s = Settings()
        node: object = s
        for part in path:
            node = getattr(node, part)
        assert node.get_secret_value() == value, name  # type: ignore[attr-defined]  # newline stripped
        assert value not in repr(s)


def test_file_variable_feeds_nested_groups_beside_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__MODE", "oauth2")
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__TOKEN_URL", "https://idp.example/token")
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__CLIENT_ID", "strokewatch")
    secret = _secret_file(tmp_path, "client_secret", "s3cr3t-from-a-file\r\n")
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__CLIENT_SECRET_FILE", str(secret))
    db = _secret_file(tmp_path, "db", "postgresql+psycopg://sw:pg-pass-123@db/strokewatch\n")
    monkeypatch.setenv("STROKEWATCH_DATABASE_URL_FILE", str(db))
    s = Settings()
    assert s.ehr.auth.client_secret is not None and s.ehr.auth.client_secret.get_secret_value() == "s3cr3t-from-a-file"
    assert s.ehr.auth.mode == "oauth2" and s.ehr.auth.client_id == "strokewatch"
    assert s.db_url == "postgresql+psycopg://sw:pg-pass-123@db/strokewatch"
    assert "pg-pass-123" not in repr(s) and "s3cr3t" not in repr(s)


def test_placeholder_secret_from_a_file_is_refused_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_PACS__AUTH__MODE", "basic")
    monkeypatch.setenv("STROKEWATCH_PACS__AUTH__USERNAME", "engine")
    monkeypatch.setenv("STROKEWATCH_PACS__AUTH__PASSWORD_FILE", str(_secret_file(tmp_path, "pw", "changeme\n")))
    with pytest.raises(ValidationError, match="pacs.auth has a placeholder secret"):
        Settings()


def test_secrets_dir_holds_files_named_after_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes mounts a Secret as files plus hidden ..data links; Docker as /run/secrets/<name>."""
    secrets = tmp_path / "secrets"
    (secrets / "..2026_01_01").mkdir(parents=True)
    _secret_file(secrets / "..2026_01_01", "ehr__auth__token", "bearer-token-from-k8s\n")
    (secrets / "..data").symlink_to("..2026_01_01")
    (secrets / "ehr__auth__token").symlink_to("..data/ehr__auth__token")
    _secret_file(secrets, "BROKER_URL", "redis://:redis-pass-1@redis:6379/0\n")  # case does not matter
    _secret_file(secrets, "privacy__pseudonym_key", "k" * 40 + "\n")
    monkeypatch.setenv("STROKEWATCH_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__MODE", "bearer")
    s = Settings()
    assert s.ehr.auth.token is not None and s.ehr.auth.token.get_secret_value() == "bearer-token-from-k8s"
    assert s.celery_broker_url == "redis://:redis-pass-1@redis:6379/0" and not s.embedded_broker
    assert s.privacy.pseudonym_key is not None and s.privacy.pseudonym_key.get_secret_value() == "k" * 40

    # The environment wins over the directory; a _FILE variable wins over the directory as well.
    monkeypatch.setenv("STROKEWATCH_BROKER_URL", "redis://redis:6379/1")
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__TOKEN_FILE", str(_secret_file(tmp_path, "t", "token-from-file-var")))
    s = Settings()
    assert s.celery_broker_url == "redis://redis:6379/1"
    assert s.ehr.auth.token is not None and s.ehr.auth.token.get_secret_value() == "token-from-file-var"


def test_a_file_in_the_secrets_dir_that_names_no_secret_setting_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _secret_file(tmp_path, "ehr__auth__clientsecret", "typo-in-the-name\n")
    monkeypatch.setenv("STROKEWATCH_SECRETS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"STROKEWATCH_SECRETS_DIR=.*'ehr__auth__clientsecret' names no secret") as err:
        Settings()
    assert "typo-in-the-name" not in str(err.value) and "ehr__auth__client_secret" in str(err.value)
    monkeypatch.setenv("STROKEWATCH_SECRETS_DIR", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="STROKEWATCH_SECRETS_DIR=.*nope: not a directory"):
        Settings()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        ("", "the file is empty"),
        ("\n", "the file is empty"),
        ("x" * (64 * 1024 + 1), "larger than 65536 bytes"),
        (b"\xff\xfe-not-text", "not UTF-8 text"),
        ("dir", "not a regular file"),
    ],
)
def test_a_bad_secret_file_stops_start_up_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | bytes | None, expected: str
) -> None:
    path = tmp_path / "secret"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    monkeypatch.setenv("STROKEWATCH_EHR__AUTH__TOKEN_FILE", str(path))
    with pytest.raises(ValueError, match=expected) as err:
        Settings()
    assert f"STROKEWATCH_EHR__AUTH__TOKEN_FILE={path}" in str(err.value)
    assert "xxxxxxxx" not in str(err.value) and "not-text" not in str(err.value)  # contents never echoed


def test_a_secret_given_both_ways_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("STROKEWATCH_DATABASE_URL_FILE", str(_secret_file(tmp_path, "db", "postgresql://db/y")))
    with pytest.raises(ValueError, match="both STROKEWATCH_DATABASE_URL and STROKEWATCH_DATABASE_URL_FILE"):
        Settings()


def test_database_and_broker_urls_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_DATABASE_URL", "postgresql+psycopg://sw:db-pass-42@db/sw")
    monkeypatch.setenv("STROKEWATCH_BROKER_URL", "amqp://sw:mq-pass-42@mq:5672//")
    s = Settings()
    assert s.db_url.endswith("@db/sw") and s.celery_broker_url.startswith("amqp://")
    assert "db-pass-42" not in repr(s) and "mq-pass-42" not in repr(s) and "db-pass-42" not in str(s.model_dump())
    monkeypatch.setenv("STROKEWATCH_DATABASE_URL", "  ")
    assert Settings().database_url is None  # blank: the SQLite default


def test_a_short_pseudonym_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_PRIVACY__PSEUDONYM_KEY", "too-short")
    with pytest.raises(ValidationError, match="STROKEWATCH_PRIVACY__PSEUDONYM_KEY"):
        Settings()
    monkeypatch.setenv("STROKEWATCH_PRIVACY__PSEUDONYM_KEY", "a-long-enough-hmac-key")
    assert Settings().privacy.pseudonym_key is not None


def test_retention_and_lost_claims_have_defaults_and_refuse_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.max_lost_claims == 3 and s.retention.vitals_days == 400 and s.retention.volumes_days == 7
    monkeypatch.setenv("STROKEWATCH_RETENTION__RESOLVED_FAILURES_DAYS", "30")
    monkeypatch.setenv("STROKEWATCH_RETENTION__LOG_BACKUPS", "2")
    assert (Settings().retention.resolved_failures_days, Settings().retention.log_backups) == (30, 2)
    for name, value in (("RETENTION__BATCH_SIZE", "0"), ("RETENTION__VITALS_DAYS", "1"), ("MAX_LOST_CLAIMS", "0"),
                        ("RETENTION__TYPO", "1")):
        monkeypatch.setenv(f"STROKEWATCH_{name}", value)
        with pytest.raises(ValidationError):
            Settings()
        monkeypatch.delenv(f"STROKEWATCH_{name}")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STROKEWATCH_API__KEYS", '["tinysecretQQ-not-a-mapping"]'),  # the wrong type: pydantic would quote it
        ("STROKEWATCH_PRIVACY__PSEUDONYM_KEY", "tinysecretQQ"),  # too short
        ("STROKEWATCH_WEBHOOKS__ORTHANC__SECRET", "tinysecretQQ"),
        ("STROKEWATCH_EHR__AUTH", '{"mode": "basic", "password": "tinysecretQQ", "bogus": 1}'),
    ],
)
def test_a_settings_error_never_echoes_what_was_given(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "tinysecretQQ" not in str(err.value)  # what the CLI, the worker and the API print
