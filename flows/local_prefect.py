"""A local Prefect server and workers as child processes: for the scale-out test, the soak, and trying it out.

``prefect server start`` and ``prefect worker start`` are the real programs a
deployment runs; these helpers only start them in their own process groups
(so that stopping one stops whatever it started), wait for the server to be
healthy, and stop everything on the way out. The server keeps its state in
SQLite under ``home`` unless a database URL is given
(``postgresql+asyncpg://…``, which is how a shared deployment runs it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect_program() -> list[str]:
    """The ``prefect`` command of this interpreter's environment."""
    program = Path(sys.executable).with_name("prefect")
    return [str(program)] if program.exists() else [sys.executable, "-m", "prefect"]


def stop_process_group(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group started with ``start_new_session``, then SIGKILL what is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stray children of the group, if any
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(timeout=grace_s)


@contextmanager
def prefect_server(home: Path, log_path: Path, database_url: str | None = None,
                   startup_timeout_s: float = 180.0) -> Iterator[str]:
    """A ``prefect server start`` child process; yields its API URL and stops it at the end."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_API_DATABASE_CONNECTION_URL=database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
               PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = log_path.open("w")
    process = subprocess.Popen([*prefect_program(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited ({process.returncode}) at start:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy within {startup_timeout_s:.0f} s:\n"
                                   f"{log_path.read_text()}")
            time.sleep(0.5)
        yield api
    finally:
        stop_process_group(process)
        log.close()


def start_worker(pool: str, env: Mapping[str, str], log_path: Path, limit: int = 1) -> subprocess.Popen:
    """``prefect worker start --pool POOL`` in its own process group (the flow runs it starts are its children)."""
    return subprocess.Popen([*prefect_program(), "worker", "start", "--pool", pool, "--type", "process",
                             "--limit", str(limit)], env=dict(env), stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
