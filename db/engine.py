"""Engines, sessions and transactions for the ledger, from one database URL.

The URL comes from the caller, else ``SEQEDIT_DATABASE_URL``, else an SQLite
file ``seqedit.db`` in the working directory (the embedded default). A plain
``postgresql://`` URL means psycopg 3, the driver this project installs.

SQLite needs three settings to behave as a shared ledger: WAL journaling (a
reader never blocks the writer), foreign keys (off by default in SQLite) and a
busy timeout (a second writer waits instead of failing at once). And because a
deferred SQLite transaction that reads first and writes later can fail with
"database is locked" when another writer committed in between, every *write*
transaction here starts with ``BEGIN IMMEDIATE``: it takes SQLite's write lock
up front and so serialises writers the way row locks do on PostgreSQL. Reads
use a plain ``BEGIN``.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from typing import Iterator

from pathlib import Path

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from db.errors import LedgerReadOnlyError, LedgerUnavailableError

URL_ENV = "SEQEDIT_DATABASE_URL"
DEFAULT_URL = "sqlite:///seqedit.db"
SQLITE_BUSY_TIMEOUT_S = 60.0
"""How long an SQLite writer waits for another writer's transaction to end."""

POSTGRES_INSERT_PAGE_ROWS = 100
"""Rows per multi-row INSERT on PostgreSQL: statements of 1,000 rows × 23 columns (SQLAlchemy's
default) spend more time being planned than 100-row ones; this halves the time to insert facts."""

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_WRITE_OPTION = "seqedit_write"


def database_url(url: str | URL | None = None) -> URL:
    """The URL to use: ``url``, else ``$SEQEDIT_DATABASE_URL``, else ``sqlite:///seqedit.db``."""
    given = url or os.environ.get(URL_ENV) or DEFAULT_URL
    try:
        parsed = make_url(given)
    except ArgumentError:
        raise LedgerUnavailableError(f"{given!r} is not a database URL; expected sqlite:///PATH or "
                          f"postgresql://USER@HOST[:PORT]/DATABASE") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise LedgerUnavailableError(f"unsupported database {backend!r}; the ledger runs on {', '.join(SUPPORTED_BACKENDS)}")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise LedgerUnavailableError("the ledger needs an SQLite *file* (e.g. sqlite:///seqedit.db): an in-memory "
                         "database is private to one connection and cannot be shared by writers")
    return parsed


def absolute_url(url: str | URL | None = None) -> str:
    """:func:`database_url` as a string that means the same from any working directory
    (an SQLite path made absolute); for URLs handed to another process, e.g. a scheduled run."""
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        parsed = parsed.set(database=os.path.abspath(parsed.database))
    return parsed.render_as_string(hide_password=False)


def in_schema(url: str | URL, schema: str) -> URL:
    """A PostgreSQL URL whose connections use ``schema`` (through ``search_path``).

    Separate ledgers (a study, a test, a benchmark) can so share one database
    without seeing each other's tables; the writer locks are per schema too.
    """
    parsed = database_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"schemas are a PostgreSQL feature, not available for {parsed.get_backend_name()}")
    return parsed.update_query_dict({"options": f"-csearch_path={schema}"})


def display_url(engine_or_url: Engine | URL) -> str:
    """The URL with any password masked, for messages and logs."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url
    return url.render_as_string(hide_password=True)


def make_engine(url: str | URL | None = None, read_only: bool = False, check: bool = False) -> Engine:
    """An engine for ``url`` (see :func:`database_url`), configured for the ledger.

    ``read_only`` is for the commands that only read (history, report, export): an SQLite ledger must
    exist — a mistyped path is an error, not a new empty file — and is opened read-only, so it can be read
    from a read-only folder or by a user who may not write it. ``check`` connects once now, so that an
    unreachable server, a missing database or a file that is not a ledger fails here with one clear line
    instead of deep inside the first query.
    """
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed, read_only)
    else:
        engine = create_engine(parsed, pool_pre_ping=True, insertmanyvalues_page_size=POSTGRES_INSERT_PAGE_ROWS)
    if check:
        check_connection(engine)
    return engine


def _sqlite_engine(parsed: URL, read_only: bool) -> Engine:
    path = Path(parsed.database)
    if path.exists() and (not path.is_file() or not _is_sqlite_file(path)):
        raise LedgerUnavailableError(f"{path} is not an SQLite database (a ledger is created by `seqedit init --db "
                          f"sqlite:///PATH` at a new path)")
    if read_only:
        if not path.is_file():
            raise LedgerUnavailableError(f"no ledger at {path.resolve()} (check --db; `seqedit init` creates one)")
        # immutable=1 where nobody can write (a read-only folder has no room for SQLite's -shm and -wal
        # files, without which a WAL database cannot be opened otherwise): nothing can change under the reader.
        immutable = "&immutable=1" if not os.access(path.resolve().parent, os.W_OK) else ""
        uri = f"file:{path.resolve()}?mode=ro{immutable}"
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(
            uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False))
        event.listen(engine, "connect", _configure_sqlite_reader)
    else:
        folder = path.resolve().parent
        if not folder.is_dir():
            raise LedgerUnavailableError(f"cannot create the ledger {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise LedgerUnavailableError(f"the ledger {path.resolve()} is read-only (SQLite writes the file and "
                                         f"its folder); history, report and export can still read it")
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _is_sqlite_file(path: Path) -> bool:
    """Whether SQLite reads ``path`` as a database (an empty file is one not yet written).

    SQLite itself reads the header, through an ``immutable`` connection (no locks taken, no -wal or -shm
    created). Reading it with Python's ``open`` would be wrong: closing any descriptor of a file releases
    every POSIX lock the process holds on it, so a second engine made for a ledger this process already
    writes would drop SQLite's shared lock — and the next process to close a connection would then think
    itself the last one, checkpoint the WAL and delete it under the live writer, whose later commits are lost.
    SQLite's own descriptors are safe: it defers closing a file's descriptors while locks on it are held.
    """
    try:
        probe = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error:
        return False
    try:
        probe.execute("PRAGMA schema_version").fetchone()
        return True
    except sqlite3.DatabaseError:
        return False
    finally:
        probe.close()


def check_connection(engine: Engine) -> None:
    """Connect once; a failure becomes a :class:`LedgerError` naming the ledger in one line."""
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except DBAPIError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig is not None else str(error)
        raise LedgerUnavailableError(f"cannot open the ledger {display_url(engine)}: {reason}") from None


WRITTEN_TABLES = ("facts", "runs", "batches", "batch_facts", "weight_deltas", "checkpoints", "evaluations", "metrics")
"""The tables every writing command changes: a role without INSERT or UPDATE on one of them is an auditor's."""


def require_writable(engine: Engine) -> None:
    """Refuse at once (:class:`LedgerReadOnlyError`) when the connected PostgreSQL role may not write the ledger
    (SQLite's read-only files are refused by :func:`make_engine`), so that a writing command run under an
    auditor's role stops with one line before it loads a model — instead of failing on its first INSERT."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as connection:
        user = connection.exec_driver_sql("SELECT current_user").scalar()
        missing = [table for table in WRITTEN_TABLES
                   if not connection.exec_driver_sql(
                       "SELECT has_table_privilege(current_user, to_regclass(%(table)s), 'INSERT') "
                       "AND has_table_privilege(current_user, to_regclass(%(table)s), 'UPDATE')",
                       {"table": table}).scalar()]
    if missing:
        raise LedgerReadOnlyError(f"the ledger role {user!r} may only read ({', '.join(missing)}: no INSERT or "
                                  f"UPDATE): this command writes the ledger; history, verify, identify, report "
                                  f"and export work under it")


def _configure_sqlite_reader(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    dbapi_connection.isolation_level = None
    dbapi_connection.execute("PRAGMA query_only=ON")


def _configure_sqlite_connection(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Hand transaction control to SQLAlchemy (see _begin_sqlite_transaction): the
    # sqlite3 module's own BEGIN handling skips SELECTs and DDL.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as error:  # a read-only file or folder: name it instead of SQLite's words
        raise LedgerUnavailableError(f"cannot write the ledger (is it or its folder read-only?): {error}") from None
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def session_factory(engine: Engine, write: bool = False) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; ``write=True`` ones take SQLite's write lock when they begin.

    Objects stay usable after commit (``expire_on_commit=False``) because the
    ledger hands plain values back to callers once its transaction is over.
    """
    bind = engine.execution_options(**{_WRITE_OPTION: True}) if write else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


@contextmanager
def transaction(engine: Engine, write: bool = False) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    with session_factory(engine, write)() as session, session.begin():
        yield session
