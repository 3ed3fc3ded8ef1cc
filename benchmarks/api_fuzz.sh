#!/usr/bin/env bash
# Fuzz `fastret serve`'s HTTP API with schemathesis, on loopback only (BENCHMARKS.md, "HTTP API fuzzing").
#
#   bash benchmarks/api_fuzz.sh [SECONDS]    # time budget of the fuzzing run (default 150)
#
# schemathesis (and Pillow, for its hooks) go into their own virtual environment
# (benchmarks/out/fuzz-venv, git-ignored), not the project's. A 63-image gallery (6 of each wang1k
# class, or generated images when the data is absent, plus three files with hostile names) is
# indexed with `fastret index` in a temporary folder; `fastret serve` runs on 127.0.0.1 at a free port; `st run --checks all` fuzzes every
# operation of /openapi.json until the budget is spent, then POST /search alone for half as long
# again. Exit status 0 when neither run found a failure. Logs, JUnit reports and the server's
# access log go to benchmarks/out/api-fuzz/.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${1:-150}
PY=${PYTHON:-.venv/bin/python}
RESULTS=benchmarks/out/api-fuzz
FUZZ_VENV=benchmarks/out/fuzz-venv
DATA=${SHARED_DATA:-../shared/data}/wang1k
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/fastret-api-fuzz.XXXXXX)
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2> /dev/null && wait "$SERVER_PID" 2> /dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$FUZZ_VENV/bin/st" ]; then
    step "installing schemathesis into $FUZZ_VENV"
    python3 -m venv "$FUZZ_VENV" && "$FUZZ_VENV/bin/pip" install -q schemathesis pillow || exit 1
fi
ST_VERSION=$("$FUZZ_VENV/bin/st" --version)

step "gallery and index in $WORK"
"$PY" - "$DATA" "$WORK/gallery" << 'EOF' || exit 1
import os, shutil, sys
from pathlib import Path
from PIL import Image

data, gallery = Path(sys.argv[1]), Path(sys.argv[2])
if data.is_dir():
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        (gallery / folder.name).mkdir(parents=True)
        for path in sorted(folder.glob("*.jpg"))[:6]:
            shutil.copyfile(path, gallery / folder.name / path.name)
else:  # no data: 10 colour classes of generated images
    for c in range(10):
        (gallery / f"class{c}").mkdir(parents=True)
        for n in range(6):
            Image.new("RGB", (320, 240), (25 * c, 40 * n, 255 - 25 * c)).save(gallery / f"class{c}" / f"{n}.jpg")
# Hostile names the API must report in valid JSON: non-UTF-8 bytes, a newline, a quote.
odd = gallery / "odd"
odd.mkdir()
for raw in (b"caf\xe9.png", b"line\nbreak.png", b'say "hi".png'):
    Image.new("RGB", (64, 48), (200, 100, 50)).save(os.path.join(os.fsencode(odd), raw), format="PNG")
print(sum(1 for _ in gallery.rglob("*.*")), "images")
EOF
"$PY" -m fastret.cli.main index "$WORK/gallery" --out "$WORK/index" --model efficientnet-lite2 --quiet || exit 1

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "fastret serve on 127.0.0.1:$PORT"
"$PY" -m fastret.cli.main serve --index "$WORK/index" --host 127.0.0.1 --port "$PORT" \
    --max-upload-mb 2 --max-pixels 4000000 --max-decodes 2 --log-level info > "$RESULTS/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 "$SERVER_PID" 2> /dev/null || { cat "$RESULTS/server.log"; exit 1; }
    sleep 0.5
done

# A schema-valid request can still be unusable: bytes that are no decodable image, softmax with
# re-ranking. The API answers those with 400 and a reason (documented in its schema), so
# positive_data_acceptance takes 400 as well as its defaults; every other check runs as shipped.
cat > "$WORK/schemathesis.toml" << 'EOF'
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
EOF

# The response-time check runs with 30 s, not its default 10 s: the first query of a re-ranking
# space fits a PCA on the database (1-2 s alone on the 2-core VM, 11.6 s once while other jobs ran).
# Run from the results folder: st keeps its crash files for `st replay` in ./.schemathesis.
# benchmarks/api_fuzz_hooks.py adds generated (and broken) image files to POST /search's bodies.
fuzz() {  # NAME SECONDS [st run options...]: one schemathesis run, its output in $RESULTS/NAME.log
    local name=$1 seconds=$2
    shift 2
    step "$ST_VERSION, $name: st run --checks all --max-response-time 30 --max-time $seconds $*"
    (cd "$RESULTS" && SCHEMATHESIS_HOOKS=api_fuzz_hooks PYTHONPATH="$OLDPWD/benchmarks" \
        "$OLDPWD/$FUZZ_VENV/bin/st" --config-file "$WORK/schemathesis.toml" run "http://127.0.0.1:$PORT/openapi.json" \
        --checks all --max-response-time 30 --max-time "$seconds" --workers 2 --continue-on-failure --seed 1 \
        --request-timeout 60 --no-color --output-truncate true --generation-database none \
        --report junit --report-junit-path "$name.junit.xml" "$@" 2>&1) > "$RESULTS/$name.log"
    local status=$?
    sed -n '/^Test Phases:/,$p' "$RESULTS/$name.log"
    return $status
}

started=$(date +%s)
# Every operation, every phase (coverage, fuzzing, stateful via the schema's links); then uploads
# alone for half as long again, since the first run spends most of its time on item queries.
fuzz all-operations "$BUDGET"
status_all=$?
fuzz uploads $((BUDGET / 2)) --include-path /search --phases coverage,fuzzing
status_uploads=$?
elapsed=$(($(date +%s) - started))

kill "$SERVER_PID" 2> /dev/null && wait "$SERVER_PID" 2> /dev/null
SERVER_PID=""
step "summary"
echo "schemathesis:    $ST_VERSION"
echo "fuzzing time:    ${elapsed} s (budgets ${BUDGET} s + $((BUDGET / 2)) s)"
echo "test cases:      $(grep -ho '[0-9]* generated,' "$RESULTS"/*.log | tr -dc '0-9\n' | paste -sd+ | bc)"
echo "requests served: $(grep -c '" [0-9][0-9][0-9]' "$RESULTS/server.log") (uvicorn's access log), by endpoint and status:"
grep -o '"[A-Z]* /[^"]*" [0-9]*' "$RESULTS/server.log" \
    | sed -E 's/\?[^ ]*//; s#/(items|item)/[^/ ]*#/\1/ID#' | sort | uniq -c | sort -rn | sed 's/^/  /'
echo "server errors:   $(grep -c 'Exception in ASGI application\|Traceback' "$RESULTS/server.log") tracebacks in $RESULTS/server.log"
echo "st exit status:  all operations $status_all, uploads $status_uploads (0: no failures)"
[ "$status_all" = 0 ] && [ "$status_uploads" = 0 ]
