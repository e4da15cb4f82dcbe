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


def test_0003_marks_studies_published_before_it_and_goes_both_ways(db_url: str) -> None:
    """A study whose assessment was written before the end-to-end time existed is not counted later (a re-scoring
    published after the upgrade); the histogram table comes and goes with the revision."""
    upgrade(db_url, "0002")
    engine = sa.create_engine(db_url)
    with engine.begin() as c:
        for uid in ("1.2.3.1", "1.2.3.2"):
            c.execute(
                sa.text(
                    "INSERT INTO studies (study_uid, source, status, attempts, lost_claims, detected_at, updated_at) "
                    "VALUES (:uid, 'qido', 'ready', 1, 0, '2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00')"
                ),
                {"uid": uid},
            )
        for ident, published in (("a1", "2026-01-01 00:00:09+00:00"), ("a2", "2026-01-01 00:00:05+00:00"),
                                 ("a3", None)):
            c.execute(
                sa.text(
                    "INSERT INTO assessments (identifier, patient_fhir_id, study_uid, window_end, model_version, "
                    "runtime, trained, probability, band, input_fingerprint, n_vitals, status, resource, superseded, "
                    "attempts, lost_claims, created_at, published_at) VALUES (:ident, 'p1', :study, "
                    "'2026-01-01 00:00:00+00:00', '1', 'x', true, 0.5, 'low', 'f', 0, 'scored', '{}', false, 0, 0, "
                    "'2026-01-01 00:00:00+00:00', :published)"
                ),
                {"ident": ident, "study": "1.2.3.1" if ident != "a3" else "1.2.3.2", "published": published},
            )
    upgrade(db_url)
    with engine.connect() as c:
        rows = dict(c.execute(sa.text("SELECT study_uid, first_published_at FROM studies")).all())
        assert rows["1.2.3.2"] is None  # never published: its first publish will count
        assert str(rows["1.2.3.1"]).startswith("2026-01-01 00:00:05")  # the earliest write
        c.execute(sa.text("SELECT COUNT(*) FROM stage_seconds")).scalar_one()
    command.downgrade(alembic_config(db_url), "0002")
    with engine.connect() as c:
        assert "stage_seconds" not in sa.inspect(c).get_table_names()
        assert "first_published_at" not in {col["name"] for col in sa.inspect(c).get_columns("studies")}
    upgrade(db_url)
    engine.dispose()
