"""store finished results once

A finished batch's results live in its output and error files; its request rows are deleted by
retention, and what a retry needs (the line numbers that did not succeed) is kept beside the
batch. Batches that finished before this revision get their line numbers here; their rows then
go with the next retention rounds, a bounded number a statement, not in this migration.

`batch_requests` takes an update per claim and per result, none of them HOT (its status is
indexed): autovacuum runs on it after a small share of changed rows, without cost pauses, so
dead row versions do not pile up in the claim's indexes.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 22:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

_FINAL = "'completed', 'failed', 'expired', 'cancelled'"
QUEUE_AUTOVACUUM = ("autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02, "
                    "autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0")


def upgrade() -> None:
    op.add_column('batches', sa.Column('requests_pruned_at', postgresql.TIMESTAMP(timezone=True), nullable=True))
    op.create_index('batches_unpruned', 'batches', ['id'], unique=False,
                    postgresql_where=sa.text(f"requests_pruned_at IS NULL AND status IN ({_FINAL})"))
    op.create_table(
        'unsuccessful_lines',
        sa.Column('batch_id', sa.Text(), nullable=False),
        sa.Column('lines', postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('batch_id'),
    )
    op.execute(f"""
        INSERT INTO unsuccessful_lines (batch_id, lines)
        SELECT r.batch_id, array_agg(r.line ORDER BY r.line) FROM batch_requests r
        JOIN batches b ON b.id = r.batch_id
        WHERE b.status IN ({_FINAL}) AND r.status <> 'succeeded'
        GROUP BY r.batch_id
    """)
    op.create_index('webhook_deliveries_event', 'webhook_deliveries', ['event_id'], unique=False)
    op.execute(f"ALTER TABLE batch_requests SET ({QUEUE_AUTOVACUUM})")


def downgrade() -> None:
    op.execute("ALTER TABLE batch_requests RESET (autovacuum_vacuum_scale_factor, "
               "autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_scale_factor, autovacuum_vacuum_cost_delay)")
    op.drop_index('webhook_deliveries_event', table_name='webhook_deliveries')
    op.drop_table('unsuccessful_lines')
    op.drop_index('batches_unpruned', table_name='batches')
    op.drop_column('batches', 'requests_pruned_at')
