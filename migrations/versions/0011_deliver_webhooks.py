"""deliver webhooks

Webhook endpoints per project, the events of ended batches (written with the batch's final
status) and their deliveries, tried until the receiver answers 2xx.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 00:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

# Spelled out rather than imported: a revision must keep meaning what it meant when written.
DELIVERY_STATUSES = ('pending', 'delivered', 'failed')


def _now(name: str) -> sa.Column:
    return sa.Column(name, postgresql.TIMESTAMP(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        'webhook_endpoints',
        sa.Column('id', sa.Text(), primary_key=True),
        sa.Column('project', sa.Text(), nullable=False),
        sa.Column('name', sa.Text(), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('event_types', postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column('secret', sa.Text(), nullable=False),
        sa.Column('old_secret', sa.Text(), nullable=True),
        sa.Column('old_secret_until', postgresql.TIMESTAMP(timezone=True), nullable=True),
        _now('created_at'),
        _now('updated_at'),
    )
    op.create_index('webhook_endpoints_project_created', 'webhook_endpoints', ['project', 'created_at'])
    op.create_table(
        'webhook_events',
        sa.Column('id', sa.Text(), primary_key=True),
        sa.Column('project', sa.Text(), nullable=False),
        sa.Column('type', sa.Text(), nullable=False),
        sa.Column('payload', sa.Text(), nullable=False),
        _now('created_at'),
    )
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.BigInteger(), primary_key=True),
        sa.Column('event_id', sa.Text(), sa.ForeignKey('webhook_events.id', ondelete='CASCADE'), nullable=False),
        sa.Column('endpoint_id', sa.Text(), sa.ForeignKey('webhook_endpoints.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('status', sa.Text(), server_default='pending', nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        _now('next_attempt_at'),
        sa.Column('last_status_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.Text(), server_default='', nullable=False),
        _now('created_at'),
        sa.Column('delivered_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint(f"status IN ({', '.join(repr(s) for s in DELIVERY_STATUSES)})",
                           name='webhook_deliveries_status_known'),
    )
    op.create_index('webhook_deliveries_due', 'webhook_deliveries', ['next_attempt_at'],
                    postgresql_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_events')
    op.drop_table('webhook_endpoints')
