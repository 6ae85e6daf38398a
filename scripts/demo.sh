#!/usr/bin/env bash
# Setup (idempotent) + the main job on the default model: a question about a long built-in document
# (~5000 tokens of Python's documentation) answered on the patched engine with the merged (MiniCache)
# KV cache — aligned merging with the calibration shipped for the default model — then what the
# cache holds (tokens merged, kept exact, in the window) and allocates next to a stock cache.
#   bash scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
QUESTION=${1:-"Which Python statements does this documentation describe? Name three."}
.venv/bin/minicache-gguf info
exec .venv/bin/minicache-gguf generate --kv-merge --calibration auto --n-ctx 8192 --doc builtin -p "$QUESTION" -n 96
