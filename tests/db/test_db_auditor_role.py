"""An auditor's PostgreSQL role (SELECT only on the ledger, as the README gives it): the reading commands work
under it, the writing ones are refused in one line before they start."""

from __future__ import annotations

import uuid

import pytest
import torch
from sqlalchemy import make_url, text

from db.engine import make_engine
from db.evaluations import record_evaluation
from db.ledger import acquire_writer
from db.migrate import upgrade
from fixtures.database import add_facts, apply_and_commit, new_run, postgres_schema, random_weights
from flows.cli import main

pytestmark = pytest.mark.postgres


def test_an_auditor_role_reads_verifies_and_reports_but_cannot_write(postgres_admin, tmp_path, capsys):
    role = f"seqedit_auditor_{uuid.uuid4().hex[:8]}"
    with postgres_schema(postgres_admin) as url:
        upgrade(url)
        engine = make_engine(url)
        add_facts(engine, 4)
        weights = random_weights()
        run = new_run(engine, weights, batch_size=2)
        with acquire_writer(engine, run.id) as writer:
            apply_and_commit(writer, writer.claim_batch(), weights, torch.Generator().manual_seed(0))
        record_evaluation(engine, run.id, 1, [("es", 1.0)])
        engine.dispose()
        schema = make_url(url).query["options"].split("search_path=")[1]
        with postgres_admin.connect() as connection:  # the README's auditor role
            connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            connection.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
            connection.execute(text(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'))
        auditor = make_url(url).set(username=role).render_as_string(hide_password=False)
        try:
            assert main(["history", "--run", str(run.id), "--db", auditor]) == 0
            assert main(["verify", "--run", str(run.id), "--db", auditor]) == 0
            assert "verified" in capsys.readouterr().out
            assert main(["report", "--run", str(run.id), "--out", str(tmp_path / "r"), "--quiet", "--db", auditor]) == 0
            capsys.readouterr()
            for command in (["rollback", "--run", str(run.id), "--to", "0"],
                            ["retract", "--run", str(run.id), "--fact", "1"],
                            ["run", "--resume", str(run.id)]):
                assert main([*command, "--db", auditor]) == 2, command
                error = capsys.readouterr().err
                assert f"the ledger role '{role}' may only read" in error and len(error.strip().splitlines()) == 1
        finally:
            with postgres_admin.connect() as connection:
                connection.execute(text(f'DROP OWNED BY "{role}"'))
                connection.execute(text(f'DROP ROLE "{role}"'))
