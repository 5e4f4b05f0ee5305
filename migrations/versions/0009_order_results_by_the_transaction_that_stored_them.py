"""order results by the transaction that stored them

A result records the transaction that stored it, the order in which the finished part of a
running batch is downloaded (GET /v1/batches/{id}/output). The results that batches still
running stored before this revision sort first (transaction 0), in the order of their lines.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 23:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('batch_requests', sa.Column('finished_xid', sa.BigInteger(), nullable=True))
    op.execute("""
        UPDATE batch_requests SET finished_xid = 0
        WHERE status = 'succeeded' AND batch_id IN (
            SELECT id FROM batches WHERE status NOT IN ('completed', 'failed', 'expired', 'cancelled'))""")


def downgrade() -> None:
    op.drop_column('batch_requests', 'finished_xid')
