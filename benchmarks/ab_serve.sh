#!/bin/bash
# A/B of `swav serve` builds: alternating runs at one concurrency, each in a fresh server (2 s of
# warm-up, then 6 s of wrk), printing requests/s and the server's own CPU time per request (from
# /proc, so the load generator's share does not count). On a noisy machine the CPU per request
# varies less than the throughput.
# usage: BENCH_LIST=list.txt MODEL=dir benchmarks/ab_serve.sh ROUNDS CONCURRENCY BINARY...
# (list.txt: one PNG path per line, e.g. made by scripts/bench_serve.py's write_pngs;
#  EXTRA="--workers 2" adds serve flags)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=$1 CONC=$2
shift 2
PORT=${PORT:-18779}
TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for _ in $(seq "$ROUNDS"); do
    for bin in "$@"; do
        # shellcheck disable=SC2086 # EXTRA holds several flags
        "$bin" serve --model "${MODEL:?}" --device cpu --listen "127.0.0.1:$PORT" --log warn ${EXTRA:-} >/dev/null 2>&1 &
        pid=$!
        for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.1; done
        wrk -t1 -c"$CONC" -d2s -s "$ROOT/benchmarks/wrk_images.lua" "http://127.0.0.1:$PORT/v1/embed" >/dev/null
        before=$(cpu_ticks $pid)
        out=$(wrk -t1 -c"$CONC" -d6s -s "$ROOT/benchmarks/wrk_images.lua" "http://127.0.0.1:$PORT/v1/embed")
        after=$(cpu_ticks $pid)
        requests=$(echo "$out" | grep -oP '^\s+\K\d+(?= requests in)')
        rps=$(echo "$out" | grep -oP 'Requests/sec:\s+\K[\d.]+')
        echo "$bin c=$CONC: $rps requests/s, server CPU $(( (after - before) * 1000000 / TICK / requests )) µs/request"
        kill -TERM $pid
        wait $pid
    done
done
