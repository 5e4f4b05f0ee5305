"""attribute worker deaths

Why each worker died is a row of `worker_deaths` (its cause, who declared it, how many running
requests it held), and the rescue charges those requests a crash only for the causes a request
may have caused; `workers.blames_requests` goes. Workers already dead keep what they were
charged: a death that blamed its requests becomes `exited`, one that did not `killed`. Each
host's watchdog beats in `hosts`, so a worker silent together with its host is told from a hung
one; `batch_requests.host_losses` counts the runs in a row a request lost with its host.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 22:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None

CAUSES = ("'exited', 'crash_signal', 'oom_killed', 'hung', 'stalled', 'failed_to_start', 'killed', 'drained', "
          "'fenced', 'host_silent', 'unwatched', 'abandoned', 'restarted'")
BEFORE = "declared dead before causes were recorded"


def upgrade() -> None:
    op.create_table(
        'hosts',
        sa.Column('host', sa.Text(), nullable=False),
        sa.Column('last_seen', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('host'),
    )
    op.create_table(
        'worker_deaths',
        sa.Column('worker_id', postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column('cause', sa.Text(), nullable=False),
        sa.Column('detail', sa.Text(), server_default='', nullable=False),
        sa.Column('declared_by', sa.Text(), server_default='', nullable=False),
        sa.Column('declared_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('requests', sa.Integer(), server_default='0', nullable=False),
        sa.CheckConstraint(f"cause IN ({CAUSES})", name='worker_deaths_cause_known'),
        sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('worker_id'),
    )
    op.execute(f"""INSERT INTO worker_deaths (worker_id, cause, detail, declared_at)
                   SELECT id, CASE WHEN blames_requests THEN 'exited' ELSE 'killed' END, '{BEFORE}',
                          coalesce(stopped_at, last_seen)
                   FROM workers WHERE status = 'dead'""")
    op.drop_column('workers', 'blames_requests')
    op.add_column('batch_requests', sa.Column('host_losses', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('batch_requests', 'host_losses')
    op.add_column('workers', sa.Column('blames_requests', sa.Boolean(), server_default='true', nullable=False))
    op.execute("""UPDATE workers w SET blames_requests = false FROM worker_deaths d
                  WHERE d.worker_id = w.id
                    AND d.cause NOT IN ('exited', 'crash_signal', 'oom_killed', 'hung', 'stalled', 'failed_to_start')""")
    op.drop_table('worker_deaths')
    op.drop_table('hosts')
