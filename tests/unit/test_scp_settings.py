"""The ``scp`` settings: defaults, environment names, what is refused, and when the SCP may not start at all."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from integration.config import Settings
from integration.entrypoints.scp import startup_problem, transfer_syntaxes


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STROKEWATCH_"):
            monkeypatch.delenv(name)


def test_defaults_are_off_on_loopback_with_the_documented_title_and_port() -> None:
    scp = Settings().scp
    assert (scp.enabled, scp.ae_title, scp.port, scp.host) == (False, "STROKEWATCH", 11112, "127.0.0.1")
    assert scp.allowed_calling_aets == [] and scp.quiet_period_s == 10.0 and scp.tls.cert is None
    assert Settings().retention.spool_days == 7.0


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROKEWATCH_SCP__ENABLED", "true")
    monkeypatch.setenv("STROKEWATCH_SCP__PORT", "104")
    monkeypatch.setenv("STROKEWATCH_SCP__AE_TITLE", " AI_NODE ")
    monkeypatch.setenv("STROKEWATCH_SCP__ALLOWED_CALLING_AETS", '["PACS1", "CT_ER"]')
    monkeypatch.setenv("STROKEWATCH_SCP__ALLOWED_HOSTS", '["10.1.2.0/24", "192.168.7.9"]')
    monkeypatch.setenv("STROKEWATCH_SCP__QUIET_PERIOD_S", "2.5")
    monkeypatch.setenv("STROKEWATCH_RETENTION__SPOOL_DAYS", "3")
    s = Settings()
    assert (s.scp.enabled, s.scp.port, s.scp.ae_title) == (True, 104, "AI_NODE")
    assert s.scp.allowed_calling_aets == ["PACS1", "CT_ER"] and s.scp.quiet_period_s == 2.5
    assert s.scp.allowed_hosts == ["10.1.2.0/24", "192.168.7.9"] and s.retention.spool_days == 3


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"ae_title": "A" * 17}, "STROKEWATCH_SCP__AE_TITLE"),
        ({"ae_title": "   "}, "STROKEWATCH_SCP__AE_TITLE"),
        ({"allowed_calling_aets": ["OK", "BACK\\SLASH"]}, "STROKEWATCH_SCP__ALLOWED_CALLING_AETS"),
        ({"per_series_senders": ["T\u00e9l\u00e9"]}, "STROKEWATCH_SCP__PER_SERIES_SENDERS"),
        ({"allowed_hosts": ["pacs.example.org"]}, "STROKEWATCH_SCP__ALLOWED_HOSTS"),
        ({"port": 0}, "port"),
        ({"quiet_period_s": -1}, "quiet_period_s"),
        ({"tls": {"require_client_cert": True}}, "STROKEWATCH_SCP__TLS__CERT"),
        ({"tls": {"cert": "/x.pem", "require_client_cert": True}}, "STROKEWATCH_SCP__TLS__CLIENT_CA"),
        ({"typo": 1}, "typo"),
    ],
)
def test_nonsense_is_refused_naming_the_setting(values: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError, match=named.replace("\\", "\\\\")):
        Settings.model_validate({"scp": values})


def test_an_instance_may_not_be_larger_than_a_series() -> None:
    with pytest.raises(ValidationError, match="STROKEWATCH_SCP__MAX_INSTANCE_BYTES"):
        Settings.model_validate({"scp": {"max_instance_bytes": 2 << 30}})


def test_the_scp_needs_named_senders_outside_the_sandbox_and_loopback_inside_it() -> None:
    enabled = {"enabled": True}
    assert "STROKEWATCH_SCP__ALLOWED_CALLING_AETS" in (startup_problem(Settings.model_validate({"scp": enabled}))
                                                         or "")
    assert startup_problem(Settings.model_validate({"sandbox": True, "scp": enabled})) is None
    wide = {"sandbox": True, "scp": {**enabled, "host": "0.0.0.0"}}
    assert "listens beyond this machine" in (startup_problem(Settings.model_validate(wide)) or "")
    named = {"scp": {**enabled, "host": "0.0.0.0", "allowed_calling_aets": ["PACS1"]}}
    assert startup_problem(Settings.model_validate(named)) is None


def test_the_offered_transfer_syntaxes_are_decodable_and_never_deflate() -> None:
    offered = transfer_syntaxes()
    assert offered[:2] == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert "1.2.840.10008.1.2.4.90" in offered  # JPEG 2000 lossless: pylibjpeg-openjpeg is a dependency
    assert "1.2.840.10008.1.2.1.99" not in offered
