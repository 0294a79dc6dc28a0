"""A live SQLite ledger keeps its write-ahead log while other processes open and close it.

SQLite's last connection to close checkpoints the WAL and deletes it; it knows it is the last when it can
take an exclusive lock on the database file, which every other open connection prevents with a shared lock.
Those are POSIX locks, which a process loses as soon as it closes *any* descriptor of the file — so nothing
in a writing process may open the ledger behind SQLite's back (as the "is it an SQLite file?" check once
did with Python's ``open``). Otherwise a user's ``sqlite3 ledger.db`` during a study deletes the WAL under
the running writer, and every commit after that goes to a deleted file.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from db.engine import make_engine
from db.errors import LedgerUnavailableError

COUNT = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute('SELECT count(*) FROM t').fetchone()[0]); c.close()"


def _count_in_another_process(path) -> int:
    """Open the ledger in a fresh process, count, close (the close is what may checkpoint and delete the WAL)."""
    return int(subprocess.run([sys.executable, "-c", COUNT, str(path)], check=True, capture_output=True,
                              text=True).stdout)


def test_a_second_engine_for_a_ledger_being_written_does_not_expose_its_wal_to_deletion(tmp_path):
    path = tmp_path / "ledger.db"
    writer = make_engine(f"sqlite:///{path}")
    with writer.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    # the writer's pooled connection stays open, as during a run; a second engine for the same ledger in
    # this process (a study's arm, a migration) checks the file first
    make_engine(f"sqlite:///{path}")
    assert _count_in_another_process(path) == 1
    assert (tmp_path / "ledger.db-wal").exists(), "another process's close checkpointed and deleted the live WAL"
    with writer.begin() as connection:
        connection.exec_driver_sql("INSERT INTO t VALUES (2)")
    assert _count_in_another_process(path) == 2, "a commit after the WAL's deletion is invisible to other processes"
    writer.dispose()


def test_a_file_that_is_not_sqlite_is_still_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("not a database, just some notes\n" * 8)
    with pytest.raises(LedgerUnavailableError, match=r"notes.db is not an SQLite database \(a ledger is created by"):
        make_engine(f"sqlite:///{path}")
    assert path.read_text().startswith("not a database"), "the check must not write the file"
    assert not (tmp_path / "notes.db-wal").exists()
