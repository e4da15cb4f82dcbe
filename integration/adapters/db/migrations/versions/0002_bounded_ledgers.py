"""Bounded ledgers: one open failure per (stage, subject, outcome), lost-claim counters, vitals backoff,
vitals keyed per patient.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_OPEN = sa.text("resolved_at IS NULL")


def _vitals_unique(old: list[str], new: list[str], new_name: str, old_name_sqlite: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # SQLite's constraints are usually unnamed: name them on reflection, then recreate the table without it.
        names = [uc["name"] for uc in sa.inspect(bind).get_unique_constraints("vitals") if uc["column_names"] == old]
        with op.batch_alter_table(
            "vitals",
            recreate="always",
            naming_convention={"uq": "uq_%(table_name)s_%(column_0_N_name)s"},
        ) as batch:
            for name in names:
                batch.drop_constraint(name or old_name_sqlite, type_="unique")
            batch.create_unique_constraint(new_name, new)
        return
    for uc in sa.inspect(bind).get_unique_constraints("vitals"):
        if list(uc["column_names"]) == old and uc["name"]:
            op.drop_constraint(uc["name"], "vitals", type_="unique")
    op.create_unique_constraint(new_name, "vitals", new)


def upgrade() -> None:
    with op.batch_alter_table("failures") as batch:
        batch.add_column(sa.Column("occurrences", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_failures_resolved_at", ["resolved_at"], unique=False)
    # Fold the open duplicates the old engine wrote (one row per occurrence) into their newest row.
    op.execute(
        """
        UPDATE failures SET
          occurrences = (SELECT COUNT(*) FROM failures f2 WHERE f2.resolved_at IS NULL AND f2.stage = failures.stage
                         AND f2.subject = failures.subject AND f2.outcome = failures.outcome),
          last_seen_at = (SELECT MAX(f2.created_at) FROM failures f2 WHERE f2.resolved_at IS NULL
                          AND f2.stage = failures.stage AND f2.subject = failures.subject
                          AND f2.outcome = failures.outcome)
        WHERE resolved_at IS NULL
        """
    )
    op.execute(
        """
        DELETE FROM failures WHERE resolved_at IS NULL AND id NOT IN (
          SELECT MAX(id) FROM failures WHERE resolved_at IS NULL GROUP BY stage, subject, outcome)
        """
    )
    op.execute("UPDATE failures SET last_seen_at = created_at WHERE last_seen_at IS NULL")
    op.create_index(
        "uq_failures_open",
        "failures",
        ["stage", "subject", "outcome"],
        unique=True,
        postgresql_where=_OPEN,
        sqlite_where=_OPEN,
    )
    for table in ("studies", "patients", "assessments"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("lost_claims", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("patients") as batch:
        batch.add_column(sa.Column("vitals_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("vitals_next_attempt_at", sa.DateTime(timezone=True), nullable=True))
    _vitals_unique(
        ["observation_id", "feature"],
        ["patient_fhir_id", "observation_id", "feature"],
        "uq_vitals_patient_observation_feature",
        "uq_vitals_observation_id_feature",
    )
    # The EHR poll follows patients with a study seen recently: a range over (status, detected_at).
    op.create_index("ix_studies_status_detected_at", "studies", ["status", "detected_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_studies_status_detected_at", table_name="studies")
    # Back to one row per (observation, feature): keep the newest row of each.
    op.execute("DELETE FROM vitals WHERE id NOT IN (SELECT MAX(id) FROM vitals GROUP BY observation_id, feature)")
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("vitals", recreate="always") as batch:
            batch.drop_constraint("uq_vitals_patient_observation_feature", type_="unique")
            batch.create_unique_constraint("vitals_observation_id_feature_key", ["observation_id", "feature"])
    else:
        op.drop_constraint("uq_vitals_patient_observation_feature", "vitals", type_="unique")
        op.create_unique_constraint("vitals_observation_id_feature_key", "vitals", ["observation_id", "feature"])
    with op.batch_alter_table("patients") as batch:
        batch.drop_column("vitals_next_attempt_at")
        batch.drop_column("vitals_attempts")
    for table in ("studies", "patients", "assessments"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lost_claims")
    op.drop_index("uq_failures_open", table_name="failures")
    with op.batch_alter_table("failures") as batch:
        batch.drop_index("ix_failures_resolved_at")
        batch.drop_column("last_seen_at")
        batch.drop_column("occurrences")
