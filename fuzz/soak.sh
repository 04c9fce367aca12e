#!/usr/bin/env bash
# Long fuzzing of one target for RELIABILITY.md: P processes (different seeds, one shared
# corpus folder) until they have run RUNS executions together or SECONDS have passed,
# under run.sh's limits (10 s per input, 1 GiB RSS and per allocation). Prints one line:
#   NAME executions=E seconds=S processes=P findings=F
# and leaves any finding in WORK/NAME/ (crash-*, timeout-*, oom-*, leak-*).
#   fuzz/soak.sh BUILD_DIR NAME RUNS PROCESSES SECONDS WORK
set -uo pipefail
build=$1 name=$2 runs=$3 processes=$4 seconds=$5 work=$6
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work/$name/logs"
start=$(date +%s)
for ((i = 0; i < processes; ++i)); do
  RUNS=$(( (runs + processes - 1) / processes )) "$here/run.sh" "$build" "$name" "$seconds" "$work" -seed=$((i + 1)) \
    -reload=1 >"$work/$name/logs/$i.log" 2>&1 &
done
wait
elapsed=$(( $(date +%s) - start ))
executions=$(grep -h '^stat::number_of_executed_units' "$work/$name/logs/"*.log | awk '{s += $2} END {print s + 0}')
findings=$(find "$work/$name" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' -o -name 'slow-unit-*' \) | wc -l)
echo "$name executions=$executions seconds=$elapsed processes=$processes findings=$findings"
[[ "$findings" == 0 ]]
