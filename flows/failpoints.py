"""Named crash points for recovery tests.

``SEQEDIT_FAILPOINT=NAME`` (or ``NAME:SEQ`` for one batch) makes the process
kill itself with SIGKILL when it reaches that point — no cleanup, no
``finally``, exactly like a power cut — so tests can prove that a run resumes
from any of them. Unset, a failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("during_solve", "before_commit", "after_commit")
"""``during_solve``: some layers updated, others not; ``before_commit``: every weight written, the
ledger not; ``after_commit``: the ledger committed, the evaluation not run."""


def failpoint(name: str, seq: int) -> None:
    wanted = os.environ.get("SEQEDIT_FAILPOINT")
    if not wanted:
        return
    point, _, at = wanted.partition(":")
    if point == name and (not at or int(at) == seq):
        os.kill(os.getpid(), signal.SIGKILL)
