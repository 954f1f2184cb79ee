//! The worker killed with SIGKILL mid-delivery: the server restarts it, it resumes the run,
//! and the destination converges to the model with nothing lost and nothing created twice.
mod common;
use common::*;
use std::time::Duration;

/// The worker delivering `run_id`, as `retl.worker_status()` shows it.
fn worker_pid(client: &mut postgres::Client, run_id: i64) -> Option<i32> {
    client
        .query_opt("SELECT pid FROM retl.worker_status() WHERE run_id = $1", &[&run_id])
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

#[test]
fn worker_killed_mid_delivery_converges_without_loss_or_duplicate_creates() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 60, "upsert", "batch_size '5', max_concurrency '1'", None);
    // Every request takes 250 ms: 12 batches ≈ 3 s, a wide window to kill the worker in.
    fake.script((0..40).map(|_| Scripted::Delay(Duration::from_millis(250))).collect());
    let run_id: i64 = f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap().get(0);
    wait_until(SHORT, "a few batches to arrive", || fake.request_count() >= 4);
    // Between two slices of the run its worker shows no run: look until it shows it again.
    let mut pid = None;
    wait_until(SHORT, "a worker delivering the run", || {
        pid = worker_pid(&mut f.client, run_id);
        pid.is_some()
    });
    let pid = pid.expect("a worker delivering the run");
    let killed = unsafe { libc_kill(pid, 9) };
    assert_eq!(killed, 0, "kill -9 {pid}");
    drop(f.client);

    // The postmaster reinitialises after a crash; reconnect and wait for the resumed run.
    // A connection made in the moment before the postmaster starts its crash restart is
    // terminated by it: connect again whenever the connection is gone.
    let mut client = retl_e2e::cluster::reconnect(Duration::from_secs(60));
    wait_for_success_through_restarts(&mut client, run_id);
    let workers: Vec<i32> = client
        .query("SELECT pid FROM retl.worker_status()", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(workers.len(), 2, "both workers restarted");
    assert!(!workers.contains(&pid) && workers.iter().all(|&p| p != 0), "{workers:?} after killing {pid}");

    f.client = client;
    assert_eq!(fake.records(), f.model_state(), "the destination equals the model");
    for id in 1..=60 {
        assert_eq!(fake.create_count(&key(id)), 1, "record {id} created exactly once");
    }
    assert_eq!(f.outbox_rows(), 0);
    let snapshot = f.count(&format!(
        "SELECT count(*) FROM retl.snapshots sn JOIN retl.syncs s ON s.id = sn.sync_id WHERE s.name = '{}'",
        f.sync
    ));
    assert_eq!(snapshot, 60);
    // And a further run has nothing left to send.
    fake.clear_journal();
    let run = f.run();
    assert_eq!((run.delivered, run.api_calls), (0, 0));
}

/// A small deterministic generator (xorshift64*), seeded per test run and printed, so a
/// failing sequence of kill points can be replayed with RETL_KILL_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    }
}

/// Runs `sql`, reconnecting while the server restarts after a crash.
fn query_through_restarts(client: &mut postgres::Client, sql: &str) -> Vec<postgres::Row> {
    loop {
        match client.query(sql, &[]) {
            Ok(rows) => return rows,
            Err(_) => *client = retl_e2e::cluster::reconnect(Duration::from_secs(60)),
        }
    }
}

/// Waits until run `run_id` has succeeded, reconnecting while the server restarts.
fn wait_for_success_through_restarts(client: &mut postgres::Client, run_id: i64) {
    wait_until(Duration::from_secs(90), "the interrupted run to finish", || {
        let rows = query_through_restarts(client, &format!("SELECT status FROM retl.runs WHERE id = {run_id}"));
        rows[0].get::<_, String>(0) == "succeeded"
    });
}

#[test]
fn twenty_kills_at_random_points_of_plan_and_delivery_lose_nothing_and_create_nothing_twice() {
    let seed: u64 = std::env::var("RETL_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("RETL_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let fake = FakeWebhook::start();
    // A mirror sync (inserts, updates and deletes) in batches of 50, each request taking 60 ms:
    // each round's ~700 changes take about half a second to plan and deliver.
    let mut f = Fixture::new(&fake.url(), 3000, "mirror", "batch_size '50', max_concurrency '2'", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    fake.script((0..4000).map(|_| Scripted::Delay(Duration::from_millis(60))).collect());
    let mut next_id = 3001;
    let mut phases = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..20 {
        // Change the model: updates, new keys (never reused), deletes.
        let sql = format!(
            "UPDATE {t} SET score = score + 1 WHERE id % 5 = {u};
             INSERT INTO {t} SELECT i, 'user' || i || '@example.com', 'Person ' || i, 0 FROM generate_series({next_id}, {last}) i;
             DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY md5(id::text || '{d}') LIMIT 5);",
            t = f.table,
            u = rng.next(5),
            last = next_id + 39,
            d = rng.next(1_000_000),
        );
        next_id += 40;
        query_through_restarts(&mut f.client, "SELECT 1");
        f.client.batch_execute(&sql).unwrap();
        let run_id: i64 = f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap().get(0);
        std::thread::sleep(Duration::from_millis(rng.next(700)));
        // The worker on this run if it has one (planning or delivering), else any worker.
        let rows = f
            .client
            .query("SELECT pid, state FROM retl.worker_status() ORDER BY (run_id = $1) DESC NULLS LAST, worker LIMIT 1", &[&run_id])
            .unwrap();
        let (pid, state): (i32, String) = (rows[0].get(0), rows[0].get(1));
        let status: String = f.client.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&run_id]).unwrap().get(0);
        *phases.entry(format!("run {status}, worker {state}")).or_default() += 1;
        assert_eq!(unsafe { libc_kill(pid, 9) }, 0, "kill -9 {pid}");
        // Wait for the crash restart to begin, then for the server to be back.
        std::thread::sleep(Duration::from_millis(300));
        f.client = retl_e2e::cluster::reconnect(Duration::from_secs(60));
    }
    eprintln!("kill points: {phases:?}");
    // Every interrupted run finishes by itself; then one more run has nothing left to do.
    wait_until(Duration::from_secs(120), "the interrupted runs to finish", || {
        let rows = query_through_restarts(
            &mut f.client,
            &format!(
                "SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
                  WHERE s.name = '{}' AND r.status IN ('queued', 'delivering')",
                f.sync
            ),
        );
        rows[0].get::<_, i64>(0) == 0
    });
    let last = f.run();
    assert_eq!(last.status, "succeeded", "{last:?}");
    let settled = f.run();
    assert_eq!((settled.inserts, settled.updates, settled.deletes, settled.api_calls), (0, 0, 0, 0), "{settled:?}");
    assert_eq!(fake.records(), f.model_state(), "the destination equals the model (seed {seed})");
    for id in 1..next_id {
        assert!(fake.create_count(&key(id)) <= 1, "record {id} created more than once (seed {seed})");
    }
    assert_eq!(f.outbox_rows(), 0);
}

#[test]
fn an_immediate_shutdown_mid_run_then_restart_converges() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 60, "upsert", "batch_size '5', max_concurrency '1'", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    fake.script((0..40).map(|_| Scripted::Delay(Duration::from_millis(250))).collect());
    let run_id: i64 = f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap().get(0);
    wait_until(SHORT, "a few batches to arrive", || fake.request_count() >= 4);
    // The whole server goes down without a checkpoint, as in a power cut, and comes back.
    let data_dir: String = f.client.query_one("SHOW data_directory", &[]).unwrap().get(0);
    let run_dir = std::path::Path::new(&data_dir).parent().unwrap().to_path_buf();
    let pg_ctl = |args: &[&str]| {
        let out = std::process::Command::new("sudo")
            .args(["-u", "postgres", "/usr/lib/postgresql/15/bin/pg_ctl", "-D", &data_dir])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    pg_ctl(&["-m", "immediate", "-w", "stop"]);
    let before_restart = fake.request_count();
    // Started the way `make` starts it (its environment included: other tests rely on it).
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh");
    let started = std::process::Command::new(script).arg("start").env("RETL_RUN_DIR", &run_dir).output().unwrap();
    assert!(started.status.success(), "cluster.sh start: {}", String::from_utf8_lossy(&started.stderr));
    let mut client = retl_e2e::cluster::reconnect(Duration::from_secs(60));
    wait_for_success_through_restarts(&mut client, run_id);
    assert!(fake.request_count() > before_restart, "delivery resumed after the restart");
    f.client = client;
    assert_eq!(fake.records(), f.model_state());
    for id in 1..=60 {
        assert_eq!(fake.create_count(&key(id)), 1, "record {id} created exactly once");
    }
    assert_eq!(f.outbox_rows(), 0);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
