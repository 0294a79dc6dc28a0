"""The schema exists only through the migrations, identically on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from db.engine import database_url, in_schema, make_engine, transaction
from db.errors import SchemaNotCurrentError
from db.migrate import current_revision, downgrade, head_revision, require_current, upgrade
from db.models import Base
from flows.cli import main

LEDGER_TABLES = {"facts", "runs", "rollbacks", "batches", "batch_facts", "weight_deltas", "checkpoints",
                 "evaluations", "metrics", "alarms", "evaluation_requests", "studies",
                 "study_arms", "arm_batches", "arm_fact_scores", "v_star_cache", "ledger_identity"}


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_creates_every_table_and_downgrade_removes_them(empty_database_url):
    engine = make_engine(empty_database_url)
    try:
        with pytest.raises(SchemaNotCurrentError, match="has no ledger tables"):
            require_current(engine)
        upgrade(empty_database_url)
        assert _tables(engine) == LEDGER_TABLES
        assert current_revision(engine) == head_revision()
        require_current(engine)
        downgrade(empty_database_url)
        assert _tables(engine) == set()
        assert current_revision(engine) is None
    finally:
        engine.dispose()


def test_migrations_and_models_describe_the_same_schema(database):
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                       Base.metadata)
    assert differences == []


def test_check_constraints_are_enforced(database):
    with pytest.raises(IntegrityError):
        with transaction(database.engine, write=True) as session:
            session.execute(text("INSERT INTO facts (source, source_index, location, record_sha256, status, "
                                 "created_at, updated_at) VALUES ('s', 0, 'line 1', 'x', 'bogus', "
                                 "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    finally:
        engine.dispose()


def test_database_url_defaults_and_driver(monkeypatch):
    monkeypatch.delenv("SEQEDIT_DATABASE_URL", raising=False)
    assert database_url().render_as_string() == "sqlite:///seqedit.db"
    monkeypatch.setenv("SEQEDIT_DATABASE_URL", "postgresql://user@db.example/ledger")
    assert database_url().drivername == "postgresql+psycopg"
    assert database_url("sqlite:///other.db").database == "other.db"
    with pytest.raises(ValueError, match="in-memory"):
        database_url("sqlite://")
    with pytest.raises(ValueError, match="unsupported database"):
        database_url("mysql://localhost/x")
    assert in_schema("postgresql://localhost/ledger", "study_1").query["options"] == "-csearch_path=study_1"
    with pytest.raises(ValueError, match="PostgreSQL feature"):
        in_schema("sqlite:///x.db", "study_1")


def test_init_command_migrates_the_database(empty_database_url, capsys):
    assert main(["init", "--db", empty_database_url]) == 0
    assert f"revision {head_revision()}" in capsys.readouterr().out
    engine = make_engine(empty_database_url)
    try:
        assert _tables(engine) == LEDGER_TABLES
    finally:
        engine.dispose()


def test_a_ledger_written_at_revision_0002_upgrades_and_keeps_working(database):
    """A ledger at revision 0002 (no batch diagnostics, no stored keys, no evaluation kinds) holding a run
    with batches, checkpoints and evaluations: upgraded to head (SQLite rebuilds referenced tables), its
    history reads back, its evaluations are ``full`` ones, and its weights restore and verify."""
    import torch

    from db.evaluations import record_evaluation
    from db.history import batches_frame, evaluations_frame
    from db.ledger import acquire_writer
    from db.replay import weights_at
    from fixtures.database import add_facts, apply_and_commit, new_run, random_weights

    engine = database.engine
    add_facts(engine, 8)
    weights = random_weights()
    run = new_run(engine, weights, batch_size=4, checkpoint_every=1)
    generator = torch.Generator().manual_seed(0)
    with acquire_writer(engine, run.id) as writer:
        for _ in range(2):
            apply_and_commit(writer, writer.claim_batch(), weights, generator)
    for seq in (0, 2):
        record_evaluation(engine, run.id, seq, [("ppl.x", 10.0 + seq)])
    downgrade(database.url, "0002")
    engine.dispose()
    assert "diagnostics" not in {column["name"] for column in inspect(engine).get_columns("batches")}
    upgrade(database.url)
    frame = batches_frame(engine, run.id)
    assert list(frame["status"]) == ["applied", "applied"]
    assert not [column for column in frame.columns if column.startswith("memorization_")]
    restored = weights_at(engine, run.id, 2)
    assert all(torch.equal(restored[layer], weights[layer]) for layer in weights)
    evaluations = evaluations_frame(engine, run.id)
    assert list(evaluations["seq"]) == [0, 2] and set(evaluations["kind"]) == {"full"}


def _populate(engine) -> None:
    """One of everything: facts, a run, applied batches with keys, a checkpoint, evaluations with metrics
    and an alarm, an evaluation request, a rollback — what a current ledger holds."""
    import torch

    from db.evaluation_requests import request_evaluation
    from db.evaluations import AlarmRow, record_evaluation
    from db.ledger import acquire_writer
    from fixtures.database import add_facts, apply_and_commit, new_run, random_weights

    add_facts(engine, 6)
    weights = random_weights()
    run = new_run(engine, weights, batch_size=2, checkpoint_every=2)
    generator = torch.Generator().manual_seed(0)
    with acquire_writer(engine, run.id) as writer:
        for _ in range(3):
            keys = {layer: torch.randn(weight.shape[1], 2, generator=generator) for layer, weight in weights.items()}
            apply_and_commit(writer, writer.claim_batch(), weights, generator, keys=keys)
    for seq in (0, 2):
        record_evaluation(engine, run.id, seq, [("es", 0.5), ("ppl.wiki", 20.0)], duration_s=1.0,
                          alarms=[AlarmRow(rule="ppl.*:ratio:2", metric="ppl.wiki", value=20.0, baseline=10.0,
                                           threshold=2.0, action="warn", message="ppl.wiki doubled")] if seq else ())
    request_evaluation(engine, run.id, 3)
    with acquire_writer(engine, run.id) as writer:
        writer.rollback(2)


def test_every_downgrade_works_on_a_ledger_with_data_from_the_alembic_command_line(empty_database_url):
    """``alembic downgrade`` one revision at a time from head to base on a populated ledger (it stopped at
    ``DROP TABLE evaluations`` on SQLite), then back up; on both backends."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    alembic = [str(Path(sys.executable).with_name("alembic")), "-x", f"url={empty_database_url}"]
    upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        _populate(engine)
        revisions = ["0004", "0003", "0002", "0001", "base"]
        for revision in revisions:
            done = subprocess.run([*alembic, "downgrade", revision], cwd=root, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, f"downgrade {revision}: {done.stderr[-2000:]}"
            assert current_revision(engine) == (None if revision == "base" else revision)
        assert _tables(engine) == set()
        upgrade(empty_database_url)  # and the chain still goes up again
        assert current_revision(engine) == head_revision()
        _populate(engine)
        downgrade(empty_database_url, "0003")  # the same through db.migrate
        assert current_revision(engine) == "0003"
    finally:
        engine.dispose()
