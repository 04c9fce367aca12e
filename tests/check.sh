#!/usr/bin/env bash
# The whole check, as CI runs it (README's test command, after the Debian packages):
#  1. Release build of everything; the suite, including the ThreadSanitizer build of the
#     concurrency tests (tests/run_thread_sanitizer.cmake) and the package consumer.
#  2. The suite again under AddressSanitizer + UndefinedBehaviorSanitizer (its own build).
#  3. The libFuzzer targets (clang): each replays its committed corpus and regressions,
#     then fuzzes for LEXICO_FUZZ_SECONDS (default 30); any crash, hang (10 s), leak or
#     allocation over 1 GiB fails.
# JOBS (default 2) sets the parallelism; SKIP_SANITIZERS=1 or SKIP_FUZZ=1 leave a stage out.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-2}
stage() { printf '\n==== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

stage "Release build and suite"
cmake -S . -B build
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"

if [[ -z "${SKIP_SANITIZERS:-}" ]]; then
  stage "AddressSanitizer + UndefinedBehaviorSanitizer build and suite"
  # -O1 with assertions on: sanitized -O2 -g builds take 5x the Release compile time here, -O1 under 2x.
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O1 -DLEXICO_SANITIZE=ON \
    -DLEXICO_BUILD_BENCHMARKS=OFF
  cmake --build build-asan -j"$jobs"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs"
fi

if [[ -z "${SKIP_FUZZ:-}" ]]; then
  stage "libFuzzer targets: corpora, regressions, ${LEXICO_FUZZ_SECONDS:-30} s each"
  cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DLEXICO_FUZZ=ON -DLEXICO_BUILD_TESTS=OFF \
    -DLEXICO_BUILD_BENCHMARKS=OFF -DLEXICO_BUILD_EXAMPLES=OFF -DLEXICO_FUZZ_SECONDS="${LEXICO_FUZZ_SECONDS:-30}"
  cmake --build build-fuzz -j"$jobs"
  ctest --test-dir build-fuzz --output-on-failure -j"$jobs"
fi
stage "all checks passed"
