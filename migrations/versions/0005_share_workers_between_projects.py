"""share workers between projects

Each request carries its batch's project, and queued requests are indexed by model then project,
so a claim can take from every project with queued work in turn.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('batch_requests', sa.Column('project', sa.Text(), nullable=True))
    op.execute("UPDATE batch_requests r SET project = b.project FROM batches b WHERE b.id = r.batch_id")
    op.alter_column('batch_requests', 'project', nullable=False)
    op.drop_index('batch_requests_claimable', table_name='batch_requests', postgresql_where=sa.text("status = 'queued'"))
    op.create_index('batch_requests_claimable', 'batch_requests',
                    ['model', 'project', sa.literal_column('priority DESC'), 'id'], unique=False,
                    postgresql_where=sa.text("status = 'queued'"))


def downgrade() -> None:
    op.drop_index('batch_requests_claimable', table_name='batch_requests', postgresql_where=sa.text("status = 'queued'"))
    op.create_index('batch_requests_claimable', 'batch_requests', ['model', sa.literal_column('priority DESC'), 'id'],
                    unique=False, postgresql_where=sa.text("status = 'queued'"))
    op.drop_column('batch_requests', 'project')
