"""limit projects

A revoked API key keeps its row (`revoked_at`), so it stays refused across restarts and revoking
every key never opens the server. A partial index finds a project's unfinished batches, which
its limits count at each create.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 22:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

# The final batch statuses as they are today (a migration does not follow later code).
_UNFINISHED = "status NOT IN ('completed', 'failed', 'expired', 'cancelled')"


def upgrade() -> None:
    op.add_column('api_keys', sa.Column('revoked_at', postgresql.TIMESTAMP(timezone=True), nullable=True))
    op.create_index('batches_project_unfinished', 'batches', ['project'], unique=False,
                    postgresql_where=sa.text(_UNFINISHED))


def downgrade() -> None:
    op.drop_index('batches_project_unfinished', table_name='batches', postgresql_where=sa.text(_UNFINISHED))
    # Revoked keys would work again without the column: they are deleted instead.
    op.execute("DELETE FROM api_keys WHERE revoked_at IS NOT NULL")
    op.drop_column('api_keys', 'revoked_at')
