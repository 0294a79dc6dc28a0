"""The paths that fail in production, provoked in-process: an error mid-edit, a failed commit, another model.

Each leaves the model bit for bit as it was and the ledger as it was (but for the claimed batch, which is
given back: marked failed, its facts pending), or is refused before anything changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from sqlalchemy import func, select

from db.engine import make_engine
from db.history import batches_frame, facts_frame
from db.ingest import ingest_file
from db.ledger import RunWriter
from db.migrate import upgrade
from db.models import WeightDelta
from db.replay import weights_at
from editing.config import load_edit_config
from editing.editor import Editor
from flows.model_session import ModelSession
from flows.pipeline import sequential_edit
from fixtures.data import counterfact_facts_between, counterfact_file
from fixtures.models import build_tiny_model
from fixtures.runs import SOURCE, TINY_EDIT, tiny_settings


def _state(adapter) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in adapter.model.state_dict().items()}


def _identical(before: dict[str, torch.Tensor], adapter) -> bool:
    return all(torch.equal(before[name], tensor) for name, tensor in adapter.model.state_dict().items())


@pytest.mark.parametrize("algorithm", ["memit", "alphaedit"])
def test_an_error_between_two_layers_of_an_edit_leaves_the_model_and_the_memory_as_they_were(tokenizer, algorithm):
    adapter = build_tiny_model("llama", tokenizer)
    editor = Editor.prepare(adapter, load_edit_config("smollm2-135m", algorithm, TINY_EDIT))
    facts = counterfact_facts_between(0, 8)
    editor.remember(editor.apply(facts[:4]))  # an earlier batch, so the edit memory holds something
    before, memory = _state(adapter), editor.memory.at(2).clone() if editor.memory is not None else None

    def fail_after_the_first_layer(update) -> None:
        raise RuntimeError("the solve of the next layer failed")
    with pytest.raises(RuntimeError, match="next layer failed"):
        editor.apply(facts[4:], on_layer=fail_after_the_first_layer)
    assert _identical(before, adapter)  # layer 1 had been written: it is back, bit for bit
    if memory is not None:
        assert torch.equal(editor.memory.at(2), memory)


def test_a_failed_commit_puts_the_layers_back_and_records_nothing_but_the_failed_claim(tmp_path, tiny_model_folder,
                                                                                      prefect_server, monkeypatch):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    ingest_file(engine, counterfact_file(12), source=SOURCE)
    settings = tiny_settings(tiny_model_folder, limit=8)
    first = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=4).to_dict(), db_url=url)
    commit = RunWriter.commit_batch

    def commit_fails(self, batch, *args, **kwargs):
        if batch.seq == 2:
            raise OSError("disk full")  # the database refused the transaction
        return commit(self, batch, *args, **kwargs)
    monkeypatch.setattr(RunWriter, "commit_batch", commit_fails)
    with pytest.raises(OSError, match="disk full"):
        sequential_edit(settings=settings.to_dict(), db_url=url)
    run_id = first["run_id"] + 1
    adapter = ModelSession.loaded(settings.model, settings.runtime).adapter  # the model this process edited
    for layer, weight in weights_at(engine, run_id, 1).items():
        assert torch.equal(adapter.weight(layer), weight), layer  # the rollback hook restored batch 1's state
    assert list(batches_frame(engine, run_id)["status"]) == ["applied", "failed"]
    with engine.connect() as connection:
        deltas = connection.execute(select(func.count()).select_from(WeightDelta)).scalar_one()
    assert deltas == 2 * 2  # two runs' first batches, two layers each; nothing of the failed batch
    statuses = facts_frame(engine).set_index("fact_id")["status"]
    assert list(statuses[4:12]) == ["applied"] * 4 + ["pending"] * 4


def test_resuming_or_evaluating_a_run_with_another_model_is_refused(tmp_path, tokenizer, tiny_model_folder,
                                                                    prefect_server):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_folder, model)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    ingest_file(make_engine(url), counterfact_file(8), source=SOURCE)
    run_id = sequential_edit(settings=tiny_settings(str(model), limit=4).to_dict(), db_url=url)["run_id"]
    other = build_tiny_model("llama", tokenizer, seed=1)  # the same architecture, other weights
    other.model.save_pretrained(model)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    for argv in (["run", "--resume", str(run_id)], ["eval", "--run", str(run_id)]):
        done = subprocess.run([sys.executable, "-m", "flows.cli", *argv, "--db", url], capture_output=True,
                              text=True, timeout=300, env=env)
        errors = [line for line in done.stderr.strip().splitlines() if "Loading weights" not in line]  # progress
        assert done.returncode == 2 and len(errors) == 1, done.stderr
        assert errors[0].startswith(f"seqedit {argv[0]}: error: run {run_id} edited a model with fingerprint")
    assert list(batches_frame(make_engine(url), run_id)["status"]) == ["applied"]


def test_the_same_model_in_another_dtype_is_not_the_runs_model(tmp_path, tiny_model_folder, prefect_server):
    """A run records its resolved dtype and reloads in it; the guard itself also refuses the model in another
    one (its layers' hashes are of other numbers), naming the dtype as the likely cause."""
    from db.runs import get_run
    from editing.models import load_model
    from flows.run_model import check_run_model
    from flows.run_state import RunStateError

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    ingest_file(engine, counterfact_file(4), source=SOURCE)
    run_id = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=4).to_dict(), db_url=url)["run_id"]
    run = get_run(engine, run_id)
    check_run_model(run, load_model(tiny_model_folder, device="cpu"), RunStateError)  # float32: the run's model
    with pytest.raises(RunStateError, match="another dtype than bfloat16"):
        check_run_model(run, load_model(tiny_model_folder, dtype=torch.bfloat16, device="cpu"), RunStateError,
                        dtype="bfloat16")
