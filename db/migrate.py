"""Run the Alembic migrations from code, and check that a database is up to date.

The schema exists only through the migrations in ``alembic/`` (next to this
package in the repository, which is installed in editable mode), so
``seqedit init``, the tests and the flows all call :func:`upgrade` rather than
``create_all``: the database a test sees is built exactly as production's.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Engine

from db.engine import display_url, make_engine
from db.errors import SchemaNotCurrentError

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "alembic"


def _config() -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"Alembic migrations not found at {MIGRATIONS_DIR}; "
                                "install seqedit from its repository (pip install -e .)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _run(url: str | URL | None, action: str, revision: str) -> None:
    """Run an Alembic command on the ledger at ``url``, in one transaction (``alembic/env.py`` opens it,
    with SQLite's foreign keys handled as schema changes need)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            config = _config()
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
            if connection.in_transaction():
                connection.commit()
    finally:
        engine.dispose()


def upgrade(url: str | URL | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` (default: see :func:`db.engine.database_url`) up to ``revision``."""
    _run(url, "upgrade", revision)


def downgrade(url: str | URL | None = None, revision: str = "base") -> None:
    """Migrate down to ``revision``; ``base`` removes every ledger table."""
    _run(url, "downgrade", revision)


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def require_current(engine: Engine) -> None:
    """Raise :class:`SchemaNotCurrentError` unless the database is at the head revision.

    Commands call this instead of migrating on their own: changing a shared
    production schema should be an explicit ``seqedit init``.
    """
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no ledger tables" if current is None else f"is at revision {current}"
        raise SchemaNotCurrentError(f"database {display_url(engine)} {state}, this code needs {head}; "
                                    f"run `seqedit init --db URL` to migrate it")
