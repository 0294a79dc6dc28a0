"""The writer lock of a run: at most one process writes a run's ledger at a time.

Both implementations are released by the operating system or the server when
their holder dies, so a crashed flow never leaves a run locked:

* PostgreSQL: a session-level advisory lock, held by a dedicated connection
  in autocommit mode. Unlike ``SELECT … FOR UPDATE`` on the run row it keeps
  no transaction open for hours (which would hold back VACUUM) and does not
  block the writer's own updates of the run. Its key is (hash of
  ``seqedit run writer`` and the current schema, run id), so ledgers in
  different schemas of one database do not collide.
* SQLite: an exclusive ``flock`` on a file next to the database
  (``<db>.run-<id>.lock``, removed when the lock is released). SQLite is a
  single-machine database, which is exactly the scope of ``flock``; the lock
  belongs to the open file, so two writers in one process exclude each other too.

A second writer gets :class:`RunLockedError` at once, naming the holder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from db.errors import RunLockedError

LOCK_NAMESPACE = "seqedit run writer"


class WriterLock(Protocol):
    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError`; never waits."""

    def release(self) -> None: ...


def writer_lock(engine: Engine, run_id: int, subject: str = "run") -> WriterLock:
    """The lock implementation for ``engine``'s database (not yet acquired). ``subject`` names what is
    locked: ``run`` (a run's writer) or ``arm`` (the process running a study arm); each has its own keys."""
    if engine.dialect.name == "postgresql":
        return AdvisoryLock(engine, run_id, subject)
    database = Path(engine.url.database).resolve()
    return FileLock(database.with_name(f"{database.name}.{subject}-{run_id}.lock"), run_id, subject)


class AdvisoryLock:
    """PostgreSQL ``pg_try_advisory_lock(namespace, run_id)`` on a connection of its own."""

    def __init__(self, engine: Engine, run_id: int, subject: str = "run") -> None:
        self._engine = engine
        self._run_id = run_id
        self._subject = subject
        self._connection: Connection | None = None
        self._namespace = 0

    def acquire(self) -> None:
        connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            schema = connection.scalar(text("SELECT current_schema()"))
            namespace = LOCK_NAMESPACE if self._subject == "run" else f"seqedit {self._subject} writer"
            digest = hashlib.sha256(f"{namespace}:{schema}".encode()).digest()
            self._namespace = int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
            keys = {"namespace": self._namespace, "run_id": self._run_id}
            if not connection.scalar(text("SELECT pg_try_advisory_lock(:namespace, :run_id)"), keys):
                holder = connection.scalar(text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = :namespace AND objid = :run_id AND objsubid = 2"), keys)
                raise RunLockedError(f"{self._subject} {self._run_id} already has a writer "
                                     f"(PostgreSQL backend pid {holder}); one writer per {self._subject}")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:namespace, :run_id)"),
                               {"namespace": self._namespace, "run_id": self._run_id})
        except DBAPIError:
            connection.invalidate()  # a broken connection is discarded; the server dropped its locks
        finally:
            connection.close()


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path``; the file records who holds it."""

    def __init__(self, path: Path, run_id: int, subject: str = "run") -> None:
        self._path = path
        self._run_id = run_id
        self._subject = subject
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace") or "unknown"
                os.close(fd)
                raise RunLockedError(f"{self._subject} {self._run_id} already has a writer ({holder}, lock file "
                                     f"{self._path}); one writer per {self._subject}") from None
            # The holder before us removes the file as it releases (see release); if it did so after we
            # opened it, our lock is on an unlinked inode that a newcomer would not see: start again.
            if self._still_linked(fd):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd

    def _still_linked(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self._path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Remove the lock file, then unlock: no ``.run-N.lock`` is left beside the ledger, and a process
        that opened the file meanwhile sees it unlinked and retries (see :meth:`acquire`)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.unlink(self._path)
            except (FileNotFoundError, PermissionError):
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
