"""web signup and archive: campaign slug and archived flag, confirmation marks, used challenges

Revision ID: 0005_archive
Revises: 0004_console
Create Date: 2026-12-02 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_archive"
down_revision = "0004_console"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "confirmation_marks",
        sa.Column("email_hash", sa.String(length=64), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("email_hash", name=op.f("pk_confirmation_marks")),
    )
    op.create_index(
        op.f("ix_confirmation_marks_sent_at"), "confirmation_marks", ["sent_at"], unique=False
    )
    op.create_table(
        "used_challenges",
        sa.Column("challenge", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("challenge", name=op.f("pk_used_challenges")),
    )
    op.create_index(
        op.f("ix_used_challenges_expires_at"), "used_challenges", ["expires_at"], unique=False
    )
    # Plain ADD COLUMN and CREATE INDEX, never batch mode: on SQLite batch mode copies and drops
    # `campaigns`, and with foreign keys on, dropping it cascades to every variant and delivery.
    op.add_column("campaigns", sa.Column("slug", sa.String(length=120), nullable=True))
    op.add_column(
        "campaigns", sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.true())
    )
    # Campaigns sent before 0005 get a slug from their kind, day and id (unique by the id).
    campaigns = sa.table(
        "campaigns",
        sa.column("id", sa.Integer()),
        sa.column("kind", sa.String()),
        sa.column("created_at", sa.DateTime()),
        sa.column("slug", sa.String()),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(campaigns.c.id, campaigns.c.kind, campaigns.c.created_at))
    for cid, kind, created_at in rows.all():
        connection.execute(
            campaigns.update()
            .where(campaigns.c.id == cid)
            .values(slug=f"{kind}-{created_at:%Y-%m-%d}-{cid}")
        )
    op.create_index(op.f("ix_campaigns_slug"), "campaigns", ["slug"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_campaigns_slug"), table_name="campaigns")
    # Plain ALTER TABLE, not batch mode (see upgrade).
    for column in ("archived", "slug"):
        op.execute(f"ALTER TABLE campaigns DROP COLUMN {column}")
    op.drop_index(op.f("ix_used_challenges_expires_at"), table_name="used_challenges")
    op.drop_table("used_challenges")
    op.drop_index(op.f("ix_confirmation_marks_sent_at"), table_name="confirmation_marks")
    op.drop_table("confirmation_marks")
