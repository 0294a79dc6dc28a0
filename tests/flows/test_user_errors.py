"""What a new user meets: every expected error is one line, checked before Prefect starts or a model loads.

Each case runs the real command line (``flows.cli.main``) against a real ledger (SQLite, and the
PostgreSQL server for the server cases) and asserts the whole of what it printed: one line on stderr,
``seqedit CMD: error: …``, nothing on stdout, exit status 2 — and that nothing was created.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import RunRecord
from flows.cli import main
from fixtures.database import add_facts
from fixtures.runs import SOURCE, tiny_settings


def _one_line_error(capsys, argv: list[str], command: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"seqedit {command}: error: "), lines[0]
    assert captured.out == ""
    return lines[0]


def _run_count(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(RunRecord)).scalar_one()


# -- the ledger: URLs, files, servers ------------------------------------------------------------------------------

def test_ledger_urls_and_files_that_cannot_be_opened(tmp_path, capsys):
    readme = Path(__file__).resolve().parents[2] / "README.md"
    cases = [
        (["history", "--db", "not a url"], "is not a database URL"),
        (["history", "--db", "mysql://u@h/db"], "unsupported database 'mysql'"),
        (["init", "--db", f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}"], "does not exist"),
        (["history", "--db", f"sqlite:///{readme}"], "is not an SQLite database"),
        (["history", "--db", f"sqlite:///{tmp_path / 'typo.db'}"], "no ledger at"),
        (["report", "--run", "1", "--db", f"sqlite:///{tmp_path / 'typo.db'}"], "no ledger at"),
    ]
    for argv, expected in cases:
        assert expected in _one_line_error(capsys, argv, argv[0]), argv
    assert not (tmp_path / "typo.db").exists(), "a read-only command must not create a ledger"


@pytest.mark.postgres
def test_a_postgresql_server_or_database_that_is_not_there(capsys):
    assert "does not exist" in _one_line_error(
        capsys, ["history", "--db", "postgresql://postgres@127.0.0.1:5432/no_such_seqedit_db"], "history")
    assert "Connection refused" in _one_line_error(
        capsys, ["history", "--db", "postgresql://postgres@127.0.0.1:1/test"], "history")


def _as_nobody(argv: list[str]) -> subprocess.CompletedProcess:
    """``seqedit ARGV`` as an unprivileged user (root ignores file modes), or skip where that is impossible."""
    command = [sys.executable, "-m", "flows.cli", *argv]
    if os.geteuid() == 0:
        if not Path("/usr/bin/setpriv").exists():
            pytest.skip("needs setpriv to drop root's privileges")
        command = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {**os.environ, "SEQEDIT_CACHE": "/tmp/seqedit-nobody-cache", "PREFECT_HOME": "/tmp/seqedit-nobody-prefect"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[2])


def test_a_ledger_in_a_read_only_folder_can_be_read_but_not_written():
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="seqedit-ro-"))
    path = folder / "ledger.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    from db.engine import make_engine

    engine = make_engine(url)
    add_facts(engine, 3)
    engine.dispose()  # closed cleanly: SQLite removes its -wal and -shm files, as in a copied or archived ledger
    assert not Path(f"{path}-wal").exists()
    folder.chmod(0o555)
    path.chmod(0o444)
    try:
        read = _as_nobody(["history", "--db", url])
        assert read.returncode == 0, read.stderr
        assert read.stdout.strip() == "(nothing recorded)"
        write = _as_nobody(["ingest", "counterfact-sample", "--db", url])
        assert write.returncode == 2
        assert write.stderr.strip().splitlines() == [write.stderr.strip()]
        assert write.stderr.startswith("seqedit ingest: error: ") and "read-only" in write.stderr
    finally:
        folder.chmod(0o755)


# -- settings, runs, batches: refused at once, nothing created ------------------------------------------------------

@pytest.fixture
def ledger_with_facts(database):
    add_facts(database.engine, 8, source=SOURCE)
    return database


def test_settings_are_refused_by_key_and_type_before_a_run_exists(ledger_with_facts, capsys):
    url = ledger_with_facts.url
    cases = [
        (["--set", "values.steps=abc"], "values.steps: expected an integer, got 'abc'"),
        (["--set", "nosuch.key=1"], "unknown setting(s) nosuch.key"),
        (["--set", "values.stepz=3"], "unknown setting(s) values.stepz"),
        (["--eval-set", "n_downstream=many"], "evaluation.n_downstream: expected an integer, got 'many'"),
        (["--limit", "0"], "limit must be at least 1"),
        (["--layers", "99"], "layers: [99] not in the model"),
        (["--model", "/no/such/model", "--hparams", "smollm2-135m"], "cannot load model '/no/such/model'"),
        (["--resume", "999"], "no run 999"),
        (["--resume", "1", "--batch-size", "4"], "leave out --batch-size"),
    ]
    for options, expected in cases:
        message = _one_line_error(capsys, ["run", "--db", url, *options], "run")
        assert expected in message, (options, message)
    assert _run_count(ledger_with_facts.engine) == 0


def test_a_run_with_nothing_to_edit_says_so_exits_1_and_writes_nothing(ledger_with_facts, capsys):
    url, engine = ledger_with_facts.url, ledger_with_facts.engine
    size = Path(engine.url.database).stat().st_size if engine.dialect.name == "sqlite" else None
    for options in (["--source", "no-such-source"], ["--pool", "private", "--source", "empty"]):
        assert main(["run", "--db", url, *options]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("seqedit run: nothing to edit: no ") and "\n" not in err
    assert _run_count(engine) == 0
    if size is not None:
        assert Path(engine.url.database).stat().st_size == size


def test_a_dataset_no_place_has_is_one_line_before_anything_starts(ledger_with_facts, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("SEQEDIT_DATA", str(tmp_path))  # no mirror: MRPC is neither bundled nor downloadable here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error(capsys, ["run", "--db", ledger_with_facts.url, "--source", SOURCE,
                                       "--eval-set", 'downstream_tasks=["mrpc"]'], "run")
    assert "dataset 'mrpc' not available (mirror, bundle, hub)" in message
    assert _run_count(ledger_with_facts.engine) == 0


def test_global_options_work_after_the_subcommand(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert main(["init", "--db", url]) == 0
    capsys.readouterr()
    assert main(["history", "--db", url, "-v", "--data-dir", str(tmp_path)]) == 0
    assert main(["-v", "history", "--db", url]) == 0
    assert os.environ["SEQEDIT_DATA"] == str(tmp_path.resolve())


def test_a_failing_flow_prints_one_line_and_its_traceback_only_with_v(tiny_model_folder, tmp_path, prefect_server):
    """The error is raised inside the Prefect flow (the run's model folder is gone when it is evaluated):
    without ``-v`` neither Prefect's log of the crash nor a traceback reaches the terminal."""
    import shutil

    from db.engine import make_engine
    from db.ingest import ingest_file
    from flows.pipeline import sequential_edit
    from fixtures.data import counterfact_file

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    ingest_file(make_engine(url), counterfact_file(4), source=SOURCE)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_folder, model)
    run_id = sequential_edit(settings=tiny_settings(str(model), limit=4).to_dict(), db_url=url)["run_id"]
    shutil.rmtree(model)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    argv = [sys.executable, "-m", "flows.cli", "eval", "--db", url, "--run", str(run_id)]
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 2
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1, quiet.stderr
    assert lines[0].startswith(f"seqedit eval: error: cannot load model {str(model)!r}: not a local folder")
    loud = subprocess.run(argv[:3] + ["-v"] + argv[3:], capture_output=True, text=True, timeout=300, env=env)
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr


def test_every_option_of_every_command_says_what_it_does():
    """``--help`` of each command documents each of its options (argparse shows no text for one without)."""
    import argparse

    from flows.cli import _subparsers_of, build_parser

    parser = build_parser()
    missing = [f"{child.prog} {action.option_strings[0]}" for child in _subparsers_of(parser)
               for action in child._actions
               if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []
