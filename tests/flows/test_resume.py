"""Kill -9 a worker mid-batch, resume it, and get exactly the weights an uninterrupted run gets.

The worker is a real ``seqedit run`` process. It is killed with SIGKILL from
outside while batch 2's v* optimisation runs, or kills itself at a named point
(``SEQEDIT_FAILPOINT``): during the solve (some layers written, others not),
after every weight is written but before the ledger commit, and right after the
commit. ``seqedit run --resume`` must then finish the run with the per-batch
hashes of an uninterrupted run of the same facts (both runs use private pools
of the same source, so they edit the same facts), with no batch row lost or
doubled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from db.engine import make_engine
from db.history import applied_facts, batches_frame, metrics_frame, runs_frame
from db.migrate import upgrade
from db.models import BatchRecord, BatchStatus, WeightDelta
from flows.model_export import export_model
from flows.pipeline import sequential_edit
from fixtures.processes import alive, children
from fixtures.runs import FAST_EDIT, fast_settings, ingest_counterfact

pytestmark = pytest.mark.usefixtures("prefect_server")

KILLED_SETTINGS = {"fact_pool": "private", "limit": 24, "eval_every": 0}


def _hashes(engine, run_id: int) -> dict[tuple[int, int], str]:
    """(seq, layer) → sha256 after, over the run's applied batches."""
    with engine.connect() as connection:
        rows = connection.execute(select(BatchRecord.seq, WeightDelta.layer, WeightDelta.sha256_after)
                                  .join(WeightDelta, WeightDelta.batch_id == BatchRecord.id)
                                  .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED))
        return {(seq, layer): sha for seq, layer, sha in rows}


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory, prefect_server: str):
    """A ledger with CounterFact ingested and the reference (uninterrupted) run's id and hashes.

    The reference run is evaluated every 2 batches (evaluation does not touch the weights), so
    its third and last batch gets the final evaluation.
    """
    path = tmp_path_factory.mktemp("resume") / "ledger.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    ingest_counterfact(engine)
    reference = sequential_edit(settings=fast_settings(**{**KILLED_SETTINGS, "eval_every": 2}).to_dict(), db_url=url)
    return url, engine, reference["run_id"], _hashes(engine, reference["run_id"])


def test_a_last_batch_between_evaluation_points_is_scored_by_the_final_evaluation(ledger):
    _, engine, run_id, _ = ledger
    metrics = metrics_frame(engine, run_id, kind="full")
    assert sorted(metrics["seq"].unique()) == [0, 2, 3]
    health = metrics_frame(engine, run_id, kind="health")
    # a batch between evaluation points gets a health check; batches 2 and 3 have it inside their full evaluation
    assert sorted(health["seq"].unique()) == [1]
    final = metrics[metrics["seq"] == 3].set_index("name")["value"]
    assert {"es", "ps", "ns", "retention.es", "ge", "ppl.probe", "norm.w.4", "vstar.steps"} <= set(final.index)
    assert final["es"] >= 0.5  # batch 3's eight facts, mostly edited (6 v* steps)


PLAIN_ES = """
import hashlib, json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, layers, facts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
hashes = {}
for layer in layers:
    matrix = model.model.layers[layer].mlp.down_proj.weight.detach()
    header = f"{matrix.dtype}|{tuple(matrix.shape)}|".encode()
    hashes[str(layer)] = hashlib.sha256(header + matrix.numpy().tobytes()).hexdigest()

def mean_nll(prompt, target):
    context = tokenizer(prompt)["input_ids"]
    answer = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([context + answer])).logits[0]
    log_probs = torch.log_softmax(logits[len(context) - 1:-1].double(), dim=-1)
    return -float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].mean())

wins = [mean_nll(prompt, new) < mean_nll(prompt, true) for prompt, new, true in facts]
print(json.dumps({"sha256": hashes, "es": sum(wins) / len(wins)}))
"""
"""ES of a list of (prompt, new, true) with nothing but torch and transformers: the mean per-token NLL of
`` " " + target`` after the prompt, as docs/math.md defines the CounterFact probabilities."""


def test_the_exported_run_gives_plain_transformers_its_hashes_and_final_es(ledger, tmp_path: Path):
    """``seqedit export-model`` of the run's last batch, loaded in a separate interpreter that never
    imports seqedit, has the ledger's layer hashes and scores batch 3's facts with the ES the run recorded."""
    _, engine, run_id, hashes = ledger
    folder = export_model(engine, run_id, None, tmp_path / "model")
    batch_3 = [fact for _, fact in applied_facts(engine, run_id)][16:24]
    facts = [[fact.rewrite_prompt, fact.target_new, fact.target_true] for fact in batch_3]
    plain = subprocess.run([sys.executable, "-I", "-c", PLAIN_ES, str(folder), "[3, 4]", json.dumps(facts)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    measured = json.loads(plain.stdout.strip().splitlines()[-1])
    assert measured["sha256"] == {str(layer): hashes[(3, layer)] for layer in (3, 4)}
    recorded = metrics_frame(engine, run_id, kind="full")
    final_es = recorded[(recorded["seq"] == 3) & (recorded["name"] == "es")]["value"].item()
    assert measured["es"] == pytest.approx(final_es, abs=1e-9)


def _start_worker(url: str, config: Path, api_url: str | None, failpoint: str | None,
                  prefect_home: Path | None = None) -> subprocess.Popen:
    """``seqedit run`` in a subprocess, on the session's Prefect server (``api_url``) or, without one, on a
    temporary server of its own under ``prefect_home``."""
    env = {name: value for name, value in os.environ.items() if name not in ("PREFECT_API_URL", "SEQEDIT_FAILPOINT")}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if prefect_home:
        env["PREFECT_HOME"] = str(prefect_home)
    if failpoint:
        env["SEQEDIT_FAILPOINT"] = failpoint
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--db", url, "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_claim(engine, seq: int, worker: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until the worker's run has batch ``seq`` in progress (the v* optimisation starts right after)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            found = connection.execute(select(BatchRecord.id).where(
                BatchRecord.seq == seq, BatchRecord.status == BatchStatus.IN_PROGRESS)).first()
        if found:
            return
        if worker.poll() is not None:
            pytest.fail(f"the worker exited ({worker.returncode}) before claiming batch {seq}:\n"
                        f"{worker.stdout.read()}")
        time.sleep(0.05)
    pytest.fail(f"batch {seq} was not claimed within {timeout_s} s")


@pytest.mark.parametrize("kill", ["sigkill-during-values", "during_solve:2", "before_commit:2", "after_commit:1"])
def test_a_killed_run_resumes_to_the_same_weights(ledger, tmp_path: Path, prefect_server: str, kill: str):
    url, engine, _, reference = ledger
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(fast_settings(**KILLED_SETTINGS).to_dict()))
    worker = _start_worker(url, config, prefect_server, None if kill.startswith("sigkill") else kill)
    if kill.startswith("sigkill"):
        _wait_for_claim(engine, 2, worker)  # batch 2 claimed: its v* runs next, nothing of it committed
        worker.send_signal(signal.SIGKILL)
    output, _ = worker.communicate(timeout=600)
    assert worker.returncode == -signal.SIGKILL, output
    run_id = int(runs_frame(engine)["run_id"].max())

    interrupted = batches_frame(engine, run_id)
    if kill == "after_commit:1":
        assert list(interrupted["status"]) == ["applied"]
    else:
        assert list(interrupted["status"]) == ["applied", "in_progress"]  # killed inside batch 2

    outcome = sequential_edit(run_id=run_id, db_url=url)
    assert (outcome["status"], outcome["seq"]) == ("completed", 3)
    batches = batches_frame(engine, run_id)
    assert list(batches["seq"]) == [1, 2, 3] and set(batches["status"]) == {"applied"}  # redone, not doubled
    assert list(batches["batch_id"][:len(interrupted)]) == list(interrupted["batch_id"])  # a crashed batch is finished
    assert _hashes(engine, run_id) == reference


def test_a_sigterm_stops_the_run_with_its_temporary_prefect_server_and_the_run_resumes(ledger, tmp_path: Path):
    """``kill PID`` (SIGTERM) during batch 2 of a ``seqedit run`` that started its own temporary Prefect
    server (no ``PREFECT_API_URL``): the process exits with 143 after marking the run failed, the server
    it started exits with it (by default SIGTERM ends the process at once and the server keeps running,
    orphaned), and the run resumes to the weights of an uninterrupted run."""
    url, engine, _, reference = ledger
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(fast_settings(**KILLED_SETTINGS).to_dict()))
    worker = _start_worker(url, config, None, None, prefect_home=tmp_path / "prefect")
    _wait_for_claim(engine, 2, worker)
    started = children(worker.pid)
    assert started, "the run started no temporary Prefect server"
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 128 + signal.SIGTERM, output
    assert "terminated by SIGTERM" in output
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if alive(pid)], f"left running: {started}"

    run_id = int(runs_frame(engine)["run_id"].max())
    assert runs_frame(engine).set_index("run_id").loc[run_id, "status"] == "failed"
    # The interrupted batch was given back (its facts claimable again), not left in progress.
    assert list(batches_frame(engine, run_id)["status"]) == ["applied", "failed"]
    outcome = sequential_edit(run_id=run_id, db_url=url)
    assert (outcome["status"], outcome["seq"]) == ("completed", 3)
    assert list(batches_frame(engine, run_id)["status"]) == ["applied", "failed", "applied", "applied"]
    assert _hashes(engine, run_id) == reference


@pytest.mark.parametrize("algorithm", ["encore", "alphaedit", "rlsedit", "rect", "nas", "lyaplock"])
def test_a_lifelong_run_rolled_back_and_resumed_rebuilds_its_edit_memory(ledger, algorithm):
    """The edit memory S (and RLSEdit's running inverse P) decides every later update of these objectives: a
    run rolled back to batch 1 and edited on must rebuild S and P from the ledger without batch 2's keys,
    exactly, or batch 3 comes out different from an uninterrupted run's (both runs edit the same facts, private
    pools). RECT's dense deltas, NAS's anchor (recomputed on the unedited model) and LyapLock's virtual queue
    (replayed from the ledger's history) must come back the same way."""
    from flows.pipeline import rollback_run

    url, engine, _, _ = ledger
    edit = {**FAST_EDIT, "values.nas_anchor_facts": 12} if algorithm == "nas" else FAST_EDIT
    settings = fast_settings(algorithm=algorithm, fact_pool="private", eval_every=0, health_checks=False,
                             edit_overrides=edit)
    reference = sequential_edit(settings=fast_settings(**{**settings.to_dict(), "limit": 24}).to_dict(), db_url=url)
    interrupted = sequential_edit(settings=fast_settings(**{**settings.to_dict(), "limit": 16}).to_dict(), db_url=url)
    rollback_run(run_id=interrupted["run_id"], to_seq=1, db_url=url)
    finished = sequential_edit(run_id=interrupted["run_id"], db_url=url)  # redoes batch 2, then batch 3 (limit 24)
    assert finished["seq"] == 2  # the limit counts applied facts: 16 again after the rollback
    _assert_prefix_hashes(engine, reference["run_id"], interrupted["run_id"], upto=2)


def _assert_prefix_hashes(engine, reference: int, run: int, upto: int) -> None:
    expected, actual = _hashes(engine, reference), _hashes(engine, run)
    for seq in range(1, upto + 1):
        assert {k: v for k, v in actual.items() if k[0] == seq} == {k: v for k, v in expected.items() if k[0] == seq}
