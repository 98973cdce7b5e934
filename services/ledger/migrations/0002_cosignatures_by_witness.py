"""The cosignatures by witness key: the witnessing task asks, for each witness, the last size it
cosigned (services/ledger/witnessing.py, max(size) WHERE key_id = ...), and the primary key
(size, key_id) cannot answer that without reading every cosignature.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # if_not_exists: a ledger made by create_all from this code (some tests) already has it.
    op.create_index("ix_log_cosignatures_key_size", "log_cosignatures", ["key_id", "size"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_log_cosignatures_key_size", table_name="log_cosignatures")
