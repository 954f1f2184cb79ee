//! retl-bench: commit-to-destination latency of an `on change` sync.
//!
//! Creates a table of `--rows` rows (default 10,000), a model over it, a webhook destination
//! pointing at an in-process fake (127.0.0.1, OS-assigned port) and an `on change` upsert
//! sync; delivers the initial rows with `retl.run(wait => true)`; then, for `--seconds`
//! (default 30), issues `--rate` (default 100) paced single-row autocommit UPDATEs per second,
//! each setting `val` of a random row to the next value of a counter. Every update is matched
//! to the first record the fake receives for that row carrying its value (or a later one:
//! "superseded", see docs/BENCHMARKS.md), and the latency from the client's COMMIT returning to that
//! arrival is reported with both instants taken from the same monotonic clock, in this
//! process. Everything it creates is dropped at the end, so it can be rerun.
//!
//! Exit status: 0 when every update reached the destination, 1 when any is missing (or the
//! destination's final state is stale), 2 on a usage or set-up error.
//!
//! See docs/BENCHMARKS.md for the method. Usage: `retl-bench --help`.

use postgres::Client;
use retl_e2e::cluster::{try_connect, unique};
use retl_e2e::{FakeWebhook, RecordedRequest};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::exit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: retl-bench [--seconds 30] [--rate 100] [--rows 10000] [--grace 5] [--seed N] [--untraced] [--json FILE]

Measures the latency from the commit of a source-row UPDATE to the arrival of the changed
record at a webhook destination, for an 'on change' sync (see docs/BENCHMARKS.md).
Connects with PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE (default 127.0.0.1:28815, postgres).

  --seconds N   how long updates are issued (default 30)
  --rate N      single-row UPDATE transactions per second, paced (default 100)
  --rows N      rows in the table and model (default 10000)
  --grace N     seconds to wait after the last update for stragglers (default 5)
  --seed N      seed of the row-id generator (default: from the clock)
  --untraced    define the model so that its key cannot be traced to the table (OFFSET 0, like
                any join or aggregate): every run then plans the whole model
  --json FILE   also write the results as one JSON line to FILE (overwritten)";

/// The targets of the issue, in milliseconds.
const TARGET_P50_MS: f64 = 50.0;
const TARGET_P99_MS: f64 = 250.0;

struct Args {
    seconds: u64,
    rate: u64,
    rows: i64,
    grace: u64,
    seed: u64,
    untraced: bool,
    json: Option<PathBuf>,
}

fn usage_error(msg: &str) -> ! {
    eprintln!("retl-bench: {msg}\n\n{USAGE}");
    exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        seconds: 30,
        rate: 100,
        rows: 10_000,
        grace: 5,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        untraced: false,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage_error(&format!("{name} needs a non-negative integer")))
        };
        match arg.as_str() {
            "--seconds" => a.seconds = number("--seconds"),
            "--rate" => a.rate = number("--rate"),
            "--rows" => a.rows = number("--rows") as i64,
            "--grace" => a.grace = number("--grace"),
            "--seed" => a.seed = number("--seed"),
            "--untraced" => a.untraced = true,
            "--json" => match it.next() {
                Some(p) => a.json = Some(PathBuf::from(p)),
                None => usage_error("--json needs a file name"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0);
            }
            other => usage_error(&format!("unknown argument {other:?}")),
        }
    }
    if a.seconds == 0 || a.rate == 0 || a.rate > 10_000 || a.rows < 1 {
        usage_error("--seconds and --rows must be at least 1, --rate between 1 and 10000");
    }
    a
}

/// splitmix64: a tiny deterministic generator for row ids (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 1..=n (the modulo bias is irrelevant for n = 10,000).
    fn id(&mut self, n: i64) -> i64 {
        (self.next() % n as u64) as i64 + 1
    }
}

/// One UPDATE as the client saw it: `val` was set to `seq` on row `id`.
struct Update {
    id: i64,
    seq: i64,
    sent: Instant,
    committed: Instant,
    /// Wall-clock commit time (Unix seconds), only to place a missing update among the
    /// runs' server-side timestamps (same machine, same clock).
    committed_unix: f64,
}

/// What the fake saw during the measured window: every record with `val > 0` (the initial
/// load carries `val = 0`), by row id, as (val, arrival instant); and the requests carrying them.
#[derive(Default)]
struct Receipts {
    by_id: HashMap<i64, Vec<(i64, Instant)>>,
    requests: usize,
    records: usize,
}

impl Receipts {
    fn observe(&mut self, r: &RecordedRequest) {
        if r.status != 200 || r.replayed {
            return;
        }
        let Some(records) = r.body.as_ref().and_then(|b| b["records"].as_array()) else {
            return;
        };
        let mut counted = false;
        for rec in records {
            let (Some(id), Some(val)) = (rec["key"]["id"].as_i64(), rec["fields"]["val"].as_i64())
            else {
                continue;
            };
            if val > 0 {
                self.by_id.entry(id).or_default().push((val, r.at));
                self.records += 1;
                counted = true;
            }
        }
        if counted {
            self.requests += 1;
        }
    }

    /// Highest value received so far for `id`.
    fn max_val(&self, id: i64) -> i64 {
        self.by_id
            .get(&id)
            .and_then(|v| v.iter().map(|(val, _)| *val).max())
            .unwrap_or(0)
    }
}

/// Object names, all derived from one unique base so concurrent tests never collide.
struct Names {
    table: String,
    model: String,
    server: String,
    sync: String,
}

/// Drops everything the benchmark created, on a fresh connection, even after an error or panic.
struct Cleanup<'a>(&'a Names);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let n = self.0;
        // The server may be restarting (e.g. after an error caused by a restart): retry a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        let connection = loop {
            match try_connect() {
                Some(c) => break Some(c),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(1)),
                None => break None,
            }
        };
        let Some(mut c) = connection else {
            eprintln!(
                "retl-bench: cleanup: cannot connect; drop {}, {}, {}, {} by hand",
                n.sync, n.model, n.server, n.table
            );
            return;
        };
        let steps = [
            format!("SELECT retl.drop_sync('{}', if_exists => true)", n.sync),
            format!("SELECT retl.drop_model('{}', if_exists => true)", n.model),
            format!("DROP SERVER IF EXISTS {} CASCADE", n.server),
            format!("DROP TABLE IF EXISTS {}", n.table),
        ];
        for sql in steps {
            if let Err(e) = c.batch_execute(&sql) {
                eprintln!("retl-bench: cleanup: {sql}: {e}");
            }
        }
    }
}

type R<T> = Result<T, String>;

fn pg<T>(what: &str, r: Result<T, postgres::Error>) -> R<T> {
    r.map_err(|e| match e.as_db_error() {
        Some(db) => format!("{what}: {} ({})", db.message(), db.code().code()),
        None => format!("{what}: {e}"),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `later - earlier` in milliseconds, negative if `later` is in fact earlier.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        ms(later - earlier)
    } else {
        -ms(earlier - later)
    }
}

/// Nearest-rank percentiles of a sample.
struct Dist {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Option<Dist> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Dist {
            n: v.len(),
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }
    fn line(&self) -> String {
        format!(
            "p50 {:7.1}  p90 {:7.1}  p99 {:7.1}  max {:7.1}  mean {:7.1} ms",
            self.p50, self.p90, self.p99, self.max, self.mean
        )
    }
    fn json(d: &Option<Dist>) -> Value {
        match d {
            None => Value::Null,
            Some(d) => {
                json!({"n": d.n, "p50": r1(d.p50), "p90": r1(d.p90), "p99": r1(d.p99), "max": r1(d.max), "mean": r1(d.mean)})
            }
        }
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Prints the sync's runs around the first missing update, with their timestamps relative to
/// its commit, so one can see which run should have carried it and why it did not.
fn explain_missing(client: &mut Client, sync_id: i64, u: &Update) -> R<()> {
    let rows = pg(
        "read the runs around a missing update",
        client.query(
            "SELECT id, trigger, status, planned_inserts + planned_updates + planned_deletes,
                    (extract(epoch FROM queued_at)::float8 - $2) * 1000,
                    (extract(epoch FROM started_at)::float8 - $2) * 1000,
                    (extract(epoch FROM planned_at)::float8 - $2) * 1000,
                    (extract(epoch FROM finished_at)::float8 - $2) * 1000
               FROM retl.runs
              WHERE sync_id = $1 AND coalesce(finished_at, now()) >= to_timestamp($2) - interval '200 ms'
              ORDER BY id LIMIT 8",
            &[&sync_id, &u.committed_unix],
        ),
    )?;
    println!(
        "  runs around the commit of id {} val {} (ms relative to that commit; queued / started / planned / finished):",
        u.id, u.seq
    );
    if rows.is_empty() {
        println!("    none: no run ended after it");
    }
    let t = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:+.1}"));
    for r in rows {
        println!(
            "    run {} ({}, {}), {} rows planned: {} / {} / {} / {}",
            r.get::<_, i64>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i64>(3),
            t(r.get(4)),
            t(r.get(5)),
            t(r.get(6)),
            t(r.get(7)),
        );
    }
    Ok(())
}

fn r1(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn main() {
    let args = parse_args();
    match run(&args) {
        Ok(ok) => exit(if ok { 0 } else { 1 }),
        Err(e) => {
            eprintln!("retl-bench: {e}");
            exit(2)
        }
    }
}

/// Returns whether every update reached the destination.
fn run(args: &Args) -> R<bool> {
    let mut client = try_connect().ok_or_else(|| {
        format!(
            "cannot connect to Postgres at {}:{} (is the cluster running? make cluster)",
            std::env::var("PGHOST").unwrap_or_else(|_| "127.0.0.1".into()),
            std::env::var("PGPORT").unwrap_or_else(|_| "28815".into())
        )
    })?;
    let env = environment(&mut client)?;

    let receipts = Arc::new(Mutex::new(Receipts::default()));
    let other_statuses = Arc::new(AtomicUsize::new(0));
    let fake = {
        let (receipts, other) = (receipts.clone(), other_statuses.clone());
        FakeWebhook::builder()
            .path("/bench")
            .on_request(move |r| {
                if r.status != 200 {
                    other.fetch_add(1, Ordering::Relaxed);
                }
                receipts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .observe(r);
            })
            .try_start()
            .map_err(|e| format!("cannot start the fake webhook on 127.0.0.1: {e}"))?
    };

    let base = unique("bench");
    let names = Names {
        table: format!("{base}_t"),
        model: format!("{base}_m"),
        server: format!("{base}_d"),
        sync: format!("{base}_s"),
    };
    // Declared after the fake, so it runs first: the sync goes before its destination.
    let _cleanup = Cleanup(&names);

    println!(
        "retl-bench: {} rows, {} updates/s for {} s, grace {} s, seed {}; destination {}",
        args.rows,
        args.rate,
        args.seconds,
        args.grace,
        args.seed,
        fake.url()
    );
    let setup_started = Instant::now();
    let (sync_id, initial_run) = set_up(&mut client, &names, &fake, args.rows, args.untraced)?;
    println!(
        "set-up: table {}, sync {} (id {sync_id}); initial run {} delivered {} rows in {} API calls ({:.1} s)",
        names.table,
        names.sync,
        initial_run.0,
        initial_run.1,
        initial_run.2,
        setup_started.elapsed().as_secs_f64()
    );
    if initial_run.1 != args.rows {
        return Err(format!(
            "the initial run delivered {} rows, expected {}",
            initial_run.1, args.rows
        ));
    }

    // The measured window.
    let update = pg(
        "prepare UPDATE",
        client.prepare(&format!(
            "UPDATE {} SET val = $1 WHERE id = $2",
            names.table
        )),
    )?;
    let mut rng = Rng(args.seed);
    let total = args.seconds * args.rate;
    let mut updates = Vec::with_capacity(total as usize);
    let mut max_lag = Duration::ZERO;
    let window_start = Instant::now();
    println!("updating for {} s ...", args.seconds);
    for i in 0..total {
        // Open loop on a fixed schedule: a late update goes at once, the next ones stay on time.
        let due = window_start + Duration::from_nanos(i * 1_000_000_000 / args.rate);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        } else {
            max_lag = max_lag.max(now - due);
        }
        let (id, seq) = (rng.id(args.rows), i as i64 + 1);
        let sent = Instant::now();
        let n = pg("UPDATE", client.execute(&update, &[&seq, &id]))?;
        let committed = Instant::now();
        let committed_unix = unix_seconds();
        if n != 1 {
            return Err(format!("UPDATE of id {id} changed {n} rows"));
        }
        updates.push(Update {
            id,
            seq,
            sent,
            committed,
            committed_unix,
        });
    }
    let load_elapsed = window_start.elapsed();

    // Grace: until every row's last value has arrived and the sync is idle, or the grace ends.
    let mut last_seq: HashMap<i64, i64> = HashMap::new();
    for u in &updates {
        last_seq.insert(u.id, u.seq);
    }
    let grace_start = Instant::now();
    let grace_end = grace_start + Duration::from_secs(args.grace);
    loop {
        let all_in = {
            let r = receipts.lock().unwrap_or_else(|e| e.into_inner());
            last_seq.iter().all(|(id, seq)| r.max_val(*id) >= *seq)
        };
        let active: i64 = pg(
            "count active runs",
            client.query_one(
                "SELECT count(*) FROM retl.runs WHERE sync_id = $1 AND status IN ('queued', 'delivering')",
                &[&sync_id],
            ),
        )?
        .get(0);
        if (all_in && active == 0) || Instant::now() >= grace_end {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let waited = grace_start.elapsed();

    // Match every update to the first arrival of its value or of a later value of that row.
    let receipts = std::mem::take(&mut *receipts.lock().unwrap_or_else(|e| e.into_inner()));
    let (mut commit_lat, mut send_lat, mut rtt) = (Vec::new(), Vec::new(), Vec::new());
    let (mut exact, mut superseded, mut missing) = (0usize, 0usize, Vec::new());
    for u in &updates {
        rtt.push(ms(u.committed - u.sent));
        let arrivals = receipts.by_id.get(&u.id).map(Vec::as_slice).unwrap_or(&[]);
        let first = arrivals
            .iter()
            .filter(|(val, _)| *val >= u.seq)
            .min_by_key(|(_, at)| *at);
        match first {
            None => missing.push(u),
            Some((val, at)) => {
                if *val == u.seq {
                    exact += 1;
                } else {
                    superseded += 1;
                }
                commit_lat.push(signed_ms(*at, u.committed));
                send_lat.push(signed_ms(*at, u.sent));
            }
        }
    }
    // A record arriving after a newer value of the same row would leave the destination stale.
    let out_of_order: usize = receipts
        .by_id
        .values()
        .map(|v| {
            let mut v = v.clone();
            v.sort_by_key(|(_, at)| *at);
            v.windows(2).filter(|w| w[1].0 < w[0].0).count()
        })
        .sum();
    let stale = stale_rows(&mut client, &names.table, &fake, &last_seq)?;
    let runs = run_stats(&mut client, sync_id, initial_run.0)?;

    let commit = Dist::of(commit_lat);
    let send = Dist::of(send_lat);
    let rtt = Dist::of(rtt);
    let received = exact + superseded;
    let ok = missing.is_empty() && stale == 0;
    let target_met = commit
        .as_ref()
        .is_some_and(|d| ok && d.p50 < TARGET_P50_MS && d.p99 < TARGET_P99_MS);
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };

    // Human-readable report.
    let achieved = updates.len() as f64 / load_elapsed.as_secs_f64();
    println!();
    println!("=== retl-bench: on-change latency (this binary: {build} build) ===");
    println!(
        "environment       PostgreSQL {}, pg_reverse_etl {}, retl.workers = {}, {} CPUs, {}",
        env.server_version, env.extension_version, env.workers, env.cpus, env.os
    );
    println!(
        "model             {} rows{}; upsert sync, schedule 'on change'; default destination options",
        args.rows,
        if args.untraced { " (untraced: OFFSET 0)" } else { "" }
    );
    println!(
        "updates           {} in {:.1} s ({achieved:.1}/s, target {}/s; worst lag behind schedule {:.1} ms)",
        updates.len(),
        load_elapsed.as_secs_f64(),
        args.rate,
        ms(max_lag)
    );
    println!(
        "received          {received} (own value {exact}, superseded by a later value of the row {superseded}); missing {}",
        missing.len()
    );
    for u in missing.iter().take(5) {
        println!(
            "  missing: id {} val {} (committed {:.1} s into the window)",
            u.id,
            u.seq,
            (u.committed - window_start).as_secs_f64()
        );
    }
    if let Some(first) = missing.first() {
        explain_missing(&mut client, sync_id, first)?;
    }
    if stale > 0 || out_of_order > 0 {
        println!("consistency       {stale} rows stale at the destination at the end; {out_of_order} out-of-order arrivals");
    }
    match &commit {
        Some(d) => println!("commit -> recv    {}", d.line()),
        None => println!("commit -> recv    (nothing received)"),
    }
    if let Some(d) = &send {
        println!("send -> recv      {}", d.line());
    }
    if let Some(d) = &rtt {
        println!("UPDATE+COMMIT rtt {}", d.line());
    }
    println!(
        "runs              {} ({}; plan scope: {}), {} with changes; {:.1} planned rows/run, {:.2} updates/run",
        runs.runs,
        runs.by_status,
        runs.by_scope,
        runs.runs - runs.empty,
        runs.planned as f64 / runs.runs.max(1) as f64,
        updates.len() as f64 / runs.runs.max(1) as f64
    );
    println!(
        "api calls         {} (retl.runs); fake received {} requests with {} records, {} non-200 answers",
        runs.api_calls, receipts.requests, receipts.records, other_statuses.load(Ordering::Relaxed)
    );
    println!(
        "run phases (p50)  queue wait {:.1} ms, plan {:.1} ms, deliver {:.1} ms  (p99: {:.1} / {:.1} / {:.1} ms)",
        runs.queue_p50, runs.plan_p50, runs.deliver_p50, runs.queue_p99, runs.plan_p99, runs.deliver_p99
    );
    println!(
        "grace             waited {:.2} s of {} s",
        waited.as_secs_f64(),
        args.grace
    );
    println!(
        "target            p50 < {TARGET_P50_MS} ms and p99 < {TARGET_P99_MS} ms commit -> received: {}",
        if target_met { "MET" } else { "NOT MET" }
    );
    if !ok {
        println!(
            "RESULT: FAILED ({} updates missing, {stale} rows stale)",
            missing.len()
        );
    }

    if let Some(path) = &args.json {
        let line = json!({
            "benchmark": "on_change_latency",
            "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "bench_build": build,
            "environment": {
                "postgres": env.server_version, "extension": env.extension_version,
                "workers": env.workers, "cpus": env.cpus, "os": env.os,
            },
            "config": {
                "rows": args.rows, "rate": args.rate, "seconds": args.seconds,
                "grace_s": args.grace, "seed": args.seed, "untraced": args.untraced,
            },
            "updates": updates.len(),
            "achieved_rate": r1(achieved),
            "max_schedule_lag_ms": r1(ms(max_lag)),
            "received": received,
            "received_own_value": exact,
            "received_superseded": superseded,
            "missing": missing.len(),
            "stale_rows": stale,
            "out_of_order": out_of_order,
            "commit_to_received_ms": Dist::json(&commit),
            "send_to_received_ms": Dist::json(&send),
            "update_round_trip_ms": Dist::json(&rtt),
            "runs": runs.runs,
            "runs_by_status": runs.by_status,
            "runs_by_plan_scope": runs.by_scope,
            "runs_with_changes": runs.runs - runs.empty,
            "planned_rows": runs.planned,
            "delivered_rows": runs.delivered,
            "avg_rows_per_run": r1(runs.planned as f64 / runs.runs.max(1) as f64),
            "api_calls": runs.api_calls,
            "fake_requests": receipts.requests,
            "run_phase_ms": {
                "queue_wait_p50": r1(runs.queue_p50), "plan_p50": r1(runs.plan_p50), "deliver_p50": r1(runs.deliver_p50),
                "queue_wait_p99": r1(runs.queue_p99), "plan_p99": r1(runs.plan_p99), "deliver_p99": r1(runs.deliver_p99),
            },
            "target": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "met": target_met},
            "ok": ok,
        });
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(path, format!("{line}\n"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("json              written to {}", path.display());
    }
    Ok(ok)
}

struct Environment {
    server_version: String,
    extension_version: String,
    workers: String,
    cpus: usize,
    os: String,
}

fn environment(client: &mut Client) -> R<Environment> {
    let row = pg(
        "read the server's version",
        client.query_one(
            "SELECT current_setting('server_version'),
                    (SELECT extversion FROM pg_extension WHERE extname = 'pg_reverse_etl'),
                    coalesce(current_setting('retl.workers', true), '?')",
            &[],
        ),
    )?;
    let extension_version: Option<String> = row.get(1);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    Ok(Environment {
        server_version: row.get(0),
        extension_version: extension_version.ok_or(
            "the extension is not installed in this database (CREATE EXTENSION pg_reverse_etl)",
        )?,
        workers: row.get(2),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        os,
    })
}

/// Creates table, model, destination and on-change sync, and delivers the initial rows.
/// Returns the sync id and the initial run's (id, delivered, api_calls).
fn set_up(
    client: &mut Client,
    n: &Names,
    fake: &FakeWebhook,
    rows: i64,
    untraced: bool,
) -> R<(i64, (i64, i64, i64))> {
    pg(
        "create the table",
        client.batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, val bigint NOT NULL, email text NOT NULL, name text NOT NULL);
             INSERT INTO {t} SELECT i, 0, 'user' || i || '@example.com', 'Person ' || i FROM generate_series(1, {rows}) i;
             ANALYZE {t};",
            t = n.table
        )),
    )?;
    pg(
        "retl.create_model",
        client.execute(
            "SELECT retl.create_model(name => $1, query => $2, primary_key => '{id}')",
            &[
                &n.model,
                &format!("SELECT id, val, email, name FROM {}{}", n.table, if untraced { " OFFSET 0" } else { "" }),
            ],
        ),
    )?;
    pg(
        "CREATE SERVER",
        client.batch_execute(&format!(
            "CREATE SERVER {} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{}')",
            n.server,
            fake.url()
        )),
    )?;
    let sync_id: i64 = pg(
        "retl.create_sync",
        client.query_one(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'upsert', schedule => 'on change')",
            &[&n.sync, &n.model, &n.server],
        ),
    )?
    .get(0);
    let run = pg(
        "initial retl.run(wait => true)",
        client.query_one(
            "SELECT id, status, delivered, api_calls, error FROM retl.run($1, wait => true, timeout => interval '5 minutes')",
            &[&n.sync],
        ),
    )?;
    let (id, status, delivered, api_calls, error): (i64, String, i64, i64, Option<String>) =
        (run.get(0), run.get(1), run.get(2), run.get(3), run.get(4));
    if status != "succeeded" {
        return Err(format!(
            "initial run {id} ended {status}: {}",
            error.unwrap_or_default()
        ));
    }
    // Runs triggered meanwhile (none expected) must not count as part of the measured window.
    let last: i64 = pg(
        "read the runs",
        client.query_one(
            "SELECT max(id) FROM retl.runs WHERE sync_id = $1",
            &[&sync_id],
        ),
    )?
    .get(0);
    Ok((sync_id, (last.max(id), delivered, api_calls)))
}

/// Rows whose value at the destination is not the table's final value (among updated rows).
fn stale_rows(
    client: &mut Client,
    table: &str,
    fake: &FakeWebhook,
    last_seq: &HashMap<i64, i64>,
) -> R<usize> {
    let ids: Vec<i64> = last_seq.keys().copied().collect();
    let rows = pg(
        "read the final values",
        client.query(
            &format!("SELECT id, val FROM {table} WHERE id = ANY($1)"),
            &[&ids],
        ),
    )?;
    let records = fake.records();
    Ok(rows
        .iter()
        .filter(|row| {
            let (id, val): (i64, i64) = (row.get(0), row.get(1));
            records
                .get(&json!({ "id": id }).to_string())
                .and_then(|f| f["val"].as_i64())
                != Some(val)
        })
        .count())
}

struct RunStats {
    runs: i64,
    by_status: String,
    by_scope: String,
    empty: i64,
    planned: i64,
    delivered: i64,
    api_calls: i64,
    queue_p50: f64,
    plan_p50: f64,
    deliver_p50: f64,
    queue_p99: f64,
    plan_p99: f64,
    deliver_p99: f64,
}

/// The sync's runs after `after_run` (the measured window and the grace period).
fn run_stats(client: &mut Client, sync_id: i64, after_run: i64) -> R<RunStats> {
    let row = pg(
        "read the runs",
        client.query_one(
            "WITH r AS (SELECT * FROM retl.runs WHERE sync_id = $1 AND id > $2),
                  s AS (SELECT string_agg(status || ' ' || n, ', ' ORDER BY status) AS by_status
                          FROM (SELECT status, count(*) AS n FROM r GROUP BY status) x),
                  p AS (SELECT string_agg(coalesce(plan_scope, 'unplanned') || ' ' || n, ', ' ORDER BY plan_scope) AS by_scope
                          FROM (SELECT plan_scope, count(*) AS n FROM r GROUP BY plan_scope) x)
             SELECT count(*),
                    coalesce((SELECT by_status FROM s), 'none'),
                    coalesce((SELECT by_scope FROM p), 'none'),
                    count(*) FILTER (WHERE planned_at IS NOT NULL
                                      AND planned_inserts + planned_updates + planned_deletes = 0),
                    coalesce(sum(planned_inserts + planned_updates + planned_deletes), 0)::bigint,
                    coalesce(sum(delivered), 0)::bigint,
                    coalesce(sum(api_calls), 0)::bigint,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - queued_at)::float8 * 1000),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM planned_at - started_at)::float8 * 1000),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - planned_at)::float8 * 1000)
                        FILTER (WHERE planned_inserts + planned_updates + planned_deletes > 0),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - queued_at)::float8 * 1000),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM planned_at - started_at)::float8 * 1000),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - planned_at)::float8 * 1000)
                        FILTER (WHERE planned_inserts + planned_updates + planned_deletes > 0)
               FROM r",
            &[&sync_id, &after_run],
        ),
    )?;
    let f = |i: usize| row.get::<_, Option<f64>>(i).unwrap_or(f64::NAN);
    Ok(RunStats {
        runs: row.get(0),
        by_status: row.get(1),
        by_scope: row.get(2),
        empty: row.get(3),
        planned: row.get(4),
        delivered: row.get(5),
        api_calls: row.get(6),
        queue_p50: f(7),
        plan_p50: f(8),
        deliver_p50: f(9),
        queue_p99: f(10),
        plan_p99: f(11),
        deliver_p99: f(12),
    })
}
