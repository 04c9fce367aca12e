#!/usr/bin/env python3
"""Per-layer key and value atom budgets of a Lexico cache, by measured sensitivity (issue 18, item 3),
and other sets at equal bytes (dictionaries coded in a key or value metric, items 1 and 2).

  layer_budget.py sensitivity --layer-s 4:3:3:4:3:4:4:7 --out results/layer_budget/sensitivity.jsonl
      runs the base cache and, for every layer l, the base with one more key atom in l
      (layer_sk) and with one more value atom in l (layer_sv), all in one lexico-eval process
      on the tuning windows (dev windows 65-72 of tokens_dev.u16), with --per-token;
  layer_budget.py try --layer-s ... --candidate NAME=OPTIONS ... --out FILE.jsonl
      runs the base and each candidate (cache options set over the base's, e.g.
      layer_sk=4:3:3:3:3:4:4:8, or dict=DIR for another dictionary set), then each
      --baseline NAME=SPEC (a whole cache spec of any kind, e.g. kivi:bits=4,group=32,residual=128);
      --skip 72 runs them on dev windows 73-80 instead, which no choice was made on;
  layer_budget.py report FILE.jsonl ... > results/layer_budget.md
      tables every cache of each file against the file's first one (the base): KV size, KL,
      its change, and the paired ΔNLL change (mean ± standard error of the per-token
      differences, same tokens in both runs).

  layer_budget.py fronts FILE.jsonl ...
      reads the candidates labelled "s N <family>" of `try` files as one front per family
      against the file's KIVI-2 baselines, by the claim's arithmetic (bench/claim_page.py);
--dry-run prints the lexico-eval command instead of running it.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import claim_page
import results_sweep

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def base_spec(args):
    return (f"lexico:dict={args.dict},s={args.s},layer_s={args.layer_s},buffer=32,recent=128,"
            f"recent_format=q8_0/q4_0")


def run(args, caches):
    """One lexico-eval process over the tuning windows; each cache spec a (label, spec) pair."""
    command = [args.eval, "--model", args.model, "--tokens", args.tokens, "--window", "1024", "--windows", "8",
               "--skip", str(args.skip), "--prefill", "512", "--json", "--per-token"]
    for _, spec in caches:
        command += ["--cache", spec]
    if args.dry_run:
        print(shlex.join(command))
        return
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        sys.exit(f"layer_budget: lexico-eval failed ({result.returncode}): {result.stderr[-2000:]}")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    if len(rows) != len(caches) or any(r["cache"] != spec.partition(":")[0] for (_, spec), r in zip(caches, rows)):
        sys.exit(f"layer_budget: lexico-eval gave {[r['cache'] for r in rows]} for the caches {[s for _, s in caches]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for (label, spec), r in zip(caches, rows):
            f.write(json.dumps({"label": label, "spec": spec, "skip": args.skip, "command": shlex.join(command), **r}) + "\n")
    print(f"layer_budget: {len(caches)} caches -> {out}")


def sensitivity(args):
    base = [int(x) for x in args.layer_s.split(":")]
    caches = [("base", base_spec(args))]
    for part in ("sk", "sv"):
        for layer in range(len(base)):
            bumped = list(base)
            bumped[layer] += 1
            caches.append((f"{'K' if part == 'sk' else 'V'}{layer} +1",
                           base_spec(args) + f",layer_{part}=" + ":".join(map(str, bumped))))
    run(args, caches)


def with_options(spec, options):
    """The cache spec with OPTIONS (a,b=c,...) set: a key the spec has takes the new value,
    so a candidate may name another dict= as well as add options."""
    kind, _, rest = spec.partition(":")
    merged = dict(item.split("=", 1) for item in rest.split(","))
    for item in options.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            sys.exit(f"layer_budget: candidate option '{item}' is not KEY=VALUE")
        merged[key] = value
    return kind + ":" + ",".join(f"{k}={v}" for k, v in merged.items())


def try_candidates(args):
    caches = [("base", base_spec(args))]
    for candidate in args.candidate:
        name, _, options = candidate.partition("=")
        if not options:
            sys.exit(f"layer_budget: --candidate '{candidate}' is not NAME=OPTIONS")
        caches.append((f"{name}: {options}", with_options(base_spec(args), options)))
    for baseline in args.baseline:
        name, _, spec = baseline.partition("=")
        if not spec:
            sys.exit(f"layer_budget: --baseline '{baseline}' is not NAME=SPEC")
        caches.append((name, spec))
    run(args, caches)


def report(args):
    print("# Per-layer key and value budgets, coding metrics and residuals (tuning and held-out dev windows)\n")
    print("Made by `bench/layer_budget.py report " + " ".join(args.files) + "` from the run files of "
          "`bench/layer_budget.py sensitivity` and `try`; each table sets every cache against the first one "
          "of its file (the base), on the same 8 windows of the dev tokens (1,024 tokens, prefill 512, "
          "4,088 scored tokens; which windows and which proxy, each file says). Paired ΔNLL is the mean per-token NLL change "
          "against the base ± its standard error.\n")
    sets = REPO / "results" / "layer_budget" / "metric_sets.json"
    made_by = json.loads(sets.read_text())["sets"] if sets.exists() else {}
    for path in args.files:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        base = rows[0]
        print(f"## {Path(path).name}\n")
        skip = base.get("skip", 64)
        print(f"{Path(base['model']).name}, dev windows {skip + 1}-{skip + 8}{' (the tuning windows)' if skip == 64 else ''}. "
              f"Base: `{base['spec']}` ({base['parameters']}).\n")
        print(f"Command: `OMP_NUM_THREADS=1 {base['command']}`\n")
        print("| cache | KV % | KV % (decode mean) | payload bytes vs base | KL | KL vs base | ΔNLL | paired ΔNLL vs base |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            # the per-token mean and standard error of results_sweep's paired difference
            difference = results_sweep.paired({"tokens": r["token_delta_nll"], "windows": 8},
                                              {"tokens": base["token_delta_nll"]})
            if difference is None:
                sys.exit(f"layer_budget: {path}: '{r['label']}' and the base scored different tokens")
            mean, se = difference[:2]
            change = (r["mean_kl"] / base["mean_kl"] - 1) * 100
            mean_kv = r.get("kv_size_fraction_decode_mean")
            print(f"| {r['label']} | {100 * r['kv_size_fraction']:.2f} | "
                  f"{'—' if mean_kv is None else f'{100 * mean_kv:.2f}'} | {r['bytes_payload'] - base['bytes_payload']:+d} | "
                  f"{r['mean_kl']:.5f} | {change:+.1f} % | {r['delta_nll']:+.4f} | {mean:+.5f} ± {se:.5f} |")
        print()
        # Sets outside the repository: the command that made each (results/layer_budget/metric_sets.json).
        named = sorted({p for r in rows for p in made_by if f"dict={p}," in r["spec"]})
        for path in named:
            print(f"- `{path}`: `{made_by[path]}`")
        if named:
            print()


def fronts(args):
    """Each family of `try` files of one proxy (candidates labelled "s N <family>") read as a front against the
    file's KIVI-2 baselines by the claim's arithmetic (bench/claim_page.py), at the windows' end
    and at decode-mean KV sizes: the ratio at KIVI-2's best point and its range over KIVI-2's front.
    A family's points may come from several files (runs of one binary on the same windows)."""
    rows = [json.loads(line) for path in args.files for line in Path(path).read_text().splitlines() if line.strip()]
    if len({(r["model"], r.get("skip", 64)) for r in rows}) != 1:
        sys.exit(f"layer_budget: {' '.join(args.files)} mix proxies or windows")
    def point(r):
        return {"kv": 100 * r["kv_size_fraction"], "kv_mean": 100 * r["kv_size_fraction_decode_mean"],
                "kl": r["mean_kl"], "delta": r["delta_nll"], "label": r["label"]}
    kivi = [point(r) for r in rows if r["label"].startswith("KIVI-2")]
    families = {}
    for r in rows:
        words = r["label"].split(":")[0].split(" ")  # a candidate's label is "NAME: its options"
        if words[0] == "s" and len(words) > 2:
            families.setdefault(" ".join(words[2:]), []).append(point(r))
    if not kivi or not families:
        sys.exit(f"layer_budget: {' '.join(args.files)} hold no KIVI-2 baseline or no 's N <family>' candidates")
    print(f"{Path(rows[0]['model']).name}, dev windows {rows[0].get('skip', 64) + 1}-{rows[0].get('skip', 64) + 8}: "
          f"each family's front against KIVI-2's ({len(kivi)} points; best point = its lowest KL).\n")
    print("| family | points | by KL at KIVI-2's best point (end / decode mean) | by ΔNLL there (end / decode mean) | "
          "by KL over KIVI-2's front (end / decode mean) |")
    print("|---|---:|---|---|---|")
    for family, points in families.items():
        cells = []
        for sizes in (lambda rs: rs, claim_page.at_decode_mean):
            baseline = claim_page.front_points(sizes(kivi))
            found = claim_page.ratios(baseline, sizes(points))
            best = min(range(len(baseline)), key=lambda k: baseline[k]["kl"])
            cells.append((claim_page.span([found[best][0]]), claim_page.span([found[best][1]]),
                          claim_page.span(f for f, _ in found)))
        print(f"| {family} | {len(points)} | " + " | ".join(f"{end} / {mean}" for end, mean in zip(*cells)) + " |")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("sensitivity", "try"):
        p = sub.add_parser(name)
        p.add_argument("--eval", default=str(REPO / "build" / "examples" / "lexico-eval"))
        p.add_argument("--model", default=str(SHARED / "proxy-lm-hd128"))
        p.add_argument("--tokens", default=str(SHARED / "bpe4k" / "tokens_dev.u16"))
        p.add_argument("--dict", default="dictionaries/proxy-lm-hd128")
        p.add_argument("--s", type=int, default=4, help="s of the base (its KV size with layer_s)")
        p.add_argument("--layer-s", required=True, help="the base's atoms per layer, s0:s1:...")
        p.add_argument("--skip", type=int, default=64,
                       help="dev windows skipped (64: the tuning windows 65-72; 72: windows 73-80, held out)")
        p.add_argument("--out", required=True)
        p.add_argument("--dry-run", action="store_true")
        if name == "try":
            p.add_argument("--candidate", action="append", default=[], metavar="NAME=OPTIONS")
            p.add_argument("--baseline", action="append", default=[], metavar="NAME=SPEC")
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("fronts")
    p.add_argument("files", nargs="+")
    args = parser.parse_args()
    {"sensitivity": sensitivity, "try": try_candidates, "report": report, "fronts": fronts}[args.command](args)


if __name__ == "__main__":
    main()
