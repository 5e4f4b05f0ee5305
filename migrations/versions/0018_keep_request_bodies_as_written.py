"""keep request bodies as written

A request's body is stored as `json` instead of `jsonb`: jsonb reorders an object's keys, and a
line's `tools` (their parameters' properties, say) are rendered into the prompt by the model's
chat template in the order the line wrote them, so a reordered body gave another prompt than
`vllm serve` renders for the same line. The queue never looks inside a body. Bodies stored
before keep the order jsonb gave them.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 12:10:00
"""

from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE batch_requests ALTER COLUMN body TYPE json USING body::json")


def downgrade() -> None:
    op.execute("ALTER TABLE batch_requests ALTER COLUMN body TYPE jsonb USING body::jsonb")
