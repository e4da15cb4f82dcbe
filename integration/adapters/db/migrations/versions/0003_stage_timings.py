"""Stage timings: the shared histogram of stage durations (``stage_seconds``), and per study when it became
complete and when its first RiskAssessment was written (the end-to-end time, counted once per study).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stage_seconds",
        sa.Column("stage", sa.String(length=24), nullable=False),
        sa.Column("le", sa.String(length=16), nullable=False),
        sa.Column("observations", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("stage", "le"),
    )
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("first_published_at", sa.DateTime(timezone=True), nullable=True))
    # Studies already published before this revision: their end-to-end time is not counted (again) later, when a
    # re-scoring of the same study is published.
    op.execute(
        """
        UPDATE studies SET first_published_at = (
          SELECT MIN(a.published_at) FROM assessments a
          WHERE a.study_uid = studies.study_uid AND a.published_at IS NOT NULL)
        WHERE EXISTS (
          SELECT 1 FROM assessments a WHERE a.study_uid = studies.study_uid AND a.published_at IS NOT NULL)
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("first_published_at")
        batch.drop_column("completed_at")
    op.drop_table("stage_seconds")
