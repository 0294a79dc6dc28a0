"""Alembic environment: runs the ledger migrations on SQLite or PostgreSQL.

The database comes from, in order: a connection handed over by
:mod:`db.migrate` (``config.attributes["connection"]``), ``-x url=...`` on the
``alembic`` command line, then :func:`db.engine.database_url`'s defaults.
Engines are made by :func:`db.engine.make_engine`, so migrations run with the
same SQLite settings (foreign keys, transactional DDL) as the ledger itself.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from db.engine import database_url, make_engine
from db.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)


def _configure(**kwargs: object) -> None:
    # Batch mode lets future migrations ALTER tables on SQLite (which rebuilds them). SQLite's DDL
    # is transactional once BEGIN is ours (db.engine), so a failed migration leaves nothing behind.
    context.configure(target_metadata=Base.metadata, render_as_batch=True, transactional_ddl=True, **kwargs)


def _run(connection: Connection) -> None:
    """Run the migrations on ``connection`` in one transaction.

    On SQLite, altering a table means rebuilding it (batch mode): the old copy is dropped, and dropping a
    table that other rows reference fails while foreign keys are enforced (``alembic downgrade`` of a ledger
    with evaluations stopped at ``DROP TABLE evaluations``). So, as SQLite's documentation prescribes for
    schema changes, enforcement is switched off around the transaction — it can only change outside one, on
    the driver's connection — and the migrated database must pass ``PRAGMA foreign_key_check`` before it
    commits. This holds for ``alembic`` on the command line and for :mod:`db.migrate` alike.
    """
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
    try:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration would leave rows whose foreign keys point nowhere: "
                                       f"{broken[:5]}")
    finally:
        if sqlite:
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


def main() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if context.is_offline_mode():
        _configure(url=database_url(url), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


main()
