//! retl-load: the long part of the reliability suite (docs/LOAD.md). Many syncs over one large
//! model, against a throttled destination, for a long time.
//!
//! Set-up: a table of `rows` rows (`id, email, plan, score, updated_at`) and one model over it;
//! `syncs` syncs to one webhook destination served by a strict throttled fake in this process
//! (`retl_e2e::fake_throttled`) that enforces the budget its `rate_limit` promises and answers
//! 429 past it. Of the syncs, `full` deliver the whole model (`upsert`) and the others one
//! audience each: disjoint id ranges of the model without the churned rows (`mirror`, so rows
//! whose plan becomes 'churned' are deleted and come back when it changes again). All run on
//! an interval schedule; they are kicked off together (t0) and a writer updates `writes`
//! random rows per second (score, updated_at, sometimes the plan) for `seconds`.
//!
//! Measured: per sync, runs, rows delivered, first complete delivery, the longest time without
//! service before it (no request delivered) and the longest gap between successful runs after
//! it; the destination's 429s and most requests in any 1-s and 10-s window; the memory of every
//! worker (VmRSS/RssAnon/RssShmem sampled every second, VmHWM). After the writer stops, it waits
//! until every sync has succeeded in a run started after the last write, and compares each
//! sync's destination records with its audience (or the model).
//!
//! Exit status: 0 when every check passes, 1 when any fails, 2 on a usage or set-up error.
//! Usage: `retl-load --help`.

use postgres::{Client, Transaction};
use retl_e2e::cluster::{try_connect, unique};
use retl_e2e::fake_throttled::{fields_hash, SyncCounts, ThrottledWebhook};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: retl-load [--rows N] [--syncs N] [--seconds N] [--rate R] [--full N] [--interval S]
                 [--writes N] [--churn P] [--batch N] [--concurrency N] [--starve-intervals N]
                 [--jitter-ms N] [--quiesce S] [--mem-limit-mb N] [--seed N] [--json FILE] [--keep]

Load test of pg_reverse_etl (docs/LOAD.md). Every option can also be given as an environment
variable LOAD_<NAME> (LOAD_ROWS, LOAD_SYNCS, LOAD_SECONDS, LOAD_RATE, LOAD_STARVE_INTERVALS, ...);
a flag wins over the variable. Connects with PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE.

  --rows N              rows in the table and the model (default 1000000)
  --syncs N             syncs in all (default 100), of which --full deliver the whole model and
                        the others one audience each (a disjoint id range, churned rows left out)
  --full N              whole-model syncs (default 2)
  --seconds N           how long the writer runs, from the kick-off of every sync (default 600)
  --rate R              the destination's limit, requests/s; the server's rate_limit (default 25)
  --interval S          the syncs' interval schedule, seconds (default 30)
  --writes N            rows updated per second, in 10 statements per second (default 200)
  --churn P             share of updated rows whose plan becomes 'churned' (default 0.05)
  --batch N             the server's batch_size (default 500)
  --concurrency N       the server's max_concurrency (default 4)
  --starve-intervals N  a sync starves when it waits longer than N intervals for service (default 3)
  --jitter-ms N         arrival jitter the destination forgives beyond the budget (default 50)
  --quiesce S           how long to wait for every sync to catch up after the writer (default
                        max(180, 6 intervals))
  --mem-limit-mb N      a worker whose private memory (RssAnon) exceeds this fails (default 1024)
  --seed N              seed of the writer's row choice (default: from the clock)
  --json FILE           JSON lines written here (default .run/load.json)
  --keep                keep the table, model, audiences, syncs and server afterwards";

struct Args {
    rows: i64,
    syncs: usize,
    full: usize,
    seconds: u64,
    rate: f64,
    interval: u64,
    writes: u64,
    churn: f64,
    batch: u64,
    concurrency: u64,
    starve_intervals: f64,
    jitter_ms: u64,
    quiesce: u64,
    mem_limit_mb: u64,
    seed: u64,
    json: PathBuf,
    keep: bool,
}

fn usage_error(msg: &str) -> ! {
    eprintln!("retl-load: {msg}\n\n{USAGE}");
    exit(2)
}

const OPTIONS: &[&str] = &[
    "rows", "syncs", "full", "seconds", "rate", "interval", "writes", "churn", "batch", "concurrency",
    "starve-intervals", "jitter-ms", "quiesce", "mem-limit-mb", "seed", "json", "keep",
];

fn parse_args() -> Args {
    let mut given: HashMap<String, String> = HashMap::new();
    for name in OPTIONS {
        let var = format!("LOAD_{}", name.to_uppercase().replace('-', "_"));
        if let Ok(v) = std::env::var(&var) {
            if !v.is_empty() {
                given.insert(name.to_string(), v);
            }
        }
    }
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            println!("{USAGE}");
            exit(0);
        }
        let Some(name) = arg.strip_prefix("--").filter(|n| OPTIONS.contains(n)) else {
            usage_error(&format!("unknown argument {arg:?}"));
        };
        if name == "keep" {
            given.insert(name.into(), "1".into());
            continue;
        }
        match it.next() {
            Some(v) => given.insert(name.into(), v),
            None => usage_error(&format!("--{name} needs a value")),
        };
    }
    fn get<T: std::str::FromStr>(given: &HashMap<String, String>, name: &str, default: T) -> T {
        match given.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| usage_error(&format!("--{name} (LOAD_{}): bad value {v:?}", name.to_uppercase().replace('-', "_")))),
        }
    }
    let interval = get(&given, "interval", 30u64);
    let a = Args {
        rows: get(&given, "rows", 1_000_000i64),
        syncs: get(&given, "syncs", 100usize),
        full: get(&given, "full", 2usize),
        seconds: get(&given, "seconds", 600u64),
        rate: get(&given, "rate", 25.0f64),
        interval,
        writes: get(&given, "writes", 200u64),
        churn: get(&given, "churn", 0.05f64),
        batch: get(&given, "batch", 500u64),
        concurrency: get(&given, "concurrency", 4u64),
        starve_intervals: get(&given, "starve-intervals", 3.0f64),
        jitter_ms: get(&given, "jitter-ms", 50u64),
        quiesce: get(&given, "quiesce", (6 * interval).max(180)),
        mem_limit_mb: get(&given, "mem-limit-mb", 1024u64),
        seed: get(&given, "seed", SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)),
        json: PathBuf::from(given.get("json").cloned().unwrap_or_else(|| ".run/load.json".into())),
        keep: given.get("keep").is_some_and(|v| v != "0" && v != "false"),
    };
    if a.rows < 1 || a.seconds == 0 || a.interval == 0 || a.syncs <= a.full || a.syncs - a.full > a.rows as usize {
        usage_error("--rows, --seconds and --interval must be at least 1, --syncs more than --full and at most --rows + --full");
    }
    if !(a.rate > 0.0 && a.rate <= 10_000.0) || !(1..=1000).contains(&a.batch) || !(1..=32).contains(&a.concurrency) {
        usage_error("--rate must be in (0, 10000], --batch in 1..=1000, --concurrency in 1..=32");
    }
    if !(0.0..=1.0).contains(&a.churn) || a.starve_intervals <= 0.0 {
        usage_error("--churn must be in [0, 1], --starve-intervals > 0");
    }
    a
}

type R<T> = Result<T, String>;

fn pg<T>(what: &str, r: Result<T, postgres::Error>) -> R<T> {
    r.map_err(|e| match e.as_db_error() {
        Some(db) => format!("{what}: {} ({})", db.message(), db.code().code()),
        None => format!("{what}: {e}"),
    })
}

fn connect() -> R<Client> {
    try_connect().ok_or_else(|| {
        format!(
            "cannot connect to Postgres at {}:{} (is the cluster running? make cluster)",
            std::env::var("PGHOST").unwrap_or_else(|_| "127.0.0.1".into()),
            std::env::var("PGPORT").unwrap_or_else(|_| "28815".into())
        )
    })
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// splitmix64: the writer's row choice (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One sync of the load: its name, the view it delivers and whether that is the whole model.
struct SyncDef {
    name: String,
    /// `retl_models.<view>`: the audience, or the model for whole-model syncs.
    view: String,
    full: bool,
    /// Rows of its view at set-up.
    initial_rows: i64,
}

struct Names {
    base: String,
    table: String,
    model: String,
    server: String,
    syncs: Vec<SyncDef>,
}

/// Drops everything the harness created, on a fresh connection, also after an error.
struct Cleanup {
    names: Arc<Mutex<Option<Names>>>,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let guard = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = guard.as_ref() else { return };
        if self.keep {
            println!("kept: table {}, model {}, server {}, syncs {}_*", n.table, n.model, n.server, n.base);
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let connection = loop {
            match try_connect() {
                Some(c) => break Some(c),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(1)),
                None => break None,
            }
        };
        let Some(mut c) = connection else {
            eprintln!("retl-load: cleanup: cannot connect; drop the {}_* syncs, audiences, model, server and table by hand", n.base);
            return;
        };
        let started = Instant::now();
        let mut steps: Vec<String> = n
            .syncs
            .iter()
            .map(|s| format!("SELECT retl.drop_sync('{}', if_exists => true)", s.name))
            .collect();
        steps.extend(n.syncs.iter().filter(|s| !s.full).map(|s| format!("SELECT retl.drop_audience('{}', if_exists => true)", s.view)));
        steps.push(format!("SELECT retl.drop_model('{}', if_exists => true)", n.model));
        steps.push(format!("DROP SERVER IF EXISTS {} CASCADE", n.server));
        steps.push(format!("DROP TABLE IF EXISTS {}", n.table));
        for sql in steps {
            if let Err(e) = c.batch_execute(&sql) {
                eprintln!("retl-load: cleanup: {sql}: {e}");
            }
        }
        println!("cleanup: dropped the syncs, audiences, model, server and table ({:.1} s)", started.elapsed().as_secs_f64());
    }
}

fn main() {
    let args = parse_args();
    match run(&args) {
        Ok(true) => exit(0),
        Ok(false) => exit(1),
        Err(e) => {
            eprintln!("retl-load: {e}");
            exit(2)
        }
    }
}

struct Environment {
    server_version: String,
    extension_version: String,
    workers: String,
    shared_buffers: String,
    work_mem: String,
    cpus: usize,
}

fn environment(client: &mut Client) -> R<Environment> {
    let row = pg(
        "read the server's settings",
        client.query_one(
            "SELECT current_setting('server_version'),
                    (SELECT extversion FROM pg_extension WHERE extname = 'pg_reverse_etl'),
                    coalesce(current_setting('retl.workers', true), '?'),
                    current_setting('shared_buffers'), current_setting('work_mem')",
            &[],
        ),
    )?;
    let extension_version: Option<String> = row.get(1);
    Ok(Environment {
        server_version: row.get(0),
        extension_version: extension_version.ok_or("the extension is not created in this database (CREATE EXTENSION pg_reverse_etl)")?,
        workers: row.get(2),
        shared_buffers: row.get(3),
        work_mem: row.get(4),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

fn set_up(client: &mut Client, args: &Args, names: &Arc<Mutex<Option<Names>>>, url: &str) -> R<()> {
    let base = unique("load");
    let (table, model, server) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"));
    let segments = args.syncs - args.full;
    let mut syncs = Vec::new();
    for k in 0..segments {
        syncs.push(SyncDef { name: format!("{base}_s{k}"), view: format!("{base}_a{k}"), full: false, initial_rows: 0 });
    }
    for j in 0..args.full {
        syncs.push(SyncDef { name: format!("{base}_full{j}"), view: model.clone(), full: true, initial_rows: 0 });
    }
    *names.lock().unwrap() = Some(Names { base: base.clone(), table: table.clone(), model: model.clone(), server: server.clone(), syncs });

    let started = Instant::now();
    pg(
        "create the table",
        client.batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, email text NOT NULL, plan text NOT NULL,
                                   score int NOT NULL, updated_at timestamptz NOT NULL);
             INSERT INTO {table}
             SELECT i, 'user' || i || '@example.com',
                    (ARRAY['free', 'starter', 'pro', 'enterprise', 'churned'])[1 + ((i * 2654435761) % 5)::int],
                    (i * 48271) % 1000, timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second'
               FROM generate_series(1::bigint, {rows}) i;
             ANALYZE {table};",
            rows = args.rows
        )),
    )?;
    println!("set-up: table {table} with {} rows ({:.1} s)", args.rows, started.elapsed().as_secs_f64());
    pg(
        "retl.create_model",
        client.execute(
            "SELECT retl.create_model(name => $1, query => $2, primary_key => '{id}')",
            &[&model, &format!("SELECT id, email, plan, score, updated_at FROM {table}")],
        ),
    )?;
    pg(
        "CREATE SERVER",
        client.batch_execute(&format!(
            "CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}',
                 rate_limit '{}', batch_size '{}', max_concurrency '{}')",
            args.rate, args.batch, args.concurrency
        )),
    )?;
    let schedule = format!("{} seconds", args.interval);
    let mut guard = names.lock().unwrap();
    let n = guard.as_mut().expect("names set");
    for (k, s) in n.syncs.iter_mut().enumerate() {
        if !s.full {
            // Disjoint id ranges: each audience reads its range through the primary key.
            let (lo, hi) = (args.rows * k as i64 / segments as i64, args.rows * (k as i64 + 1) / segments as i64);
            pg(
                "retl.create_audience",
                client.execute(
                    "SELECT retl.create_audience(name => $1, model => $2, filter => $3)",
                    &[&s.view, &model, &format!("id > {lo} AND id <= {hi} AND plan <> 'churned'")],
                ),
            )?;
        }
        let (target, mode) = if s.full { ("model", "upsert") } else { ("audience", "mirror") };
        pg(
            "retl.create_sync",
            client.execute(
                &format!(
                    "SELECT retl.create_sync(name => $1, {target} => $2, destination => $3, mode => '{mode}',
                                             schedule => $4, paused => true)"
                ),
                &[&s.name, &s.view, &server, &schedule],
            ),
        )?;
        s.initial_rows = pg("count a view", client.query_one(&format!("SELECT count(*) FROM retl_models.{}", s.view), &[]))?.get(0);
    }
    println!(
        "set-up: model {model}, server {server} (rate_limit {}, batch_size {}, max_concurrency {}), {} audience syncs (mirror) + {} whole-model syncs (upsert), schedule '{schedule}' ({:.1} s)",
        args.rate,
        args.batch,
        args.concurrency,
        segments,
        args.full,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One worker process as seen by the sampler.
#[derive(Clone, Debug, Default)]
struct WorkerMem {
    worker: i32,
    pid: i32,
    samples: u64,
    busy_samples: u64,
    peak_rss_kb: u64,
    hwm_kb: u64,
    peak_anon_kb: u64,
    peak_shmem_kb: u64,
    first_anon_kb: u64,
    last_anon_kb: u64,
    /// Peak RssAnon over each third of the load window (after t0).
    anon_thirds_kb: [u64; 3],
    /// (seconds since t0, RssAnon kB) every 10 s.
    anon_series: Vec<(u64, u64)>,
}

#[derive(Default)]
struct Samples {
    workers: BTreeMap<i32, WorkerMem>,
    max_queued: i64,
    max_delivering: i64,
    errors: Vec<String>,
    /// Latest (queued, delivering) runs and worker states, for the progress lines.
    last_queue: (i64, i64),
    last_states: Vec<String>,
}

/// `/proc/<pid>/status` fields in kB: VmRSS, VmHWM, RssAnon, RssShmem.
fn proc_status(pid: i32) -> Option<[u64; 4]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut out = [0u64; 4];
    for line in text.lines() {
        let idx = match line.split(':').next()? {
            "VmRSS" => 0,
            "VmHWM" => 1,
            "RssAnon" => 2,
            "RssShmem" => 3,
            _ => continue,
        };
        out[idx] = line.split_whitespace().nth(1)?.parse().ok()?;
    }
    Some(out)
}

/// Every second until `stop`: the workers' pids and states, their memory, the run queue.
fn sampler(stop: Arc<AtomicBool>, samples: Arc<Mutex<Samples>>, t0: Instant, window: f64) {
    let mut client = None;
    let mut tick = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let next = Instant::now() + Duration::from_secs(1);
        if client.is_none() {
            client = try_connect();
        }
        if let Some(c) = client.as_mut() {
            let elapsed = t0.elapsed().as_secs_f64();
            let workers = c.query("SELECT worker, pid, state FROM retl.worker_status()", &[]);
            let queue = c.query_one(
                "SELECT count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'delivering')
                   FROM retl.runs WHERE status IN ('queued', 'delivering')",
                &[],
            );
            let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
            match (workers, queue) {
                (Ok(rows), Ok(q)) => {
                    let (queued, delivering): (i64, i64) = (q.get(0), q.get(1));
                    s.max_queued = s.max_queued.max(queued);
                    s.max_delivering = s.max_delivering.max(delivering);
                    s.last_queue = (queued, delivering);
                    s.last_states.clear();
                    for r in rows {
                        let (worker, pid, state): (i32, i32, String) = (r.get(0), r.get(1), r.get(2));
                        s.last_states.push(state.clone());
                        if pid <= 0 {
                            continue;
                        }
                        let Some([rss, hwm, anon, shmem]) = proc_status(pid) else { continue };
                        let w = s.workers.entry(pid).or_insert_with(|| WorkerMem { worker, pid, first_anon_kb: anon, ..Default::default() });
                        w.samples += 1;
                        if !matches!(state.as_str(), "idle" | "starting" | "stopped") {
                            w.busy_samples += 1;
                        }
                        w.peak_rss_kb = w.peak_rss_kb.max(rss);
                        w.hwm_kb = w.hwm_kb.max(hwm);
                        w.peak_anon_kb = w.peak_anon_kb.max(anon);
                        w.peak_shmem_kb = w.peak_shmem_kb.max(shmem);
                        w.last_anon_kb = anon;
                        let third = ((elapsed / window * 3.0) as usize).min(2);
                        w.anon_thirds_kb[third] = w.anon_thirds_kb[third].max(anon);
                        if tick % 10 == 0 {
                            w.anon_series.push((elapsed as u64, anon));
                        }
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    if s.errors.len() < 5 {
                        s.errors.push(e.to_string());
                    }
                    client = None;
                }
            }
        }
        tick += 1;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

struct WriterReport {
    statements: u64,
    rows: u64,
    max_lag_ms: f64,
    error: Option<String>,
}

/// `writes` random rows per second, in statements paced 10 per second (open loop), until `until`.
fn writer(table: String, rows: i64, writes: u64, churn: f64, seed: u64, t0: Instant, until: Instant) -> WriterReport {
    let mut report = WriterReport { statements: 0, rows: 0, max_lag_ms: 0.0, error: None };
    let Some(mut c) = try_connect() else {
        report.error = Some("the writer cannot connect".into());
        return report;
    };
    let per_second = writes.clamp(1, 10);
    let stmt = match c.prepare(&format!(
        "UPDATE {table} SET score = (score + 1 + floor(random() * 997)::int) % 1000, updated_at = clock_timestamp(),
                plan = CASE WHEN plan = 'churned' THEN 'pro' WHEN random() < $2 THEN 'churned' ELSE plan END
          WHERE id = ANY($1)"
    )) {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(format!("prepare the writer's UPDATE: {e}"));
            return report;
        }
    };
    let mut rng = Rng(seed);
    let mut i = 0u64;
    loop {
        let due = t0 + Duration::from_nanos(i * 1_000_000_000 / per_second);
        if due >= until {
            break;
        }
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        } else {
            report.max_lag_ms = report.max_lag_ms.max((now - due).as_secs_f64() * 1000.0);
        }
        // Spread `writes` over the statements of each second.
        let n = writes * (i % per_second + 1) / per_second - writes * (i % per_second) / per_second;
        let ids: Vec<i64> = (0..n).map(|_| (rng.next() % rows as u64) as i64 + 1).collect();
        match c.execute(&stmt, &[&ids, &churn]) {
            Ok(k) => {
                report.statements += 1;
                report.rows += k;
            }
            Err(e) => {
                report.error = Some(format!("writer: {e}"));
                return report;
            }
        }
        i += 1;
    }
    report
}

/// A run of one of our syncs, times relative to t0 in seconds.
struct RunRow {
    sync: String,
    trigger: String,
    status: String,
    queued: f64,
    started: Option<f64>,
    finished: Option<f64>,
    delivered: i64,
    api_calls: i64,
    error: Option<String>,
}

fn read_runs(client: &mut Client, base: &str, t0_unix: f64) -> R<Vec<RunRow>> {
    let rows = pg(
        "read the runs",
        client.query(
            "SELECT s.name, r.trigger, r.status, extract(epoch FROM r.queued_at)::float8 - $2,
                    extract(epoch FROM r.started_at)::float8 - $2, extract(epoch FROM r.finished_at)::float8 - $2,
                    coalesce(r.delivered, 0)::int8, coalesce(r.api_calls, 0)::int8, r.error
               FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
              WHERE s.name LIKE $1 ORDER BY r.id",
            &[&format!("{base}\\_%"), &t0_unix],
        ),
    )?;
    Ok(rows
        .iter()
        .map(|r| RunRow {
            sync: r.get(0),
            trigger: r.get(1),
            status: r.get(2),
            queued: r.get(3),
            started: r.get(4),
            finished: r.get(5),
            delivered: r.get(6),
            api_calls: r.get(7),
            error: r.get(8),
        })
        .collect())
}

/// Syncs (of ours) that have not yet succeeded in a run started after `since_unix`, or still
/// have a run queued or delivering.
fn not_caught_up(client: &mut Client, base: &str, since_unix: f64) -> R<Vec<String>> {
    let rows = pg(
        "check which syncs caught up",
        client.query(
            "SELECT s.name FROM retl.syncs s
              WHERE s.name LIKE $1
                AND (NOT EXISTS (SELECT 1 FROM retl.runs r WHERE r.sync_id = s.id AND r.status = 'succeeded'
                                    AND r.started_at > to_timestamp($2))
                     OR EXISTS (SELECT 1 FROM retl.runs r WHERE r.sync_id = s.id AND r.status IN ('queued', 'delivering')))
              ORDER BY s.name",
            &[&format!("{base}\\_%"), &since_unix],
        ),
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Differences between a sync's destination records and its view: (missing, stale, extra,
/// an example).
fn compare(tx: &mut Transaction, view: &str, mut held: HashMap<String, u64>) -> R<(u64, u64, u64, Option<String>)> {
    let portal = pg("read the view", tx.bind(&format!("SELECT to_jsonb(m.*)::text FROM retl_models.{view} m"), &[]))?;
    let (mut missing, mut stale, mut example) = (0u64, 0u64, None);
    loop {
        let rows = pg("read the view", tx.query_portal(&portal, 50_000))?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            let text: String = r.get(0);
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("to_jsonb gave no JSON ({e}): {text}"))?;
            let key = json!({ "id": v["id"] }).to_string();
            match held.remove(&key) {
                None => {
                    missing += 1;
                    example.get_or_insert_with(|| format!("missing {key}"));
                }
                Some(h) if h != fields_hash(&v) => {
                    stale += 1;
                    example.get_or_insert_with(|| format!("stale {key} (model: {text})"));
                }
                Some(_) => {}
            }
        }
    }
    let extra = held.len() as u64;
    if let Some(k) = held.keys().next() {
        example.get_or_insert_with(|| format!("extra {k}"));
    }
    Ok((missing, stale, extra, example))
}

/// Most seconds without service: from t0 to the first applied request, between applied requests
/// and from the last to `until`.
fn longest_silence(arrivals: &[f64], until: f64) -> f64 {
    let mut last = 0.0f64;
    let mut worst = 0.0f64;
    for &a in arrivals.iter().filter(|&&a| a <= until) {
        worst = worst.max(a - last);
        last = a;
    }
    worst.max(until - last)
}

struct SyncResult {
    name: String,
    full: bool,
    initial_rows: i64,
    runs: usize,
    succeeded: usize,
    failed: usize,
    delivered: i64,
    api_calls: i64,
    first_complete: Option<f64>,
    fill_silence: Option<f64>,
    steady_gap: Option<f64>,
    starved: bool,
    counts: SyncCounts,
    missing: u64,
    stale: u64,
    extra: u64,
    example: Option<String>,
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn run(args: &Args) -> R<bool> {
    let mut client = connect()?;
    let env = environment(&mut client)?;
    let fake = ThrottledWebhook::start(args.rate, Duration::from_millis(args.jitter_ms), args.batch as usize)
        .map_err(|e| format!("cannot start the throttled destination on 127.0.0.1: {e}"))?;
    println!(
        "retl-load: {} rows, {} syncs ({} whole-model), {} s, destination limit {} req/s (jitter {} ms) at {}, interval {} s, {} row updates/s, seed {}",
        args.rows, args.syncs, args.full, args.seconds, args.rate, args.jitter_ms, fake.url(), args.interval, args.writes, args.seed
    );
    println!(
        "environment: PostgreSQL {}, pg_reverse_etl {}, retl.workers = {}, shared_buffers {}, work_mem {}, {} CPUs",
        env.server_version, env.extension_version, env.workers, env.shared_buffers, env.work_mem, env.cpus
    );
    let names: Arc<Mutex<Option<Names>>> = Arc::default();
    // Declared after the fake, so it runs first: the syncs go before their destination.
    let _cleanup = Cleanup { names: names.clone(), keep: args.keep };
    set_up(&mut client, args, &names, &fake.url())?;
    let (base, table, defs): (String, String, Vec<(String, String, bool, i64)>) = {
        let g = names.lock().unwrap();
        let n = g.as_ref().unwrap();
        (n.base.clone(), n.table.clone(), n.syncs.iter().map(|s| (s.name.clone(), s.view.clone(), s.full, s.initial_rows)).collect())
    };
    let initial_requests: i64 = defs.iter().map(|d| (d.3 + args.batch as i64 - 1) / args.batch as i64).sum();
    let fill_estimate = initial_requests as f64 / args.rate;
    let limit = args.starve_intervals * args.interval as f64;
    println!(
        "initial delivery: {} rows in at least {initial_requests} requests: {fill_estimate:.0} s at {} req/s; starvation: waiting more than {limit:.0} s ({} intervals) for service",
        defs.iter().map(|d| d.3).sum::<i64>(),
        args.rate,
        args.starve_intervals
    );

    // Kick-off: every sync resumed (its schedule starts now) and run, in one transaction.
    {
        let mut tx = pg("begin", client.transaction())?;
        for d in &defs {
            pg("retl.resume", tx.execute("SELECT retl.resume($1)", &[&d.0]))?;
            pg("retl.run", tx.execute("SELECT 1 FROM retl.run($1)", &[&d.0]))?;
        }
        pg("commit the kick-off", tx.commit())?;
    }
    let t0 = Instant::now();
    let t0_unix = unix_now();
    let fake_offset = (t0 - fake.started()).as_secs_f64();
    let window = args.seconds as f64;
    let until = t0 + Duration::from_secs(args.seconds);

    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let sampler_thread = {
        let (stop, samples) = (stop.clone(), samples.clone());
        std::thread::spawn(move || sampler(stop, samples, t0, window))
    };
    let writer_thread = {
        let (table, rows, writes, churn, seed) = (table.clone(), args.rows, args.writes, args.churn, args.seed);
        std::thread::spawn(move || writer(table, rows, writes, churn, seed, t0, until))
    };

    // Progress every 30 s while the writer runs.
    let mut next_report = t0 + Duration::from_secs(30);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200).min(until.saturating_duration_since(Instant::now())));
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(30);
            let t = fake.totals();
            let done: i64 = pg(
                "progress",
                client.query_one(
                    "SELECT count(DISTINCT s.id) FROM retl.syncs s JOIN retl.runs r ON r.sync_id = s.id
                      WHERE s.name LIKE $1 AND r.status = 'succeeded'",
                    &[&format!("{base}\\_%")],
                ),
            )?
            .get(0);
            let s = samples.lock().unwrap();
            let anon: Vec<String> = s.workers.values().map(|w| format!("{}:{}MB", w.worker, w.last_anon_kb / 1024)).collect();
            println!(
                "  t={:>4.0}s  syncs with a success {done}/{}  requests {} (429: {})  runs queued/delivering {}/{}  workers {:?} anon {}",
                t0.elapsed().as_secs_f64(),
                defs.len(),
                t.requests,
                t.throttled,
                s.last_queue.0,
                s.last_queue.1,
                s.last_states,
                anon.join(" ")
            );
        }
    }
    let writer_report = writer_thread.join().map_err(|_| "the writer panicked".to_string())?;
    let t_end_unix = unix_now();
    let t_end = t_end_unix - t0_unix;
    if let Some(e) = &writer_report.error {
        return Err(e.clone());
    }
    println!(
        "writer: {} rows in {} statements over {} s (worst lag behind schedule {:.0} ms); waiting for every sync to catch up (at most {} s)",
        writer_report.rows, writer_report.statements, args.seconds, writer_report.max_lag_ms, args.quiesce
    );

    // Quiescence: every sync succeeded in a run that started after the last write.
    let quiesce_started = Instant::now();
    let mut behind;
    loop {
        behind = not_caught_up(&mut client, &base, t_end_unix)?;
        if behind.is_empty() || quiesce_started.elapsed() > Duration::from_secs(args.quiesce) {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let quiesce_secs = quiesce_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let _ = sampler_thread.join();
    // A last reading of every worker's high-water mark.
    let mut samples = Arc::try_unwrap(samples).map_err(|_| "sampler still running")?.into_inner().unwrap();
    for w in samples.workers.values_mut() {
        if let Some([_, hwm, _, _]) = proc_status(w.pid) {
            w.hwm_kb = w.hwm_kb.max(hwm);
        }
    }

    // Per sync: runs, starvation, destination state.
    let runs = read_runs(&mut client, &base, t0_unix)?;
    let per_sync_counts = fake.per_sync();
    let mut results = Vec::new();
    let mut tx = pg("begin", client.transaction())?;
    for (name, view, full, initial_rows) in &defs {
        let mine: Vec<&RunRow> = runs.iter().filter(|r| &r.sync == name).collect();
        let successes: Vec<f64> =
            mine.iter().filter(|r| r.status == "succeeded").filter_map(|r| r.finished).collect();
        let first_complete = successes.first().copied();
        let counts = per_sync_counts.get(name).cloned().unwrap_or_default();
        let arrivals: Vec<f64> = counts.arrivals.iter().map(|a| a - fake_offset).collect();
        let fill_silence = first_complete.map(|f| longest_silence(&arrivals, f));
        let steady_gap = first_complete.filter(|&f| f <= t_end).map(|f| {
            let mut worst = 0.0f64;
            let mut last = f;
            for &s in successes.iter().filter(|&&s| s > f && s <= t_end) {
                worst = worst.max(s - last);
                last = s;
            }
            worst.max(t_end - last)
        });
        let starved = match (first_complete, fill_silence) {
            (None, _) => true,
            (Some(f), _) if f > t_end => longest_silence(&arrivals, t_end) > limit,
            (_, fs) => fs.unwrap_or(0.0) > limit || steady_gap.unwrap_or(0.0) > limit,
        };
        let (missing, stale, extra, example) = compare(&mut tx, view, fake.records(name))?;
        results.push(SyncResult {
            name: name.clone(),
            full: *full,
            initial_rows: *initial_rows,
            runs: mine.len(),
            succeeded: successes.len(),
            failed: mine.iter().filter(|r| r.status == "failed").count(),
            delivered: mine.iter().map(|r| r.delivered).sum(),
            api_calls: mine.iter().map(|r| r.api_calls).sum(),
            first_complete,
            fill_silence,
            steady_gap,
            starved,
            counts,
            missing,
            stale,
            extra,
            example,
        });
    }
    pg("end", tx.commit())?;
    let totals = fake.totals();

    // Checks.
    let jitter = args.jitter_ms as f64 / 1000.0;
    let burst = args.rate.max(1.0);
    let bound = |t: f64| (burst + args.rate * t + args.rate * jitter).floor() as u64 + 1;
    let (bound_1s, bound_10s) = (bound(1.0), bound(10.0));
    let starved: Vec<&SyncResult> = results.iter().filter(|r| r.starved).collect();
    let mismatched: Vec<&SyncResult> = results.iter().filter(|r| r.missing + r.stale + r.extra > 0).collect();
    let redundant: u64 = results.iter().map(|r| r.counts.redundant).sum();
    let absent_deletes: u64 = results.iter().map(|r| r.counts.absent_deletes).sum();
    let duplicate_inserts: u64 = results.iter().map(|r| r.counts.duplicate_inserts).sum();
    let mem_limit_kb = args.mem_limit_mb * 1024;
    let over_memory: Vec<&WorkerMem> = samples.workers.values().filter(|w| w.peak_anon_kb > mem_limit_kb).collect();
    let rate_ok = totals.throttled == 0 && totals.max_in_1s <= bound_1s && totals.max_in_10s <= bound_10s;
    let state_ok = mismatched.is_empty() && behind.is_empty() && redundant == 0 && absent_deletes == 0 && duplicate_inserts == 0;
    let contract_ok = totals.invalid == 0;
    let ok = starved.is_empty() && rate_ok && state_ok && contract_ok && over_memory.is_empty();

    // Report.
    let worst_by = |f: &dyn Fn(&SyncResult) -> Option<f64>| {
        results.iter().filter_map(|r| f(r).map(|v| (v, r.name.as_str()))).max_by(|a, b| a.0.total_cmp(&b.0))
    };
    let first_seg: Vec<f64> = results.iter().filter(|r| !r.full).filter_map(|r| r.first_complete).collect();
    let first_full: Vec<f64> = results.iter().filter(|r| r.full).filter_map(|r| r.first_complete).collect();
    let fill_end = results.iter().filter_map(|r| r.first_complete).fold(0.0f64, f64::max);
    let fill_requests = totals.per_second.iter().enumerate().filter(|(s, _)| {
        let t = *s as f64 - fake_offset;
        t >= 0.0 && t < fill_end
    });
    let fill_rate = fill_requests.map(|(_, n)| *n).sum::<u64>() as f64 / fill_end.max(1e-9);
    let run_status: BTreeMap<String, usize> = runs.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.status.clone()).or_default() += 1;
        m
    });
    let run_errors: BTreeMap<String, usize> = runs.iter().filter_map(|r| r.error.clone()).fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.chars().take(160).collect()).or_default() += 1;
        m
    });
    let scheduled_runs = runs.iter().filter(|r| r.trigger == "schedule").count();
    let queue_waits: Vec<f64> = runs.iter().filter_map(|r| r.started.map(|s| s - r.queued)).collect();
    let yes = |b: bool| if b { "ok" } else { "FAILED" };

    println!("\n== retl-load results ==");
    println!("runs: {} ({} scheduled), by status {:?}; queue wait p50 {:.2} s, p99 {:.2} s, max {:.2} s; most queued/delivering at once {}/{}",
        runs.len(), scheduled_runs, run_status, pct(&queue_waits, 50.0), pct(&queue_waits, 99.0), pct(&queue_waits, 100.0), samples.max_queued, samples.max_delivering);
    for (e, n) in run_errors.iter().take(5) {
        println!("  run error x{n}: {e}");
    }
    println!(
        "first complete delivery (s after t0): audiences p50 {:.1}, max {:.1}; whole-model p50 {:.1}, max {:.1}; all done at {fill_end:.1} s (estimate at the rate limit {fill_estimate:.0} s; achieved {fill_rate:.1} req/s of {})",
        pct(&first_seg, 50.0), pct(&first_seg, 100.0), pct(&first_full, 50.0), pct(&first_full, 100.0), args.rate
    );
    if let Some((v, n)) = worst_by(&|r| r.fill_silence) {
        println!("longest wait for service before the first complete delivery: {v:.1} s ({n})");
    }
    if let Some((v, n)) = worst_by(&|r| r.steady_gap) {
        println!("longest gap between successful runs after it (to the writer's end): {v:.1} s ({n}); interval {} s", args.interval);
    }
    println!(
        "starvation (waited > {limit:.0} s): {} syncs  [{}]",
        starved.len(),
        yes(starved.is_empty())
    );
    for r in starved.iter().take(5) {
        println!("  starved: {} first complete {:?} fill silence {:?} steady gap {:?} runs {} succeeded {} failed {}",
            r.name, r.first_complete.map(r2), r.fill_silence.map(r2), r.steady_gap.map(r2), r.runs, r.succeeded, r.failed);
    }
    println!(
        "destination: {} requests, {} applied records, {} replays, {} invalid; 429s {}; most in any 1 s {} (bucket allows {bound_1s}), in any 10 s {} (allows {bound_10s}); limit {} req/s, burst {}  [{}]",
        totals.requests,
        results.iter().map(|r| r.counts.records).sum::<u64>(),
        totals.replays,
        totals.invalid,
        totals.throttled,
        totals.max_in_1s,
        totals.max_in_10s,
        args.rate,
        burst,
        yes(rate_ok && contract_ok)
    );
    if totals.throttled > 0 {
        println!("  the earliest throttled request was {:.1} ms ahead of the budget", totals.max_early_ms);
    }
    for reason in &totals.invalid_reasons {
        println!("  invalid: {reason}");
    }
    println!(
        "final state (after {quiesce_secs:.0} s to catch up): {} syncs differ from their view, {} not caught up; redundant writes {redundant}, deletes of absent keys {absent_deletes}, duplicate inserts {duplicate_inserts}  [{}]",
        mismatched.len(),
        behind.len(),
        yes(state_ok)
    );
    for r in mismatched.iter().take(5) {
        println!("  {}: missing {}, stale {}, extra {}; e.g. {}", r.name, r.missing, r.stale, r.extra, r.example.as_deref().unwrap_or(""));
    }
    for name in behind.iter().take(5) {
        println!("  not caught up: {name}");
    }
    println!("worker memory (MB; RssAnon = the process's private memory, VmHWM = peak RSS including shared buffers it touched):");
    for w in samples.workers.values() {
        println!(
            "  worker {} pid {}: RssAnon peak {:.1} (start {:.1}, end {:.1}; peak per third {:.1}/{:.1}/{:.1}), VmRSS peak {:.1}, VmHWM {:.1}, RssShmem peak {:.1}; busy {:.0}% of {} samples  [{}]",
            w.worker, w.pid, kb(w.peak_anon_kb), kb(w.first_anon_kb), kb(w.last_anon_kb),
            kb(w.anon_thirds_kb[0]), kb(w.anon_thirds_kb[1]), kb(w.anon_thirds_kb[2]),
            kb(w.peak_rss_kb), kb(w.hwm_kb), kb(w.peak_shmem_kb),
            100.0 * w.busy_samples as f64 / w.samples.max(1) as f64, w.samples,
            yes(w.peak_anon_kb <= mem_limit_kb)
        );
    }
    if samples.workers.len() as u64 > env.workers.parse::<u64>().unwrap_or(0) {
        println!("  (more pids than retl.workers: a worker was restarted)");
    }
    for e in &samples.errors {
        println!("  sampler error: {e}");
    }
    println!("RESULT: {}", if ok { "passed" } else { "FAILED" });

    // JSON lines.
    let mut lines = vec![json!({
        "kind": "summary", "passed": ok, "at": t0_unix,
        "config": {"rows": args.rows, "syncs": args.syncs, "full": args.full, "seconds": args.seconds, "rate": args.rate,
                   "interval": args.interval, "writes": args.writes, "churn": args.churn, "batch": args.batch,
                   "concurrency": args.concurrency, "starve_intervals": args.starve_intervals, "jitter_ms": args.jitter_ms,
                   "mem_limit_mb": args.mem_limit_mb, "seed": args.seed},
        "environment": {"postgres": env.server_version, "extension": env.extension_version, "workers": env.workers,
                        "shared_buffers": env.shared_buffers, "work_mem": env.work_mem, "cpus": env.cpus},
        "writer": {"rows": writer_report.rows, "statements": writer_report.statements, "max_lag_ms": r2(writer_report.max_lag_ms)},
        "runs": {"total": runs.len(), "scheduled": scheduled_runs, "by_status": run_status, "errors": run_errors,
                 "queue_wait_p50_s": r2(pct(&queue_waits, 50.0)), "queue_wait_p99_s": r2(pct(&queue_waits, 99.0)),
                 "queue_wait_max_s": r2(pct(&queue_waits, 100.0)), "max_queued": samples.max_queued, "max_delivering": samples.max_delivering},
        "fill": {"initial_requests": initial_requests, "estimate_s": r2(fill_estimate), "done_s": r2(fill_end),
                 "achieved_req_per_s": r2(fill_rate),
                 "first_complete_audience_p50_s": r2(pct(&first_seg, 50.0)), "first_complete_audience_max_s": r2(pct(&first_seg, 100.0)),
                 "first_complete_full_p50_s": r2(pct(&first_full, 50.0)), "first_complete_full_max_s": r2(pct(&first_full, 100.0))},
        "starvation": {"limit_s": limit, "starved": starved.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                       "worst_fill_silence_s": worst_by(&|r| r.fill_silence).map(|w| r2(w.0)),
                       "worst_steady_gap_s": worst_by(&|r| r.steady_gap).map(|w| r2(w.0))},
        "destination": {"requests": totals.requests, "throttled_429": totals.throttled, "replays": totals.replays,
                        "invalid": totals.invalid, "max_in_1s": totals.max_in_1s, "bound_1s": bound_1s,
                        "max_in_10s": totals.max_in_10s, "bound_10s": bound_10s, "max_early_ms": r2(totals.max_early_ms),
                        "per_second": totals.per_second, "per_second_starts_before_t0_s": r2(fake_offset)},
        "final_state": {"mismatched_syncs": mismatched.len(), "not_caught_up": behind, "quiesce_s": r2(quiesce_secs),
                        "redundant_writes": redundant, "absent_deletes": absent_deletes, "duplicate_inserts": duplicate_inserts},
    })];
    for w in samples.workers.values() {
        lines.push(json!({
            "kind": "worker", "worker": w.worker, "pid": w.pid, "samples": w.samples,
            "busy_share": r2(w.busy_samples as f64 / w.samples.max(1) as f64),
            "rss_anon_peak_mb": r2(kb(w.peak_anon_kb)), "rss_anon_start_mb": r2(kb(w.first_anon_kb)), "rss_anon_end_mb": r2(kb(w.last_anon_kb)),
            "rss_anon_peak_by_third_mb": w.anon_thirds_kb.iter().map(|&k| r2(kb(k))).collect::<Vec<_>>(),
            "vm_rss_peak_mb": r2(kb(w.peak_rss_kb)), "vm_hwm_mb": r2(kb(w.hwm_kb)), "rss_shmem_peak_mb": r2(kb(w.peak_shmem_kb)),
            "rss_anon_every_10s_kb": w.anon_series,
        }));
    }
    for r in &results {
        lines.push(json!({
            "kind": "sync", "sync": r.name, "whole_model": r.full, "initial_rows": r.initial_rows,
            "runs": r.runs, "succeeded": r.succeeded, "failed": r.failed, "delivered": r.delivered, "api_calls": r.api_calls,
            "first_complete_s": r.first_complete.map(r2), "fill_silence_s": r.fill_silence.map(r2),
            "steady_gap_s": r.steady_gap.map(r2), "starved": r.starved,
            "destination": {"requests": r.counts.requests, "records": r.counts.records, "creates": r.counts.creates,
                            "updates": r.counts.updates, "deletes": r.counts.deletes, "redundant": r.counts.redundant,
                            "absent_deletes": r.counts.absent_deletes, "duplicate_inserts": r.counts.duplicate_inserts},
            "missing": r.missing, "stale": r.stale, "extra": r.extra,
        }));
    }
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let mut f = std::fs::File::create(&args.json).map_err(|e| format!("write {}: {e}", args.json.display()))?;
    for l in lines {
        writeln!(f, "{l}").map_err(|e| format!("write {}: {e}", args.json.display()))?;
    }
    println!("JSON lines: {}", args.json.display());
    Ok(ok)
}

fn kb(v: u64) -> f64 {
    v as f64 / 1024.0
}
