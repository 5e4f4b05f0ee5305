"""record scheduler jobs

A worker (or server) started inside a scheduler's job records the job and the node it runs on
(SLURM's job id and node name), so operators see which job holds which worker. Rows from before
are no job's: empty.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04 22:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('workers', sa.Column('scheduler_job', sa.Text(), server_default='', nullable=False))
    op.add_column('workers', sa.Column('scheduler_node', sa.Text(), server_default='', nullable=False))


def downgrade() -> None:
    op.drop_column('workers', 'scheduler_node')
    op.drop_column('workers', 'scheduler_job')
