"""The claim's page, the top of RESULTS.md: on the fresh text, each method's Pareto front
of KV size against KL and against ΔNLL, the ratio between Lexico's front and each
baseline's, the methods' speeds and the Lexico cache's shared per-model bytes.

results/claim.json holds the rule (fixed before the first fresh-text run); this module
only applies it to the runs it is given (results_sweep.load_runs(claim=True)). Figures are
SVG drawn by matplotlib with a fixed hash salt and no date, so that the same runs give
the same bytes.
"""

import math
from pathlib import Path

METRICS = (("kl", "KL", "mean KL(dense ‖ cache), nats"), ("delta", "ΔNLL", "ΔNLL, nats/token"))
BASELINE_ORDER = ("KIVI-2", "KIVI-4", "q4_0", "q8_0", "FP8", "TOVA")
COLORS = {"Lexico": "#d62728", "Lexico unshrink": "#e377c2", "KIVI-2": "#1f77b4", "KIVI-4": "#17becf", "q4_0": "#2ca02c", "q8_0": "#98df8a",
          "FP8": "#9467bd", "TOVA": "#8c564b"}


def front(rows, metric):
    """The rows no other row beats on both KV size and `metric`, by KV size: along it the
    quality improves as the size grows."""
    rows = [r for r in rows if r.get(metric) is not None]
    kept = [a for a in rows if not any(b is not a and b["kv"] <= a["kv"] and b[metric] <= a[metric]
                                       and (b["kv"] < a["kv"] or b[metric] < a[metric]) for b in rows)]
    return sorted(kept, key=lambda r: (r["kv"], r[metric]))


def size_at(points, metric, quality):
    """(KV size at which the front `points` reaches `quality`, the front point just at or
    above it), interpolated linearly in log size between neighbours; ("below", first) when
    the front's smallest point is already better (the size is at most that point's), and
    (None, None) when no point is good enough."""
    if not points or points[-1][metric] > quality:
        return None, None
    if points[0][metric] <= quality:
        return "below", points[0]
    for worse, better in zip(points, points[1:]):
        if worse[metric] > quality >= better[metric]:
            t = (worse[metric] - quality) / (worse[metric] - better[metric])
            return math.exp(math.log(worse["kv"]) + t * (math.log(better["kv"]) - math.log(worse["kv"]))), better
    return None, None


def ratio(point, lexico_front, metric):
    """(point's KV size over the size at which Lexico's front reaches its quality, that
    size, whether the ratio is only a lower bound, the Lexico point reached), or None."""
    size, reached = size_at(lexico_front, metric, point[metric])
    if size is None:
        return None
    bound = size == "below"
    size = reached["kv"] if bound else size
    return point["kv"] / size, size, bound, reached


def ratio_text(found, point, paired=None):
    """The ratio as text, and with `paired` the paired ΔNLL of the Lexico point reached."""
    if found is None:
        return "not reached", "—"
    value, size, bound, reached = found
    text = f"≥ {value:.2f}× (≤ {size:.1f} %)" if bound else f"{value:.2f}× ({size:.1f} %)"
    if paired is None:
        return text, "—"
    p = paired(reached, point)
    noise = "—" if p is None else f"{p[0]:+.4f} ± {max(x for x in p[1:] if x is not None):.4f}"
    return text, noise


def span(values):
    """"a–b×" over the ratios found (a bound marked ≥), or "—"."""
    found = [v for v in values if v is not None]
    if not found:
        return "—"
    low, high = min(found, key=lambda v: v[0]), max(found, key=lambda v: v[0])
    mark = lambda v: ("≥ " if v[2] else "") + f"{v[0]:.2f}"
    return f"{mark(low)}×" if low is high else f"{mark(low)}–{mark(high)}×"


def pyplot():
    """matplotlib's pyplot, set up to write the same SVG bytes for the same data."""
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "lexico"
    import matplotlib.pyplot as plt
    return plt


def matplotlib_ticker():
    import matplotlib.ticker
    return matplotlib.ticker


def save(fig, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None})
    pyplot().close(fig)


def draw(path, title, rows_by_method):
    """Two panels, KV % against KL and against ΔNLL: every run faint, each front a line."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, name, axis) in zip(axes, METRICS):
        for method, rows in rows_by_method.items():
            color = COLORS.get(method, "#7f7f7f")
            ax.scatter([r["kv"] for r in rows], [r[metric] for r in rows], s=10, color=color, alpha=0.35)
            points = front(rows, metric)
            ax.plot([r["kv"] for r in points], [r[metric] for r in points], marker="o", ms=4, color=color,
                    label=method, linewidth=2 if method == "Lexico" else 1.2)
        ax.set_xscale("log")
        plain = matplotlib_ticker().FuncFormatter(lambda x, _: f"{x:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("KV size, % of fp16 K and V")
        ax.set_ylabel(axis)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{title}: {name}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def at_decode_mean(rows):
    """The rows with each one's KV size averaged over its decode steps in place of the size at
    the window's end: a check on the ratios that does not depend on where in their flush cycles
    the caches stand when the window ends."""
    return [{**r, "kv": r["kv_mean"]} for r in rows]


def front_points(rows):
    """The rows on the front by KL or by ΔNLL (each once), the points a baseline is read at."""
    points = []
    for metric, _, _ in METRICS:
        points += [p for p in front(rows, metric) if all(p is not q for q in points)]
    return points


def ratios(points, lexico_rows):
    """Per baseline point, (by KL, by ΔNLL) against the front of `lexico_rows`."""
    fronts = {m: front(lexico_rows, m) for m, _, _ in METRICS}
    return [(ratio(p, fronts["kl"], "kl"), ratio(p, fronts["delta"], "delta")) for p in points]


def summary_row(baseline, front_name, found, found_mean):
    """One baseline front read against one Lexico front: (by KL, by ΔNLL) ratio per point, at
    the windows' end and (found_mean) over the decode steps."""
    missed = sum(1 for pair in found for f in pair if f is None)
    return (f"| {baseline} | {front_name} | {len(found)} | {span(f for f, _ in found)} | {span(f for _, f in found)} | "
            f"{missed} | {span(f for f, _ in found_mean)} | {span(f for _, f in found_mean)} |")


def machine_name(run):
    """The machine a run was made on, as the page names it (runs before 2026-12-07 did not record it)."""
    m = run.get("machine")
    return f"{m['cpu'] or 'unnamed CPU'}, {m['logical_cpus']} logical CPUs" if m else "a 2-core machine, not recorded"


def machines_text(rows):
    where = sorted({machine_name(r) for r in rows})
    text = "Made on " + "; ".join(where) + ", one thread per lexico-eval process."
    if len(where) > 1:
        text += " Speed ratios compare runs of one machine only (— where that machine ran no dense fp16 cache)."
    if any(not r["tps"] for r in rows):
        text += (" A speed of — also marks runs whose timing is not valid (their process was stopped, or starved "
                 "by other work, during the call; the run file's timing_invalid says why), and every ratio to such a "
                 "dense run.")
    return text


def variant_rows(claim, name, by_method):
    """A variant's runs, with the claim's own where its rule adds its caches to the claim's front."""
    rows = by_method.get(name, [])
    adds = claim.get("variants", {}).get(name, {}).get("adds_to_claim_front", False)
    return rows + by_method.get("Lexico", []) if adds else rows


def best_of_fronts(points, readings, paired):
    """Markdown lines: KIVI-2's best point (its lowest KL) read against the claim's front and
    every variant's (`readings`: front -> ratios(points, its rows)), with the paired ΔNLL of
    the Lexico setting that reaches its ΔNLL; and each front's cell for the page's glance."""
    i = min(range(len(points)), key=lambda k: points[k]["kl"])
    best = points[i]
    lines = [f"KIVI-2's best point ({best['label']}, {best['kv']:.1f} % KV, KL {best['kl']:.5f}, ΔNLL "
             f"{best['delta']:+.4f}) against each Lexico front:", "",
             "| front | Lexico's size at its KL (ratio) | Lexico's size at its ΔNLL (ratio) | paired ΔNLL, Lexico − KIVI-2 |",
             "|---|---|---|---|"]
    cells = {}
    for name, found in readings.items():
        by_kl, by_delta = found[i]
        delta_text, noise = ratio_text(by_delta, best, paired)
        lines.append(f"| {name} | {ratio_text(by_kl, best)[0]} | {delta_text} | {noise} |")
        cells[name] = f"{span([by_kl])} / {span([by_delta])}"
    return lines, cells


def glance(claim, columns):
    """Markdown lines: one row per Lexico front, one column per (proxy, protocol), each cell the
    ratio at KIVI-2's best point by KL / by ΔNLL (`columns`: (proxy, protocol) -> {front: cell}),
    "no setting" where the front's rule names no cache for the proxy, "not run" where it does."""
    variants = claim.get("variants", {})
    lines = ["Lexico's fronts against KIVI-2's best point (its lowest-KL setting) on the fresh text: how many "
             "times smaller Lexico is at equal KL / at equal ΔNLL (— not reached; details, paired errors and "
             "every other baseline in each section below):", "",
             "| front | " + " | ".join(f"{model}, {protocol}" for model, protocol in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in ["Lexico"] + list(variants):
        def cell(model, cells):
            if name in cells:
                return cells[name]
            return "no setting" if name in variants and model not in variants[name]["proxies"] else "not run"
        lines.append(f"| {name} | " + " | ".join(cell(model, cells) for (model, _), cells in columns.items()) + " |")
    return lines


def section(runs, claim, plots_dir, paired, relative, expected):
    """Markdown lines of the claim's page from the fresh-text runs; writes its figures."""
    md = ["## The claim, on one page", "",
          f"Rule, fixed {claim['fixed']} (`results/claim.json`):", ""]
    md += [f"{i}. {text}" for i, text in enumerate(claim["rule"], 1)]
    if claim.get("rule_8k"):
        md += ["", f"8k: {claim['rule_8k']}"]
    for name, variant in claim.get("variants", {}).items():
        md += ["", f"Variant **{name}**, fixed {variant['fixed']}: {variant['rule']} Why: {variant['why']}"]
    md += ["", f"Why this setting: {claim['why']}", "",
           f"Fresh text: {claim['fresh_text']}; nothing here was trained, tuned or evaluated on it before the "
           "rule was fixed. Runs decode 16 windows in step per process (`lexico-eval --batch 16`), so their "
           "tokens/s are a batch's throughput on one thread of the machine each table names, given as a ratio to "
           "the dense fp16 cache of the same sweep; the sweeps ran niced beside other jobs (builds, other "
           "lexico-eval processes), so these ratios are indicative only: controlled single-sequence ratios are in BENCHMARKS.md. KV % is "
           "measured at each window's end (the fronts use it) and averaged over decode steps. Which tokens "
           "make Lexico's ΔNLL (copies of an earlier pair of the window, mostly): `results/token_gap.md`, "
           "written by `bench/token_gap.py`.", ""]
    groups, columns = {}, {}
    for r in runs:
        groups.setdefault((r["model"], r["protocol"], r["windows"]), []).append(r)
    if not groups:
        md += ["*No fresh-text run has finished yet.*", ""]
    for (model, protocol, windows), rows in sorted(groups.items()):
        by_method = {}
        for r in rows:
            if not r["method"].startswith("dense"):
                by_method.setdefault(r["method"], []).append(r)
        dense_on = {machine_name(r): r for r in rows if r["method"] == "dense fp16"}
        scored = rows[0]["scored"]
        md += [f"### {model}, {protocol} ({windows} windows of {rows[0]['window']} tokens, "
               f"{scored:,} scored tokens)", ""]
        md += [machines_text(rows), ""]
        present = {(r["method"], r["label"]) for r in rows}
        missing = [f"{method} {label}" for method, label in expected(model) if (method, label) not in present]
        if missing:
            md += [f"*Not run yet ({len(missing)} of the rule's {len(expected(model))} settings; the table is "
                   f"partial):* {'; '.join(missing)}.", ""]
        figure = Path(plots_dir) / f"claim_{model}_{protocol}.svg"
        draw(figure, f"{model}, {protocol}", by_method)
        md += [f"![fronts]({relative(figure)})", ""]
        detail, summary, best_point = [], [], []
        variants = [m for m in by_method if m.startswith("Lexico ")]
        for method in BASELINE_ORDER:
            points = front_points(by_method.get(method, []))
            points_mean = front_points(at_decode_mean(by_method.get(method, [])))
            if not points:
                continue
            readings = {}
            for name in ["Lexico"] + variants:  # the same points against each variant's front
                rows_of = variant_rows(claim, name, by_method)
                readings[name] = ratios(points, rows_of)
                summary.append(summary_row(method, name, readings[name], ratios(points_mean, at_decode_mean(rows_of))))
            if method == "KIVI-2":
                best_point, columns[(model, protocol)] = best_of_fronts(points, readings, paired)
            for point, (by_kl, by_delta) in zip(points, readings["Lexico"]):
                delta_text, noise = ratio_text(by_delta, point, paired)
                detail.append(f"| {method} {point['label']} | {point['kv']:.1f} | {point['kl']:.5f} | "
                              f"{ratio_text(by_kl, point)[0]} | {point['delta']:+.4f} | {delta_text} | {noise} |")
        md += ["| baseline | front | front points | ratio by KL | ratio by ΔNLL | ratios not reached (better than "
               "the front's best point) | by KL, decode-mean sizes | by ΔNLL, decode-mean sizes |",
               "|---|---|---|---|---|---|---|---|"] + summary
        md += ["", "The last two columns read the same fronts with every run's KV size averaged over its decode "
               "steps instead of taken at the window's end (each cache's flush cycle stands at a different phase "
               "when the window ends)."]
        md += [""] + best_point if best_point else []
        md += ["", "Per front point: the KV size at which Lexico's front reaches the point's KL or ΔNLL and the "
               "ratio (≥: Lexico's smallest setting is already better, so the ratio is at least this); the paired "
               "column is the Lexico setting that reaches the point's ΔNLL minus the point, token by token "
               "(± the larger of the per-token and per-window standard errors).", "",
               "| baseline point | KV % | KL | Lexico's size at its KL (ratio) | ΔNLL | "
               "Lexico's size at its ΔNLL (ratio) | paired ΔNLL, Lexico − baseline |",
               "|---|---|---|---|---|---|---|"] + detail
        md += ["", "Each method's runs (front points marked ●):", "",
               "| method | setting | KV % (end) | KV % (decode mean) | KL | ΔNLL ± SE | top-1 % | "
               "decode, × dense | prefill, × dense | shared bytes |", "|---|---|---|---|---|---|---|---|---|---|"]
        on_front = {id(r) for m, _, _ in METRICS for rs in by_method.values() for r in front(rs, m)}
        for r in sorted(rows, key=lambda r: (r["method"] != "Lexico", r["method"], r["kv"])):
            dense = dense_on.get(machine_name(r))
            speed = (f"{r['tps'] / dense['tps']:.2f}" if dense and dense["tps"] and r["tps"] else "—",
                     f"{r['prefill_tps'] / dense['prefill_tps']:.2f}"
                     if dense and dense.get("prefill_tps") and r["prefill_tps"] else "—")
            mark = " ●" if id(r) in on_front else ""
            shared = f"{r['shared_bytes'] / 2**20:.1f} MiB" if r["shared_bytes"] else "—"
            md.append(f"| {r['method']}{mark} | {r['label']} | {r['kv']:.2f} | {r['kv_mean']:.2f} | {r['kl']:.5f} | "
                      f"{r['delta']:+.4f} ± {r['delta_se']:.4f} | {r['top1']:.2f} | {speed[0]} | {speed[1]} | "
                      f"{shared} |")
        md.append("")
    return md[:2] + (glance(claim, columns) + [""] if columns else []) + md[2:]
