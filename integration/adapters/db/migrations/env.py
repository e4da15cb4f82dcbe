"""Alembic environment: the URL comes from the Config built in integration.adapters.db.session."""

from __future__ import annotations

from alembic import context

from integration.adapters.db.models import Base
from integration.adapters.db.session import make_engine

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # No statement timeout: building an index on a big table may rightly take longer than any one query should.
    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or "", statement_timeout_s=None)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
