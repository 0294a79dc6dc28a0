#!/usr/bin/env bash
# The 200-edit sequential study of the issue note: EMMET and MEMIT on SmolLM2-135M, batch 16,
# evaluation every 2 batches, the same 200 CounterFact facts for both (private fact pools), one ledger.
# The two runs go in parallel, one thread each (two torch processes with two threads each on two cores
# thrash), each with its own Prefect home. Evaluation: the quick profile with four GLUE tasks (16 examples
# each); the v* optimisation is shortened to 15 steps and 2 prefixes to fit a 2-core CPU session.
# Usage: bench/sequential_study.sh [OUT_DIR] [N_FACTS]    (about an hour on a 2-core CPU)
set -euo pipefail
OUT=${1:-out/study}
N=${2:-200}
SEQEDIT=${SEQEDIT:-.venv/bin/seqedit}
DATA=${SEQEDIT_DATA:-../shared/data}
mkdir -p "$OUT"
DB="sqlite:///$(cd "$OUT" && pwd)/ledger.db"
$SEQEDIT init --db "$DB"
$SEQEDIT ingest "$DATA/counterfact/counterfact-1000.json" --source cf1000 --db "$DB"
for ALGO in emmet memit; do
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PREFECT_HOME="$OUT/prefect-$ALGO" /usr/bin/time -f "$ALGO wall %e s, peak RSS %M kB" \
    $SEQEDIT run --db "$DB" --algo "$ALGO" --batch-size 16 --eval-every 2 --limit "$N" \
      --pool private --source cf1000 --eval-profile quick \
      --eval-set 'downstream_tasks=["sst2","mrpc","cola","rte"]' --eval-set n_downstream=16 \
      --set values.steps=15 --set values.n_prefixes=2 --name "study-$ALGO" --json > "$OUT/$ALGO.log" 2>&1 &
done
wait
for RUN in $($SEQEDIT history --db "$DB" --json | python3 -c 'import json,sys; print(" ".join(str(r["run_id"]) for r in json.load(sys.stdin)))'); do
  $SEQEDIT report --db "$DB" --run "$RUN" --out "$OUT/report"
done
