//! Worker lifecycle: SIGTERM stops a worker within a second without losing in-flight work,
//! SIGHUP reloads settings, and DROP EXTENSION / ALTER EXTENSION ... UPDATE while the workers
//! run crash nothing (they wait quietly until the catalog fits their library again), and a
//! DROP EXTENSION waits for a worker's transaction instead of deadlocking with it; a table
//! dropped with CASCADE under an on-change sync leaves the other syncs working.
//!
//! The last two tests drop the extension in the workers' database: `make e2e` runs test files
//! one after another, and every other file creates the extension when it is missing.
mod common;
use common::*;
use std::time::{Duration, Instant};

/// The server log after `offset`.
struct ServerLog {
    offset: i64,
}

impl ServerLog {
    const PATH: &'static str = SERVER_LOG;

    fn from_now(c: &mut postgres::Client) -> ServerLog {
        let offset: i64 = c.query_one(&format!("SELECT (pg_stat_file({})).size", Self::PATH), &[]).unwrap().get(0);
        ServerLog { offset }
    }

    fn text(&self, c: &mut postgres::Client) -> String {
        let size: i64 = c.query_one(&format!("SELECT (pg_stat_file({})).size", Self::PATH), &[]).unwrap().get(0);
        c.query_one(&format!("SELECT pg_read_file({}, $1, $2)", Self::PATH), &[&self.offset, &(size - self.offset)])
            .unwrap()
            .get(0)
    }
}

fn worker_pids(c: &mut postgres::Client) -> Vec<i32> {
    c.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_reverse_etl worker' ORDER BY pid", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether a server log line is a worker's error, or its failure to record a batch.
fn worker_complaint(line: &str) -> bool {
    (line.contains("pg_reverse_etl worker") && line.contains("ERROR")) || line.contains("could not record")
}

/// The worker whose activity (pg_stat_activity.query) is LIKE `activity`, if one is.
fn worker_doing(c: &mut postgres::Client, activity: &str) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_reverse_etl worker' AND query LIKE $1",
        &[&activity],
    )
    .unwrap()
    .map(|r| r.get(0))
}

#[test]
fn a_sigterm_stops_a_worker_within_a_second_and_its_run_resumes() {
    let fake = FakeWebhook::start();
    // The first request hangs for 5 s: the worker is stopped while it is in flight.
    fake.script(vec![Scripted::Delay(Duration::from_secs(5))]);
    let mut f = Fixture::new(&fake.url(), 4, "upsert", "batch_size '2', max_concurrency '1'", None);
    let run_id: i64 = f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap().get(0);
    let mut pid = 0;
    wait_until(SHORT, "a worker delivering the run", || {
        match f.client.query_opt("SELECT pid FROM retl.worker_status() WHERE run_id = $1 AND state = 'delivering'", &[&run_id]) {
            Ok(Some(row)) => {
                pid = row.get(0);
                true
            }
            _ => false,
        }
    });
    // Its first request is now in flight (the fake answers it after 5 s).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.request_count(), 0, "the request is still unanswered");

    let asked = Instant::now();
    f.exec(&format!("SELECT pg_terminate_backend({pid})"));
    wait_until(Duration::from_secs(5), "the worker to exit", || {
        f.count(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")) == 0
    });
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "the worker took {took:?} to stop");

    // The postmaster starts it again; the run resumes and nothing is lost or created twice.
    wait_until(Duration::from_secs(30), "the run to finish", || {
        f.client
            .query_one("SELECT status FROM retl.runs WHERE id = $1", &[&run_id])
            .unwrap()
            .get::<_, String>(0)
            == "succeeded"
    });
    assert_eq!(fake.records(), f.model_state());
    for id in 1..=4 {
        assert_eq!(fake.create_count(&key(id)), 1, "record {id} created once");
    }
}

/// Resets retl.log_runs whatever happens to the test.
struct LogRunsOff<'a>(&'a mut postgres::Client);
impl Drop for LogRunsOff<'_> {
    fn drop(&mut self) {
        let _ = self.0.batch_execute("ALTER SYSTEM RESET retl.log_runs");
        let _ = self.0.batch_execute("SELECT pg_reload_conf()");
    }
}

#[test]
fn a_sighup_reloads_settings_in_the_workers() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    let mut admin = connect();
    let log = ServerLog::from_now(&mut admin);
    let guard = LogRunsOff(&mut admin);
    guard.0.batch_execute("ALTER SYSTEM SET retl.log_runs = on").unwrap();
    guard.0.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let logged = f.run();
    let line = format!("pg_reverse_etl: run {} of sync {} succeeded: 3 delivered, 0 rejected, 1 API calls", logged.id, f.sync);
    wait_until(SHORT, "the run's log line", || log.text(&mut f.client).contains(&line));

    guard.0.batch_execute("ALTER SYSTEM RESET retl.log_runs").unwrap();
    guard.0.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    f.exec(&format!("UPDATE {} SET score = 0", f.table));
    let quiet = f.run();
    assert_eq!(quiet.delivered, 3);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!log.text(&mut f.client).contains(&format!("run {} of sync", quiet.id)), "logged after the reset");
    drop(guard);
}

/// Starts a run of `f`'s sync (3 rows, one batch, to `fake`, which answers it after 2 s),
/// calls `sql` while the batch is in flight, and checks that the call waited for the answer.
fn call_while_the_batch_is_in_flight(f: &mut Fixture, fake: &FakeWebhook, sql: &str) {
    f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap();
    // (The fake journals a delayed request when it answers it.)
    let delivering = format!("retl: sync {} run %: delivering 3 rows to {}", f.sync, f.server);
    wait_until(SHORT, "the request in flight", || worker_doing(&mut f.client, &delivering).is_some());
    assert_eq!(fake.request_count(), 0, "not answered yet");
    let started = Instant::now();
    f.exec(sql);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1200), "{sql} returned after {waited:?}, before the answer came");
    assert_eq!(fake.records().len(), 3, "the batch in flight was answered");
}

fn assert_no_worker_complaints(f: &mut Fixture, log: &ServerLog) {
    let text = log.text(&mut f.client);
    let complaints: Vec<&str> = text.lines().filter(|l| worker_complaint(l)).collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}

#[test]
fn a_sync_dropped_while_its_batch_is_in_flight_waits_for_the_batch_to_be_recorded() {
    // drop_sync deletes the sync's runs and outbox rows. Run between a batch's request and
    // the transaction that records its answer, it left that transaction rows gone from under
    // it; run during that transaction, the two could deadlock (each holding rows the other
    // deletes or locks). It now waits for the worker's step on the sync to end.
    let fake = FakeWebhook::start();
    fake.script(vec![Scripted::Delay(Duration::from_secs(2))]);
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    let log = ServerLog::from_now(&mut f.client);
    let sql = format!("SELECT retl.drop_sync(name => '{}')", f.sync);
    call_while_the_batch_is_in_flight(&mut f, &fake, &sql);
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.syncs WHERE name = '{}'", f.sync)), 0);
    assert_eq!(f.count("SELECT count(*) FROM retl.outbox o WHERE NOT EXISTS (SELECT FROM retl.syncs s WHERE s.id = o.sync_id)"), 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_no_worker_complaints(&mut f, &log);
}

#[test]
fn a_sync_moved_to_another_destination_while_its_batch_is_in_flight_waits_for_the_batch() {
    // A new destination empties the sync's snapshot and queue, under the batch in flight to
    // the old one (as drop_sync did): alter_sync now waits for the worker's step too.
    let old = FakeWebhook::start();
    old.script(vec![Scripted::Delay(Duration::from_secs(2))]);
    let new = FakeWebhook::start();
    let mut f = Fixture::new(&old.url(), 3, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    let moved_to = format!("{}_new", f.server);
    f.exec(&format!("CREATE SERVER {moved_to} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{}')", new.url()));
    let log = ServerLog::from_now(&mut f.client);
    let sql = format!("SELECT retl.alter_sync(name => '{}', destination => '{moved_to}')", f.sync);
    call_while_the_batch_is_in_flight(&mut f, &old, &sql);
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.snapshots s JOIN retl.syncs y ON y.id = s.sync_id WHERE y.name = '{}'", f.sync)), 0);
    // The new destination gets every row.
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 3), "{run:?}");
    assert_eq!(new.records(), f.model_state());
    assert_no_worker_complaints(&mut f, &log);
}

#[test]
fn drop_extension_and_update_while_the_workers_run() {
    let fake = FakeWebhook::start();
    fake.script((0..5).map(|_| Scripted::Delay(Duration::from_millis(300))).collect());
    let mut f = Fixture::new(&fake.url(), 10, "upsert", "batch_size '1', max_concurrency '1'", None);
    let log = ServerLog::from_now(&mut f.client);
    // A worker stopped by an earlier test may still be waiting out its restart interval.
    let mut before = Vec::new();
    wait_until(SHORT, "both workers running", || {
        before = worker_pids(&mut f.client);
        before.len() == 2
    });
    f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap();
    wait_until(SHORT, "a request in flight", || fake.request_count() >= 1);

    f.exec("DROP EXTENSION pg_reverse_etl CASCADE");
    wait_until(SHORT, "the delivering worker to notice", || {
        log.text(&mut f.client).contains("the extension is not installed in this database (CREATE EXTENSION pg_reverse_etl); waiting")
    });
    std::thread::sleep(Duration::from_millis(500));
    let waiting_lines = log.text(&mut f.client).matches("the extension is not installed in this database").count();
    assert!(waiting_lines <= 2, "each worker says it once, then waits quietly ({waiting_lines} lines)");
    // A worker (re)started in a database without the extension waits quietly too.
    let restarted_from = before[0];
    f.exec(&format!("SELECT pg_terminate_backend({restarted_from})"));
    let mut now_running = Vec::new();
    wait_until(Duration::from_secs(20), "the terminated worker to start again", || {
        now_running = worker_pids(&mut f.client);
        now_running.len() == 2 && !now_running.contains(&restarted_from)
    });
    let restarted = *now_running.iter().find(|p| !before.contains(p)).unwrap();
    wait_until(SHORT, "the new worker to say why it waits", || {
        log.text(&mut f.client).contains(&format!(
            "[{restarted}] pg_reverse_etl worker LOG:  pg_reverse_etl worker"
        ))
    });
    std::thread::sleep(Duration::from_millis(500));
    let text = log.text(&mut f.client);
    let said: Vec<&str> = text.lines().filter(|l| l.contains(&format!("[{restarted}]"))).collect();
    assert!(said.iter().any(|l| l.contains("not installed in this database")), "{said:?}");
    assert!(said.len() <= 2, "started, then one line saying why it waits: {said:?}");
    let before = now_running;
    // The library is newer than these SQL objects: the workers wait for the update.
    f.exec("CREATE EXTENSION pg_reverse_etl VERSION '0.1.0'");
    f.exec("SELECT pg_reload_conf()"); // wakes nobody by itself; the workers recheck on their own
    f.exec(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{}'", env!("CARGO_PKG_VERSION")));
    assert_eq!(worker_pids(&mut f.client), before, "no worker crashed or restarted");
    let text = log.text(&mut f.client);
    assert!(!text.contains("terminated by signal"), "{text}");
    assert!(!text.contains("PANIC"), "{text}");

    // The workers work again at once.
    let fake2 = FakeWebhook::start();
    let mut g = Fixture::new(&fake2.url(), 3, "upsert", "", None);
    let run = g.run();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 3));
    assert_eq!(worker_pids(&mut g.client), before);
}

#[test]
fn a_table_dropped_with_cascade_does_not_break_other_syncs_and_its_model_can_still_be_dropped() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    ensure_extension(&mut c);
    let base = unique("casc");
    let (gone, kept) = (format!("{base}_gone"), format!("{base}_kept"));
    let define = |c: &mut postgres::Client, name: &str| {
        c.batch_execute(&format!(
            "CREATE TABLE {name} (id bigint PRIMARY KEY, v text); INSERT INTO {name} VALUES (1, 'a');
             SELECT retl.create_model(name => '{name}_m', query => 'SELECT * FROM {name}', primary_key => '{{id}}');
             CREATE SERVER {name}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
             SELECT retl.create_sync(name => '{name}_s', model => '{name}_m', destination => '{name}_d', schedule => 'on change');",
            url = fake.url()
        ))
        .unwrap();
    };
    define(&mut c, &gone);
    let _drop = DropSyncs(vec![format!("{gone}_s"), format!("{kept}_s")]);
    // The table goes, and with it the model's view (CASCADE); the sync is left behind.
    c.batch_execute(&format!("DROP TABLE {gone} CASCADE")).unwrap();
    // Another on-change sync can still be defined, and gets its triggers.
    define(&mut c, &kept);
    let triggers: i64 = c
        .query_one(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{kept}'::regclass AND tgname LIKE 'retl%'"), &[])
        .unwrap()
        .get(0);
    assert_eq!(triggers, 5, "retl_on_change and the four retl_changed_keys triggers");
    // The orphan sync and its model can be dropped although the view is gone.
    c.batch_execute(&format!("SELECT retl.drop_sync('{gone}_s'); SELECT retl.drop_model('{gone}_m');")).unwrap();
    let left: i64 = c.query_one("SELECT count(*) FROM retl.models WHERE name = $1", &[&format!("{gone}_m")]).unwrap().get(0);
    assert_eq!(left, 0);
}

#[test]
fn drop_extension_waits_for_a_workers_transaction_instead_of_deadlocking_with_it() {
    // A worker that had locked one of the extension's tables and then waited for another one
    // the drop already held made a deadlock, and Postgres failed the DBA's DROP EXTENSION.
    // Every worker transaction now holds the extension itself first, so the drop waits for
    // the transaction at its first lock. A plan made slow by the model holds one open.
    let fake = FakeWebhook::start();
    let mut c = connect();
    ensure_extension(&mut c);
    let base = unique("dropwait");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, v text); INSERT INTO {table} VALUES (1, 'a'), (2, 'b');
         SELECT retl.create_model(name => '{model}', primary_key => '{{id}}',
                                  query => 'SELECT t.id, t.v FROM public.{table} t, (SELECT pg_sleep(3)) s');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}');",
        url = fake.url()
    ))
    .unwrap();
    c.query_one("SELECT id FROM retl.run($1)", &[&sync]).unwrap();
    let mut planner = None;
    wait_until(SHORT, "a worker to plan the slow model", || {
        planner = worker_doing(&mut c, &format!("retl: sync {sync} run %: planning"));
        planner.is_some()
    });
    let holds: Vec<String> = c
        .query(
            "SELECT mode FROM pg_locks WHERE pid = $1 AND granted AND locktype = 'object'
               AND classid = 'pg_extension'::regclass
               AND objid = (SELECT oid FROM pg_extension WHERE extname = 'pg_reverse_etl')",
            &[&planner.unwrap()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(holds, vec!["AccessShareLock".to_string()], "the planning worker holds the extension");

    let mut dropper = connect();
    let dropper_pid: i32 = dropper.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let started = Instant::now();
    let drop = std::thread::spawn(move || {
        dropper.batch_execute("DROP EXTENSION pg_reverse_etl CASCADE").map_err(|e| match e.as_db_error() {
            Some(db) => format!("{} ({:?})", db.message(), db.detail()),
            None => e.to_string(),
        })
    });
    // The drop waits on the extension, holding none of its tables.
    let mut waits_for = Vec::new();
    wait_until(SHORT, "the drop to wait", || {
        waits_for = c
            .query("SELECT locktype, classid::regclass::text FROM pg_locks WHERE pid = $1 AND NOT granted", &[&dropper_pid])
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1)))
            .collect();
        !waits_for.is_empty()
    });
    assert_eq!(waits_for, vec![("object".to_string(), Some("pg_extension".to_string()))]);
    let held: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND granted AND locktype = 'relation'
               AND relation IN (SELECT oid FROM pg_class WHERE relnamespace = 'retl'::regnamespace)",
            &[&dropper_pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "the drop holds no table while it waits");
    assert_eq!(drop.join().unwrap(), Ok(()));
    assert!(started.elapsed() < SHORT);
    let left: i64 = c.query_one("SELECT count(*) FROM pg_extension WHERE extname = 'pg_reverse_etl'", &[]).unwrap().get(0);
    assert_eq!(left, 0);
    ensure_extension(&mut c);
}
