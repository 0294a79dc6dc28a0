"""A bfloat16 run end to end on the CPU — the dtype paths a GPU takes, on every change: edit with an
evaluation after every batch, rollback with hash verification, resume, and an export that loads in plain
transformers. The ledger describes the float32 masters; the exported files hold their bfloat16 rounding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from db.history import batches_frame, metrics_frame
from db.replay import expected_hashes, weights_at
from sqlalchemy.orm import Session
from editing.delta import weight_sha256
from flows.cli import main
from flows.model_session import ModelSession
from flows.pipeline import sequential_edit
from fixtures.runs import new_tiny_ledger, tiny_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

BF16 = {"device": "cpu", "dtype": "bfloat16"}
DOWN_PROJ = "model.layers.{}.mlp.down_proj.weight"


def test_a_bf16_run_edits_rolls_back_resumes_and_exports_on_its_float32_masters(tmp_path, tiny_model_folder):
    url, engine = new_tiny_ledger(tmp_path, 12)
    settings = tiny_settings(tiny_model_folder, limit=12, eval_every=1, runtime=BF16)
    run_id = sequential_edit(settings=settings.to_dict(), db_url=url)["run_id"]
    assert list(batches_frame(engine, run_id)["status"]) == ["applied"] * 3
    assert sorted(metrics_frame(engine, run_id, kind="full")["seq"].unique()) == [0, 1, 2, 3]  # baseline + each

    # the ledger's weights are float32 masters, and the model in this process holds their rounding
    replayed = weights_at(engine, run_id, 3)
    assert {weight.dtype for weight in replayed.values()} == {torch.float32}
    adapter = ModelSession.loaded(tiny_model_folder, settings.runtime).adapter
    for layer, weight in replayed.items():
        assert torch.equal(adapter.weight(layer).cpu(), weight)
        assert torch.equal(adapter.stored_weight(layer).cpu(), weight.to(torch.bfloat16))
    with Session(engine) as session:
        at_3 = expected_hashes(session, run_id, 3)
        at_1 = expected_hashes(session, run_id, 1)
    assert {layer: weight_sha256(w) for layer, w in replayed.items()} == at_3

    # rollback to 1 (hash-verified), then resume: batches 2-3 are edited again on the same masters
    assert main(["rollback", "--db", url, "--run", str(run_id), "--to", "1"]) == 0
    resumed = sequential_edit(run_id=run_id, db_url=url)
    assert resumed["seq"] == 3
    with Session(engine) as session:
        assert expected_hashes(session, run_id, 1) == at_1
        redone = expected_hashes(session, run_id, 3)
    assert redone == at_3  # the same facts on the same masters: bit-identical
    assert adapter.weights_sha256(sorted(redone)) == redone

    # export: bfloat16 files, their hashes recorded beside the ledger's, loadable by transformers
    out = tmp_path / "export"
    assert main(["export-model", "--db", url, "--run", str(run_id), "--out", str(out)]) == 0
    provenance = json.loads((out / "seqedit.json").read_text())
    assert provenance["stored_dtype"] == "bfloat16"
    assert provenance["layer_sha256"] == {str(layer): sha for layer, sha in redone.items()}
    files = load_file(out / "model.safetensors")
    final = weights_at(engine, run_id, 3)
    for layer, master in final.items():
        written = files[DOWN_PROJ.format(layer)]
        assert written.dtype == torch.bfloat16 and torch.equal(written, master.to(torch.bfloat16))
        assert provenance["delivered_sha256"][str(layer)] == weight_sha256(written)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(loaded.get_parameter(DOWN_PROJ.format(1)), files[DOWN_PROJ.format(1)])


def test_a_bf16_run_recorded_before_float32_masters_resumes_without_one(tmp_path, tiny_model_folder):
    """A ledger row from before ``runtime.float32_master`` existed has no such key; that run added rounded
    deltas to bfloat16 weights, and redoing its batches must do the same to reproduce its hashes."""
    from sqlalchemy import select, update

    from db.models import RunRecord

    url, engine = new_tiny_ledger(tmp_path, 8)
    plain = {**BF16, "float32_master": False}
    run_id = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=8, runtime=plain).to_dict(),
                             db_url=url)["run_id"]
    with Session(engine) as session:
        at_2 = expected_hashes(session, run_id, 2)
    with engine.begin() as connection:  # the row as an older seqedit wrote it
        stored = connection.execute(select(RunRecord.hyperparameters).where(RunRecord.id == run_id)).scalar_one()
        del stored["settings"]["runtime"]["float32_master"]
        connection.execute(update(RunRecord).where(RunRecord.id == run_id).values(hyperparameters=stored))

    assert main(["rollback", "--db", url, "--run", str(run_id), "--to", "1"]) == 0
    assert sequential_edit(run_id=run_id, db_url=url)["seq"] == 2
    with Session(engine) as session:
        assert expected_hashes(session, run_id, 2) == at_2  # batch 2 redone on plain bfloat16 weights
