"""Every client the composition root builds takes its timeouts, deadline and Retry-After cap from the settings
(nothing is contacted: the clients are only built)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from integration.adapters.fhir_auth import ClientCredentialsAuth
from integration.bootstrap import build_ehr, build_feed, build_pacs, build_pacs_auth, build_tls
from integration.config import Settings

OAUTH = {"mode": "oauth2", "token_url": "http://127.0.0.1:9/token", "client_id": "sw", "client_secret": "s3cret-42"}


def settings(tmp_path: Path, **extra: object) -> Settings:
    base: dict[str, object] = {
        "sandbox": True,
        "data_dir": tmp_path,
        "pacs": {
            "dicomweb_url": "http://127.0.0.1:9/dicom-web",
            "timeout_s": 17,
            "retrieve_deadline_s": 240,
            "auth": OAUTH,
        },
        "ehr": {"base_url": "http://127.0.0.1:9/fhir", "timeout_s": 11, "auth": {**OAUTH, "timeout_s": 4}},
        "retry_after_cap_s": 300,
    }
    return Settings.model_validate({**base, **extra})


def read_timeout(client: httpx.Client) -> float | None:
    return client.timeout.read


def test_the_pacs_its_feed_and_its_token_client_use_the_pacs_settings(tmp_path: Path) -> None:
    s = settings(tmp_path)
    tls = build_tls(s.pacs.tls, "pacs", "tls")
    auth = build_pacs_auth(s, tls)
    assert isinstance(auth, ClientCredentialsAuth)
    assert read_timeout(auth._http) == 17 and auth.retry_after_cap_s == 300  # auth.timeout_s unset: the peer's
    pacs = build_pacs(s, auth, tls)
    feed = build_feed(s, "http://127.0.0.1:9", auth, tls)
    try:
        assert read_timeout(pacs._client) == 17 and read_timeout(feed._client) == 17
        assert pacs.retrieve_deadline_s == 240 and pacs.retry_after_cap_s == 300
    finally:
        for closing in (pacs, feed, auth):
            closing.close()


def test_the_ehr_and_its_token_client_use_the_ehr_settings(tmp_path: Path) -> None:
    ehr = build_ehr(settings(tmp_path))
    try:
        assert read_timeout(ehr._client) == 11 and ehr.retry_after_cap_s == 300
        auth = ehr._auth
        assert isinstance(auth, ClientCredentialsAuth)
        assert read_timeout(auth._http) == 4 and auth.retry_after_cap_s == 300  # ehr.auth.timeout_s wins
    finally:
        ehr.close()


@pytest.mark.parametrize(
    ("setting", "bad", "named"),
    [
        ("pacs", {"retrieve_deadline_s": 0}, "pacs.retrieve_deadline_s"),
        ("ehr", {"auth": {**OAUTH, "timeout_s": 0}}, "ehr.auth.timeout_s"),
        ("db", {"connect_timeout_s": 0}, "db.connect_timeout_s"),
        ("db", {"statement_timeout_s": -1}, "db.statement"),
        ("db", {"sqlite_busy_timeout_s": 0}, "db.sqlite_busy"),
        ("db", {"statement_timeout": 5}, "db.statement_timeout"),
    ],
)
def test_bad_timeouts_are_refused(tmp_path: Path, setting: str, bad: dict[str, object], named: str) -> None:
    group = {**settings(tmp_path).model_dump(mode="json")[setting], **bad} if setting != "db" else bad
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        settings(tmp_path, **{setting: group})


def test_database_timeouts_have_sane_defaults(tmp_path: Path) -> None:
    db = settings(tmp_path).db
    assert (db.connect_timeout_s, db.statement_timeout_s, db.sqlite_busy_timeout_s) == (10.0, 60.0, 30.0)


def test_the_embedded_model_shares_the_cpus_among_the_workers_processes(tmp_path: Path) -> None:
    """ONNX Runtime's default (a thread per CPU in every process) would run concurrency x CPUs busy threads."""
    from integration.bootstrap import build_model, model_threads

    assert model_threads(settings(tmp_path, worker_concurrency=2), cpus=2) == 1
    assert model_threads(settings(tmp_path, worker_concurrency=2), cpus=8) == 4
    assert model_threads(settings(tmp_path, worker_concurrency=4), cpus=2) == 1
    assert model_threads(settings(tmp_path, worker_concurrency=2, model_threads=3), cpus=2) == 3
    with pytest.raises(ValueError, match="model_threads"):
        settings(tmp_path, model_threads=0)
    model = build_model(settings(tmp_path, model_threads=3))
    session = model._session  # type: ignore[attr-defined]
    assert session.get_session_options().intra_op_num_threads == 3
