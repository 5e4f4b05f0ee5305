"""count batch progress as it happens

A batch's finished requests are counted as they are stored, a row per batch and worker, instead
of counting its request rows at every retrieve. Existing counts are carried over.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 18:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'batch_progress',
        sa.Column('batch_id', sa.Text(), nullable=False),
        sa.Column('worker_id', postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column('completed', sa.Integer(), server_default='0', nullable=False),
        sa.Column('failed', sa.Integer(), server_default='0', nullable=False),
        sa.Column('input_tokens', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('output_tokens', sa.BigInteger(), server_default='0', nullable=False),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('batch_id', 'worker_id'),
    )
    op.execute("""
        INSERT INTO batch_progress (batch_id, worker_id, completed, failed, input_tokens, output_tokens)
        SELECT batch_id, worker_id, count(*) FILTER (WHERE status = 'succeeded'),
               count(*) FILTER (WHERE status = 'failed'), sum(prompt_tokens), sum(completion_tokens)
        FROM batch_requests WHERE status IN ('succeeded', 'failed') AND worker_id IS NOT NULL
        GROUP BY batch_id, worker_id
    """)


def downgrade() -> None:
    op.drop_table('batch_progress')
