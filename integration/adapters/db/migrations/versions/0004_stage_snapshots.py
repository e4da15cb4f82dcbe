"""Stage snapshots: a bounded ring of copies of the stage histogram, for latency percentiles over time
(the dashboard's overview).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stage_snapshots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("histograms", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_stage_snapshots_taken_at", "stage_snapshots", ["taken_at"])


def downgrade() -> None:
    op.drop_index("ix_stage_snapshots_taken_at", table_name="stage_snapshots")
    op.drop_table("stage_snapshots")
