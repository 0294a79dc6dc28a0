"""Prefect flows and the CLI that wire the editing library to the ledger.

Prefect is configured here, before it is first imported, to work offline:
a project-local home, no analytics, and a generous start-up time for its
temporary API server (15–25 s on a small machine). Values already in the
environment win.
"""

import os
from pathlib import Path

_CACHE = Path(os.environ.get("SEQEDIT_CACHE", Path.home() / ".cache" / "seqedit"))
for _name, _value in {
    "PREFECT_HOME": str(_CACHE / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "INFO",  # flow and task runs' own lines in the UI's Logs tab
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # seqedit's loggers outside a flow run (prefect_ui)
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)
