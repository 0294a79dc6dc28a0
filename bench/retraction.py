"""One wrong fact undone on SmolLM2: a run, its retraction branch, and every fact's edit success in both.

A run edits ``--edits`` CounterFact facts in batches of ``--batch-size`` (EMMET, SmolLM2's shipped settings);
``seqedit retract`` then branches it without one fact of the first batch and edits the later facts again.
Printed per fact: the probabilities of the new and old target on its rewrite prompt, and whether the new one
wins (ES), in the unedited model, after the run and after the branch — so the retracted fact's ES before and
after and the other facts' ES kept can be read side by side — then ``seqedit verify`` of both runs and the
branch's chain head and layer hashes.

    python bench/retraction.py --edits 12 --batch-size 4 --retract-position 1

Facts: records ``--offset`` onwards of ``counterfact-easyedit-edit.json`` (never used for tuning).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.audit import verify_run
from db.branch import create_branch
from db.engine import make_engine
from db.ingest import ingest_file
from db.migrate import upgrade
from db.models import BatchFact, BatchRecord, FactRecord
from db.replay import last_applied_seq, weights_at
from db.runs import get_run
from editing.evaluation.counterfact import counterfact_metrics
from flows.model_export import run_model
from flows.pipeline import sequential_edit

FACTS = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
         / "counterfact-easyedit-edit.json")


def fact_scores(engine, run_id: int, seq: int, fact_ids: list[int]) -> dict[int, tuple[float, float]]:
    """(p_new, p_true) of each fact on its rewrite prompt, in the model of ``run_id`` after batch ``seq``."""
    with Session(engine) as session:
        facts = {row.id: row.to_fact() for row in session.scalars(select(FactRecord).where(FactRecord.id.in_(fact_ids)))}
    with run_model(get_run(engine, run_id), weights_at(engine, run_id, seq)) as adapter:
        results = counterfact_metrics(adapter, [facts[i] for i in fact_ids], with_neighborhood=False).facts
    return {i: (math.exp(-r.rewrite.nll_new[0]), math.exp(-r.rewrite.nll_true[0])) for i, r in zip(fact_ids, results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--offset", type=int, default=0, help="first record of the fact file")
    parser.add_argument("--retract-position", type=int, default=1, help="which fact of batch 1 (0-based)")
    parser.add_argument("--algorithm", default="emmet")
    parser.add_argument("--facts", type=Path, default=FACTS)
    parser.add_argument("--db", help="ledger URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp(prefix='retraction-')}/ledger.db"
    upgrade(url)
    engine = make_engine(url)
    subset = Path(tempfile.mkdtemp()) / "facts.json"
    subset.write_text(json.dumps(json.loads(args.facts.read_text())[args.offset: args.offset + args.edits]))
    ingest_file(engine, subset, source="retraction")
    settings = {"name": "retraction/original", "algorithm": args.algorithm, "batch_size": args.batch_size,
                "limit": args.edits, "fact_source": "retraction", "fact_pool": "private", "eval_every": 0,
                "health_checks": False, "runtime": {"device": "cpu", "dtype": "float32"}}
    started = time.perf_counter()
    run_id = sequential_edit(settings=settings, db_url=url)["run_id"]
    print(f"run {run_id}: {time.perf_counter() - started:.0f} s", flush=True)
    with Session(engine) as session:
        order = session.execute(select(BatchFact.fact_id, BatchRecord.seq).join(BatchRecord)
                                .where(BatchRecord.run_id == run_id)
                                .order_by(BatchRecord.seq, BatchFact.position)).all()
    fact_ids = [fact_id for fact_id, _ in order]
    batch_of = dict(order)
    retracted = [fact_id for fact_id, seq in order if seq == 1][args.retract_position]
    started = time.perf_counter()
    branch = create_branch(engine, run_id, retracted, "bench: retract one fact of batch 1")
    sequential_edit(run_id=branch.id, db_url=url)
    print(f"branch run {branch.id} (retract fact {retracted}): {time.perf_counter() - started:.0f} s\n", flush=True)

    unedited = fact_scores(engine, run_id, 0, fact_ids)
    original = fact_scores(engine, run_id, last_applied_seq(engine, run_id), fact_ids)
    after = fact_scores(engine, branch.id, last_applied_seq(engine, branch.id), fact_ids)
    print(f"{'fact':>5} {'batch':>5}  {'unedited p_new/p_true':>22}  {'run p_new/p_true ES':>24}  "
          f"{'branch p_new/p_true ES':>26}")
    for fact_id in fact_ids:
        cells = []
        for scores in (unedited, original, after):
            p_new, p_true = scores[fact_id]
            cells.append(f"{p_new:.4f}/{p_true:.4f} {int(p_new > p_true)}")
        mark = "  <- retracted" if fact_id == retracted else ""
        print(f"{fact_id:5d} {batch_of[fact_id]:5d}  {cells[0]:>22}  {cells[1]:>24}  {cells[2]:>26}{mark}")
    others = [i for i in fact_ids if i != retracted]
    for label, scores in (("unedited", unedited), ("run", original), ("branch", after)):
        es = sum(scores[i][0] > scores[i][1] for i in others) / len(others)
        print(f"ES of the {len(others)} other facts, {label}: {es:.3f}; retracted fact ES "
              f"{int(scores[retracted][0] > scores[retracted][1])}")
    for label, checked in (("run", run_id), ("branch", branch.id)):
        verification = verify_run(engine, checked)
        print(f"verify {label} {checked}: {'ok' if verification.ok else 'FAILED'}, head {verification.head}")
    with Session(engine) as session:
        for seq, layers in session.execute(select(BatchRecord.seq, BatchRecord.chain_record)
                                           .where(BatchRecord.run_id == branch.id).order_by(BatchRecord.seq)):
            hashes = ", ".join(f"L{layer} {entry['sha256_after'][:12]}" for layer, entry in
                               sorted(layers["layers"].items(), key=lambda item: int(item[0])))
            print(f"  branch batch {seq}: {hashes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
