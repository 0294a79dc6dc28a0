"""Errors of the ledger, one class per thing a caller may want to handle differently.

The flows catch :class:`RunLockedError` (another writer owns the run) apart
from :class:`LedgerIntegrityError` (the recorded history does not reproduce:
stop everything) and :class:`BatchStateError` (a batch is not in the state the
caller assumed, e.g. it was rolled back meanwhile). Usage errors the CLI should
print without a traceback derive from :class:`ValueError` as well.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error raised by :mod:`db`."""


class SchemaNotCurrentError(LedgerError, ValueError):
    """The database has not been migrated to the schema this code expects."""


class RunNotFoundError(LedgerError, LookupError):
    """No run with the given id."""


class RunLockedError(LedgerError):
    """Another process (or another writer in this one) holds the run's writer lock."""


class BatchStateError(LedgerError):
    """A batch operation does not fit the batch's (or run's) current status."""


class LedgerIntegrityError(LedgerError):
    """Replayed or checkpointed weights do not match the sha256 the ledger recorded."""


class RequestLostError(LedgerError):
    """A worker finished an evaluation request it no longer holds (its lease ran out and another worker
    claimed the request, or the request is done already); its result is discarded."""


class LedgerUnavailableError(LedgerError, ValueError):
    """The ledger cannot be opened as asked: a malformed URL, a missing or non-SQLite file, a read-only
    ledger opened for writing, an unreachable server or database. Always the user's to fix."""


class LedgerReadOnlyError(LedgerError, ValueError):
    """The ledger's role may only read (an auditor's): a command that writes is refused before it starts."""
