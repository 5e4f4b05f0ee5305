"""record the health of pool backends

A pool worker (the `openai-http` engine) reports each of its backends with its heartbeat: a row
per backend and worker. A pool worker none of whose backends is healthy is `no_backend`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 20:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# Spelled out rather than imported: a revision must keep meaning what it meant when written.
WORKER_STATUSES = ('loading', 'idle', 'busy', 'no_backend', 'draining', 'stopped', 'dead')
PREVIOUS_WORKER_STATUSES = ('loading', 'idle', 'busy', 'draining', 'stopped', 'dead')


def _worker_status_check(statuses: tuple[str, ...]) -> None:
    op.drop_constraint('workers_status_known', 'workers', type_='check')
    op.create_check_constraint('workers_status_known', 'workers',
                               f"status IN ({', '.join(f'{s!r}' for s in statuses)})")


def upgrade() -> None:
    _worker_status_check(WORKER_STATUSES)
    op.create_table(
        'backends',
        sa.Column('worker_id', postgresql.UUID(as_uuid=False), sa.ForeignKey('workers.id', ondelete='CASCADE'),
                  primary_key=True),
        sa.Column('url', sa.Text(), primary_key=True),
        sa.Column('model', sa.Text(), nullable=False),
        sa.Column('state', sa.Text(), nullable=False),
        sa.Column('in_flight', sa.Integer(), server_default='0', nullable=False),
        sa.Column('completed', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('errors', postgresql.JSONB(), server_default='{}', nullable=False),
        sa.Column('last_error', sa.Text(), server_default='', nullable=False),
        sa.Column('checked_at', sa.TIMESTAMP(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table('backends')
    op.execute("UPDATE workers SET status = 'idle' WHERE status = 'no_backend'")
    _worker_status_check(PREVIOUS_WORKER_STATUSES)
