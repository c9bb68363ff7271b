"""Alembic environment: runs on the connection that newsletter.db.migrate() hands over."""

from alembic import context

from newsletter.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `newsletter init` drives migrations
    raise RuntimeError("run migrations through `newsletter init`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
