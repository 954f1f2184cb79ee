#!/usr/bin/env python3
"""Scale benchmark of pg_reverse_etl (`make bench`; method and figures in docs/BENCHMARKS.md).

One run measures, against a local cluster with the extension preloaded and a local strict
webhook receiver (e2e/src/bin/bench-receiver.rs) on 127.0.0.1:
  - for models of 100k, 1M and 10M rows of customer state (12 columns, mixed types):
    the first run (everything new: delivery throughput), then runs where 0%, 0.2% and 10% of
    the rows changed, each next to the floor measured just before it in the same state
    (materialising the model: CREATE TEMP TABLE AS the model query);
  - snapshot storage per row and the workers' peak private memory at each size;
  - at 1M rows: the same job done by an external script (bench/external_sync.py: psycopg +
    requests, its own snapshot), alternating with pg_reverse_etl on the same change sets;
  - a destination with a rate limit of N requests/s: achieved rate and 429s.
Figures are medians of --repeats runs (--repeats-large at sizes of 5M rows and more).
Writes JSON to --json, the section between the scale markers of --doc and a PNG to --plot.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TABLE = "bench_customers"
COLUMNS = ["email", "full_name", "country", "plan", "mrr", "seats", "lifetime_value",
           "churn_risk", "is_active", "signed_up_at", "last_seen_at"]
MODEL_QUERY = (
    "SELECT id, email, full_name, country, plan, mrr, seats, lifetime_value, churn_risk, "
    f"is_active, signed_up_at, last_seen_at FROM {TABLE}"
)
RATES = [0.0, 0.002, 0.10]
BATCH_SIZE = 1000
RATE_LIMIT = 50          # requests/s for the rate-limit test
RATE_ROWS = 100_000      # rows delivered in batches of 100 under it: 1,000 requests


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def connect():
    return psycopg.connect(autocommit=True)


class Receiver:
    """bench-receiver as a child process; statistics over HTTP on port + 1."""

    def __init__(self, binary, port, rate=None, max_batch=BATCH_SIZE):
        cmd = [binary, "--port", str(port), "--max-batch", str(max_batch)]
        if rate:
            cmd += ["--rate", str(rate)]
        self.port = port
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = time.time() + 10
        while True:
            try:
                self.stats()
                # Answered: by this receiver, unless another one holds the port and this one
                # exited (a leftover receiver would make every figure someone else's).
                time.sleep(0.3)
                if self.proc.poll() is not None:
                    raise SystemExit(f"bench-receiver could not listen on port {port}: is another one running?")
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"bench-receiver did not start on port {port}")
                time.sleep(0.1)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    def stats(self, arrivals_of=None):
        q = f"?arrivals={arrivals_of}" if arrivals_of else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port + 1}/stats{q}", timeout=30) as r:
            return json.load(r)

    def sync(self, name, arrivals=False):
        return self.stats(name if arrivals else None)["syncs"].get(name, {"requests": 0, "records": 0, "held": 0})

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class MemorySampler(threading.Thread):
    """Every 0.2 s: each worker's private (RssAnon) and peak (VmHWM) memory, from /proc."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_anon_kb = 0
        self.hwm_kb = 0
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def reset(self):
        with self.lock:
            self.peak_anon_kb = 0
            self.hwm_kb = 0

    def run(self):
        conn = connect()
        pids, refreshed = [], 0.0
        while not self.stop_event.is_set():
            if time.time() - refreshed > 2:
                try:
                    pids = [r[0] for r in conn.execute("SELECT pid FROM retl.worker_status() WHERE pid > 0")]
                except psycopg.Error:
                    # The extension is being re-created between sizes: keep the last pids.
                    pass
                refreshed = time.time()
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/status") as f:
                        fields = dict(line.split(":", 1) for line in f if ":" in line)
                    anon = int(fields["RssAnon"].split()[0])
                    hwm = int(fields["VmHWM"].split()[0])
                except (OSError, KeyError, ValueError):
                    continue
                with self.lock:
                    self.peak_anon_kb = max(self.peak_anon_kb, anon)
                    self.hwm_kb = max(self.hwm_kb, hwm)
            time.sleep(0.2)


def fresh_extension(conn):
    # The workers hold the extension in each transaction, so a DROP EXTENSION waits for them
    # rather than deadlocking with one (it did before; this function then tried again).
    conn.execute("DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE")
    conn.execute("DROP TABLE IF EXISTS bench_customers, bench_rate, external_sync_state, bench_outbox CASCADE")
    conn.execute("CREATE EXTENSION pg_reverse_etl")


def define_sync(conn, name, model, query, url, batch_size, rate_limit=None):
    conn.execute("SELECT retl.create_model(name => %s, query => %s, primary_key => '{id}')", (model, query))
    options = f"type 'webhook', url '{url}', batch_size '{batch_size}'"
    if rate_limit:
        options += f", rate_limit '{rate_limit}'"
    conn.execute(f"CREATE SERVER {name}_dest FOREIGN DATA WRAPPER retl OPTIONS ({options})")
    conn.execute(f"CREATE USER MAPPING FOR CURRENT_USER SERVER {name}_dest OPTIONS (token 'bench')")
    mappings = json.dumps({c: c for c in COLUMNS})
    conn.execute(
        "SELECT retl.create_sync(name => %s, model => %s, destination => %s, mode => 'upsert', mappings => %s)",
        (name, model, f"{name}_dest", mappings))


def load_table(conn, table, rows):
    conn.execute(f"""
        CREATE TABLE {table} (
            id bigint PRIMARY KEY, email text NOT NULL, full_name text, country char(2), plan text,
            mrr numeric(10,2), seats int, lifetime_value numeric(12,2), churn_risk double precision,
            is_active boolean, signed_up_at timestamptz, last_seen_at timestamptz)""")
    conn.execute(f"""
        INSERT INTO {table}
        SELECT g, 'user' || g || '@example.com', 'Customer ' || g,
               (ARRAY['US','DE','FR','GB','JP','BR','IN','CA'])[(1 + g %% 8)::int],
               (ARRAY['free','starter','pro','enterprise'])[(1 + (g * 7) %% 4)::int],
               round(((g * 37) %% 50000) / 100.0, 2), 1 + (g * 13) %% 250,
               round(((g * 7919) %% 10000000) / 100.0, 2), ((g * 2654435761) %% 1000) / 1000.0,
               g %% 10 <> 0, timestamptz '2020-01-01' + (g %% 1700) * interval '1 day',
               timestamptz '2026-01-01' + (g %% 86400) * interval '1 second'
          FROM generate_series(1::bigint, %s) g""", (rows,))
    conn.execute(f"VACUUM ANALYZE {table}")


def change(conn, table, rate, seed):
    """Changes about `rate` of the rows (a pseudo-random set fixed by `seed`); returns how many."""
    if rate == 0:
        return 0
    threshold = round(rate * 100000)
    cur = conn.execute(
        f"""UPDATE {table} SET last_seen_at = last_seen_at + interval '1 minute',
                    churn_risk = round((churn_risk * 0.9 + 0.05)::numeric, 4)
             WHERE (hashint8extended(id, %s) & 9223372036854775807) %% 100000 < %s""", (seed, threshold))
    changed = cur.rowcount
    conn.execute(f"VACUUM ANALYZE {table}")
    return changed


def write_seconds(conn, rate, seed):
    """What writing the changed rows to the outbox costs by itself, which any plan of them must
    pay on top of reading the model: the rows `change(rate, seed)` changed, their keys, payloads
    and 24-byte hashes built beforehand (not timed), inserted in one statement into a table
    shaped like retl.outbox (its columns, identity, CHECK and one index; logged like it)."""
    threshold = round(rate * 100000)
    conn.execute("DROP TABLE IF EXISTS bench_changed")
    conn.execute(
        f"""CREATE TEMP TABLE bench_changed AS
            SELECT jsonb_build_object('id', m.id) AS key, to_jsonb(m) - 'id' AS payload,
                   substring(sha256(m::text::bytea) FROM 1 FOR 24) AS hash
              FROM ({MODEL_QUERY}) m
             WHERE (hashint8extended(m.id, %s) & 9223372036854775807) %% 100000 < %s""", (seed, threshold))
    conn.execute("CREATE TABLE IF NOT EXISTS bench_outbox (LIKE retl.outbox INCLUDING ALL)")
    started = time.perf_counter()
    conn.execute("INSERT INTO bench_outbox (sync_id, run_id, op, key, payload, hash) "
                 "SELECT 1, 1, 'upsert', key, payload, hash FROM bench_changed")
    elapsed = time.perf_counter() - started
    conn.execute("TRUNCATE bench_outbox")
    conn.execute("DROP TABLE bench_changed")
    return elapsed


def floor_seconds(conn, query):
    started = time.perf_counter()
    conn.execute(f"CREATE TEMP TABLE bench_floor AS {query}")
    elapsed = time.perf_counter() - started
    conn.execute("DROP TABLE bench_floor")
    return elapsed


def run_sync(conn, name):
    """retl.run(wait => true), timed from the client; the run's own timings from retl.runs."""
    started = time.perf_counter()
    (run_id,) = conn.execute("SELECT id FROM retl.run(%s, wait => true)", (name,)).fetchone()
    wall = time.perf_counter() - started
    row = conn.execute(
        """SELECT status, extract(epoch FROM planned_at - started_at)::float8,
                  extract(epoch FROM finished_at - planned_at)::float8,
                  extract(epoch FROM started_at - queued_at)::float8,
                  planned_inserts + planned_updates + planned_deletes, delivered, failed, api_calls, rows_in_model
             FROM retl.runs WHERE id = %s""", (run_id,)).fetchone()
    keys = ["status", "plan_s", "deliver_s", "queue_s", "planned", "delivered", "failed", "api_calls", "rows_in_model"]
    out = dict(zip(keys, row))
    out["wall_s"] = wall
    if out["status"] != "succeeded":
        raise SystemExit(f"run {run_id} of {name} ended {out['status']}: {out}")
    return out


def external_script(python, url, rows_expected=None):
    cmd = [python, os.path.join(HERE, "external_sync.py"), "--query", MODEL_QUERY, "--key", "id",
           "--url", url, "--batch-size", str(BATCH_SIZE)]
    started = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def median(xs):
    return statistics.median(xs) if xs else None


def bench_size(conn, receiver, sampler, rows, repeats, python, compare):
    log(f"== {rows:,} rows")
    fresh_extension(conn)
    t = time.perf_counter()
    load_table(conn, TABLE, rows)
    log(f"table loaded in {time.perf_counter() - t:.1f} s")
    # A sync name per size: the receiver keeps each sync's records apart.
    sync = f"bench_{rows}"
    define_sync(conn, sync, "bench_model", MODEL_QUERY, receiver.url, BATCH_SIZE)
    sampler.reset()
    first = run_sync(conn, sync)
    after = receiver.sync(sync)
    first["requests"] = after["requests"]
    first["rows_per_s"] = first["delivered"] / first["deliver_s"] if first["deliver_s"] else None
    if after["held"] != rows or first["delivered"] != rows:
        raise SystemExit(f"first run: the destination holds {after['held']} rows, expected {rows}")
    log(f"first run: plan {first['plan_s']:.1f} s, delivery {first['deliver_s']:.1f} s "
        f"({first['rows_per_s']:,.0f} rows/s, {first['requests']} requests)")
    snapshot_bytes = conn.execute(
        "SELECT pg_total_relation_size('retl.snapshots'), pg_relation_size('retl.snapshots'), "
        "pg_total_relation_size(%s)", (TABLE,)).fetchone()

    result = {"rows": rows, "first_run": first, "rates": {},
              "snapshot_bytes_per_row": snapshot_bytes[0] / rows,
              "snapshot_heap_bytes_per_row": snapshot_bytes[1] / rows,
              "source_bytes_per_row": snapshot_bytes[2] / rows}
    seed = 1
    for rate in RATES:
        samples = []
        for rep in range(repeats):
            seed += 1
            changed = change(conn, TABLE, rate, seed)
            floor = floor_seconds(conn, MODEL_QUERY)
            before = receiver.sync(sync)
            r = run_sync(conn, sync)
            after = receiver.sync(sync)
            r["requests"] = after["requests"] - before["requests"]
            r["floor_s"] = floor
            r["changed_rows"] = changed
            if r["planned"] != changed or r["delivered"] != changed:
                raise SystemExit(f"{rate:.1%}: changed {changed} rows, the run planned {r['planned']} and delivered {r['delivered']}")
            if after["records"] - before["records"] != changed:
                raise SystemExit(f"{rate:.1%}: the destination received {after['records'] - before['records']} records, expected {changed}")
            # After the run, so as not to slow it down; the model is as the run read it.
            r["write_s"] = write_seconds(conn, rate, seed) if changed else None
            samples.append(r)
            log(f"{rate:.1%} (#{rep + 1}): {changed} changed, floor {floor:.2f} s, plan {r['plan_s']:.2f} s, "
                f"run {r['wall_s']:.2f} s, {r['requests']} requests"
                + (f", the changed rows written alone {r['write_s']:.2f} s" if changed else ""))
        result["rates"][str(rate)] = {
            "samples": samples,
            "changed_rows": median([s["changed_rows"] for s in samples]),
            "floor_s": median([s["floor_s"] for s in samples]),
            "plan_s": median([s["plan_s"] for s in samples]),
            "wall_s": median([s["wall_s"] for s in samples]),
            "requests": median([s["requests"] for s in samples]),
            "plan_over_floor": median([s["plan_s"] / s["floor_s"] for s in samples]),
            "deliver_rows_per_s": median([s["delivered"] / s["deliver_s"] for s in samples if s["delivered"] and s["deliver_s"]]),
            "wall_over_floor": median([s["wall_s"] / s["floor_s"] for s in samples]),
            "write_s": median([s["write_s"] for s in samples if s.get("write_s")]),
            "write_over_floor": median([s["write_s"] / s["floor_s"] for s in samples if s.get("write_s")]),
        }

    if compare:
        result["external"] = compare_external(conn, receiver, sync, repeats, python, seed)
    if receiver.sync(sync)["held"] != rows:
        raise SystemExit(f"the destination holds {receiver.sync(sync)['held']} rows of {sync}, expected {rows}")
    with sampler.lock:
        result["worker_peak_anon_mb"] = sampler.peak_anon_kb / 1024
        result["worker_hwm_mb"] = sampler.hwm_kb / 1024
    log(f"worker peak private memory {result['worker_peak_anon_mb']:.0f} MB, snapshot "
        f"{result['snapshot_bytes_per_row']:.0f} B/row")
    return result


def compare_external(conn, receiver, sync, repeats, python, seed):
    """The same job (diff the model, push the 0.2% that changed) by the external script and by
    pg_reverse_etl, on the same change sets, alternating which goes first."""
    log("external script: first (full) load")
    initial = external_script(python, receiver.url)
    log(f"external script: {initial['changed']:,} rows in {initial['wall_s']:.1f} s")
    samples = []
    for rep in range(repeats):
        changed = change(conn, TABLE, 0.002, 1000 + seed + rep)
        order = ["retl", "script"] if rep % 2 == 0 else ["script", "retl"]
        s = {"changed_rows": changed, "order": order}
        for who in order:
            if who == "retl":
                r = run_sync(conn, sync)
                if r["delivered"] != changed:
                    raise SystemExit(f"compare: pg_reverse_etl delivered {r['delivered']}, expected {changed}")
                s["retl_s"] = r["wall_s"]
            else:
                r = external_script(python, receiver.url)
                if r["changed"] != changed:
                    raise SystemExit(f"compare: the script pushed {r['changed']}, expected {changed}")
                s["script_s"] = r["wall_s"]
        s["ratio"] = s["script_s"] / s["retl_s"]
        samples.append(s)
        log(f"compare #{rep + 1}: {changed} changed; pg_reverse_etl {s['retl_s']:.2f} s, script {s['script_s']:.2f} s "
            f"({s['ratio']:.1f}x)")
    held = receiver.sync("external_script")["held"]
    return {"initial": initial, "samples": samples, "script_held": held,
            "retl_s": median([s["retl_s"] for s in samples]),
            "script_s": median([s["script_s"] for s in samples]),
            "ratio": median([s["ratio"] for s in samples])}


def bench_rate_limit(conn, binary, port, repeats):
    """A destination whose rate_limit is RATE_LIMIT requests/s, and a receiver enforcing that
    budget (429 + Retry-After past it): 1,000 requests per run."""
    log(f"== rate limit {RATE_LIMIT} requests/s")
    receiver = Receiver(binary, port, rate=RATE_LIMIT, max_batch=100)
    try:
        fresh_extension(conn)
        load_table(conn, "bench_rate", RATE_ROWS)
        query = MODEL_QUERY.replace(TABLE, "bench_rate")
        define_sync(conn, "bench_rated", "bench_rate_model", query, receiver.url, 100, RATE_LIMIT)
        samples = []
        for rep in range(repeats):
            if rep:
                conn.execute("UPDATE bench_rate SET last_seen_at = last_seen_at + interval '1 minute'")
            before = receiver.sync("bench_rated", arrivals=True)
            throttled_before = receiver.stats()["throttled"]
            r = run_sync(conn, "bench_rated")
            after = receiver.sync("bench_rated", arrivals=True)
            arrivals = sorted(after["arrivals"][len(before.get("arrivals", [])):])
            n = len(arrivals)
            span = arrivals[-1] - arrivals[0]
            # The bucket starts full (one second's worth): past the first second is the steady rate.
            steady = [a for a in arrivals if a > arrivals[0] + 1.0]
            s = {"requests": n, "throttled": receiver.stats()["throttled"] - throttled_before,
                 "overall_rate": (n - 1) / span, "steady_rate": (len(steady) - 1) / (steady[-1] - steady[0]),
                 "seconds": span, "run_wall_s": r["wall_s"]}
            samples.append(s)
            log(f"rate #{rep + 1}: {n} requests in {span:.1f} s: overall {s['overall_rate']:.1f}/s, "
                f"steady {s['steady_rate']:.1f}/s, {s['throttled']} x 429")
        return {"limit": RATE_LIMIT, "rows": RATE_ROWS, "batch_size": 100, "samples": samples,
                "steady_rate": median([s["steady_rate"] for s in samples]),
                "overall_rate": median([s["overall_rate"] for s in samples]),
                "throttled": sum(s["throttled"] for s in samples)}
    finally:
        receiver.stop()


def environment(conn):
    version = conn.execute("SHOW server_version").fetchone()[0]
    # The version each fresh_extension() creates (the one installed now is whatever the last
    # user left: it made the reports of two A/B runs name each other's version).
    ext = conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'pg_reverse_etl'").fetchone()
    workers = conn.execute("SHOW retl.workers").fetchone()[0]
    settings = {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in ("shared_buffers", "work_mem", "max_wal_size")}
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"postgres": version, "extension": ext[0] if ext else None, "workers": workers, "cores": os.cpu_count(),
            "cpu": cpu_model(), "settings": settings, "commit": commit, "date": datetime.date.today().isoformat()}


def cpu_model():
    """The processor's name: runs on hosts of the same kind have differed by 2x in delivery."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-large", type=int, default=3, help="repeats at 5M rows and more (each 10M-row repeat takes about 5 minutes here)")
    ap.add_argument("--compare-size", type=int, default=1_000_000)
    ap.add_argument("--receiver", default=os.path.join(ROOT, "target/release/bench-receiver"))
    ap.add_argument("--port", type=int, default=28890)
    ap.add_argument("--python", default=sys.executable, help="the interpreter for the external script")
    ap.add_argument("--json", default=os.path.join(ROOT, ".run/scale.json"))
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs/BENCHMARKS.md"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs/benchmarks-scale.png"))
    ap.add_argument("--skip-rate-limit", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    conn = connect()
    results = {"environment": environment(conn), "batch_size": BATCH_SIZE, "sizes": []}
    started = time.perf_counter()
    if not args.skip_rate_limit:
        results["rate_limit"] = bench_rate_limit(conn, args.receiver, args.port + 2, args.repeats)
    receiver = Receiver(args.receiver, args.port)
    sampler = MemorySampler()
    try:
        fresh_extension(conn)
        sampler.start()
        for rows in sizes:
            repeats = args.repeats_large if rows >= 5_000_000 else args.repeats
            results["sizes"].append(bench_size(conn, receiver, sampler, rows, repeats, args.python,
                                               compare=rows == args.compare_size))
        totals = receiver.stats()
        results["receiver"] = {k: totals[k] for k in ("requests", "throttled", "replays", "invalid", "invalid_reasons")}
        if totals["invalid"] or totals["throttled"]:
            raise SystemExit(f"the receiver refused requests: {results['receiver']}")
    finally:
        sampler.stop_event.set()
        receiver.stop()
    results["seconds"] = time.perf_counter() - started
    fresh_extension(conn)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    log(f"results in {args.json}")
    import report
    report.write(results, args.doc, args.plot)
    log(f"report in {args.doc}, plot in {args.plot}")


if __name__ == "__main__":
    main()
