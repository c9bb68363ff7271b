"""variants record the nonce of their link markers

Revision ID: 0003_links
Revises: 0002
Create Date: 2026-12-01 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_links"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Variants stored before this revision get "": they carry the old fixed markers.
    with op.batch_alter_table("variants", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("link_nonce", sa.String(length=64), nullable=False, server_default="")
        )


def downgrade() -> None:
    # Back to the fixed markers the older version looks for, so its variants still send. Feed
    # text that looks like them is inert now, but would not be then: first every such name is
    # changed (none is left to form a marker), then only this render's markers become them.
    for name in ("UNSUBSCRIBE_URL", "PREFERENCES_URL"):
        inert = name.replace("_", "-")
        for column in ("html", "text"):
            op.execute(
                f"UPDATE variants SET {column} = replace({column}, '{name}', '{inert}') "
                "WHERE link_nonce <> ''"
            )
            op.execute(
                f"UPDATE variants SET {column} = replace({column}, "
                f"'%%{inert}_' || link_nonce || '%%', '%%{name}%%') WHERE link_nonce <> ''"
            )
    with op.batch_alter_table("variants", schema=None) as batch_op:
        batch_op.drop_column("link_nonce")
