"""Ledger benchmark: ingest rate, batch-claim latency, and restore/rollback time against history length.

    python bench/ledger.py [--postgres URL] [--records 21919] [--batches 200]

Runs on a fresh SQLite file and on a throwaway schema of the PostgreSQL
database (dropped afterwards), and prints one table per measurement.

* Ingest: a JSON file the size of the full CounterFact (21,919 records by
  default), synthesised from the shared 1,000 full-schema and 9,788 EasyEdit
  records by renaming subjects, ingested once (facts/s) and again (the
  idempotent pass, which stores nothing).
* Claim: claim-then-commit of batches of 10 facts from the ingested pool; the
  latency of ``claim_batch`` and of ``commit_batch`` (3 layers' rank-10 deltas).
* Restore: a run of SmolLM2-sized edited layers (3 × 576 × 1536 float32) with
  rank-10 deltas; ``weights_at(n)`` for growing ``n`` with a checkpoint every
  10 batches (replays ``n mod 10`` deltas) and with only the origin (replays
  ``n``); then ``rollback`` (restore + marking the later batches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from sqlalchemy import create_engine, text

from db.engine import in_schema, make_engine
from db.ingest import ingest_file
from db.ledger import acquire_writer
from db.migrate import upgrade
from db.replay import weights_at
from db.runs import RunSpec, create_run
from editing.delta import LowRankDelta, apply_delta, weight_sha256

ROOT = Path(__file__).resolve().parents[1]
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LAYER_SHAPE = (576, 1536)
LAYERS = (3, 4, 5)
RANK = 10
BATCH_SIZE = 10
CLAIMS = 200
RESTORE_POINTS = (1, 9, 49, 99, 199)
"""With a checkpoint every 10 batches these are worst cases: 9 deltas to replay (1 for n = 1)."""


def synthesise_counterfact(path: Path, count: int) -> None:
    """``count`` distinct records in both CounterFact schemas, cycling the shared ones with renamed subjects."""
    full = json.loads((COUNTERFACT / "counterfact-1000.json").read_text())
    reduced = json.loads((COUNTERFACT / "counterfact-easyedit-edit.json").read_text())
    base, records = full + reduced, []
    for index in range(count):
        record = json.loads(json.dumps(base[index % len(base)]))
        suffix = f" ({index // len(base)})" if index >= len(base) else ""
        if "requested_rewrite" in record:
            record["requested_rewrite"]["subject"] += suffix
        else:
            record["prompt"] = record["prompt"].replace(record["subject"], record["subject"] + suffix, 1)
            record["subject"] += suffix
        records.append(record)
    path.write_text(json.dumps(records))


@contextmanager
def scratch_database(backend: str, postgres_url: str, folder: Path) -> Iterator[str]:
    """A fresh, migrated database URL: an SQLite file, or a PostgreSQL schema dropped afterwards."""
    if backend == "sqlite":
        url = f"sqlite:///{folder / 'bench.db'}"
        upgrade(url)
        yield url
        return
    schema = f"seqedit_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = in_schema(postgres_url, schema).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def random_delta(generator: torch.Generator) -> LowRankDelta:
    return LowRankDelta(torch.randn(LAYER_SHAPE[0], RANK, generator=generator),
                        torch.randn(LAYER_SHAPE[1], RANK, generator=generator) * 1e-3)


def edit_batches(engine, run_id: int, weights: dict[int, torch.Tensor], count: int,
                 generator: torch.Generator) -> tuple[list[float], list[float]]:
    """Claim and commit ``count`` batches as the editor would; returns (claim, commit) latencies in s."""
    claims, commits = [], []
    with acquire_writer(engine, run_id) as writer:
        for _ in range(count):
            started = time.perf_counter()
            batch = writer.claim_batch()
            claims.append(time.perf_counter() - started)
            deltas = {layer: random_delta(generator) for layer in weights}
            for layer, delta in deltas.items():
                apply_delta(weights[layer], delta)
            hashes = {layer: weight_sha256(weight) for layer, weight in weights.items()}
            checkpoint = weights if batch.checkpoint_due else None
            started = time.perf_counter()
            writer.commit_batch(batch, deltas, hashes, checkpoint=checkpoint)
            commits.append(time.perf_counter() - started)
    return claims, commits


def new_run(engine, checkpoint_every: int, generator: torch.Generator) -> tuple[int, dict[int, torch.Tensor]]:
    weights = {layer: torch.randn(LAYER_SHAPE, generator=generator) for layer in LAYERS}
    spec = RunSpec(model_name="bench", algorithm="memit", distribution="memit_spread", batch_size=BATCH_SIZE,
                   checkpoint_every=checkpoint_every)
    return create_run(engine, spec, weights).id, weights


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def bench_backend(backend: str, postgres_url: str, source: Path, records: int, batches: int) -> dict:
    with tempfile.TemporaryDirectory() as folder, scratch_database(backend, postgres_url, Path(folder)) as url:
        engine = make_engine(url)
        first = ingest_file(engine, source)
        again = ingest_file(engine, source)
        assert first.accepted == records and again.unchanged == records, (first.to_dict(), again.to_dict())
        generator = torch.Generator().manual_seed(0)
        run_id, weights = new_run(engine, 10**6, generator)
        claims, commits = edit_batches(engine, run_id, weights, CLAIMS, generator)
        restore: dict[str, dict[int, float]] = {}
        rollback = {}
        for label, every in (("checkpoint every 10", 10), ("origin only", 10**6)):
            run_id, weights = new_run(engine, every, generator)
            edit_batches(engine, run_id, weights, batches, generator)
            restore[label] = {n: timed(weights_at, engine, run_id, n) for n in RESTORE_POINTS if n <= batches}
            with acquire_writer(engine, run_id) as writer:
                rollback[label] = timed(writer.rollback, batches // 2)
        engine.dispose()
    return {"ingest": (first.seconds, again.seconds), "claims": claims, "commits": commits,
            "restore": restore, "rollback": rollback}


def milliseconds(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return f"median {1000 * statistics.median(ordered):7.2f} ms   p95 {1000 * p95:7.2f} ms"


def report(results: dict[str, dict], records: int, batches: int) -> None:
    print(f"\n== ingest: {records} CounterFact records (JSON, both schemas) ==")
    for backend, result in results.items():
        first, again = result["ingest"]
        print(f"{backend:<11} first {records / first:8.0f} facts/s ({first:5.1f} s)   "
              f"re-ingest {records / again:8.0f} records/s ({again:5.1f} s, nothing stored)")
    print(f"\n== batch claim / commit latency: {CLAIMS} batches of {BATCH_SIZE} facts, pool of {records} ==")
    for backend, result in results.items():
        print(f"{backend:<11} claim  {milliseconds(result['claims'])}")
        print(f"{'':<11} commit {milliseconds(result['commits'])}  (3 layers, rank {RANK}, no checkpoint)")
    print(f"\n== weights_at(n): {len(LAYERS)} layers of {LAYER_SHAPE[0]}x{LAYER_SHAPE[1]} float32, "
          f"rank-{RANK} deltas ==")
    for backend, result in results.items():
        for label, times in result["restore"].items():
            cells = "  ".join(f"n={n}: {1000 * seconds:7.1f} ms" for n, seconds in times.items())
            print(f"{backend:<11} {label:<20} {cells}")
    print(f"\n== rollback to batch {batches // 2} of {batches} (restore + mark {batches - batches // 2} batches) ==")
    for backend, result in results.items():
        cells = "  ".join(f"{label}: {1000 * seconds:7.1f} ms" for label, seconds in result["rollback"].items())
        print(f"{backend:<11} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL database to use a scratch schema of")
    parser.add_argument("--records", type=int, default=21_919, help="records in the synthetic CounterFact file")
    parser.add_argument("--batches", type=int, default=200, help="history length for the restore timings")
    args = parser.parse_args()
    # The claim run and the two restore runs each consume their batches' facts from the shared pool.
    needed = (CLAIMS + 2 * args.batches) * BATCH_SIZE
    if args.records < needed:
        parser.error(f"--records {args.records} is too few for {CLAIMS} claims and 2 × --batches {args.batches} "
                     f"batches of {BATCH_SIZE} facts: need at least {needed}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "counterfact-synthetic.json"
        synthesise_counterfact(source, args.records)
        print(f"synthetic CounterFact: {args.records} records, {source.stat().st_size / 1e6:.1f} MB")
        results = {backend: bench_backend(backend, args.postgres, source, args.records, args.batches)
                   for backend in ("sqlite", "postgresql")}
    report(results, args.records, args.batches)


if __name__ == "__main__":
    main()
