"""expire files

A file may expire (`expires_after` at upload, FILE_RETENTION otherwise); a batch keeps how long
its output and error files live (`output_expires_after`). Existing files are kept until deleted.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 23:45:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('files', sa.Column('expires_at', postgresql.TIMESTAMP(timezone=True), nullable=True))
    op.create_index('files_expiring', 'files', ['expires_at'], postgresql_where=sa.text('expires_at IS NOT NULL'))
    op.add_column('batches', sa.Column('output_expires_after', sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column('batches', 'output_expires_after')
    op.drop_index('files_expiring', table_name='files')
    op.drop_column('files', 'expires_at')
