"""``verify``: prove that a run's ledger is what was committed, and that its deltas make the weights it claims.

Three independent checks, each naming the first place it fails:

1. **The chain** (:mod:`db.chain`). For every committed batch, its stored record must hash to its chain hash,
   link to the chain hash of the batch before it, and equal the record recomputed from the rows as they are
   now — so a fact rewritten after its edit, a delta or key blob changed, or a recorded layer hash altered is
   named by batch, fact or layer, and field. Every evaluation's seal is checked the same way (its metrics and
   alarms against the batch it scored).
2. **The replay.** The original weights (the origin checkpoint, itself sealed in batch 1's record) with every
   applied delta added in order, *ignoring* the checkpoints, must give each layer the sha256 recorded after
   each batch.
3. **The checkpoints.** Each stored checkpoint must hash to its recorded sha256 and equal the replayed weights'.

A chain proves that rows were not changed *behind seqedit's back*; someone who rewrites a row and recomputes
every later hash defeats it, unless the head hash was written down elsewhere before — which is why
:class:`Verification` reports the head and ``seqedit verify --expect HEAD`` compares it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from db.chain import batch_record, evaluation_record, seal
from db.engine import transaction
from db.models import BatchRecord, BatchStatus, Checkpoint, EvaluationRecord, WeightDelta
from db.runs import load_run
from db.tensors import delta_from_bytes, weight_from_bytes
from editing.delta import apply_delta, weight_sha256

COMMITTED = (BatchStatus.APPLIED, BatchStatus.ROLLED_BACK)


@dataclass(frozen=True)
class Problem:
    """One thing that does not hold: where (``batch 3``, ``evaluation 7``, ``checkpoint after batch 4``), what
    (the field) and how."""

    where: str
    field: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}, {self.field}: {self.detail}"


@dataclass
class Verification:
    """The outcome of :func:`verify_run`: ``ok`` only when there is no problem."""

    run_id: int
    head: str | None = None
    """Chain hash of the last applied batch: write it down to detect a rewrite of the whole chain later."""
    evaluations_digest: str | None = None
    """sha256 over every evaluation's seal, in id order."""
    batches: int = 0
    evaluations: int = 0
    checkpoints: int = 0
    replayed: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "ok": self.ok, "head": self.head, "evaluations_digest": self.evaluations_digest,
                "batches": self.batches, "evaluations": self.evaluations, "checkpoints": self.checkpoints,
                "replayed_batches": self.replayed,
                "problems": [{"where": p.where, "field": p.field, "detail": p.detail} for p in self.problems]}


def verify_run(engine: Engine, run_id: int) -> Verification:
    """Check run ``run_id``'s chain, evaluations, replay and checkpoints (see the module docstring)."""
    result = Verification(run_id)
    with transaction(engine) as session:
        load_run(session, run_id)
        batches = session.execute(
            select(BatchRecord.id, BatchRecord.seq, BatchRecord.status, BatchRecord.chain_record,
                   BatchRecord.chain_sha256)
            .where(BatchRecord.run_id == run_id, BatchRecord.status.in_(COMMITTED),
                   BatchRecord.finished_at.is_not(None))
            .order_by(BatchRecord.seq, BatchRecord.id)).all()
        chains_at: dict[int, set[str | None]] = {}
        for _, seq, _, _, digest in batches:
            chains_at.setdefault(seq, set()).add(digest)
        for batch_id, seq, status, record, digest in batches:
            result.batches += 1
            _check_batch(session, result, batch_id, seq, status, record, digest, chains_at)
        applied = [row for row in batches if row.status == BatchStatus.APPLIED]
        result.head = applied[-1].chain_sha256 if applied else None
        _check_evaluations(session, result, run_id)
    _check_weights(engine, result, run_id)
    return result


def _check_batch(session, result: Verification, batch_id: int, seq: int, status: BatchStatus,
                 record: dict[str, Any] | None, digest: str | None, chains_at: dict[int, set[str | None]]) -> None:
    where = f"batch {seq} (id {batch_id}{', rolled back' if status == BatchStatus.ROLLED_BACK else ''})"
    if record is None or digest is None:
        result.problems.append(Problem(where, "chain_sha256", "the batch was committed but is not sealed"))
        return
    if seal(record) != digest:
        result.problems.append(Problem(where, "chain_record",
                                       f"the sealed record hashes to {seal(record)}, not its chain hash {digest}: "
                                       "the record itself was altered"))
    if seq > 1 and record.get("previous") not in chains_at.get(seq - 1, set()):
        result.problems.append(Problem(where, "previous", f"links to {record.get('previous')}, which is the chain "
                                                          f"hash of no committed batch {seq - 1}"))
    now = batch_record(session, batch_id, record.get("previous"))
    for problem in _differences(record, now):
        result.problems.append(Problem(where, *problem))


def _differences(sealed: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, detail) for every place where the rows now differ from what was sealed."""
    found: list[tuple[str, str]] = []
    sealed_facts = {fact["id"]: fact for fact in sealed.get("facts", [])}
    now_facts = {fact["id"]: fact for fact in now.get("facts", [])}
    if list(sealed_facts) != list(now_facts):
        found.append(("batch_facts", f"the batch now holds facts {list(now_facts)}, it was committed with "
                                     f"{list(sealed_facts)}"))
    for fact_id, fact in sealed_facts.items():
        for name, value in fact.items():
            current = now_facts.get(fact_id, {}).get(name)
            if fact_id in now_facts and current != value:
                found.append((f"fact {fact_id} {name}", f"the ledger now says {current!r}, the batch was committed "
                                                        f"with {value!r}"))
    sealed_layers, now_layers = sealed.get("layers", {}), now.get("layers", {})
    if set(sealed_layers) != set(now_layers):
        found.append(("weight_deltas", f"deltas now for layers {sorted(now_layers)}, committed for "
                                       f"{sorted(sealed_layers)}"))
    for layer, values in sealed_layers.items():
        for name, value in values.items():
            current = now_layers.get(layer, {}).get(name)
            if layer in now_layers and current != value:
                column = {"factors_sha256": "factors", "keys_blob_sha256": "keys"}.get(name, name)
                found.append((f"layer {layer} weight_deltas.{column}",
                              f"now {_short(current)}, committed as {_short(value)}"))
    for section in ("run_configuration", "origin"):
        for name, value in (sealed.get(section) or {}).items():
            current = (now.get(section) or {}).get(name)
            if current != value:
                found.append((f"{section}.{name}", f"now {_short(current)}, committed as {_short(value)}"))
    return found


def _check_evaluations(session, result: Verification, run_id: int) -> None:
    rows = session.execute(select(EvaluationRecord.id, EvaluationRecord.seal_record, EvaluationRecord.seal_sha256)
                           .where(EvaluationRecord.run_id == run_id).order_by(EvaluationRecord.id)).all()
    digests = hashlib.sha256()
    for evaluation_id, record, digest in rows:
        result.evaluations += 1
        digests.update((digest or "-").encode())
        where = f"evaluation {evaluation_id}"
        if record is None or digest is None:
            result.problems.append(Problem(where, "seal_sha256", "the evaluation is not sealed"))
            continue
        where = f"evaluation {evaluation_id} (after batch {record['seq']})"
        if seal(record) != digest:
            result.problems.append(Problem(where, "seal_record", "the sealed record was altered"))
        now = evaluation_record(session, evaluation_id)
        if now["batch_chain"] != record["batch_chain"]:
            result.problems.append(Problem(where, "batch_chain", f"scored batch chain {_short(record['batch_chain'])}"
                                                                 f", the batch's is now {_short(now['batch_chain'])}"))
        sealed_metrics = {(name, split): value for name, split, value in record["metrics"]}
        now_metrics = {(name, split): value for name, split, value in now["metrics"]}
        for key in sorted(set(sealed_metrics) | set(now_metrics)):
            if sealed_metrics.get(key, "absent") != now_metrics.get(key, "absent"):
                result.problems.append(Problem(where, f"metric {key[0]} [{key[1]}]",
                                               f"the ledger now says {now_metrics.get(key, 'absent')!r}, it was "
                                               f"recorded as {sealed_metrics.get(key, 'absent')!r}"))
        if now["alarms"] != record["alarms"]:
            result.problems.append(Problem(where, "alarms", "the alarms differ from those recorded with it"))
    result.evaluations_digest = digests.hexdigest() if rows else None


def _check_weights(engine: Engine, result: Verification, run_id: int) -> None:
    """Replay every applied delta from the origin, ignoring checkpoints, then check every checkpoint."""
    with transaction(engine) as session:
        origin = {}
        for layer, blob, sha in session.execute(select(Checkpoint.layer, Checkpoint.weights, Checkpoint.sha256)
                                                .where(Checkpoint.run_id == run_id, Checkpoint.batch_id.is_(None))):
            weight = weight_from_bytes(blob)
            if weight_sha256(weight) != sha:
                result.problems.append(Problem(f"origin checkpoint layer {layer}", "checkpoints.weights",
                                               f"the original weights hash to {weight_sha256(weight)}, recorded {sha}"))
            origin[layer] = weight
        stored = {(seq, layer): (blob, sha) for seq, layer, blob, sha in session.execute(
            select(BatchRecord.seq, Checkpoint.layer, Checkpoint.weights, Checkpoint.sha256)
            .join(BatchRecord, Checkpoint.batch_id == BatchRecord.id)
            .where(Checkpoint.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED))}
        rows = session.execute(
            select(BatchRecord.seq, WeightDelta.layer, WeightDelta.factors, WeightDelta.sha256_after)
            .join(BatchRecord, WeightDelta.batch_id == BatchRecord.id)
            .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED)
            .order_by(BatchRecord.seq, WeightDelta.layer).execution_options(yield_per=8)).tuples()
        weights, hashes = origin, {layer: weight_sha256(weight) for layer, weight in origin.items()}
        replay_broken, last_seq = False, 0
        expected_at: dict[int, dict[int, str]] = {}
        for seq, layer, factors, sha_after in rows:
            if seq != last_seq:
                expected_at[last_seq] = dict(hashes)
                last_seq = seq
                result.replayed += 0 if replay_broken else 1
            if replay_broken:
                continue
            try:
                apply_delta(weights[layer], delta_from_bytes(factors))
            except Exception as error:  # an unreadable or misshapen blob is a finding, not a crash
                result.problems.append(Problem(f"batch {seq}", f"layer {layer} weight_deltas.factors",
                                               f"cannot be applied: {error}"))
                replay_broken = True
                continue
            hashes[layer] = weight_sha256(weights[layer])
            if hashes[layer] != sha_after:
                result.problems.append(Problem(f"batch {seq}", f"layer {layer} replay",
                                               f"the original weights plus the deltas of batches 1..{seq} hash to "
                                               f"{_short(hashes[layer])}, the ledger recorded {_short(sha_after)}"))
                replay_broken = True
        expected_at[last_seq] = dict(hashes)
    for (seq, layer), (blob, sha) in sorted(stored.items()):
        result.checkpoints += 1
        replayed_to = max(point for point in expected_at if point <= seq)
        where = f"checkpoint after batch {seq}, layer {layer}"
        try:
            actual = weight_sha256(weight_from_bytes(blob))
        except Exception as error:
            result.problems.append(Problem(where, "checkpoints.weights", f"unreadable: {error}"))
            continue
        if actual != sha:
            result.problems.append(Problem(where, "checkpoints.weights", f"the stored weights hash to {_short(actual)},"
                                                                         f" recorded {_short(sha)}"))
        elif not replay_broken and expected_at[replayed_to].get(layer) != sha:
            result.problems.append(Problem(where, "checkpoints.sha256",
                                           f"recorded {_short(sha)}, the replayed weights hash to "
                                           f"{_short(expected_at[replayed_to].get(layer))}"))


def _short(value: Any) -> str:
    """Hashes cut to 16 characters in messages (enough to tell them apart)."""
    if isinstance(value, str) and len(value) == 64:
        return value[:16] + "…"
    return repr(value)
