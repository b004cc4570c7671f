#!/bin/bash
# Time to first dataset as a new user meets it: `make setup` then `make demo` in a fresh clone, with cold pip, uv,
# vLLM and inductor caches (nothing reused from this machine's earlier runs). Prints one JSON line of seconds; the
# logs stay in WORK. Usage: bash bench/first_dataset.sh [REPO (default: this checkout)] [WORK (default: a temp dir)]
set -u
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
work=${2:-$(mktemp -d /tmp/first-dataset-XXXX)}
rm -rf "$work/clone" "$work/cache" && mkdir -p "$work/cache"
export PIP_CACHE_DIR=$work/cache/pip UV_CACHE_DIR=$work/cache/uv VLLM_CACHE_ROOT=$work/cache/vllm \
  TORCHINDUCTOR_CACHE_DIR=$work/cache/inductor XDG_CACHE_HOME=$work/cache/xdg POLYCULTURE_CACHE=$work/cache/polyculture
t0=$(date +%s.%N)
git clone -q "$repo" "$work/clone" && cd "$work/clone" || exit 1
t1=$(date +%s.%N)
make setup > "$work/setup.log" 2>&1; setup_rc=$?
t2=$(date +%s.%N)
make demo > "$work/demo.log" 2>&1; demo_rc=$?
t3=$(date +%s.%N)
python3 -c "import json; print(json.dumps({'setup_rc': $setup_rc, 'demo_rc': $demo_rc, 'clone_s': round($t1-$t0, 1),
  'setup_s': round($t2-$t1, 1), 'demo_s': round($t3-$t2, 1), 'total_s': round($t3-$t0, 1), 'logs': '$work'}))"
# The demo's own timeline (engine start, each round) is in its progress lines: grep -E '^[0-9:]{8} ' WORK/demo.log
