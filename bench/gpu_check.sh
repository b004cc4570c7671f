#!/usr/bin/env bash
# The GPU check in one call on a bare GPU machine (see bench/gpu_check.py): run from the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi || true
PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "${PYTHON:-python3}" bench/gpu_check.py --device cuda "$@"
