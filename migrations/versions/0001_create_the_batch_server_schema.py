"""create the batch server schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 08:21:12.185336
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('key_hash', sa.Text(), nullable=False),
    sa.Column('project', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_table('batches',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('project', sa.Text(), nullable=False),
    sa.Column('endpoint', sa.Text(), nullable=False),
    sa.Column('model', sa.Text(), nullable=True),
    sa.Column('input_file_id', sa.Text(), nullable=False),
    sa.Column('completion_window', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('priority', sa.Integer(), server_default='0', nullable=False),
    sa.Column('total', sa.Integer(), server_default='0', nullable=False),
    sa.Column('errors', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('output_file_id', sa.Text(), nullable=True),
    sa.Column('error_file_id', sa.Text(), nullable=True),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('in_progress_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('expires_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('finalizing_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('completed_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('failed_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('expired_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('cancelling_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('cancelled_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('batches_project_id', 'batches', ['project', 'id'], unique=False)
    op.create_index('batches_status', 'batches', ['status'], unique=False)
    op.create_table('files',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('project', sa.Text(), nullable=False),
    sa.Column('purpose', sa.Text(), nullable=False),
    sa.Column('filename', sa.Text(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('files_project_created', 'files', ['project', 'created_at'], unique=False)
    op.create_table('worker_restarts',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('slot', sa.Text(), nullable=False),
    sa.Column('host', sa.Text(), nullable=False),
    sa.Column('worker_id', sa.UUID(as_uuid=False), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('restarted_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('worker_restarts_slot_time', 'worker_restarts', ['host', 'slot', 'restarted_at'], unique=False)
    op.create_table('workers',
    sa.Column('id', sa.UUID(as_uuid=False), nullable=False),
    sa.Column('slot', sa.Text(), nullable=False),
    sa.Column('host', sa.Text(), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('gpu_ids', sa.Text(), server_default='', nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('requests_done', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('tokens_done', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('in_flight', sa.Integer(), server_default='0', nullable=False),
    sa.Column('started_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_seen', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_progress_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('stopped_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('workers_model_last_seen', 'workers', ['model', 'last_seen'], unique=False)
    op.create_table('batch_requests',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('batch_id', sa.Text(), nullable=False),
    sa.Column('line', sa.Integer(), nullable=False),
    sa.Column('custom_id', sa.Text(), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('priority', sa.Integer(), server_default='0', nullable=False),
    sa.Column('body', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('status', sa.Text(), server_default='queued', nullable=False),
    sa.Column('attempt', sa.Integer(), server_default='0', nullable=False),
    sa.Column('worker_id', sa.UUID(as_uuid=False), nullable=True),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('response', sa.Text(), nullable=True),
    sa.Column('error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), server_default='0', nullable=False),
    sa.Column('completion_tokens', sa.Integer(), server_default='0', nullable=False),
    sa.Column('claimed_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('finished_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('batch_requests_batch_line', 'batch_requests', ['batch_id', 'line'], unique=True)
    op.create_index('batch_requests_batch_status', 'batch_requests', ['batch_id', 'status'], unique=False)
    op.create_index('batch_requests_claimable', 'batch_requests', ['model', sa.literal_column('priority DESC'), 'id'], unique=False, postgresql_where=sa.text("status = 'queued'"))
    op.create_index('batch_requests_worker_running', 'batch_requests', ['worker_id'], unique=False, postgresql_where=sa.text("status = 'running'"))
    op.create_table('file_chunks',
    sa.Column('file_id', sa.Text(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['file_id'], ['files.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('file_id', 'seq')
    )


def downgrade() -> None:
    op.drop_table('file_chunks')
    op.drop_index('batch_requests_worker_running', table_name='batch_requests', postgresql_where=sa.text("status = 'running'"))
    op.drop_index('batch_requests_claimable', table_name='batch_requests', postgresql_where=sa.text("status = 'queued'"))
    op.drop_index('batch_requests_batch_status', table_name='batch_requests')
    op.drop_index('batch_requests_batch_line', table_name='batch_requests')
    op.drop_table('batch_requests')
    op.drop_index('workers_model_last_seen', table_name='workers')
    op.drop_table('workers')
    op.drop_index('worker_restarts_slot_time', table_name='worker_restarts')
    op.drop_table('worker_restarts')
    op.drop_index('files_project_created', table_name='files')
    op.drop_table('files')
    op.drop_index('batches_status', table_name='batches')
    op.drop_index('batches_project_id', table_name='batches')
    op.drop_table('batches')
    op.drop_table('api_keys')
