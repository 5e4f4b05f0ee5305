"""check the statuses

Every status column accepts only the statuses the code knows (core/batch_app/domain/statuses.py
at this revision; a new status needs a new revision).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 17:00:00
"""

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# Spelled out rather than imported: a revision must keep meaning what it meant when written.
STATUSES = {
    'batches': ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', 'cancelling',
                'cancelled'),
    'batch_requests': ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired'),
    'workers': ('loading', 'idle', 'busy', 'draining', 'stopped', 'dead'),
}


def upgrade() -> None:
    for table, statuses in STATUSES.items():
        allowed = ", ".join(f"'{status}'" for status in statuses)
        op.create_check_constraint(f'{table}_status_known', table, f"status IN ({allowed})")


def downgrade() -> None:
    for table in STATUSES:
        op.drop_constraint(f'{table}_status_known', table, type_='check')
