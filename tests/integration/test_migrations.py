"""Alembic migrations against the models, on SQLite and the real PostgreSQL: head matches the models exactly,
and 0002 folds the duplicate open failures an older engine wrote and keys vitals per patient."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from integration.adapters.db.models import Base
from integration.adapters.db.session import alembic_config, upgrade
from tests.integration.test_store_postgres import pg_url  # noqa: F401  (fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def test_head_matches_the_models(db_url: str) -> None:
    upgrade(db_url)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"


def test_0002_folds_open_duplicates_and_keys_vitals_per_patient(db_url: str) -> None:
    upgrade(db_url, "0001")
    engine = sa.create_engine(db_url)
    insert_failure = sa.text(
        "INSERT INTO failures (stage, subject, outcome, message, retryable, created_at, resolved_at) "
        "VALUES ('vitals', 'obs-1', 'implausible_value', 'm', false, :at, :resolved)"
    )
    with engine.begin() as c:
        for day in (1, 2, 3):  # the same open problem recorded at three polls
            c.execute(insert_failure, {"at": f"2026-01-0{day} 00:00:00+00:00", "resolved": None})
        c.execute(insert_failure, {"at": "2025-12-01 00:00:00+00:00", "resolved": "2025-12-02 00:00:00+00:00"})
        c.execute(
            sa.text(
                "INSERT INTO vitals (patient_fhir_id, observation_id, feature, value, effective) "
                "VALUES ('p1', 'obs-1', 'hr', 70, '2026-01-01 00:00:00+00:00')"
            )
        )
    upgrade(db_url)
    with engine.begin() as c:
        rows = c.execute(
            sa.text("SELECT occurrences, resolved_at IS NULL FROM failures ORDER BY resolved_at IS NULL")
        ).all()
        assert [(int(n), bool(is_open)) for n, is_open in rows] == [(1, False), (3, True)]
        # another patient's Observation with the same id is its own row now
        c.execute(
            sa.text(
                "INSERT INTO vitals (patient_fhir_id, observation_id, feature, value, effective) "
                "VALUES ('p2', 'obs-1', 'hr', 71, '2026-01-01 00:00:00+00:00')"
            )
        )
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as c:  # still one open row per problem
        c.execute(insert_failure, {"at": "2026-01-04 00:00:00+00:00", "resolved": None})
    command.downgrade(alembic_config(db_url), "0001")
    upgrade(db_url)  # and back: both directions run on both backends
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT COUNT(*) FROM vitals")).scalar() == 1
    engine.dispose()
