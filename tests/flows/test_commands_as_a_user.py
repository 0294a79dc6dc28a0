"""The bugs found trying seqedit as a new user would, each on a real run of a tiny random Llama.

Runs of the tiny model take seconds, so every command is exercised for real: the flows on the test
suite's Prefect server, the ledger on SQLite, the model loaded from a Hugging Face folder.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select

from db.history import batches_frame, facts_frame
from db.errors import RunLockedError
from db.ledger import acquire_writer
from db.migrate import upgrade
from db.models import RollbackRecord
from db.replay import weights_at
from flows.cli import main
from flows.model_session import ModelSession
from flows.one_shot import OneShotRequest, run_one_shot
from flows.pipeline import sequential_edit
from fixtures.data import counterfact_file
from fixtures.runs import TINY_EDIT, tiny_settings

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_an_interrupted_run_gives_its_claimed_batch_back_to_the_pool(tiny_ledger, tiny_model_folder, monkeypatch):
    url, engine = tiny_ledger
    import flows.pipeline

    def interrupt_batch_2(name: str, seq: int) -> None:
        if (name, seq) == ("during_solve", 2):
            raise KeyboardInterrupt  # Ctrl-C with one layer of batch 2 written
    monkeypatch.setattr(flows.pipeline, "failpoint", interrupt_batch_2)
    with pytest.raises(KeyboardInterrupt):
        sequential_edit(settings=tiny_settings(tiny_model_folder, limit=12).to_dict(), db_url=url)
    monkeypatch.undo()
    batches = batches_frame(engine, 1)
    assert list(batches["status"]) == ["applied", "failed"]
    statuses = facts_frame(engine).set_index("fact_id")["status"]
    assert list(statuses[:4]) == ["applied"] * 4 and list(statuses[4:16]) == ["pending"] * 12  # nothing stranded

    second = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=8).to_dict(), db_url=url)
    assert batches_frame(engine, second["run_id"])["status"].tolist() == ["applied", "applied"]
    statuses = facts_frame(engine).set_index("fact_id")["status"]
    assert list(statuses[:12]) == ["applied"] * 12  # the next run on the pool edited batch 2's facts


def test_a_second_writer_is_refused_before_anything_loads(tiny_ledger, tiny_model_folder, capsys, monkeypatch):
    url, engine = tiny_ledger
    run_id = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=4).to_dict(), db_url=url)["run_id"]
    capsys.readouterr()
    loads = []
    get = ModelSession.get.__func__
    monkeypatch.setattr(ModelSession, "get", classmethod(lambda cls, *args: loads.append(args) or get(cls, *args)))
    with acquire_writer(engine, run_id):
        assert main(["run", "--db", url, "--resume", str(run_id)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"seqedit run: error: run {run_id} already has a writer") and "\n" not in err
        assert main(["rollback", "--db", url, "--run", str(run_id), "--to", "0"]) == 2
        assert "already has a writer" in capsys.readouterr().err
        with pytest.raises(RunLockedError):  # the flow itself, as a scheduled run or a worker calls it
            sequential_edit(run_id=run_id, db_url=url)
    assert loads == []  # refused before any model was asked for


@pytest.mark.parametrize("algorithm", ["alphaedit", "encore"])
def test_one_shot_edits_preserve_their_earlier_batches_like_a_run(tiny_ledger, tiny_model_folder, tmp_path, algorithm):
    """``seqedit edit`` with two batches and a run of the same two batches give the same weights: the
    one-shot path adds each batch to the edit memory the next batch preserves."""
    url, engine = tiny_ledger
    settings = tiny_settings(tiny_model_folder, algorithm=algorithm, limit=8, fact_pool="private")
    run = sequential_edit(settings=settings.to_dict(), db_url=url)
    saved = tmp_path / "one-shot"
    run_one_shot(OneShotRequest(facts_path=counterfact_file(8), algorithm=algorithm, batch_size=4, limit=8,
                                model=tiny_model_folder, hparams="smollm2-135m", overrides=dict(TINY_EDIT),
                                save=saved))
    one_shot = load_file(saved / "model.safetensors")
    for layer, weight in weights_at(engine, run["run_id"], 2).items():
        assert torch.allclose(one_shot[f"model.layers.{layer}.mlp.down_proj.weight"], weight, rtol=0, atol=1e-6), layer


def test_rollback_json_is_only_json_and_a_rollback_to_where_the_run_is_records_nothing(tiny_ledger, tiny_model_folder,
                                                                                       capsys):
    url, engine = tiny_ledger
    run_id = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=8).to_dict(), db_url=url)["run_id"]
    capsys.readouterr()
    assert main(["rollback", "--db", url, "--run", str(run_id), "--to", "2", "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    assert (outcome["seq"], outcome["rolled_back"]) == (2, False)
    assert main(["rollback", "--db", url, "--run", str(run_id), "--to", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rolled_back"] is True
    assert main(["rollback", "--db", url, "--run", str(run_id), "--to", "1"]) == 0
    assert "nothing rolled back, nothing recorded" in capsys.readouterr().out
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(RollbackRecord)).scalar_one() == 1
    assert main(["rollback", "--db", url, "--run", str(run_id), "--to", "99"]) == 2
    assert capsys.readouterr().err.strip() == f"seqedit rollback: error: --to 99: run {run_id} has applied batches 0-1 (0: before any edit)"


def test_exports_refuse_to_overwrite_and_write_readable_files(tiny_ledger, tiny_model_folder, tmp_path, capsys):
    url, _ = tiny_ledger
    run_id = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=4).to_dict(), db_url=url)["run_id"]
    out = tmp_path / "tables"
    assert main(["export", "--db", url, "--run", str(run_id), "--out", str(out)]) == 0
    assert main(["export", "--db", url, "--run", str(run_id), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["export", "--db", url, "--run", str(run_id), "--out", str(out), "--force"]) == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["export", "--db", url, "--run", str(run_id), "--out", str(blocker / "inside")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    model = tmp_path / "model"
    assert main(["export-model", "--db", url, "--run", str(run_id), "--out", str(model)]) == 0
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in model.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_history_finds_subjects_by_any_case_and_shows_unnamed_runs_blank(tiny_ledger, tiny_model_folder, capsys):
    url, engine = tiny_ledger
    sequential_edit(settings=tiny_settings(tiny_model_folder, limit=4).to_dict(), db_url=url)
    subject = facts_frame(engine)["subject"][0]
    capsys.readouterr()
    assert main(["history", "--db", url, "--subject", subject.upper()[2:-1], "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found and found[0]["subject"] == subject
    assert main(["history", "--db", url, "--subject", "no such subject at all"]) == 0
    assert "no fact about a subject containing" in capsys.readouterr().out
    assert main(["history", "--db", url]) == 0
    assert "NaN" not in capsys.readouterr().out


def test_ingest_fails_when_every_record_is_rejected(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "A", "prompt": "B is", "target_new": "x", "target_true": "y"}\n{"nope": 1}\n')
    assert main(["ingest", "--db", url, str(bad)]) == 1
    assert main(["ingest", "--db", url, "counterfact-sample"]) == 0  # a named dataset (bundled)
    assert "accepted       200" in capsys.readouterr().out
    assert main(["ingest", "--db", url, "counterfact-sample"]) == 0  # re-ingesting adds nothing and is fine


def test_output_piped_into_a_reader_that_leaves_ends_quietly():
    """``seqedit data list | head -0``: the reader is gone before the command writes its table."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every write fails with EPIPE
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # a user's shell:
    try:  # stdout buffered, so the failing write is the flush after the command's output, not a print in it
        writer = subprocess.run([sys.executable, "-m", "flows.cli", "data", "list"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=300, env=env)
    finally:
        os.close(write_end)
    assert writer.stderr == "", writer.stderr  # no traceback, no "Exception ignored … BrokenPipeError"
    assert writer.returncode == 141
