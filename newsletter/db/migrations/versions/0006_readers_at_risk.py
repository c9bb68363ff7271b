"""readers at risk: discreet envelope, on_key_problem, reader keys, key notices

Revision ID: 0006_readers_at_risk
Revises: 0005_archive
Create Date: 2026-12-06 01:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_readers_at_risk"
down_revision = "0005_archive"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, never batch mode: on SQLite batch mode copies and drops `subscribers`,
    # and with foreign keys on, dropping it cascades to every subscription and delivery.
    op.add_column(
        "subscribers",
        sa.Column("discreet", sa.String(length=8), nullable=False, server_default="off"),
    )
    op.add_column(
        "subscribers",
        sa.Column("on_key_problem", sa.String(length=8), nullable=False, server_default="withhold"),
    )
    op.create_table(
        "reader_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=7), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("armored", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(), nullable=True),
        sa.Column("confirm_sent_at", sa.DateTime(), nullable=True),
        sa.Column("reminded_at", sa.DateTime(), nullable=True),
        sa.Column("recheck_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_reader_keys_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reader_keys")),
        sa.UniqueConstraint("subscriber_id", "status", name=op.f("uq_reader_keys_subscriber_id")),
    )
    op.create_table(
        "key_notices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("problem", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_key_notices_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_notices")),
        sa.UniqueConstraint(
            "subscriber_id", "fingerprint", "problem", name=op.f("uq_key_notices_subscriber_id")
        ),
    )
    op.create_index(
        op.f("ix_key_notices_subscriber_id"), "key_notices", ["subscriber_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_key_notices_subscriber_id"), table_name="key_notices")
    op.drop_table("key_notices")
    op.drop_table("reader_keys")
    # Plain ALTER TABLE, not batch mode (see upgrade).
    for column in ("on_key_problem", "discreet"):
        op.execute(f"ALTER TABLE subscribers DROP COLUMN {column}")
