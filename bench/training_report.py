#!/usr/bin/python3
"""Trains dictionaries for the proxy models with lexico-train and writes TRAINING.md.

    bench/training_report.py run STAGE... [--build DIR]   train what a stage needs
    bench/training_report.py report [--build DIR]         TRAINING.md from what exists
    bench/training_report.py published                    TRAINING.md's first section, from the
                                                          sets committed under dictionaries/

Stages, most important first (each run is skipped when its manifest exists, so a
stopped job resumes; TRAINING.md is regenerated after every run):
    main     default method, N=4096, s=8, 1M vectors per dictionary, both proxies
    methods  lexico / mod / ksvd at N in {1024, 4096}, s=8, 262144 vectors (reduced)
    full     lexico / mod / ksvd at N in {1024, 4096}, s=8, 1M vectors
    sparsity ksvd, N=4096, trained at s=4 and s=16 (1M vectors), to compare with s=8 training
Meant to run in the background:
    nohup bench/training_report.py run main methods full > build-train/report.log 2>&1 &
"""

import argparse
import json
import os
import subprocess
import sys
import time

from results_sweep import train_command, write_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
MODELS = ["proxy-lm-hd128", "proxy-lm-hd64"]
METHODS = ["lexico", "mod", "ksvd"]
FULL = 1048576
REDUCED = 262144
EVAL_S = [4, 8, 16]


STAGES = ("main", "methods", "full", "sparsity")


def stage_runs(stage):
    """(model, method or None for the default, atoms, vectors, training sparsity) of a stage."""
    if stage == "main":
        return [(m, None, 4096, FULL, 8) for m in MODELS]
    if stage == "sparsity":
        return [(m, "ksvd", 4096, FULL, s) for m in MODELS for s in (4, 16)]
    vectors = REDUCED if stage == "methods" else FULL
    return [(m, method, n, vectors, 8) for n in (4096, 1024) for m in MODELS for method in METHODS]


def run_dir(build, model, method, atoms, vectors, sparsity):
    return os.path.join(build, "runs", f"{model}-{method or 'default'}-N{atoms}-s{sparsity}-v{vectors}")


def manifest_method(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)["method"]


def is_done(build, model, method, atoms, vectors, sparsity):
    """The run's manifest exists, or the default-method run's when that method is the one asked for."""
    default = run_dir(build, model, None, atoms, vectors, sparsity)
    return os.path.exists(os.path.join(run_dir(build, model, method, atoms, vectors, sparsity), "manifest.json")) or \
        bool(method and os.path.exists(os.path.join(default, "manifest.json")) and manifest_method(default) == method)


def train(build, model, method, atoms, vectors, sparsity, threads):
    out = run_dir(build, model, method, atoms, vectors, sparsity)
    if is_done(build, model, method, atoms, vectors, sparsity):
        print(f"skip {out}: done", flush=True)
        return
    command = [os.path.join(build, "examples", "lexico-train"), "--model", os.path.join(DATA, model),
               "--tokens", os.path.join(DATA, "bpe4k", "tokens_train.u16"),
               "--dev", os.path.join(DATA, "bpe4k", "tokens_dev.u16"),
               "--atoms", str(atoms), "--sparsity", str(sparsity), "--vectors", str(vectors),
               "--work", os.path.join(build, "kv", model), "--out", out]
    if method:
        command += ["--method", method]
    if threads:
        command += ["--threads", str(threads)]
    print("run " + " ".join(command), flush=True)
    begin = time.time()
    subprocess.run(command, check=True)
    write_atomically(os.path.join(out, "wall_seconds.txt"), f"{time.time() - begin:.1f}\n")


def load_runs(build):
    runs = []
    base = os.path.join(build, "runs")
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        path = os.path.join(base, name, "manifest.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            m = json.load(f)
        m["name"] = name
        m["default"] = "-default-" in name
        # Sets trained on keys before RoPE, and their 262k-vector twin, are their own
        # experiment, kept out of the method tables.
        m["rope_pair"] = "-keys-" in name
        wall = os.path.join(base, name, "wall_seconds.txt")
        m["wall"] = float(open(wall).read()) if os.path.exists(wall) else None
        # Process CPU time sampled from /proc by hand, for runs made before lexico-train recorded it.
        sampled = os.path.join(base, name, "cpu_seconds.txt")
        if os.path.exists(sampled) and "train_cpu_seconds" not in m["settings"]:
            m["settings"]["train_cpu_seconds"] = open(sampled).read().strip()
        device = os.path.join(base, name, "device.txt")
        m["device"] = open(device).read().strip() if os.path.exists(device) else None
        runs.append(m)
    return runs


def model_name(m):
    return os.path.basename(m["model"].rstrip("/"))


def mean_error(m, kind, s, split="dev"):
    values = [e[split] for e in m["errors"] if e["kind"] == kind and e["sparsity"] == s]
    return sum(values) / len(values) if values else float("nan")


def minutes(seconds):
    return f"{float(seconds) / 60:.1f} min"


def max_coherence(m):
    return max(float(v) for k, v in m["settings"].items() if k.endswith(".max_coherence"))


def per_layer_table(m):
    lines = ["| layer | K/V | " + " | ".join(f"s={s} train | s={s} dev" for s in EVAL_S) + " | max \\|cos\\| |",
             "|---|---|" + "---|---|" * len(EVAL_S) + "---|"]
    for layer in range(m["layers"]):
        for kind in "KV":
            cells = []
            for s in EVAL_S:
                e = [x for x in m["errors"] if x["layer"] == layer and x["kind"] == kind and x["sparsity"] == s]
                cells += [f"{e[0]['train']:.4f}", f"{e[0]['dev']:.4f}"] if e else ["–", "–"]
            coh = float(m["settings"].get(f"layer{layer}.{kind}.max_coherence", "nan"))
            lines.append(f"| {layer} | {kind} | " + " | ".join(cells) + f" | {coh:.3f} |")
    lines.append("| mean | K | " + " | ".join(f"{mean_error(m, 'K', s, 'train'):.4f} | {mean_error(m, 'K', s):.4f}"
                                            for s in EVAL_S) + " | |")
    lines.append("| mean | V | " + " | ".join(f"{mean_error(m, 'V', s, 'train'):.4f} | {mean_error(m, 'V', s):.4f}"
                                            for s in EVAL_S) + " | |")
    return lines


def cpu(m, key):
    value = m["settings"].get(key)
    return f" ({minutes(value)} CPU)" if value else ""


def run_summary(m):
    st = m["settings"]
    where = f" Ran on the {m['device']}." if m["device"] else " Ran on the 2-core machine."
    return (f"{model_name(m)}, method **{m['method']}**, N={m['atoms']}, trained at s={m['sparsity']} on "
            f"{int(st['vectors']):,} vectors per dictionary (batch {st['batch']}, init {st['init']}"
            + (f", lr {st['learning_rate']}" if "learning_rate" in st else "") + f", {st['threads']} threads). "
            f"Collection {minutes(st['collect_seconds'])}{cpu(m, 'collect_cpu_seconds')} (0 when reused), "
            f"training {minutes(st['train_seconds'])}{cpu(m, 'train_cpu_seconds')} wall.{where} "
            f"Largest |off-diagonal Gram entry| over its {2 * m['layers']} dictionaries: {max_coherence(m):.3f}.")


def comparison(runs, vectors):
    # A default run stands for its method unless that method also ran by name.
    sized = [r for r in runs if int(r["settings"]["vectors"]) == vectors and r["sparsity"] == 8
             and not r["rope_pair"]]
    named = {(model_name(r), r["atoms"], r["method"]) for r in sized if not r["default"]}
    rows = [r for r in sized if not r["default"] or (model_name(r), r["atoms"], r["method"]) not in named]
    if not rows:
        return []
    label = "1M" if vectors == FULL else f"{vectors:,} (reduced)"
    lines = [f"### Methods at {label} vectors per dictionary, s=8 training",
             "",
             "Mean over the 8 layers of the dev relative error (FP8 coefficients); training time is for all 16 "
             "dictionaries of the model.",
             "",
             "| model | N | method | K s=4 | K s=8 | K s=16 | V s=4 | V s=8 | V s=16 | train K s=8 | train V s=8 "
             "| training time | where | max \\|cos\\| |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows.sort(key=lambda r: (model_name(r), -r["atoms"], METHODS.index(r["method"])))
    for r in rows:
        lines.append(f"| {model_name(r)} | {r['atoms']} | {r['method']} | "
                     + " | ".join(f"{mean_error(r, k, s):.4f}" for k in "KV" for s in EVAL_S)
                     + f" | {mean_error(r, 'K', 8, 'train'):.4f} | {mean_error(r, 'V', 8, 'train'):.4f}"
                     + f" | {minutes(r['settings']['train_seconds'])}{cpu(r, 'train_cpu_seconds')}"
                     + f" | {'device (16 cores)' if r['device'] else '2-core machine'} | {max_coherence(r):.3f} |")
    lines += ["", "Winner per model and N (mean of K and V dev error at s=8; how much higher the others' "
              "error is):", ""]
    groups = {}
    for r in rows:
        groups.setdefault((model_name(r), r["atoms"]), []).append(r)
    for (model, atoms), group in sorted(groups.items()):
        if len(group) < 2:
            continue
        scored = sorted(group, key=lambda r: (mean_error(r, "K", 8) + mean_error(r, "V", 8)) / 2)
        best = (mean_error(scored[0], "K", 8) + mean_error(scored[0], "V", 8)) / 2
        others = ", ".join(
            f"{r['method']} {((mean_error(r, 'K', 8) + mean_error(r, 'V', 8)) / 2 - best) / best * 100:+.1f} %"
            for r in scored[1:])
        lines.append(f"- {model}, N={atoms}: **{scored[0]['method']}** ({best:.4f}); {others}")
    return lines + [""]


def verdict(runs):
    """Per (model, N, vectors) group with all three methods: the winner and every method's
    error relative to the group's best, at s=8 (mean of K and V)."""
    groups = {}
    for r in runs:
        if r["sparsity"] != 8 or r["rope_pair"]:
            continue
        groups.setdefault((model_name(r), r["atoms"], int(r["settings"]["vectors"])), {})[r["method"]] = \
            (mean_error(r, "K", 8) + mean_error(r, "V", 8)) / 2
    complete = {k: v for k, v in groups.items() if len(v) == len(METHODS)}
    if not complete:
        return []
    wins = {m: 0 for m in METHODS}
    gaps = {m: [] for m in METHODS}
    for scores in complete.values():
        best = min(scores.values())
        wins[min(scores, key=scores.get)] += 1
        for m, v in scores.items():
            gaps[m].append((v - best) / best * 100)
    lines = ["## Verdict", "", f"Over the {len(complete)} (model, N, vector count) settings where all three methods "
             "ran, dev error at s=8 (mean of K and V), relative to the best method of each setting:", ""]
    for m in sorted(METHODS, key=lambda m: sum(gaps[m]) / len(gaps[m])):
        lines.append(f"- {m}: best in {wins[m]} of {len(complete)}, on average {sum(gaps[m]) / len(gaps[m]):+.1f} % "
                     f"(worst {max(gaps[m]):+.1f} %)")
    return lines + ["", "`lexico-train` uses **ksvd** unless `--method` says otherwise.", ""]


def sparsity_comparison(runs):
    """Does training at the sparsity used at inference pay? ksvd, N=4096, 1M vectors, trained at each s."""
    rows = [r for r in runs if r["method"] == "ksvd" and r["atoms"] == 4096
            and int(r["settings"]["vectors"]) == FULL]
    if not any(r["sparsity"] != 8 for r in rows):
        return []
    lines = ["## Training sparsity", "",
             "K-SVD, N=4096, 1M vectors per dictionary, trained at s=4, 8 or 16 and evaluated at every s "
             "(mean dev error over the 8 layers, FP8 coefficients). The diagonal (trained = evaluated) is what "
             "a cache at that s would use.", "",
             "| model | trained at s | K s=4 | K s=8 | K s=16 | V s=4 | V s=8 | V s=16 | training time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (model_name(r), r["sparsity"], r["default"])):
        lines.append(f"| {model_name(r)} | {r['sparsity']} | "
                     + " | ".join(f"{mean_error(r, k, s):.4f}" for k in "KV" for s in EVAL_S)
                     + f" | {minutes(r['settings']['train_seconds'])}{cpu(r, 'train_cpu_seconds')} |")
    return lines + [""]


def rope_comparison(runs):
    """Each set trained on keys before RoPE against the set trained like it (model, method, N,
    s, vectors) on keys after RoPE."""
    def twin_key(r):
        return (model_name(r), r["method"], r["atoms"], r["sparsity"], r["settings"].get("vectors"))
    after = {twin_key(r): r for r in runs if r["settings"].get("keys", "after_rope") == "after_rope"}
    pairs = [(after[twin_key(r)], r) for r in runs
             if r["settings"].get("keys") == "before_rope" and twin_key(r) in after]
    if not pairs:
        return []
    lines = ["## Keys before RoPE", "",
             "Key dictionaries trained and evaluated on keys before RoPE against the same training on keys after "
             "RoPE, same windows. Dev relative error per layer; the values are the same vectors in both runs. The "
             "Lexico cache codes keys before RoPE when its dictionaries were trained so (RESULTS.md).", ""]
    for twin, before in sorted(pairs, key=lambda p: (model_name(p[1]), int(p[1]["settings"]["vectors"]))):
        lines += [f"### {model_name(before)}, {before['method']}, N={before['atoms']}, s={before['sparsity']}, "
                  f"{int(before['settings']['vectors']):,} vectors ({before['name']} vs {twin['name']})", "",
                  "| layer | " + " | ".join(f"K s={s} after RoPE | K s={s} before RoPE" for s in EVAL_S) + " |",
                  "|---|" + "---|---|" * len(EVAL_S)]
        for layer in range(before["layers"]):
            cells = []
            for s in EVAL_S:
                for r in (twin, before):
                    cells += [f"{e['dev']:.4f}" for e in r["errors"]
                              if e["layer"] == layer and e["kind"] == "K" and e["sparsity"] == s]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines += ["| mean | " + " | ".join(f"{mean_error(r, 'K', s):.4f}" for s in EVAL_S for r in (twin, before))
                  + " |", ""]
    return lines


def report(build):
    runs = load_runs(build)
    out = ["# Dictionary training: measured quality and time", "",
           "Generated by `bench/training_report.py report` from the manifests under "
           f"`{os.path.relpath(build, ROOT)}/runs/` (each written by `lexico-train`). Relative error is "
           "‖x − x̂‖/‖x‖ averaged over vectors, with x̂ decoded from FP8 E4M3 coefficients (per-vector "
           "power-of-two scale), OMP at the given s. **dev** = 32,768 vectors per dictionary from "
           "`tokens_dev.u16`; **train** = the first 32,768 training vectors. Keys after RoPE, all KV heads pooled, "
           "windows of 1024 tokens opened by BOS. Machine: 2 cores shared with other jobs, so times are upper "
           "bounds.", ""]
    notes = os.path.join(ROOT, "bench", "training_notes.md")  # what the manifests cannot say
    if os.path.exists(notes):
        out += ["## Notes on these runs", "", open(notes).read().strip(), ""]
    main = [r for r in runs if r["default"]]
    out += ["## Default method, N=4096, s=8, 1M vectors per dictionary", ""]
    if not main:
        out += ["Not run yet.", ""]
    for m in sorted(main, key=model_name):
        out += [f"### {model_name(m)}", "", run_summary(m), ""] + per_layer_table(m) + [""]
    out += verdict(runs)
    out += ["## Method comparison", ""]
    compared = comparison(runs, FULL) + comparison(runs, REDUCED)
    out += compared if compared else ["Not run yet.", ""]
    out += sparsity_comparison(runs)
    out += rope_comparison(runs)
    out += ["## Every run", ""]
    for m in runs:
        out += [f"<details><summary>{m['name']}</summary>", "", run_summary(m), ""] + per_layer_table(m) + \
               ["", "</details>", ""]
    missing = [os.path.basename(run_dir(build, *r)) for stage in STAGES
               for r in stage_runs(stage) if not is_done(build, *r)]
    out += ["## Not run", ""] + ([f"- {name}" for name in missing] if missing else ["Everything ran."]) + [""]
    write_atomically(os.path.join(ROOT, "TRAINING.md"), "\n".join(out))
    print(f"wrote {os.path.join(ROOT, 'TRAINING.md')} from {len(runs)} runs", flush=True)


PUBLISHED_BEGIN, PUBLISHED_END = "<!-- published: begin -->", "<!-- published: end -->"


def published_section():
    """Markdown of the dictionary sets committed under dictionaries/: what made each one,
    its bytes and hashes, and its mean dev error, from its manifest alone."""
    lines = [PUBLISHED_BEGIN, "## Published dictionary sets (`dictionaries/`)", "",
             "Written by `bench/training_report.py published` from the manifests committed under `dictionaries/`. "
             "These are the sets `results/claim.json` names; `lexico-eval`, `results_sweep.py` and "
             "`examples/demo.sh` read them by these repository-relative paths, so nothing is trained to reproduce "
             "the claim. Atoms are stored as fp16 (`--atom-type f16`): bit for bit the atoms the cache codes "
             "with, which rounds fp32 atoms to fp16 itself, so results equal those of the fp32 files. Each set was "
             "trained into a folder outside the repository by the command shown (with that folder as `--out`) "
             "and copied here without its `vectors/` folder (the collected KV vectors, gigabytes).", ""]
    root = os.path.join(ROOT, "dictionaries")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            m = json.load(f)
        st = m["settings"]
        files = sorted(x for x in os.listdir(folder) if x.endswith(".dict"))
        size = sum(os.path.getsize(os.path.join(folder, x)) for x in files)
        errors = [e for e in m["errors"] if e["sparsity"] == m["sparsity"]]

        def mean(kind):
            values = [e["dev"] for e in errors if e["kind"] == kind]
            return sum(values) / len(values) if values else float("nan")
        lines += [f"### `dictionaries/{name}`", "",
                  f"{m['layers']} layers x (K, V), d = {m['head_dim']}, N = {m['atoms']}, method {m['method']}, "
                  f"trained at s = {m['sparsity']} on {int(st['vectors']):,} vectors per dictionary, keys "
                  f"{st.get('keys', 'after_rope').replace('_', ' ')}; {len(files)} files, {size:,} bytes "
                  f"({st.get('atom_type', 'f32')} atoms). Corpus FNV-1a 64 `{st.get('corpus_fnv1a64', 'not recorded')}`, "
                  f"lexico {st.get('lexico_version', 'not recorded')}. Mean relative dev error at s = {m['sparsity']}: "
                  f"K {mean('K'):.4f}, V {mean('V'):.4f} ({st.get('dev', '')}).", "",
                  "```", train_command(m, folder), "```", ""]
        metrics = [name for name in ("key", "value") if name + "_metric" in st]
        if metrics:
            lines += [f"Coded in a {' and a '.join(metrics)} metric (`--{'-metric`, `--'.join(metrics)}-metric`; "
                      "key_metric.hpp, value_metric.hpp): its dev errors are measured in that metric, so they do "
                      "not compare with a plain set's.", ""]
        if "resumed_dictionaries" in st:
            lines += [f"The run was resumed after {st['resumed_dictionaries']} of {2 * m['layers']} dictionaries "
                      "(lexico-train keeps finished dictionaries and continues with the same arguments), so its "
                      "recorded times cover the rest only.", ""]
    return lines + [PUBLISHED_END]


def write_published():
    path = os.path.join(ROOT, "TRAINING.md")
    with open(path) as f:
        text = f.read()
    section = "\n".join(published_section())
    if PUBLISHED_BEGIN in text:
        before, rest = text.split(PUBLISHED_BEGIN, 1)
        text = before + section + rest.split(PUBLISHED_END, 1)[1]
    else:  # after the title line
        title, rest = text.split("\n", 1)
        text = title + "\n\n" + section + "\n" + rest
    write_atomically(path, text)
    print(f"training_report: {path}: published sets section written")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report", "published"])
    parser.add_argument("stages", nargs="*", help=", ".join(STAGES) + " (run only)")
    parser.add_argument("--build", default=os.path.join(ROOT, "build-train"))
    parser.add_argument("--threads", type=int, default=0, help="lexico-train --threads (0: its default)")
    args = parser.parse_args()
    build = os.path.abspath(args.build)
    if args.command == "published":
        write_published()
        return
    if args.command == "run":
        if not args.stages or any(s not in STAGES for s in args.stages):
            parser.error("run needs stages among " + ", ".join(STAGES))
        for stage in args.stages:
            for run in stage_runs(stage):
                train(build, *run, args.threads)
                report(build)
                write_published()
    report(build)
    write_published()


if __name__ == "__main__":
    sys.exit(main())
