#!/usr/bin/env python3
"""Which tokens a cache costs: Lexico's ΔNLL against KIVI-2's, token by token, on the claim's
fresh text (1024-token windows), split by what the dense model does with the token.

    token_gap.py [--eval BIN] [--models proxy-lm-hd128,proxy-lm-hd64]

Reads the claim's run files (results/runs, made by results_sweep.py with per-token ΔNLL) and,
per model, the window's token ids and exact dense NLLs from one `lexico-eval --prefill 0
--per-token --token-detail` run (made here when results/token_detail/ lacks it). Writes
results/token_gap.md. Token classes, for the token at position p + 1 of a window:

- copy: the pair (token p, token p + 1) occurs earlier in the window (an induction head's
  case: the model can copy the continuation it saw);
- repeat: token p + 1 occurs earlier in the window, but not after token p;
- new: not earlier in the window.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import results_sweep as sweep

DETAIL_DIR = sweep.RESULTS_DIR / "token_detail"
REPORT = sweep.RESULTS_DIR / "token_gap.md"
BUCKETS = ((0.0, 0.1), (0.1, 1.0), (1.0, 3.0), (3.0, math.inf))  # dense NLL, nats
CLASSES = ("copy", "repeat", "new")


def detail_path(model):
    return DETAIL_DIR / f"{model}__fresh.json"


def make_detail(model, eval_binary):
    """Every window's tokens and exact dense NLLs: the fresh protocol's windows, streamed."""
    fresh = sweep.FRESH["fresh"]
    cmd = [str(eval_binary), "--model", str(sweep.MODELS[model]["path"]), "--text",
           str(sweep.FRESH_TEXT.relative_to(sweep.REPO)), "--tokenizer", str(sweep.UNSEEN_TOKENIZER),
           "--cache", "dense", "--opt", "dtype=fp16", "--window", str(fresh["window"]),
           "--windows", str(fresh["windows"]), "--prefill", "0", "--batch", "16", "--json", "--per-token",
           "--token-detail"]
    print("token_gap:", " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=sweep.REPO, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    detail = {"command": " ".join(cmd), "window": fresh["window"], "windows": fresh["windows"],
              "token_ids": result["token_ids"], "token_dense_nll": result["token_dense_nll"]}
    DETAIL_DIR.mkdir(parents=True, exist_ok=True)
    sweep.write_atomically(detail_path(model), json.dumps(detail, separators=(",", ":")) + "\n")


def window_classes(tokens, first):
    """The class of each token of a window (a list of ids) from position `first` on."""
    pairs, seen, out = set(), set(), []
    for p in range(len(tokens) - 1):
        target = tokens[p + 1]
        if p + 1 >= first:
            out.append("copy" if (tokens[p], target) in pairs else "repeat" if target in seen else "new")
        pairs.add((tokens[p], target))
        seen.add(target)
    return out


def classify(detail, prefill):
    """Class and dense NLL of each token the fresh runs score, in their order."""
    window = detail["window"]
    per_window = window - 1  # a streamed window scores every position but the last
    ids, dense = detail["token_ids"], detail["token_dense_nll"]
    out = []
    for w in range(detail["windows"]):
        tokens = [None] + ids[w * per_window:(w + 1) * per_window]  # position 0 is BOS
        kinds = window_classes(tokens, prefill + 1)
        out += [(kind, dense[w * per_window + prefill + i]) for i, kind in enumerate(kinds)]
    return out


def table(lexico, kivi, classes):
    """Rows per token class and dense-NLL bucket: share, both caches' mean ΔNLL, the paired
    difference, and its contribution to the mean gap (the classes' contributions add up to it)."""
    rows = []

    def row(name, keep):
        index = [i for i, c in enumerate(classes) if keep(c)]
        if not index:
            return
        diff = [lexico["tokens"][i] - kivi["tokens"][i] for i in index]
        m = sum(diff) / len(diff)
        se = sweep.standard_error(diff, m) if len(diff) > 1 else float("nan")
        mean = lambda run: sum(run["tokens"][i] for i in index) / len(index)
        rows.append(f"| {name} | {len(index) / len(classes):.1%} | {mean(lexico):+.4f} | {mean(kivi):+.4f} | "
                    f"{m:+.4f} ± {se:.4f} | {sum(diff) / len(classes):+.4f} |")

    for kind in CLASSES:
        row(kind, lambda c, kind=kind: c[0] == kind)
    for low, high in BUCKETS:
        row(f"dense NLL {low:g}–{high:g}", lambda c, low=low, high=high: low <= c[1] < high)
    for kind in ("copy", "repeat"):
        row(f"{kind}, dense NLL < 0.1", lambda c, kind=kind: c[0] == kind and c[1] < 0.1)
    return rows


def class_mean(run, classes, kind):
    index = [i for i, c in enumerate(classes) if c[0] == kind]
    return sum(run["tokens"][i] for i in index) / len(index)


def report(models):
    runs = [r for r in sweep.load_runs(claim=True) if r["protocol"] == "fresh" and r["tokens"]]
    md = ["# Where Lexico's ΔNLL gap to KIVI-2 comes from", "",
          f"Generated by `bench/token_gap.py` from the claim's fresh-text runs (`results/runs/`) and "
          "the windows' tokens and exact dense NLLs (`results/token_detail/`, each file names the "
          "lexico-eval command that made it). Per token class: its share of the scored tokens, each "
          "cache's mean ΔNLL on it, the paired difference (Lexico − KIVI-2, ± its per-token standard "
          "error) and the class's share of the whole gap (sum of differences). *copy*: the pair "
          "(previous token, token) occurs earlier in the window; *repeat*: the token occurs earlier, not "
          "after the same token; *new*: it does not occur earlier.", ""]
    for model in models:
        detail = json.loads(detail_path(model).read_text())
        mine = [r for r in runs if r["model"] == model]
        fresh = sweep.FRESH["fresh"]
        classes = classify(detail, fresh.get("prefill", fresh["window"] // 2))
        kivi = sorted((r for r in mine if r["method"] == "KIVI-2"), key=lambda r: r["kv"])
        lexico = sorted((r for r in mine if r["method"].startswith("Lexico")), key=lambda r: (r["method"], r["kv"]))
        if not kivi or not lexico:
            md += [f"## {model}", "", "*The claim's fresh runs of KIVI-2 or Lexico are missing.*", ""]
            continue
        if any(len(r["tokens"]) != len(classes) for r in kivi + lexico):
            raise SystemExit(f"token_gap: {model}: run files and {detail_path(model).name} score different tokens")
        counts = {k: sum(1 for c in classes if c[0] == k) for k in CLASSES}
        md += [f"## {model}", "",
               f"{len(classes):,} scored tokens: " + ", ".join(f"{k} {n / len(classes):.1%}" for k, n in counts.items())
               + ".", ""]
        # Each Lexico setting against the KIVI-2 run nearest it in mean ΔNLL: at about equal
        # quality overall, which tokens each cache costs.
        pairs = [(l, min(kivi, key=lambda k: abs(k["delta"] - l["delta"]))) for l in lexico]
        md += ["Mean ΔNLL per token class, each Lexico setting beside the KIVI-2 run nearest it in mean ΔNLL:", "",
               "| Lexico | KV % | ΔNLL | KIVI-2 | KV % | ΔNLL | " + " | ".join(f"{k}: Lexico / KIVI-2" for k in CLASSES)
               + " |", "|---|---|---|---|---|---|" + "---|" * len(CLASSES)]
        for l, k in pairs:
            md.append(f"| {l['method']} s={l['options'].get('s', '?')} | {l['kv']:.1f} | {l['delta']:+.4f} | {k['label']} | "
                      f"{k['kv']:.1f} | {k['delta']:+.4f} | " + " | ".join(
                          f"{class_mean(l, classes, c):+.4f} / {class_mean(k, classes, c):+.4f}" for c in CLASSES) + " |")
        md.append("")
        for l, k in pairs:
            md += [f"### {l['method']} {l['label']} ({l['kv']:.1f} % KV, ΔNLL {l['delta']:+.4f}) against KIVI-2 "
                   f"{k['label']} ({k['kv']:.1f} % KV, ΔNLL {k['delta']:+.4f})", "",
                   "| tokens | share | Lexico ΔNLL | KIVI-2 ΔNLL | Lexico − KIVI-2 | contribution to the mean gap |",
                   "|---|---|---|---|---|---|"] + table(l, k, classes) + [""]
    sweep.write_atomically(REPORT, "\n".join(md) + "\n")
    print(f"token_gap: wrote {REPORT.relative_to(sweep.REPO)}", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", default=str(sweep.DEFAULT_EVAL), help="lexico-eval, to make missing detail files")
    parser.add_argument("--models", default="proxy-lm-hd128,proxy-lm-hd64")
    args = parser.parse_args()
    models = args.models.split(",")
    for model in models:
        if model not in sweep.MODELS:
            raise SystemExit(f"token_gap: unknown model '{model}'")
        if not detail_path(model).exists():
            make_detail(model, args.eval)
    report(models)


if __name__ == "__main__":
    main()
