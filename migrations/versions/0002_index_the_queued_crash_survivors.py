"""index the queued crash survivors

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 22:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('batch_requests_suspects', 'batch_requests', ['model'], unique=False,
                    postgresql_where=sa.text("status = 'queued' AND attempt > 0"))


def downgrade() -> None:
    op.drop_index('batch_requests_suspects', table_name='batch_requests',
                  postgresql_where=sa.text("status = 'queued' AND attempt > 0"))
