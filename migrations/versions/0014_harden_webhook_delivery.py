"""webhook delivery that no receiver can hold up

Each endpoint gets a breaker (failed tries in a row, and the pause they earned); a delivery being
tried is marked until when (`leased_until`), so the tries in flight to an endpoint are counted.
The claim looks deliveries up per endpoint, and deleting an endpoint finds its deliveries by
index. Signing secrets already stored stay as they are (plain `whsec_...` keeps signing); a
sender seals them once WEBHOOK_SECRET_KEY is set.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 22:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('webhook_endpoints', sa.Column('failures', sa.Integer(), server_default='0', nullable=False))
    op.add_column('webhook_endpoints', sa.Column('paused_until', postgresql.TIMESTAMP(timezone=True), nullable=True))
    op.add_column('webhook_deliveries', sa.Column('leased_until', postgresql.TIMESTAMP(timezone=True), nullable=True))
    op.create_index('webhook_deliveries_endpoint', 'webhook_deliveries', ['endpoint_id'], unique=False)
    op.create_index('webhook_deliveries_endpoint_due', 'webhook_deliveries', ['endpoint_id', 'next_attempt_at'],
                    unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('webhook_deliveries_in_flight', 'webhook_deliveries', ['endpoint_id'], unique=False,
                    postgresql_where=sa.text('leased_until IS NOT NULL'))
    op.drop_index('webhook_deliveries_due', table_name='webhook_deliveries', postgresql_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    op.create_index('webhook_deliveries_due', 'webhook_deliveries', ['next_attempt_at'], unique=False,
                    postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('webhook_deliveries_in_flight', table_name='webhook_deliveries')
    op.drop_index('webhook_deliveries_endpoint_due', table_name='webhook_deliveries')
    op.drop_index('webhook_deliveries_endpoint', table_name='webhook_deliveries')
    op.drop_column('webhook_deliveries', 'leased_until')
    op.drop_column('webhook_endpoints', 'paused_until')
    op.drop_column('webhook_endpoints', 'failures')
