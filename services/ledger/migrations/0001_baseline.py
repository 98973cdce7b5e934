"""Baseline: the ledger service's schema as create_all made it before migrations existed, and the
append-only guards its start-up used to install (services.ledger.log.guard_statements).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.ledger.log import guard_statements
from shared.runtime.migrations.baseline import create_mechanism_tables, drop_mechanism_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_mechanism_tables()
    op.create_table(
        "log_checkpoints",
        sa.Column("size", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("size"),
    )
    op.create_table(
        "log_cosignatures",
        sa.Column("size", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("key_id", sa.String(length=8), nullable=False),
        sa.Column("witness", sa.String(length=300), nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("size", "key_id"),
    )
    op.create_table(
        "log_entries",
        sa.Column("leaf_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("decision_id", sa.String(length=64), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(), nullable=False),
        sa.Column("service", sa.String(length=40), nullable=False),
        sa.Column("event_type", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("batch_id", sa.String(length=200), nullable=True),
        sa.Column("aggregate_id", sa.String(length=200), nullable=True),
        sa.Column("party_id", sa.String(length=200), nullable=True),
        sa.Column("appended_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("leaf_index"),
        sa.UniqueConstraint("decision_id"),
    )
    op.create_index(op.f("ix_log_entries_aggregate_id"), "log_entries", ["aggregate_id"], unique=False)
    op.create_index(op.f("ix_log_entries_batch_id"), "log_entries", ["batch_id"], unique=False)
    op.create_index("ix_log_entries_leaf_hash_index", "log_entries", ["leaf_hash", "leaf_index"], unique=False)
    op.create_index(op.f("ix_log_entries_party_id"), "log_entries", ["party_id"], unique=False)
    op.create_table(
        "log_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "log_nodes",
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx"),
    )
    op.create_table(
        "view_anomalies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("leaf_index", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(length=200), nullable=True),
        sa.Column("code", sa.String(length=60), nullable=False),
        sa.Column("severity", sa.String(length=20), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("service", sa.String(length=40), nullable=False),
        sa.Column("party_id", sa.String(length=200), nullable=True),
        sa.Column("decision_id", sa.String(length=64), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_view_anomalies_batch_id"), "view_anomalies", ["batch_id"], unique=False)
    op.create_index(op.f("ix_view_anomalies_code"), "view_anomalies", ["code"], unique=False)
    op.create_index(op.f("ix_view_anomalies_leaf_index"), "view_anomalies", ["leaf_index"], unique=False)
    op.create_table(
        "view_batch_parties",
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("party_id", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "party_id"),
    )
    op.create_index("ix_view_batch_parties_party", "view_batch_parties", ["party_id", "batch_id"], unique=False)
    op.create_table(
        "view_batch_steps",
        sa.Column("leaf_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("leaf_index"),
    )
    op.create_index("ix_view_batch_steps_batch", "view_batch_steps", ["batch_id", "leaf_index"], unique=False)
    op.create_table(
        "view_batches",
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("program_id", sa.String(length=200), nullable=True),
        sa.Column("model", sa.String(length=50), nullable=True),
        sa.Column("vendor_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=30), nullable=False),
        sa.Column("anomalies", sa.Integer(), nullable=False),
        sa.Column("last_leaf_index", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    op.create_index(op.f("ix_view_batches_model"), "view_batches", ["model"], unique=False)
    op.create_index("ix_view_batches_program_batch", "view_batches", ["program_id", "batch_id"], unique=False)
    op.create_index(op.f("ix_view_batches_program_id"), "view_batches", ["program_id"], unique=False)
    op.create_index(op.f("ix_view_batches_status"), "view_batches", ["status"], unique=False)
    op.create_index("ix_view_batches_status_batch", "view_batches", ["status", "batch_id"], unique=False)
    op.create_index(op.f("ix_view_batches_vendor_id"), "view_batches", ["vendor_id"], unique=False)
    op.create_table(
        "view_pledges",
        sa.Column("pledge_id", sa.String(length=200), nullable=False),
        sa.Column("partner_id", sa.String(length=200), nullable=False),
        sa.Column("program_id", sa.String(length=200), nullable=False),
        sa.Column("earmark_batch_id", sa.String(length=500), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("leaf_index", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("pledge_id"),
    )
    op.create_index(op.f("ix_view_pledges_earmark_batch_id"), "view_pledges", ["earmark_batch_id"], unique=False)
    op.create_index(op.f("ix_view_pledges_partner_id"), "view_pledges", ["partner_id"], unique=False)
    op.create_index(op.f("ix_view_pledges_program_id"), "view_pledges", ["program_id"], unique=False)
    op.create_table(
        "view_totals",
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("program_id", sa.String(length=200), nullable=False),
        sa.Column("party_id", sa.String(length=200), nullable=False),
        sa.Column("metric", sa.String(length=60), nullable=False),
        sa.Column("unit", sa.String(length=60), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "program_id", "party_id", "metric", "unit"),
    )

    # The log refuses UPDATE and DELETE from the first row on; PostgreSQL and SQLite variants.
    for statement in guard_statements(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("view_totals")
    op.drop_table("view_pledges")
    op.drop_table("view_batches")
    op.drop_table("view_batch_steps")
    op.drop_table("view_batch_parties")
    op.drop_table("view_anomalies")
    op.drop_table("log_nodes")
    op.drop_table("log_head")
    op.drop_table("log_entries")
    op.drop_table("log_cosignatures")
    op.drop_table("log_checkpoints")
    drop_mechanism_tables()
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS gputrace_append_only()")
        op.execute("DROP FUNCTION IF EXISTS gputrace_head_grows()")
