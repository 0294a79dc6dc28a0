#!/usr/bin/env bash
# The GPU readiness check, under 5 minutes on one GPU: the `cuda` tests, the edit-throughput bench on a random
# 1B Llama in bfloat16 (with the float32 masters), and a 100-edit bfloat16 run of SmolLM2 through the pipeline,
# printing facts/s and peak memory. Run from the repository root after `make install`:
#   bash bench/gpu_check.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
export SEQEDIT_CACHE=${SEQEDIT_CACHE:-$PWD/.cache/seqedit} PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"

echo "== cuda tests"
"$PY" -m pytest -q -m cuda tests/editing/test_cuda.py

echo "== random 1B Llama: memory and time per phase (bfloat16, float32 masters)"
[ -d "$OUT/random-llama-1b" ] || "$PY" bench/random_llama.py --out "$OUT/random-llama-1b" --dtype bfloat16
"$PY" bench/scale.py --model "$OUT/random-llama-1b" --device cuda --dtype bfloat16 --texts 512 --facts 64 --steps 25

echo "== edit throughput on SmolLM2 (bfloat16): B 1, 16, 64 against the per-fact reference loop"
"$PY" bench/edit_throughput.py --device cuda --dtype bfloat16 --sizes 1,16,64 --naive-facts 16

echo "== 100 sequential edits of SmolLM2 in bfloat16 through the pipeline (float32 masters), rollback, export"
DB="sqlite:///$PWD/$OUT/ledger.db"
rm -f "$OUT/ledger.db"
.venv/bin/seqedit init --db "$DB"
.venv/bin/seqedit ingest --db "$DB" counterfact-sample --source cf
start=$(date +%s)
.venv/bin/seqedit run --db "$DB" --algo emmet --batch-size 20 --limit 100 --eval-every 5 --source cf \
  --device cuda --dtype bfloat16 --json | tail -1
echo "100 edits in $(( $(date +%s) - start )) s wall (model load, C0 and evaluations included)"
.venv/bin/seqedit rollback --db "$DB" --run 1 --to 2
.venv/bin/seqedit export-model --db "$DB" --run 1 --out "$OUT/export" --force
