#!/bin/bash
# Quick single-point check of `swav serve` settings at c=64 (6 s after a 2 s warm-up).
# usage: BENCH_LIST=list.txt MODEL=dir benchmarks/quick_serve.sh "extra serve flags"
# (list.txt: one PNG path per line, e.g. made by scripts/bench_serve.py's write_pngs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-18777}
# shellcheck disable=SC2086 # the flags are several words
"$ROOT/target/release/swav" serve --model "${MODEL:?}" --device cpu --listen "127.0.0.1:$PORT" --log warn ${1:-} >/dev/null 2>&1 &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.1; done
wrk -t1 -c64 -d2s -s "$ROOT/benchmarks/wrk_images.lua" "http://127.0.0.1:$PORT/v1/embed" >/dev/null
echo "${1:-defaults}: $(wrk -t1 -c64 -d6s --latency -s "$ROOT/benchmarks/wrk_images.lua" "http://127.0.0.1:$PORT/v1/embed" | grep -E 'Requests/sec|  99%' | tr -s ' ' | tr '\n' ' ')"
kill -TERM $PID
wait $PID
