"""The tamper-evident ledger: ``verify`` holds on an untouched ledger and names each kind of change made behind
seqedit's back — a fact's target, a byte of a delta, a metric value, a byte of a checkpoint — on both backends."""

from __future__ import annotations

import dataclasses

import torch
from sqlalchemy import Engine, select, text, update

from db.audit import verify_run
from db.chain import FACT_CONTENT, canonical, seal
from db.engine import transaction
from db.evaluations import record_evaluation
from db.ledger import acquire_writer
from db.migrate import downgrade, upgrade
from db.models import BatchFact, BatchRecord, Checkpoint, FactRecord, MetricRecord, WeightDelta
from editing.facts import Fact
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights


def _ledger(engine: Engine) -> int:
    """A run of three batches of two facts with keys, checkpoints after batch 2, evaluations at 0 and 2."""
    add_facts(engine, 6)
    weights = random_weights()
    run = new_run(engine, weights, batch_size=2, checkpoint_every=2)
    generator = torch.Generator().manual_seed(0)
    with acquire_writer(engine, run.id) as writer:
        for _ in range(3):
            keys = {layer: torch.randn(weight.shape[1], 2, generator=generator) for layer, weight in weights.items()}
            apply_and_commit(writer, writer.claim_batch(), weights, generator, keys=keys)
    for seq in (0, 2):
        record_evaluation(engine, run.id, seq, [("es", 0.25 + seq / 10), ("ppl.wiki", 20.0)])
    return run.id


def _batch_id(engine: Engine, run_id: int, seq: int) -> int:
    with transaction(engine) as session:
        return session.scalar(select(BatchRecord.id).where(BatchRecord.run_id == run_id, BatchRecord.seq == seq))


def _flip_last_byte(blob: bytes) -> bytes:
    """Change the last byte of a safetensors blob: inside the tensor data, so the file still parses."""
    return blob[:-1] + bytes([blob[-1] ^ 0x01])


def test_an_untouched_ledger_verifies_and_its_chain_links_every_batch(database):
    run_id = _ledger(database.engine)
    result = verify_run(database.engine, run_id)
    assert result.ok, result.problems
    assert (result.batches, result.evaluations, result.checkpoints, result.replayed) == (3, 2, 2, 3)
    with transaction(database.engine) as session:
        rows = session.execute(select(BatchRecord.seq, BatchRecord.chain_record, BatchRecord.chain_sha256)
                               .order_by(BatchRecord.seq)).all()
    # the chain, recomputed here from the records: each hashes to its digest and names the one before
    assert [row.chain_record["previous"] for row in rows] == [None, rows[0].chain_sha256, rows[1].chain_sha256]
    import hashlib
    assert all(hashlib.sha256(canonical(row.chain_record)).hexdigest() == row.chain_sha256 for row in rows)
    assert result.head == rows[2].chain_sha256
    assert "run_configuration" in rows[0].chain_record and "run_configuration" not in rows[1].chain_record


def test_a_rewritten_fact_target_is_named_by_batch_fact_and_field(database):
    engine = database.engine
    run_id = _ledger(engine)
    batch_id = _batch_id(engine, run_id, 2)
    with transaction(engine, write=True) as session:
        fact_id = session.scalar(select(BatchFact.fact_id).where(BatchFact.batch_id == batch_id, BatchFact.position == 0))
        session.execute(update(FactRecord).where(FactRecord.id == fact_id).values(target_new="Atlantis"))
    result = verify_run(engine, run_id)
    assert not result.ok
    assert [(p.where, p.field) for p in result.problems] == [(f"batch 2 (id {batch_id})", f"fact {fact_id} target_new")]
    assert "'Atlantis'" in result.problems[0].detail and "City 2" in result.problems[0].detail


def test_a_changed_delta_byte_is_caught_by_the_chain_and_by_the_replay(database):
    engine = database.engine
    run_id = _ledger(engine)
    batch_id = _batch_id(engine, run_id, 2)
    with transaction(engine, write=True) as session:
        blob = session.scalar(select(WeightDelta.factors).where(WeightDelta.batch_id == batch_id, WeightDelta.layer == 3))
        session.execute(update(WeightDelta).where(WeightDelta.batch_id == batch_id, WeightDelta.layer == 3)
                        .values(factors=_flip_last_byte(bytes(blob))))
    problems = {(p.where, p.field) for p in verify_run(engine, run_id).problems}
    assert (f"batch 2 (id {batch_id})", "layer 3 weight_deltas.factors") in problems
    assert ("batch 2", "layer 3 replay") in problems


def test_a_changed_metric_value_is_named_by_evaluation_and_metric(database):
    engine = database.engine
    run_id = _ledger(engine)
    with transaction(engine, write=True) as session:
        session.execute(update(MetricRecord).where(MetricRecord.name == "es", MetricRecord.value > 0.4)
                        .values(value=0.99))
    problems = verify_run(engine, run_id).problems
    assert len(problems) == 1 and problems[0].field == "metric es [all]"
    assert "after batch 2" in problems[0].where and "0.99" in problems[0].detail and "0.45" in problems[0].detail


def test_a_changed_checkpoint_byte_is_named_even_though_the_replay_ignores_checkpoints(database):
    engine = database.engine
    run_id = _ledger(engine)
    batch_id = _batch_id(engine, run_id, 2)
    with transaction(engine, write=True) as session:
        blob = session.scalar(select(Checkpoint.weights).where(Checkpoint.batch_id == batch_id, Checkpoint.layer == 1))
        session.execute(update(Checkpoint).where(Checkpoint.batch_id == batch_id, Checkpoint.layer == 1)
                        .values(weights=_flip_last_byte(bytes(blob))))
    problems = verify_run(engine, run_id).problems
    assert [(p.where, p.field) for p in problems] == [("checkpoint after batch 2, layer 1", "checkpoints.weights")]


def test_a_recomputed_checkpoint_hash_still_disagrees_with_the_replay(database):
    """A checkpoint replaced together with its sha256 column: the replay from the origin tells."""
    from db.tensors import weight_to_bytes
    from editing.delta import weight_sha256

    engine = database.engine
    run_id = _ledger(engine)
    batch_id = _batch_id(engine, run_id, 2)
    forged = torch.zeros(24, 16)
    with transaction(engine, write=True) as session:
        session.execute(update(Checkpoint).where(Checkpoint.batch_id == batch_id, Checkpoint.layer == 1)
                        .values(weights=weight_to_bytes(forged), sha256=weight_sha256(forged)))
    problems = verify_run(engine, run_id).problems
    assert [(p.where, p.field) for p in problems] == [("checkpoint after batch 2, layer 1", "checkpoints.sha256")]


def test_a_rewritten_record_with_a_recomputed_hash_breaks_the_next_link(database):
    """Rewriting batch 2's sealed record *and* its hash to hide a changed target: batch 3 links to the old hash,
    and so does the evaluation that scored batch 2."""
    engine = database.engine
    run_id = _ledger(engine)
    batch_id = _batch_id(engine, run_id, 2)
    with transaction(engine, write=True) as session:
        record = session.scalar(select(BatchRecord.chain_record).where(BatchRecord.id == batch_id))
        record["facts"][0]["target_new"] = "Atlantis"
        session.execute(update(FactRecord).where(FactRecord.id == record["facts"][0]["id"]).values(target_new="Atlantis"))
        session.execute(update(BatchRecord).where(BatchRecord.id == batch_id)
                        .values(chain_record=record, chain_sha256=seal(record)))
    problems = verify_run(engine, run_id).problems
    assert [(p.where.split(" (")[0], p.field) for p in problems] == [("batch 3", "previous"),
                                                                         ("evaluation 2", "batch_chain")]


def test_the_chain_seals_every_field_of_a_fact():
    assert set(field.name for field in dataclasses.fields(Fact)) <= set(FACT_CONTENT)


def test_a_ledger_from_before_the_chain_is_sealed_by_the_upgrade_which_says_so(database, capfd):
    engine = database.engine
    run_id = _ledger(engine)
    downgrade(database.url, "0007")
    engine.dispose()
    upgrade(database.url)
    assert "sealed 3 committed batches and 2 evaluations" in capfd.readouterr().out
    assert verify_run(engine, run_id).ok
    with engine.connect() as connection:  # and sealed from the contents it had
        assert connection.execute(text("SELECT count(*) FROM batches WHERE chain_sha256 IS NULL")).scalar() == 0
