#!/usr/bin/env bash
# Runs one libFuzzer target over its committed inputs and then for SECONDS seconds (or
# RUNS executions when RUNS is set), with the limits RELIABILITY.md states: no input may
# take more than 10 s, nor the process more than 1 GiB (RSS or a single allocation).
# New inputs go to WORK/<name>/corpus, crashes to WORK/<name>/; the exit status is
# libFuzzer's (non-zero on any finding).
#   fuzz/run.sh BUILD_DIR NAME SECONDS WORK [extra libFuzzer flags...]
set -euo pipefail
build=$1 name=$2 seconds=$3 work=$4
shift 4
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work/$name/corpus"
flags=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=1024
       -artifact_prefix="$work/$name/" -print_final_stats=1)
[[ -n "${RUNS:-}" ]] && flags+=(-runs="$RUNS")
[[ -f "$here/$name.dict" ]] && flags+=(-dict="$here/$name.dict")
seeds=("$here/corpus/$name")
[[ -d "$here/regressions/$name" ]] && seeds+=("$here/regressions/$name")
exec "$build/fuzz/fuzz_$name" "${flags[@]}" "$@" "$work/$name/corpus" "${seeds[@]}"
