#!/usr/bin/env bash
# Setup (idempotent) + the main job on the default model: generate on the patched engine with the
# merged (MiniCache) KV cache — aligned merging, calibrated once on first use (~2-3 min on 2 cores,
# then cached) — and report the KV memory it allocated against a stock cache.
#   bash scripts/demo.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PROMPT=${1:-"In two sentences, why does a long context need so much memory in a language model?"}
.venv/bin/minicache-gguf info
exec .venv/bin/minicache-gguf generate --kv-merge --calibration auto --n-ctx 8192 -p "$PROMPT" -n 96
