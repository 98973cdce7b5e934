"""Baseline: the deliveries service's schema as create_all made it before migrations existed.

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
        "delivery_batches",
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("awarded_quantity", sa.Integer(), nullable=True),
        sa.Column("export_status", sa.String(length=32), nullable=True),
        sa.Column("cleared_quantity", sa.Integer(), nullable=False),
        sa.Column("export_decided_at", sa.String(length=40), nullable=True),
        sa.Column("dispatched", sa.Integer(), nullable=False),
        sa.Column("in_transit", sa.Integer(), nullable=False),
        sa.Column("missing", sa.Integer(), nullable=False),
        sa.Column("received", sa.Integer(), nullable=False),
        sa.Column("damaged", sa.Integer(), nullable=False),
        sa.Column("installed", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("shipments", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    op.create_table(
        "delivery_serials",
        sa.Column("serial", sa.String(length=100), nullable=False),
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("shipment_id", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("rack", sa.String(length=200), nullable=True),
        sa.Column("slot", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_index(op.f("ix_delivery_serials_batch_id"), "delivery_serials", ["batch_id"], unique=False)
    op.create_index(op.f("ix_delivery_serials_shipment_id"), "delivery_serials", ["shipment_id"], unique=False)
    op.create_table(
        "delivery_shipments",
        sa.Column("shipment_id", sa.String(length=200), nullable=False),
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("carrier", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("serials", sa.Integer(), nullable=False),
        sa.Column("origin_country", sa.String(length=2), nullable=False),
        sa.Column("route", sa.String(), nullable=False),
        sa.Column("dispatched_at", sa.String(length=40), nullable=False),
        sa.Column("declarations", sa.String(), nullable=False),
        sa.Column("received", sa.Integer(), nullable=False),
        sa.Column("damaged", sa.Integer(), nullable=False),
        sa.Column("missing", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("shipment_id"),
    )
    op.create_index(op.f("ix_delivery_shipments_batch_id"), "delivery_shipments", ["batch_id"], unique=False)


def downgrade() -> None:
    op.drop_table("delivery_shipments")
    op.drop_table("delivery_serials")
    op.drop_table("delivery_batches")
    drop_mechanism_tables()
