"""Writes the scale benchmark's results (bench/scale.py) into docs/BENCHMARKS.md, between the
scale markers, and draws its plot. Run by scale.py; also `python3 bench/report.py RESULTS.json`
to redo the report from saved results."""

import json
import math
import os
import sys

BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
PLAN_GOAL, ZERO_GOAL, THROUGHPUT_GOAL, RATE_GOAL, SCRIPT_GOAL = 3.0, 3.0, 50_000, 0.95, 5.0


def fmt_rows(n):
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def secs(x):
    return "–" if x is None else (f"{x:.2f} s" if x < 10 else f"{x:.1f} s")


def verdict(ok, how):
    return f"**met** ({how})" if ok else f"**missed** ({how})"


def slope(xs, ys):
    """Least-squares slope of log(y) on log(x): 1.0 is linear growth."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def size(results, rows):
    return next((s for s in results["sizes"] if s["rows"] == rows), None)


def render(results, plot_name):
    env = results["environment"]
    sizes = results["sizes"]
    out = []
    w = out.append
    w(f"Measured {env['date']} at commit `{env['commit']}` (extension {env['extension']}): PostgreSQL "
      f"{env['postgres']}, {env['cores']} cores{' (' + env['cpu'] + ')' if env.get('cpu') else ''}, `retl.workers` = {env['workers']}, "
      f"shared_buffers {env['settings']['shared_buffers']}, work_mem {env['settings']['work_mem']}; "
      f"webhook `batch_size` {results['batch_size']}, `max_concurrency` 4 (default). The whole run took "
      f"{results['seconds'] / 60:.0f} minutes. Medians of the repeats given per row.")
    w("")
    w(f"![plan time against the floor, by model size and change rate]({plot_name})")
    w("")

    # Goals.
    w("### Goals")
    w("")
    w("| Goal | Measured | |")
    w("|---|---|---|")
    one_m = size(results, 1_000_000)
    if one_m:
        for rate, rr in one_m["rates"].items():
            ratio = rr["plan_over_floor"]
            written = (f"; the changed rows written alone {secs(rr['write_s'])}, {rr['write_over_floor']:.2f}× floor"
                       if rr.get("write_s") else "")
            w(f"| plan ≤ {PLAN_GOAL:g}× floor at 1M rows, {float(rate):.1%} changed | plan {secs(rr['plan_s'])}, floor "
              f"{secs(rr['floor_s'])}{written} | {verdict(ratio <= PLAN_GOAL, f'{ratio:.2f}×')} |")
        zero = one_m["rates"]["0.0"]
        ok = zero["requests"] == 0 and zero["wall_over_floor"] <= ZERO_GOAL
        w(f"| zero-change run at 1M rows: 0 requests, time ≤ {ZERO_GOAL:g}× floor | {zero['requests']:g} requests, "
          f"`retl.run(wait => true)` {secs(zero['wall_s'])} | {verdict(ok, '%.2f×' % zero['wall_over_floor'])} |")
    if len(sizes) >= 2:
        for rate in sizes[0]["rates"]:
            xs = [s["rows"] for s in sizes]
            k = slope(xs, [s["rates"][rate]["plan_s"] for s in sizes])
            kf = slope(xs, [s["rates"][rate]["floor_s"] for s in sizes])
            span = f"{fmt_rows(xs[0])}–{fmt_rows(xs[-1])}"
            w(f"| linear growth of plan time, {float(rate):.1%} changed ({span}) | exponent {k:.2f} "
              f"(floor: {kf:.2f}) | {verdict(k <= 1.15, 'log-log slope, 1.00 is linear')} |")
    for s in sizes:
        f = s["first_run"]
        w(f"| delivery ≥ {THROUGHPUT_GOAL:,} rows/s, {fmt_rows(s['rows'])} rows (first run) | "
          f"{f['rows_per_s']:,.0f} rows/s ({f['delivered']:,} rows in {secs(f['deliver_s'])}, {f['requests']:,} requests) | "
          f"{verdict(f['rows_per_s'] >= THROUGHPUT_GOAL, '%.0f%% of the goal' % (100 * f['rows_per_s'] / THROUGHPUT_GOAL))} |")
    for s in sizes:
        rr = s["rates"].get("0.1")
        if rr and rr.get("deliver_rows_per_s"):
            tput = rr["deliver_rows_per_s"]
            w(f"| delivery ≥ {THROUGHPUT_GOAL:,} rows/s, {fmt_rows(s['rows'])} rows, 10% changed (median of "
              f"{len(rr['samples'])}) | {tput:,.0f} rows/s ({rr['changed_rows']:,.0f} rows each) | "
              f"{verdict(tput >= THROUGHPUT_GOAL, '%.0f%% of the goal' % (100 * tput / THROUGHPUT_GOAL))} |")
    rl = results.get("rate_limit")
    if rl:
        ok = rl["steady_rate"] >= RATE_GOAL * rl["limit"] and rl["throttled"] == 0
        w(f"| rate limit {rl['limit']}/s: ≥ {RATE_GOAL:.0%} of it, 0 × 429 | {rl['steady_rate']:.1f}/s steady, "
          f"{rl['overall_rate']:.1f}/s overall (burst included), {rl['throttled']} × 429 | "
          f"{verdict(ok, '%.1f%% of the limit' % (100 * rl['steady_rate'] / rl['limit']))} |")
    ext = one_m and one_m.get("external")
    if ext:
        w(f"| end to end ≥ {SCRIPT_GOAL:g}× faster than an external script (1M rows, 0.2% changed) | "
          f"pg_reverse_etl {secs(ext['retl_s'])}, script {secs(ext['script_s'])} | "
          f"{verdict(ext['ratio'] >= SCRIPT_GOAL, '%.1f×' % ext['ratio'])} |")
    w("")

    # Plans against the floor.
    w("### Plan time against the floor")
    w("")
    w("Floor: `CREATE TEMP TABLE ... AS` the model query, timed just before each run in the same state. "
      "Plan: the run's `planned_at - started_at` (materialise, hash, diff against the snapshot, queue the outbox). "
      "Run: `retl.run(wait => true)` as the client sees it (queue, plan, deliver). "
      "Written alone: the changed rows' keys, payloads and hashes, built beforehand, inserted in one statement "
      "into a table shaped like `retl.outbox` (logged, like it), timed after the run: what queueing them costs "
      "any plan, on top of reading the model.")
    w("")
    w("| Rows | Changed | Repeats | Floor | Plan | Plan / floor | Written alone, / floor | Run | Run / floor | Requests |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sizes:
        for rate, rr in s["rates"].items():
            written = f"{secs(rr['write_s'])}, {rr['write_over_floor']:.2f}×" if rr.get("write_s") else "–"
            w(f"| {fmt_rows(s['rows'])} | {float(rate):.1%} ({rr['changed_rows']:,.0f}) | {len(rr['samples'])} | "
              f"{secs(rr['floor_s'])} | {secs(rr['plan_s'])} | {rr['plan_over_floor']:.2f}× | {written} | "
              f"{secs(rr['wall_s'])} | {rr['wall_over_floor']:.2f}× | {rr['requests']:,.0f} |")
    w("")

    # First runs, storage, memory.
    w("### First run (every row new), storage and memory")
    w("")
    w("| Rows | Plan | Delivery | Rows/s delivered | Requests | Snapshot per row | Source table per row | Worker peak private memory |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sizes:
        f = s["first_run"]
        w(f"| {fmt_rows(s['rows'])} | {secs(f['plan_s'])} | {secs(f['deliver_s'])} | {f['rows_per_s']:,.0f} | "
          f"{f['requests']:,} | {s['snapshot_bytes_per_row']:.0f} B ({s['snapshot_heap_bytes_per_row']:.0f} B heap) | "
          f"{s['source_bytes_per_row']:.0f} B | {s['worker_peak_anon_mb']:.0f} MB |")
    w("")
    w("Snapshot per row: `pg_total_relation_size('retl.snapshots')` (heap, TOAST, primary key) over the rows of the "
      "one sync in it. Worker memory: the largest `RssAnon` (private, resident) of either worker, sampled every "
      "0.2 s from `/proc` while that size was benchmarked (shared buffers are not counted).")
    w("")

    if ext:
        w("### Against an external script")
        w("")
        w("`bench/external_sync.py` does the job the way many teams do without a tool: psycopg reads the model "
          "through a server-side cursor, each row's fields are hashed and compared with the snapshot the script "
          "keeps in a table of its own, and requests posts the changed rows in batches of the same size to the "
          "same receiver, acknowledged batches entering its snapshot. Both diff the same 1M rows after the same "
          "0.2% changed, taking turns at going first.")
        w("")
        w("| # | Changed | pg_reverse_etl | Script | Ratio |")
        w("|---:|---:|---:|---:|---:|")
        for i, smp in enumerate(ext["samples"], 1):
            w(f"| {i} | {smp['changed_rows']:,} | {secs(smp['retl_s'])} | {secs(smp['script_s'])} | {smp['ratio']:.1f}× |")
        w(f"| median | | {secs(ext['retl_s'])} | {secs(ext['script_s'])} | **{ext['ratio']:.1f}×** |")
        w("")
        w(f"The script's first (full) load of 1M rows took {secs(ext['initial']['wall_s'])}; "
          f"pg_reverse_etl's first run took {secs(one_m['first_run']['wall_s'])}.")
        w("")

    if rl:
        w("### Under a rate limit")
        w("")
        w(f"A webhook destination with `rate_limit` {rl['limit']} and `batch_size` {rl['batch_size']}, delivering "
          f"{rl['rows']:,} rows ({rl['rows'] // rl['batch_size']:,} requests) per run to a receiver that enforces "
          f"the same budget (GCRA, burst of one second's worth, 20 ms arrival jitter allowed; past it: 429 with "
          f"Retry-After). Steady rate: requests after the first second (the bucket starts full) over their span.")
        w("")
        w("| # | Requests | Seconds | Steady rate | Overall rate | 429s |")
        w("|---:|---:|---:|---:|---:|---:|")
        for i, smp in enumerate(rl["samples"], 1):
            w(f"| {i} | {smp['requests']:,} | {smp['seconds']:.1f} | {smp['steady_rate']:.1f}/s | "
              f"{smp['overall_rate']:.1f}/s | {smp['throttled']} |")
        w("")
    return "\n".join(out)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    xs = [s["rows"] for s in sizes]
    for rate in sizes[0]["rates"]:
        ax.plot(xs, [s["rates"][rate]["plan_s"] for s in sizes], marker="o", label=f"plan, {float(rate):.1%} changed")
    ax.plot(xs, [sizes[i]["rates"]["0.0"]["floor_s"] for i in range(len(sizes))], "k--", marker="s",
            label="floor (CREATE TEMP TABLE AS)")
    ax.plot(xs, [3 * s["rates"]["0.0"]["floor_s"] for s in sizes], "k:", label="3 × floor (goal)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows in the model")
    ax.set_ylabel("seconds")
    ax.set_title("Plan time against the floor")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    labels, values, colors = [], [], []
    for s in sizes:
        labels.append(f"{fmt_rows(s['rows'])} rows\nfirst run")
        values.append(s["first_run"]["rows_per_s"])
        colors.append("tab:blue")
    ax.bar(labels, values, color=colors)
    ax.axhline(THROUGHPUT_GOAL, color="k", linestyle=":", label=f"goal {THROUGHPUT_GOAL:,} rows/s")
    # Room above the bars and the goal for the note on the external script.
    ax.set_ylim(0, max(values + [THROUGHPUT_GOAL]) * 1.3)
    ax.set_ylabel("rows delivered per second")
    ax.set_title("Delivery throughput (unthrottled receiver)")
    one_m = size(results, 1_000_000)
    if one_m and one_m.get("external"):
        ext = one_m["external"]
        ax.text(0.02, 0.95, f"1M rows, 0.2% changed, end to end:\npg_reverse_etl {ext['retl_s']:.2f} s, "
                f"external script {ext['script_s']:.2f} s ({ext['ratio']:.1f}×)",
                transform=ax.transAxes, va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8})
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(results, doc_path, plot_path):
    plot(results, plot_path)
    section = render(results, os.path.relpath(plot_path, os.path.dirname(doc_path)))
    with open(doc_path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{doc_path} has no {BEGIN} ... {END} section")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(doc_path, "w") as f:
        f.write(f"{head}{BEGIN}\n{section}\n{END}{tail}")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    with open(sys.argv[1]) as f:
        write(json.load(f), os.path.join(here, "..", "docs", "BENCHMARKS.md"),
              os.path.join(here, "..", "docs", "benchmarks-scale.png"))
