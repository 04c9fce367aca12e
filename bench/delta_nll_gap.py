#!/usr/bin/env python3
"""Where a cache's ΔNLL comes from on the tuning windows (issue 18): token_gap.py's classes
(copy, repeat, new) for any caches of one lexico-eval call, each cache's mean per-token ΔNLL
(NLL minus the dense model's) per class and against the first cache, paired. token_gap.py
does the same for the claim's fresh-text runs.

  delta_nll_gap.py run --out results/delta_nll_gap.jsonl [--cache SPEC ...]
      one lexico-eval process on the tuning windows (dev windows 65-72 of tokens_dev.u16,
      1,024 tokens, prefill 512) with --per-token --token-detail;
  delta_nll_gap.py report results/delta_nll_gap.jsonl > results/delta_nll_gap.md
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from array import array
from pathlib import Path

from token_gap import window_classes

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
WINDOW, SKIP, WINDOWS, PREFILL = 1024, 64, 8, 512
CLASSES = ("copy", "repeat", "new")
DEFAULT_CACHES = [
    "kivi:bits=2,group=32,residual=128",
    "lexico:dict=dictionaries/proxy-lm-hd128,s=4,layer_s=4:3:3:4:3:4:4:7,buffer=32,recent=128,recent_format=q8_0/q4_0",
    "lexico:dict=dictionaries/proxy-lm-hd128-keymetric,s=4,layer_s=4:3:3:4:3:4:4:7,buffer=32,recent=128,"
    "recent_format=q8_0/q4_0,layer_sk=4:3:2:3:3:3:4:10",
]


def windows(tokens_path):
    """lexico-eval's windows: consecutive runs of WINDOW tokens, BOS (0) first."""
    tokens = array("H")
    tokens.frombytes(Path(tokens_path).read_bytes())
    out, start = [], 0
    while len(out) < SKIP + WINDOWS:
        window = [] if start < len(tokens) and tokens[start] == 0 else [0]
        while len(window) < WINDOW and start < len(tokens):
            window.append(tokens[start])
            start += 1
        if len(window) < WINDOW:
            break
        out.append(window)
    return out[SKIP:]


def run(args):
    command = [args.eval, "--model", args.model, "--tokens", args.tokens, "--window", str(WINDOW), "--windows",
               str(WINDOWS), "--skip", str(SKIP), "--prefill", str(PREFILL), "--json", "--per-token",
               "--token-detail"]
    for spec in args.cache or DEFAULT_CACHES:
        command += ["--cache", spec]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        sys.exit(f"delta_nll_gap: lexico-eval failed ({result.returncode}): {result.stderr[-2000:]}")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps({"command": shlex.join(command), "tokens_file": args.tokens, **r}) + "\n")
    print(f"delta_nll_gap: {len(rows)} caches -> {args.out}")


def report(args):
    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    all_windows = windows(rows[0]["tokens_file"])
    ids = rows[0]["token_ids"]
    per_window = len(ids) // WINDOWS
    labels = []
    for w, window in enumerate(all_windows):
        scored = ids[w * per_window:(w + 1) * per_window]
        first = WINDOW - per_window  # the last per_window tokens of the window are scored
        if window[first:] != scored:
            sys.exit(f"delta_nll_gap: window {w + SKIP + 1}'s tokens do not match the scored ones")
        labels += window_classes(window, first)
    print("# Where ΔNLL comes from (proxy-lm-hd128, tuning windows)\n")
    print(f"Made by `bench/delta_nll_gap.py report {args.file}` from `bench/delta_nll_gap.py run`: dev windows "
          f"{SKIP + 1}-{SKIP + WINDOWS} of tokens_dev.u16 ({WINDOW} tokens, prefill {PREFILL}), each scored token "
          "classed by what its window held before it: **copy** (the pair of it and the token before it occurred "
          "earlier: an induction head can copy it), **repeat** (the token occurred, never after this "
          "predecessor), **new**. Mean per-token ΔNLL ± its standard error per class; the last columns set "
          "each cache against the first (paired: the same tokens).\n")
    print(f"Command: `OMP_NUM_THREADS=1 {rows[0]['command']}`\n")
    count = {c: labels.count(c) for c in CLASSES}
    dense_nll = rows[0].get("token_dense_nll")
    head = "| cache | KV % | KL | " + " | ".join(f"{c} ({count[c]} tokens)" for c in CLASSES)
    head += " | " + " | ".join(f"{c} vs first" for c in CLASSES) + " |"
    print(head)
    print("|---|---:|---:|" + "---:|" * (2 * len(CLASSES)))

    def mean_se(values):
        n = len(values)
        if n < 2:
            return float("nan"), float("nan")
        m = sum(values) / n
        return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)

    first = rows[0]["token_delta_nll"]
    for r in rows:
        cells = []
        for c in CLASSES:
            m, se = mean_se([d for d, l in zip(r["token_delta_nll"], labels) if l == c])
            cells.append(f"{m:+.4f} ± {se:.4f}")
        for c in CLASSES:
            m, se = mean_se([d - f for d, f, l in zip(r["token_delta_nll"], first, labels) if l == c])
            cells.append(f"{m:+.4f} ± {se:.4f}")
        print(f"| {r['cache']} {r['parameters']} | {100 * r['kv_size_fraction']:.2f} | {r['mean_kl']:.5f} | "
              + " | ".join(cells) + " |")
    if dense_nll:
        print()
        for c in CLASSES:
            m, _ = mean_se([n for n, l in zip(dense_nll, labels) if l == c])
            print(f"- dense model's mean NLL on {c} tokens: {m:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--eval", default=str(REPO / "build" / "examples" / "lexico-eval"))
    p.add_argument("--model", default=str(SHARED / "proxy-lm-hd128"))
    p.add_argument("--tokens", default=str(SHARED / "bpe4k" / "tokens_dev.u16"))
    p.add_argument("--cache", action="append", help="a cache spec (default: KIVI-2, the claim setting, key metric)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("file")
    args = parser.parse_args()
    {"run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
