"""deliveries: on SQLite an id is never given twice (AUTOINCREMENT)

A VERP return address names a delivery by its id. SQLite gives a new row the largest id plus one,
so once `forget` had deleted a reader's deliveries (the newest ones), the next campaign reused
their ids, and a bounce to the forgotten reader's old address (in the mail they kept) named
another reader's delivery. AUTOINCREMENT can only be declared when a table is made, so the table
is rebuilt. PostgreSQL's sequences never give an id twice: nothing to do there.

Revision ID: 0009_delivery_ids_never_reused
Revises: 0008_complaints
Create Date: 2026-12-07 05:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_delivery_ids_never_reused"
down_revision = "0008_complaints"
branch_labels = None
depends_on = None

COLUMNS = (
    "id, campaign_id, subscriber_id, status, attempts, next_attempt_at, lease_until, last_reply,"
    " relay, claimed_by, created_at, requeued_at, sent_at"
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # Foreign keys are on and cannot be turned off inside the migration's transaction, so dropping
    # `deliveries` would cascade into `complaints` and empty it: its rows wait in a plain copy.
    op.execute("CREATE TABLE _complaints_kept AS SELECT * FROM complaints")
    op.drop_index(op.f("ix_complaints_campaign_id"), table_name="complaints")
    op.drop_table("complaints")
    op.create_table(
        "_deliveries_new",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("last_reply", sa.String(length=1000), nullable=True),
        sa.Column("relay", sa.String(length=100), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("requeued_at", sa.DateTime(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name="fk_deliveries_campaign_id_campaigns",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name="fk_deliveries_subscriber_id_subscribers",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint("campaign_id", "subscriber_id", name="uq_deliveries_campaign_id"),
        sqlite_autoincrement=True,
    )
    # Copying the ids sets AUTOINCREMENT's counter to the largest of them. (An id deleted before
    # this upgrade above that largest one cannot be known, and may be given once more.)
    op.execute(f"INSERT INTO _deliveries_new ({COLUMNS}) SELECT {COLUMNS} FROM deliveries")
    op.drop_table("deliveries")  # and its indexes, made again below
    op.rename_table("_deliveries_new", "deliveries")
    op.create_index("ix_deliveries_claim", "deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_deliveries_due", "deliveries", ["campaign_id", "status", "next_attempt_at"])
    op.create_index("ix_deliveries_sent_at", "deliveries", ["sent_at"])
    op.create_table(
        "complaints",
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_complaints_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_complaints_delivery_id_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("delivery_id", name=op.f("pk_complaints")),
    )
    op.create_index(op.f("ix_complaints_campaign_id"), "complaints", ["campaign_id"])
    op.execute(
        "INSERT INTO complaints (delivery_id, campaign_id, created_at)"
        " SELECT delivery_id, campaign_id, created_at FROM _complaints_kept"
    )
    op.drop_table("_complaints_kept")


def downgrade() -> None:
    """Nothing to undo: AUTOINCREMENT asks nothing of the code that 0008 ran with."""
