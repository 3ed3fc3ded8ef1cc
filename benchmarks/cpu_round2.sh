#!/usr/bin/env bash
# CPU round 2, every figure of BENCHMARKS.md "CPU round 2" in one go, on a quiet machine:
#
#   bash benchmarks/cpu_round2.sh [DATA] [OUT]     # DATA: ../shared/data, OUT: benchmarks/out/cpu_round2
#
# Builds the augmented 10,000 + 1,000 set once (/tmp/fastret-scaled, benchmarks/make_scaled_set.py), then:
# cold search (with / without the compiled query model, 1k and 10k index), the model frontier
# (Lite0/1/2 and other sides x runtime x precision), the stage floors with whole-process `fastret index`
# images/s, float16 embeddings, and the course task against its baseline. About 75 minutes on 2 quiet cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=${2:-benchmarks/out/cpu_round2}
SCALED=${SCALED:-/tmp/fastret-scaled}
PY=.venv/bin/python
mkdir -p "$OUT"
# A model cache of its own: exports and INT8 calibrations are made the current way, and nobody else's change.
export FASTRET_CACHE=${FASTRET_CACHE:-$(realpath "$OUT")/cache}
uptime | tee "$OUT/load_before.txt"
[ -d "$SCALED/db" ] || $PY benchmarks/make_scaled_set.py --src "$DATA/wang1k" --out "$SCALED" --db 10000 --queries 1000
$PY benchmarks/cold_search.py --small "$DATA/wang1k" --large "$SCALED/db" --repeats 11 --out "$OUT/cold_search.json" \
    | tee "$OUT/cold_search.txt"
$PY benchmarks/model_frontier.py --wang1k "$DATA/wang1k" --animals "$DATA/animals10-mini" \
    --scaled "$SCALED/db" --scaled-queries "$SCALED/queries" --out "$OUT/model_frontier.json" | tee "$OUT/model_frontier.txt"
$PY benchmarks/stage_floor.py --images "$SCALED/db" --index-runs 3 --out "$OUT/stage_floor.json" | tee "$OUT/stage_floor.txt"
for name in wang1k animals10-mini; do
    .venv/bin/fastret index "$DATA/$name" --model efficientnet-lite2 --out "/tmp/fastret-fp16-$name" -q
done
.venv/bin/fastret index "$SCALED/db" --model efficientnet-lite2 --out /tmp/fastret-fp16-scaled -q
$PY benchmarks/fp16_embeddings.py --index wang1k=/tmp/fastret-fp16-wang1k --index animals10=/tmp/fastret-fp16-animals10-mini \
    --index scaled10k=/tmp/fastret-fp16-scaled --out "$OUT/fp16_embeddings.json" | tee "$OUT/fp16_embeddings.txt"
$PY benchmarks/ta_speed.py --db "$SCALED/db" --queries "$SCALED/queries" --out "$OUT/ta_speed" | tee "$OUT/ta_speed.txt"
uptime | tee "$OUT/load_after.txt"
