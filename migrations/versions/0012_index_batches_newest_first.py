"""index batches newest first

Listing batches (newest first, a page after a given batch) reads one page of an index, per
project and across projects (the status page), instead of sorting every batch there is.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 18:00:00
"""

from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('batches_project_newest', 'batches', ['project', 'created_at', 'id'], unique=False)
    op.create_index('batches_newest', 'batches', ['created_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('batches_newest', table_name='batches')
    op.drop_index('batches_project_newest', table_name='batches')
