"""Helpers of ``bench/soak.py``: the tiny model, the scratch ledger, the Prefect server, the worker
processes, and the checks run on the ledger once the soak is over.

Nothing here changes a ledger except :func:`scratch_ledger` (which creates and drops a schema);
the checks only read, through SQLAlchemy and the project's own replay functions.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from sqlalchemy import Engine, create_engine, func, select, text

from db.engine import database_url, in_schema, transaction
from db.errors import LedgerIntegrityError
from db.models import (EDITABLE_FACT_STATUSES, BatchFact, BatchRecord, BatchStatus, Checkpoint, FactRecord,
                       RunRecord, WeightDelta)
from db.replay import expected_hashes
from db.tensors import delta_from_bytes, weight_from_bytes
from editing.delta import apply_delta, weight_sha256

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# -- the model ------------------------------------------------------------------------------------------------------
def smollm2_tokenizer_folder() -> Path | None:
    """A folder holding SmolLM2's converted tokenizer: the cache of ``$SEQEDIT_CACHE`` (or its default), else the
    project's ``.cache/seqedit`` (the Makefile's cache); None when neither has converted the model yet."""
    from editing.models.loading import cache_dir

    for root in (cache_dir(), ROOT / ".cache" / "seqedit"):
        for tokenizer in sorted((root / "models").glob("SmolLM2-135M*/tokenizer.json")):
            return tokenizer.parent
    return None


def build_tiny_llama(folder: Path, seed: int, n_layers: int = 4, hidden: int = 64) -> dict[str, object]:
    """A randomly initialised (seeded) Llama with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = smollm2_tokenizer_folder()
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:  # converts the embedded GGUF once (~20 s) into the cache
        from editing.models import load_model

        tokenizer = load_model(device="cpu").tokenizer
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"layers": n_layers, "hidden": hidden, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer)}


# -- the ledger -----------------------------------------------------------------------------------------------------
@contextmanager
def scratch_ledger(db: str | None, postgres: str, keep: bool) -> Iterator[tuple[str, str | None]]:
    """(URL, schema): ``db`` as given, or a new schema of the PostgreSQL database ``postgres``, dropped at the end
    unless ``keep``. The URL keeps its password so that the workers can use it."""
    if db:
        yield database_url(db).render_as_string(hide_password=False), None
        return
    schema = f"seqedit_soak_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database_url(postgres), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield in_schema(postgres, schema).render_as_string(hide_password=False), schema
    finally:
        if not keep:
            with admin.connect() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def ledger_size(engine: Engine) -> dict[str, int]:
    """Bytes per table (indexes and TOAST included) or, where SQLite lacks ``dbstat``, ``{"<file>": bytes}``."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT tablename, pg_total_relation_size(format('%I.%I', schemaname, tablename)) FROM pg_tables "
                "WHERE schemaname = current_schema()")).all()
        return {name: int(size) for name, size in rows}
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            rows = connection.exec_driver_sql(
                "SELECT coalesce(m.tbl_name, d.name), sum(d.pgsize) FROM dbstat AS d "
                "LEFT JOIN sqlite_master AS m ON m.name = d.name GROUP BY 1").all()
            return {name: int(size) for name, size in rows}
        except Exception:  # SQLite built without dbstat
            path = Path(engine.url.database)
            return {"<file>": sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())}


HISTORY_TABLES = ("runs", "batches", "batch_facts", "weight_deltas", "checkpoints", "rollbacks", "evaluations",
                  "metrics", "alarms")
"""The tables a run's history fills; ``facts`` holds what was ingested, whatever was edited."""


@dataclass
class LedgerState:
    head: int
    """Highest applied seq."""
    applied: int
    """Number of applied batches (== head when the history is contiguous)."""
    in_progress: int | None
    """Seq of the in-progress batch, if any."""
    in_progress_count: int
    failed: int
    rolled_back: int


def ledger_state(engine: Engine, run_id: int) -> LedgerState:
    with engine.connect() as connection:
        rows = connection.execute(select(BatchRecord.status, func.max(BatchRecord.seq), func.count())
                                  .where(BatchRecord.run_id == run_id).group_by(BatchRecord.status)).all()
    by_status = {BatchStatus(status): (top, count) for status, top, count in rows}
    head, applied = by_status.get(BatchStatus.APPLIED, (0, 0))
    in_progress, in_progress_count = by_status.get(BatchStatus.IN_PROGRESS, (None, 0))
    return LedgerState(head=head or 0, applied=applied, in_progress=in_progress, in_progress_count=in_progress_count,
                       failed=by_status.get(BatchStatus.FAILED, (0, 0))[1],
                       rolled_back=by_status.get(BatchStatus.ROLLED_BACK, (0, 0))[1])


def newest_run(engine: Engine, after: int) -> int | None:
    with engine.connect() as connection:
        return connection.scalar(select(func.min(RunRecord.id)).where(RunRecord.id > after))


def max_run_id(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.scalar(select(func.max(RunRecord.id))) or 0


def batch_rows(engine: Engine, run_id: int) -> list[tuple[int, int, str, tuple[int, ...]]]:
    """(batch id, seq, status, fact ids in claim order) of every batch of the run, in id order."""
    with engine.connect() as connection:
        batches = connection.execute(select(BatchRecord.id, BatchRecord.seq, BatchRecord.status)
                                     .where(BatchRecord.run_id == run_id).order_by(BatchRecord.id)).all()
        members = connection.execute(select(BatchFact.batch_id, BatchFact.fact_id)
                                     .join(BatchRecord, BatchFact.batch_id == BatchRecord.id)
                                     .where(BatchRecord.run_id == run_id)
                                     .order_by(BatchFact.batch_id, BatchFact.position)).all()
    facts: dict[int, list[int]] = {}
    for batch_id, fact_id in members:
        facts.setdefault(batch_id, []).append(fact_id)
    return [(batch_id, seq, str(BatchStatus(status)), tuple(facts.get(batch_id, ()))) for batch_id, seq, status in
            batches]


def batch_hashes(engine: Engine, run_id: int) -> dict[int, dict[int, str]]:
    """batch id → layer → sha256 after, for every batch of the run that recorded deltas."""
    with engine.connect() as connection:
        rows = connection.execute(select(WeightDelta.batch_id, WeightDelta.layer, WeightDelta.sha256_after)
                                  .join(BatchRecord, WeightDelta.batch_id == BatchRecord.id)
                                  .where(BatchRecord.run_id == run_id)).all()
    hashes: dict[int, dict[int, str]] = {}
    for batch_id, layer, sha in rows:
        hashes.setdefault(batch_id, {})[layer] = sha
    return hashes


def batch_estimates(engine: Engine, run_id: int) -> tuple[float | None, float | None]:
    """Median (batch duration, v* seconds) over the applied batches, from the timings the flow recorded."""
    with engine.connect() as connection:
        rows = connection.execute(select(BatchRecord.timings).where(
            BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED)
            .order_by(BatchRecord.seq.desc()).limit(200)).scalars().all()
    edits = [row["edit"] + row.get("commit", 0.0) for row in rows if row and "edit" in row]
    v_star = [row["v_star"] for row in rows if row and "v_star" in row]
    return (statistics.median(edits) if edits else None, statistics.median(v_star) if v_star else None)


def expected_fact_ids(engine: Engine, source: str, count: int) -> list[int]:
    """The first ``count`` facts a private pool of ``source`` draws, in the order it draws them (fact id)."""
    with engine.connect() as connection:
        return list(connection.execute(select(FactRecord.id).where(
            FactRecord.source == source, FactRecord.status.in_(EDITABLE_FACT_STATUSES))
            .order_by(FactRecord.id).limit(count)).scalars())


def editable_count(engine: Engine, source: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(FactRecord).where(
            FactRecord.source == source, FactRecord.status.in_(EDITABLE_FACT_STATUSES))))


# -- replay without checkpoints ---------------------------------------------------------------------------------------
def _origin(session, run_id: int) -> dict[int, torch.Tensor]:
    weights = {}
    for layer, blob, sha in session.execute(select(Checkpoint.layer, Checkpoint.weights, Checkpoint.sha256).where(
            Checkpoint.run_id == run_id, Checkpoint.batch_id.is_(None))).tuples():
        weight = weight_from_bytes(blob)
        if weight_sha256(weight) != sha:
            raise LedgerIntegrityError(f"run {run_id}: the origin of layer {layer} does not match its sha256")
        weights[layer] = weight
    return weights


def replay_from_origin(engine: Engine, run_id: int, seq: int) -> dict[int, torch.Tensor]:
    """:func:`db.replay.weights_at` without checkpoints: the origin plus every delta up to ``seq``, verified."""
    with transaction(engine) as session:
        weights = _origin(session, run_id)
        deltas = session.execute(
            select(WeightDelta.layer, WeightDelta.factors).join(BatchRecord, WeightDelta.batch_id == BatchRecord.id)
            .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED, BatchRecord.seq <= seq)
            .order_by(BatchRecord.seq, WeightDelta.layer).execution_options(yield_per=64)).tuples()
        for layer, factors in deltas:
            apply_delta(weights[layer], delta_from_bytes(factors))
        expected = expected_hashes(session, run_id, seq)
    for layer, weight in weights.items():
        if weight_sha256(weight) != expected[layer]:
            raise LedgerIntegrityError(f"run {run_id}: layer {layer} replayed from the origin to batch {seq} "
                                       f"does not match the recorded sha256")
    return weights


@dataclass
class ChainCheck:
    """One pass from the origin through every applied batch, without checkpoints."""

    batches: int = 0
    hashes_checked: int = 0
    hash_mismatches: list[tuple[int, int]] = field(default_factory=list)
    checkpoints_checked: int = 0
    checkpoint_mismatches: list[tuple[int, int]] = field(default_factory=list)
    kept: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    """seq → weights after it, for the points asked for."""
    seconds: float = 0.0


def check_chain(engine: Engine, run_id: int, head: int, keep: set[int]) -> ChainCheck:
    """Replay batches 1..``head`` from the origin, comparing each layer with the sha256 its batch recorded and each
    stored checkpoint with the replayed weights (``torch.equal``); keeps copies of the weights at ``keep``."""
    started = time.perf_counter()
    report = ChainCheck()
    with transaction(engine) as session:
        weights = _origin(session, run_id)
        checkpoints: dict[int, dict[int, torch.Tensor]] = {}
        for seq, layer, blob in session.execute(
                select(BatchRecord.seq, Checkpoint.layer, Checkpoint.weights)
                .join(BatchRecord, Checkpoint.batch_id == BatchRecord.id)
                .where(Checkpoint.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED)).tuples():
            checkpoints.setdefault(seq, {})[layer] = weight_from_bytes(blob)
        if 0 in keep:
            report.kept[0] = {layer: weight.clone() for layer, weight in weights.items()}
        rows = session.execute(
            select(BatchRecord.seq, WeightDelta.layer, WeightDelta.factors, WeightDelta.sha256_after)
            .join(BatchRecord, WeightDelta.batch_id == BatchRecord.id)
            .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED, BatchRecord.seq <= head)
            .order_by(BatchRecord.seq, WeightDelta.layer).execution_options(yield_per=64)).tuples()
        current = 0

        def close(seq: int) -> None:
            for layer, stored in checkpoints.get(seq, {}).items():
                report.checkpoints_checked += 1
                if not torch.equal(stored, weights[layer]):
                    report.checkpoint_mismatches.append((seq, layer))
            if seq in keep:
                report.kept[seq] = {layer: weight.clone() for layer, weight in weights.items()}

        for seq, layer, factors, sha in rows:
            while current < seq:
                if current:
                    close(current)
                current += 1
                report.batches += 1
            apply_delta(weights[layer], delta_from_bytes(factors))
            report.hashes_checked += 1
            if weight_sha256(weights[layer]) != sha:
                report.hash_mismatches.append((seq, layer))
        while current < head:
            if current:
                close(current)
            current += 1
            report.batches += 1
        if current:
            close(current)
    report.seconds = time.perf_counter() - started
    return report


def seqedit_command() -> list[str]:
    script = Path(sys.executable).with_name("seqedit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


def last_json_line(output: str) -> dict | None:
    import json

    for line in reversed(output.splitlines()):
        line = line.strip().split("\r")[-1]
        if line.startswith("{") and '"run_id"' in line:
            return json.loads(line)
    return None


def tail(text_: str, lines: int = 150) -> str:
    cleaned = re.sub(r"[^\n]*\r", "", text_)  # progress bars: keep each line's last state
    return "\n".join(cleaned.splitlines()[-lines:])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
