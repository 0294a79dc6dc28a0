#!/usr/bin/env bash
# The lifelong (sequential) editing study of issue 11: on SmolLM2-135M, the same CounterFact facts in the same
# order for every method (private fact pools of counterfact-easyedit-edit.json), batches of 16, collapse policy
# `warn` (alarms are recorded, the runs go on): MEMIT, EMMET, AlphaEdit and ENCORE for N edits each (default
# 2000), ROME with batch size 1 for up to ROME_N edits (default 500). Every batch gets the health check (norms,
# v*, perplexity probe); a full evaluation (quick profile + four GLUE tasks, 32 examples each) every EVAL_EVERY
# batches (ROME: every ROME_EVAL_EVERY edits) and after the last. Ends with `seqedit report` comparing the runs
# (PNG on shared axes + markdown table of first alarms).
#   JOBS=2    runs two methods at a time, one torch thread each (more throughput than one run on two threads)
#   VSTAR="--set values.n_prefixes=0"   extra v* settings for every run (the study note says which were used)
# Usage: bench/lifelong_study.sh [OUT_DIR] [N] [ROME_N]        e.g. JOBS=2 bench/lifelong_study.sh out/lifelong
# Runs already in the ledger are resumed, so re-running the script continues an interrupted study.
set -euo pipefail
OUT=${1:-out/lifelong}
N=${2:-2000}
ROME_N=${3:-500}
EVAL_EVERY=${EVAL_EVERY:-16}
ROME_EVAL_EVERY=${ROME_EVAL_EVERY:-100}
JOBS=${JOBS:-1}
VSTAR=${VSTAR:-}
SEQEDIT=${SEQEDIT:-.venv/bin/seqedit}
DATA=${SEQEDIT_DATA:-../shared/data}
METHODS=${METHODS:-"memit emmet alphaedit encore rome"}
mkdir -p "$OUT"
DB="sqlite:///$(cd "$OUT" && pwd)/ledger.db"
export PREFECT_HOME=${PREFECT_HOME:-$(cd "$OUT" && pwd)/prefect}
$SEQEDIT init --db "$DB"
$SEQEDIT ingest "$DATA/counterfact/counterfact-easyedit-edit.json" --source cf-edit --db "$DB" > "$OUT/ingest.txt"
EVAL=(--eval-profile quick --eval-set 'downstream_tasks=["sst2","mrpc","cola","rte"]' --eval-set n_downstream=32)
THREADS=()
[ "$JOBS" -gt 1 ] && THREADS=(--threads 1)
run_id() {  # the id of the study run named $1, if it exists
  $SEQEDIT history --db "$DB" --json | python3 -c "import json,sys; ids=[r['run_id'] for r in json.load(sys.stdin) if r['name']=='$1']; print(ids[0] if ids else '')"
}
study_run() {  # one method, created or resumed; its own Prefect home (runs in parallel must not share one)
  local ALGO=$1 NAME="lifelong-$1" ID SIZE
  if [ "$ALGO" = rome ]; then SIZE=(--batch-size 1 --limit "$ROME_N" --eval-every "$ROME_EVAL_EVERY")
  else SIZE=(--batch-size 16 --limit "$N" --eval-every "$EVAL_EVERY"); fi
  ID=$(run_id "$NAME")
  export PREFECT_HOME="$PREFECT_HOME-$ALGO"
  if [ -n "$ID" ]; then
    /usr/bin/time -f "$ALGO (resumed) wall %e s, peak RSS %M kB" $SEQEDIT run --db "$DB" --resume "$ID" --json \
      >> "$OUT/$ALGO.log" 2>&1
  else
    # shellcheck disable=SC2086
    /usr/bin/time -f "$ALGO wall %e s, peak RSS %M kB" $SEQEDIT run --db "$DB" --algo "$ALGO" "${SIZE[@]}" \
      --pool private --source cf-edit --collapse-policy warn "${EVAL[@]}" "${THREADS[@]}" $VSTAR --name "$NAME" \
      --json > "$OUT/$ALGO.log" 2>&1
  fi
  tail -n 2 "$OUT/$ALGO.log"
}
for ALGO in $METHODS; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  study_run "$ALGO" &
  sleep 5  # the runs' creation (C0, prefixes) need not collide
done
wait
IDS=()
for ALGO in $METHODS; do IDS+=(--run "$(run_id "lifelong-$ALGO")"); done
$SEQEDIT report --db "$DB" "${IDS[@]}" --out "$OUT/report" --quiet
