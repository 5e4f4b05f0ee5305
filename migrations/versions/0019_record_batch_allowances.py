"""record batch allowances

A pool whose servers also serve interactive traffic sets each server's batch allowance from its
load; the heartbeat records it with the reason for its last change, for batchctl, the status
page and /metrics. NULL: the pool's fixed max_in_flight_per_backend.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06 19:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backends", sa.Column("allowance", sa.Integer(), nullable=True))
    op.add_column("backends", sa.Column("allowance_reason", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("backends", "allowance_reason")
    op.drop_column("backends", "allowance")
