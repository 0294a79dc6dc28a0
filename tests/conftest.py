"""Test-session setup: offline, project-local caches, shared fixtures.

Fixtures live in ``tests/fixtures/`` by area and are loaded as plugins here.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The converted SmolLM2 and the C0 statistics are cached across test sessions
# (converting takes ~20 s, statistics minutes); everything else stays offline.
os.environ.setdefault("SEQEDIT_CACHE", str(ROOT / ".cache" / "seqedit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

pytest_plugins = ["fixtures.data", "fixtures.models", "fixtures.evaluation", "fixtures.database", "fixtures.prefect",
                  "fixtures.runs"]
