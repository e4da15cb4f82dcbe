"""Secrets and PHI kept in: redaction, keyed pseudonyms, no bound parameters in errors, private file modes."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from integration.config import Settings
from integration.domain import identity
from integration.domain.identity import Pseudonymizer, pseudonym, use_pseudonym_key
from integration.domain.redact import describe_exception, redact_text, redact_url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STROKEWATCH_"):
            monkeypatch.delenv(name)


@pytest.fixture()
def wide_umask() -> Iterator[None]:
    """A umask that would leave files readable by everyone: the modes below come from the code, not from it."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture()
def restore_process_state() -> Iterator[None]:
    """bootstrap() installs the pseudonym key and the log-record redaction for the process: undo both."""
    active, factory = identity._active, logging.getLogRecordFactory()
    yield
    identity._active = active
    logging.setLogRecordFactory(factory)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- redaction -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("postgresql+psycopg://sw:pg-Pass@db.example:5432/sw", "postgresql+psycopg://sw:***@db.example:5432/sw"),
        ("postgresql://sw:p@ss/w0rd@db/sw", "postgresql://sw:***@db/sw"),  # raw "@" and "/" in the password
        ("redis://:r3dis-pass@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("amqp://guest:guest@mq:5672//", "amqp://guest:***@mq:5672//"),
        ("https://engine:pacs-pw@pacs.example/dicom-web", "https://engine:***@pacs.example/dicom-web"),
        ("grpcs://u:triton-pw@triton:8001", "grpcs://u:***@triton:8001"),
        ("https://ehr.example/fhir?access_token=abc.def&_count=5", "https://ehr.example/fhir?access_token=***&_count=5"),
        ("postgresql://db/sw?user=sw&password=qs-pass", "postgresql://db/sw?user=sw&password=***"),
        # nothing secret: unchanged
        ("https://pacs.example:8042/dicom-web", "https://pacs.example:8042/dicom-web"),
        ("postgresql+psycopg://strokewatch@db/strokewatch", "postgresql+psycopg://strokewatch@db/strokewatch"),
        ("sqla+sqlite:////var/lib/strokewatch/broker.db", "sqla+sqlite:////var/lib/strokewatch/broker.db"),
    ],
)
def test_url_credentials_are_masked(raw: str, shown: str) -> None:
    assert redact_url(raw) == shown


def test_credentials_inside_free_text_are_masked() -> None:
    assert redact_url(None) is None
    line = "cannot connect to amqp://sw:mq-pass@mq:5672// (refused); retry with redis://:r-pass@r:6379/0 later"
    assert redact_text(line) == (
        "cannot connect to amqp://sw:***@mq:5672// (refused); retry with redis://:***@r:6379/0 later")
    assert redact_text("host=db user=sw password=hunter22 dbname=sw") == "host=db user=sw password=*** dbname=sw"
    assert redact_text('{"client_secret": "cs-1", "client_id": "sw"}') == '{"client_secret": "***", "client_id": "sw"}'
    assert redact_text("Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln") == "Authorization: Bearer ***"
    assert redact_text("auth mode 'basic' needs username, password") == "auth mode 'basic' needs username, password"


def test_an_unexpected_exception_is_described_without_phi_or_secrets() -> None:
    mrn = "SW77-000123"
    exc = ValueError(f"no row for {mrn.lower()} via postgresql://sw:db-pass@db/sw\n[parameters: ('{mrn}',)]")
    described = describe_exception(exc, [mrn, None])
    assert described.startswith("ValueError: no row for p:") and pseudonym(mrn) in described
    assert mrn.lower() not in described.lower() and "db-pass" not in described and "parameters" not in described
    assert describe_exception(RuntimeError()) == "RuntimeError"
    assert len(describe_exception(RuntimeError("x" * 1000))) < 220


# -- keyed pseudonyms ------------------------------------------------------------------------------------------


def test_pseudonyms_are_hmac_sha256_under_the_key(restore_process_state: None) -> None:
    key = b"k" * 32
    expected = "p:" + hmac.new(key, b"SW1-000001", hashlib.sha256).hexdigest()[:16]
    assert Pseudonymizer(key)("SW1-000001") == expected
    assert Pseudonymizer(b"j" * 32)("SW1-000001") != expected  # another key, another pseudonym
    assert expected[2:] not in hashlib.sha256(b"SW1-000001").hexdigest()  # not the plain (guessable) hash
    assert Pseudonymizer(key)(None) == "-" and "k" * 16 not in repr(Pseudonymizer(key))
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Pseudonymizer(b"short")
    use_pseudonym_key(key)
    assert pseudonym("SW1-000001") == expected


def _key_in(data_dir: str) -> bytes:
    from integration.bootstrap import pseudonym_key

    return pseudonym_key(Settings(data_dir=Path(data_dir)))


def test_pseudonym_key_is_made_once_private_and_reused(tmp_path: Path, wide_umask: None) -> None:
    from integration.bootstrap import pseudonym_key

    data = tmp_path / "data"
    data.mkdir()
    # Several processes starting together (API, worker children) agree on one key.
    with ProcessPoolExecutor(4) as pool:
        keys = set(pool.map(_key_in, [str(data)] * 8))
    assert len(keys) == 1
    key = keys.pop()
    path = data / "pseudonym.key"
    assert mode(path) == 0o600 and path.read_text().strip().encode() == key and len(key) == 64
    assert [p.name for p in data.iterdir()] == ["pseudonym.key"]  # no key left aside
    assert pseudonym_key(Settings(data_dir=data)) == key  # stable across restarts
    path.chmod(0o644)
    assert pseudonym_key(Settings(data_dir=data)) == key and mode(path) == 0o600
    configured = Settings(data_dir=tmp_path / "other", privacy={"pseudonym_key": "configured-key-0123456789"})
    assert pseudonym_key(configured) == b"configured-key-0123456789"
    assert not (tmp_path / "other" / "pseudonym.key").exists()
    path.write_text("short\n")
    with pytest.raises(ValueError, match="STROKEWATCH_PRIVACY__PSEUDONYM_KEY"):
        pseudonym_key(Settings(data_dir=data))


def test_bootstrap_installs_the_key_and_redacts_log_records(
    tmp_path: Path, restore_process_state: None, caplog: pytest.LogCaptureFixture
) -> None:
    from integration.bootstrap import bootstrap

    settings = Settings(sandbox=True, data_dir=tmp_path / "data",
                        pacs={"dicomweb_url": "http://127.0.0.1:9/dicom-web", "kind": "generic"},
                        ehr={"base_url": "http://127.0.0.1:9/fhir"})
    engine = bootstrap(settings)
    try:
        key = (tmp_path / "data" / "pseudonym.key").read_text().strip().encode()
        assert pseudonym("SW5-000005") == Pseudonymizer(key)("SW5-000005")
        log = logging.getLogger("strokewatch.test")
        with caplog.at_level(logging.INFO, logger="strokewatch.test"):
            log.info("peer %s answered", "https://u:log-pass@pacs.example/dicom-web")
            try:
                raise ConnectionError("lost redis://:tb-pass@r:6379/0")
            except ConnectionError:
                log.exception("broker")
        assert "https://u:***@pacs.example" in caplog.records[0].getMessage()
        assert "log-pass" not in caplog.text and "tb-pass" not in caplog.text and "redis://:***@r" in caplog.text
    finally:
        engine.close()


# -- no bound parameters, no PHI in failure messages -----------------------------------------------------------


def test_database_errors_carry_no_bound_parameters(tmp_path: Path) -> None:
    from integration.adapters.db.session import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE p (mrn TEXT PRIMARY KEY)"))
            conn.execute(text("INSERT INTO p VALUES (:m)"), {"m": "SW9-HIDDEN-MRN"})
        with pytest.raises(IntegrityError) as err, engine.begin() as conn:
            conn.execute(text("INSERT INTO p VALUES (:m)"), {"m": "SW9-HIDDEN-MRN"})
        assert "SW9-HIDDEN-MRN" not in str(err.value) and "hidden due to hide_parameters" in str(err.value)
    finally:
        engine.dispose()


def test_a_crash_while_ingesting_records_no_patient_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, restore_process_state: None
) -> None:
    from integration.services.context import Services
    from integration.services.studies import ingest_study, register_study
    from tests.unit.fakes import STUDY, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore

    class CrashingPacs(FakePacs):
        def list_series(self, uid: str) -> list:  # type: ignore[type-arg]
            detail = "unexpected answer for patient " + "MRN1" + " from https://u:pacs-pw@pacs/dicom-web"
            raise KeyError(detail)

    model, clock = FakeModel(), FakeClock()
    store = FakeStore(clock)
    svc = Services(store=store, pacs=CrashingPacs(), ehr=FakeEhr(), model=lambda: model,
                   volumes_dir=tmp_path / "volumes", clock=clock)
    register_study(svc, STUDY)
    with caplog.at_level(logging.INFO):
        result = ingest_study(svc, STUDY)
    assert (result.status, result.outcome) == ("failed", "internal_error")
    (failure,) = store.failures
    assert failure.message.startswith("KeyError: ") and pseudonym("MRN1") in failure.message
    assert "KeyError(" not in failure.message  # not repr(exc)
    for text_ in (failure.message, caplog.text):
        assert "MRN1" not in text_ and "pacs-pw" not in text_
    assert "crashed" in caplog.text and "list_series" in caplog.text  # the frames are still there


# -- private files: data 0600, folders 0700 --------------------------------------------------------------------


def test_sqlite_database_and_its_wal_files_are_private(tmp_path: Path, wide_umask: None) -> None:
    from integration.adapters.db.session import make_engine

    db = tmp_path / "new" / "strokewatch.db"
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x TEXT)"))
            conn.execute(text("INSERT INTO t VALUES ('x')"))
        assert mode(db.parent) == 0o700 and mode(db) == 0o600
        wal = [db.with_name(db.name + s) for s in ("-wal", "-shm")]
        assert all(p.exists() and mode(p) == 0o600 for p in wal)
    finally:
        engine.dispose()
    old = tmp_path / "old.db"
    old.touch(mode=0o644)
    make_engine(f"sqlite:///{old}").dispose()
    assert mode(old) == 0o600  # a database others could read is narrowed


def test_data_dir_is_made_private(tmp_path: Path, wide_umask: None) -> None:
    from integration.bootstrap import private_data_dir

    private_data_dir(tmp_path / "fresh")
    assert mode(tmp_path / "fresh") == 0o700
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "broker.db").write_text("x")
    (data / "run.sh").write_text("x")
    (data / "run.sh").chmod(0o755)
    data.chmod(0o755)
    private_data_dir(data)
    assert (mode(data), mode(data / "logs"), mode(data / "broker.db"), mode(data / "run.sh")) == (
        0o700, 0o700, 0o600, 0o700)


def test_engine_logs_and_what_the_children_write_are_private(tmp_path: Path, wide_umask: None) -> None:
    from integration.entrypoints.processes import _spawn

    log = tmp_path / "data" / "logs" / "worker.log"
    made = tmp_path / "made-by-child.txt"
    child = _spawn([sys.executable, "-c", f"open({str(made)!r}, 'w').write('x'); print('hello')"],
                   dict(os.environ), log, detached=False)
    assert child.wait(60) == 0
    assert mode(log.parent) == 0o700 and mode(log) == 0o600 and mode(made) == 0o600
    deadline = time.monotonic() + 10
    while "hello" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "hello" in log.read_text()


def test_sandbox_engine_env_is_private(tmp_path: Path, wide_umask: None) -> None:
    from sandbox.state import ENGINE_ENV_FILE, SandboxInfo, write_info

    info = SandboxInfo(str(tmp_path), "http://127.0.0.1:1/fhir", 1, "http://127.0.0.1:2", "http://127.0.0.1:2/dicom-web",
                       4242, "ORTHANC", 2, "2026-01-01T00:00:00+00:00")
    (tmp_path / "engine.tmp").write_text("stale")
    (tmp_path / "engine.tmp").chmod(0o644)
    write_info(info)
    env = tmp_path / ENGINE_ENV_FILE
    assert mode(env) == 0o600 and "STROKEWATCH_SANDBOX=true" in env.read_text()


def test_volumes_are_written_private(tmp_path: Path, wide_umask: None) -> None:
    from integration.services.context import Services
    from integration.services.studies import ingest_study, register_study
    from tests.unit.fakes import STUDY, FakeClock, FakeEhr, FakeModel, FakePacs, FakeStore

    model, clock = FakeModel(), FakeClock()
    svc = Services(store=FakeStore(clock), pacs=FakePacs(), ehr=FakeEhr(), model=lambda: model,
                   volumes_dir=tmp_path / "volumes", clock=clock)
    register_study(svc, STUDY)
    assert ingest_study(svc, STUDY).status == "ready"
    volumes = list((tmp_path / "volumes").iterdir())
    assert [v.name for v in volumes] == [f"{hashlib.sha256(STUDY.encode()).hexdigest()}.npy"]  # derived, not the UID
    assert mode(tmp_path / "volumes") == 0o700 and mode(volumes[0]) == 0o600


# -- what status and doctor show --------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_and_doctor_show_database_and_broker_without_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from integration.adapters.broker import BrokerProbe
    from integration.adapters.db.session import DatabaseProbe, make_engine
    from integration.entrypoints.api.routes.status import status
    from integration.entrypoints.cli import app

    db_url = f"postgresql+psycopg://alice:pg-Secret-1@127.0.0.1:{_free_port()}/sw"  # nothing listens there
    broker_url = f"redis://:redis-Secret-2@127.0.0.1:{_free_port()}/0"
    monkeypatch.setenv("STROKEWATCH_DATABASE_URL", db_url)
    monkeypatch.setenv("STROKEWATCH_BROKER_URL", broker_url)
    monkeypatch.setenv("STROKEWATCH_PACS__DICOMWEB_URL", "https://sw:pacs-Secret-3@pacs.example/dicom-web")

    result = CliRunner().invoke(app, ["status"], terminal_width=200)
    assert result.exit_code == 1 and "alice:***@127.0.0.1" in result.output and "redis://:***@" in result.output
    assert "cannot read the database" in result.output and "STROKEWATCH_DATABASE_URL" in result.output

    engine = make_engine(db_url)
    try:
        (db_check,) = DatabaseProbe(engine).probe(quick=True)
    finally:
        engine.dispose()
    (broker_check,) = BrokerProbe(broker_url, timeout_s=2).probe(quick=True)
    assert not db_check.ok and "alice:***@" in db_check.detail
    assert not broker_check.ok and "redis://:***@" in broker_check.detail

    def no_model() -> None:
        raise ConnectionError("Triton at https://t:triton-Secret-4@triton:8000 refused")

    settings = Settings()
    fake = SimpleNamespace(settings=settings, model=no_model, store=SimpleNamespace(counts=dict), feed=None)
    body = status(fake).model_dump_json()  # type: ignore[arg-type]
    assert "alice:***@" in body and "redis://:***@" in body and "sw:***@pacs.example" in body
    for shown in (result.output, db_check.detail, broker_check.detail, body):
        assert "Secret-" not in shown


def test_an_ehr_error_that_echoes_the_searched_mrn_carries_its_pseudonym_instead() -> None:
    import httpx

    from integration.adapters.fhir import _diagnostics

    request = httpx.Request("GET", "https://ehr.test/Patient",
                            params={"identifier": "urn:oid:1.2.3|MRN0042137", "_count": "100"})
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "no match for MRN0042137 (first 100)"}]}
    text = _diagnostics(httpx.Response(422, json=outcome, request=request))
    assert "MRN0042137" not in text
    assert text == f"no match for {pseudonym('MRN0042137')} (first 100)"
