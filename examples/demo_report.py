#!/usr/bin/python3
"""Prints the demo's table from lexico-eval --json lines and the one-line claim: the KV
size at which Lexico's front reaches KIVI-2's KL (interpolated in log size along the
front, as results/claim.json's rule reads it), against KIVI-2's own size.

    python3 examples/demo_report.py RUNS.jsonl
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from claim_page import front, size_at  # noqa: E402


def main():
    rows = []
    with open(sys.argv[1]) as f:
        for line in f:
            if line.startswith("{"):
                r = json.loads(line)
                rows.append({"cache": r["cache"], "label": r["parameters"], "kv": 100 * r["kv_size_fraction"],
                             "kl": r["mean_kl"], "delta": r["delta_nll"], "se": r["delta_nll_se"],
                             "top1": 100 * r["top1_agreement"], "tps": r["tokens_per_second"]})
    if not rows:
        raise SystemExit(f"demo_report: no results in {sys.argv[1]}")
    first = json.loads(next(line for line in open(sys.argv[1]) if line.startswith("{")))
    print(f"{first['windows']} windows of {first['window']} tokens, each the start of one story, "
          f"prefill {first['prefill']}, {first['scored_tokens']} scored tokens per cache")
    print(f"{'cache':9s} {'parameters':44s} {'KV size':>8s} {'delta NLL':>17s} {'KL':>9s} {'top-1':>7s} {'tok/s':>8s}")
    for r in rows:
        print(f"{r['cache']:9s} {r['label'][:44]:44s} {r['kv']:7.2f}% {r['delta']:+8.4f} ± {r['se']:.4f} "
              f"{r['kl']:9.5f} {r['top1']:6.2f}% {r['tps']:8.1f}")
    lexico = front([r for r in rows if r["cache"] == "lexico"], "kl")
    kivi2 = [r for r in rows if r["cache"] == "kivi" and r["label"].startswith("bits=2")]
    if not lexico or not kivi2:
        print("claim: needs Lexico and KIVI-2 rows")
        return
    point = min(kivi2, key=lambda r: r["kl"])
    size, reached = size_at(lexico, "kl", point["kl"])
    if size is None:
        print(f"claim: no Lexico setting here reaches KIVI-2's KL ({point['kl']:.5f} at {point['kv']:.1f} % KV)")
    elif size == "below":
        print(f"claim: Lexico reaches KIVI-2's KL ({point['kl']:.5f} at {point['kv']:.1f} % KV) already at "
              f"{reached['kv']:.1f} % KV: at least {point['kv'] / reached['kv']:.2f}x smaller")
    else:
        verdict = (f"{point['kv'] / size:.2f}x smaller" if size < point["kv"] else
                   f"{size / point['kv']:.2f}x larger: not smaller here")
        print(f"claim: at KIVI-2's KL ({point['kl']:.5f}, {point['kv']:.1f} % KV) Lexico needs {size:.1f} % KV: "
              f"{verdict}")


if __name__ == "__main__":
    main()
