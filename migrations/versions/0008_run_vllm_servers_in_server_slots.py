"""run vLLM servers in server slots

A server slot's row in `workers` is written by the watchdog that runs the server (`kind`
'server'; its beat is a passed health check, `probe` says how the last one went). Operators ask a
host's watchdog to restart a server through `slot_commands`.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 23:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# Spelled out rather than imported: a revision must keep meaning what it meant when written.
SLOT_KINDS = ('worker', 'server')
SLOT_COMMANDS = ('restart',)


def _known(values: tuple[str, ...]) -> str:
    return f"IN ({', '.join(f'{v!r}' for v in values)})"


def upgrade() -> None:
    op.add_column('workers', sa.Column('kind', sa.Text(), server_default='worker', nullable=False))
    op.add_column('workers', sa.Column('probe', sa.Text(), server_default='', nullable=False))
    op.create_check_constraint('workers_kind_known', 'workers', f"kind {_known(SLOT_KINDS)}")
    op.create_table(
        'slot_commands',
        sa.Column('id', sa.BigInteger(), primary_key=True),
        sa.Column('host', sa.Text(), nullable=False),
        sa.Column('slot', sa.Text(), nullable=False),
        sa.Column('command', sa.Text(), nullable=False),
        sa.Column('requested_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column('taken_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint(f"command {_known(SLOT_COMMANDS)}", name='slot_commands_command_known'),
    )
    op.create_index('slot_commands_waiting', 'slot_commands', ['host'], postgresql_where=sa.text('taken_at IS NULL'))


def downgrade() -> None:
    op.drop_table('slot_commands')
    op.execute("DELETE FROM workers WHERE kind = 'server'")
    op.drop_constraint('workers_kind_known', 'workers', type_='check')
    op.drop_column('workers', 'probe')
    op.drop_column('workers', 'kind')
