"""Baseline: the pledges service's schema as create_all made it before migrations existed.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shared.runtime.migrations.baseline import create_mechanism_tables, drop_mechanism_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_mechanism_tables()
    op.create_table(
        "pledges",
        sa.Column("pledge_id", sa.String(length=200), nullable=False),
        sa.Column("partner_id", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("pledge_id"),
    )
    op.create_index(op.f("ix_pledges_partner_id"), "pledges", ["partner_id"], unique=False)


def downgrade() -> None:
    op.drop_table("pledges")
    drop_mechanism_tables()
