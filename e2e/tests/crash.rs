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
    wait_until(Duration::from_secs(90), "the interrupted run to finish", || {
        match client.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&run_id]) {
            Ok(row) => row.get::<_, String>(0) == "succeeded",
            Err(_) => {
                client = retl_e2e::cluster::reconnect(Duration::from_secs(60));
                false
            }
        }
    });
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

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
