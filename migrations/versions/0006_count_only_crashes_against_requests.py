"""count only crashes against requests

A request's `attempt` counts its runs; `crashes` counts the deaths of workers that may have been
its fault (a crash, a hang, an OOM kill), and decides poison. A worker killed from outside (a
SIGKILL with no OOM kill) has `blames_requests` false: its requests run again uncharged. Requests
queued after a death under the old rules keep it as crashes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 19:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('batch_requests', sa.Column('crashes', sa.Integer(), server_default='0', nullable=False))
    # Under the old rules every run but a running request's current one ended in a crash.
    op.execute("""UPDATE batch_requests SET crashes = CASE status WHEN 'running' THEN attempt - 1 ELSE attempt END
                  WHERE status IN ('queued', 'running') AND attempt > 0""")
    op.add_column('workers', sa.Column('blames_requests', sa.Boolean(), server_default='true', nullable=False))
    op.drop_index('batch_requests_suspects', table_name='batch_requests',
                  postgresql_where=sa.text("status = 'queued' AND attempt > 0"))
    op.create_index('batch_requests_suspects', 'batch_requests', ['model'], unique=False,
                    postgresql_where=sa.text("status = 'queued' AND crashes > 0"))


def downgrade() -> None:
    op.drop_index('batch_requests_suspects', table_name='batch_requests',
                  postgresql_where=sa.text("status = 'queued' AND crashes > 0"))
    op.create_index('batch_requests_suspects', 'batch_requests', ['model'], unique=False,
                    postgresql_where=sa.text("status = 'queued' AND attempt > 0"))
    op.drop_column('workers', 'blames_requests')
    op.drop_column('batch_requests', 'crashes')
