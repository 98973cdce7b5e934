"""Baseline: the quotes service's schema as create_all made it before migrations existed.

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
        "quotes_batches",
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("program_id", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    op.create_index(op.f("ix_quotes_batches_program_id"), "quotes_batches", ["program_id"], unique=False)
    op.create_table(
        "quotes_earmarks",
        sa.Column("pledge_id", sa.String(length=200), nullable=False),
        sa.Column("partner_id", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("earmark_batch_id", sa.String(length=200), nullable=True),
        sa.Column("amount", sa.String(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.PrimaryKeyConstraint("pledge_id"),
    )
    op.create_index(op.f("ix_quotes_earmarks_earmark_batch_id"), "quotes_earmarks", ["earmark_batch_id"], unique=False)
    op.create_table(
        "quotes_quotes",
        sa.Column("quote_id", sa.String(length=200), nullable=False),
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("vendor_id", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("quote_id"),
    )
    op.create_index(op.f("ix_quotes_quotes_batch_id"), "quotes_quotes", ["batch_id"], unique=False)
    op.create_index(op.f("ix_quotes_quotes_vendor_id"), "quotes_quotes", ["vendor_id"], unique=False)


def downgrade() -> None:
    op.drop_table("quotes_quotes")
    op.drop_table("quotes_earmarks")
    op.drop_table("quotes_batches")
    drop_mechanism_tables()
