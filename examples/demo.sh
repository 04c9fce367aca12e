#!/usr/bin/env bash
# The main job on bundled data: trains Lexico key/value dictionaries for the bundled
# TinyStories-656K model on bundled training text, then runs the model over held-out
# text with its KV cache compressed by Lexico and by the baselines, and prints the
# quality-vs-memory table (mean NLL, change against the dense cache, top-1 agreement
# with the dense cache, KV size as a share of fp16 K and V).
#
#   bash examples/demo.sh [BUILD_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-$build/demo}
model=data/tinystories-656k

echo "== training dictionaries for $model (N=256 atoms, head_dim 16) =="
"$build/examples/lexico-train" --model "$model" --text data/text/tinystories_train_head.txt \
  --dev data/text/tinystories_valid_head.txt --atoms 256 --sparsity 4 --vectors 200000 --out "$out/dict"

echo
echo "== evaluating caches on held-out text (4 windows of 512 tokens, half prefilled) =="
# head_dim is 16 here: KIVI groups of 16 channels; Lexico rows cost 3s+1 bytes against
# 32 bytes of fp16, so s=2 is ~22 % and s=4 ~41 % of fp16 before the buffer.
"$build/examples/lexico-eval" --model "$model" --text data/text/tinystories_valid_head.txt \
  --window 512 --windows 4 \
  --cache dense:dtype=fp16 \
  --cache "lexico:dict=$out/dict,s=2,buffer=32" \
  --cache "lexico:dict=$out/dict,s=3,buffer=32" \
  --cache "lexico:dict=$out/dict,s=4,buffer=32" \
  --cache "lexico:dict=$out/dict,s=6,buffer=32" \
  --cache kivi:bits=2,group=16,residual=32 \
  --cache kivi:bits=4,group=16,residual=32 \
  --cache fp8 \
  --cache streaming:budget=0.3 \
  --cache h2o:budget=0.3 \
  --cache snapkv:budget=0.3 \
  --cache tova:budget=0.3
