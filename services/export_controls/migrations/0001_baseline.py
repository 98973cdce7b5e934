"""Baseline: the export_controls service's schema as create_all made it before migrations existed.

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
        "export_cases",
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=30), nullable=False),
        sa.Column("awarded_quantity", sa.Integer(), nullable=False),
        sa.Column("cleared_quantity", sa.Integer(), nullable=False),
        sa.Column("license_number", sa.String(length=200), nullable=True),
        sa.Column("quota_key", sa.String(length=300), nullable=True),
        sa.Column("quota_delta", sa.Integer(), nullable=False),
        sa.Column("quota_apply_on", sa.String(length=30), nullable=True),
        sa.Column("decision", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    op.create_table(
        "export_quota_usage",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("used_tpp", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("export_quota_usage")
    op.drop_table("export_cases")
    drop_mechanism_tables()
