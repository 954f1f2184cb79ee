//! Several workers (retl.workers = 2 on the test cluster): runs take turns slice by slice so a
//! large sync cannot starve a small one, a destination's rate limit is one budget shared by
//! every worker, and retl.worker_status() / pg_stat_activity show who does what. Within a
//! slice, a worker sends the next requests while it records the batches answered before them.
mod common;
use common::*;
use std::time::{Duration, Instant};

fn slow(n: usize, each: Duration) -> Vec<Scripted> {
    (0..n).map(|_| Scripted::Delay(each)).collect()
}

fn status_of(c: &mut postgres::Client, run_id: i64) -> String {
    c.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&run_id]).unwrap().get(0)
}

#[test]
fn a_small_sync_is_not_starved_by_two_large_ones() {
    // Two large syncs, each about 3 s of slow requests, keep both workers busy.
    let (fake_a, fake_b, fake_c) = (FakeWebhook::start(), FakeWebhook::start(), FakeWebhook::start());
    fake_a.script(slow(100, Duration::from_millis(50)));
    fake_b.script(slow(100, Duration::from_millis(50)));
    let options = "batch_size '10', max_concurrency '1'";
    let mut a = Fixture::new(&fake_a.url(), 600, "upsert", options, None);
    let mut b = Fixture::new(&fake_b.url(), 600, "upsert", options, None);
    let mut small = Fixture::new(&fake_c.url(), 5, "upsert", "", None);
    let run_a: i64 = a.client.query_one("SELECT id FROM retl.run($1)", &[&a.sync]).unwrap().get(0);
    let run_b: i64 = b.client.query_one("SELECT id FROM retl.run($1)", &[&b.sync]).unwrap().get(0);
    wait_until(SHORT, "both large syncs to be delivering", || fake_a.request_count() >= 2 && fake_b.request_count() >= 2);

    let started = Instant::now();
    let run = small.run();
    let took = started.elapsed();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 5));
    assert!(took < Duration::from_millis(1500), "the small sync waited {took:?}");
    assert_eq!(status_of(&mut a.client, run_a), "delivering", "the large syncs were still going");
    assert_eq!(status_of(&mut b.client, run_b), "delivering");
    wait_until(Duration::from_secs(60), "the large syncs to finish", || {
        status_of(&mut a.client, run_a) == "succeeded" && status_of(&mut b.client, run_b) == "succeeded"
    });
    assert_eq!(fake_a.records(), a.model_state());
    assert_eq!(fake_b.records(), b.model_state());
}

#[test]
fn the_next_request_goes_out_while_an_answered_batch_waits_to_be_recorded() {
    // One row a request, one request at a time. A lock on the snapshot holds up the recording
    // of the first batch (acknowledged rows enter the snapshot): the second request must go
    // out all the same, read and sent before the first batch is recorded, not after.
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "batch_size '1', max_concurrency '1'", None);
    let mut holder = connect();
    let mut lock = holder.transaction().unwrap();
    lock.batch_execute("LOCK TABLE retl.snapshots IN SHARE MODE").unwrap();
    let run_id: i64 = f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap().get(0);
    wait_until(Duration::from_secs(10), "the second request, while the first batch waits to be recorded", || {
        fake.request_count() >= 2
    });
    let recorded = format!("SELECT count(*) FROM retl.batches WHERE run_id = {run_id}");
    assert_eq!(f.count(&recorded), 0, "no batch could be recorded yet");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.request_count(), 2, "one request in flight beyond the batch being recorded, no more");
    lock.rollback().unwrap();
    wait_until(SHORT, "the run to finish", || status_of(&mut f.client, run_id) == "succeeded");
    assert_eq!(f.count(&recorded), 3);
    assert_eq!(fake.request_count(), 3);
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn a_destinations_rate_limit_is_shared_by_all_workers() {
    let fake = FakeWebhook::start();
    // 20 requests/s (burst 20) for the destination, whichever worker sends.
    let mut one = Fixture::new(&fake.url(), 40, "upsert", "batch_size '1', rate_limit '20'", None);
    let two_sync = format!("{}_two", one.sync);
    one.exec(&format!(
        "SELECT retl.create_sync(name => '{two_sync}', model => '{}', destination => '{}')",
        one.model, one.server
    ));
    let mut tx = one.client.transaction().unwrap();
    let first: i64 = tx.query_one("SELECT id FROM retl.run($1)", &[&one.sync]).unwrap().get(0);
    let second: i64 = tx.query_one("SELECT id FROM retl.run($1)", &[&two_sync]).unwrap().get(0);
    tx.commit().unwrap();
    let mut observer = connect();
    let mut most_delivering = 0i64;
    wait_until(Duration::from_secs(30), "both runs to finish", || {
        let n: i64 = observer
            .query_one("SELECT count(*) FROM retl.worker_status() WHERE state = 'delivering'", &[])
            .unwrap()
            .get(0);
        most_delivering = most_delivering.max(n);
        status_of(&mut observer, first) == "succeeded" && status_of(&mut observer, second) == "succeeded"
    });
    assert_eq!(most_delivering, 2, "both workers delivered at once");
    let requests = fake.requests();
    assert_eq!(requests.len(), 80);
    // 80 requests at 20/s with a burst of 20 need at least 3 s, shared; 1.5 s if each worker
    // had its own budget.
    let span = requests.last().unwrap().at - requests[0].at;
    assert!(span >= Duration::from_millis(2800), "80 requests in {span:?}");
    for window_start in requests.iter().map(|r| r.at) {
        let in_window = requests.iter().filter(|r| r.at >= window_start && r.at < window_start + Duration::from_secs(1)).count();
        assert!(in_window <= 40, "{in_window} requests within one second (rate 20, burst 20)");
    }
}

#[test]
fn worker_status_and_pg_stat_activity_show_what_each_worker_does() {
    let fake = FakeWebhook::start();
    fake.script(slow(3, Duration::from_millis(700)));
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "batch_size '1', max_concurrency '1'", None);
    let run_id: i64 = f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap().get(0);
    wait_until(SHORT, "a request in flight", || fake.request_count() >= 1);
    // Between two slices of the run no worker shows it: look until one does.
    let mut rows = Vec::new();
    wait_until(SHORT, "a worker to show the run", || {
        rows = f
            .client
            .query("SELECT worker, pid, state, sync, run_id, since <= clock_timestamp() FROM retl.worker_status()", &[])
            .unwrap();
        rows.iter().any(|r| r.get::<_, Option<i64>>(4) == Some(run_id))
    });
    assert_eq!(rows.len(), 2, "retl.workers = 2");
    let busy: Vec<_> = rows.iter().filter(|r| r.get::<_, Option<i64>>(4) == Some(run_id)).collect();
    assert_eq!(busy.len(), 1, "one worker on the run");
    assert_eq!(busy[0].get::<_, String>(2), "delivering");
    assert_eq!(busy[0].get::<_, Option<String>>(3).as_deref(), Some(f.sync.as_str()));
    assert_eq!(busy[0].get::<_, Option<i64>>(4), Some(run_id));
    assert!(busy[0].get::<_, bool>(5));
    let pid: i32 = busy[0].get(1);
    let activity = f
        .client
        .query_one(
            "SELECT backend_type, application_name, query FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .unwrap();
    assert_eq!(activity.get::<_, String>(0), "pg_reverse_etl worker");
    let worker_no: i32 = busy[0].get(0);
    assert_eq!(activity.get::<_, String>(1), format!("pg_reverse_etl worker {worker_no}"));
    assert_eq!(
        activity.get::<_, String>(2),
        format!("retl: sync {} run {run_id}: delivering 1 rows to {}", f.sync, f.server)
    );
    wait_until(SHORT, "the run to finish", || status_of(&mut f.client, run_id) == "succeeded");
    let on_it: i64 = f
        .client
        .query_one("SELECT count(*) FROM retl.worker_status() WHERE run_id = $1", &[&run_id])
        .unwrap()
        .get(0);
    assert_eq!(on_it, 0, "no worker holds the finished run");
}

/// The workers hand their table statistics to Postgres, so autovacuum sees the outbox and the
/// snapshots churn (and vacuums and analyzes them). A background worker that never reports
/// them leaves those counters at zero for ever: the outbox then grew dead rows without end and
/// was planned with no statistics at all.
#[test]
fn the_workers_report_their_table_statistics_for_autovacuum() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 300, "upsert", "batch_size '100'", None);
    let counters = |c: &mut postgres::Client| -> (i64, i64, i64) {
        let row = c
            .query_one(
                "SELECT (SELECT n_tup_ins + n_tup_del FROM pg_stat_all_tables WHERE relid = 'retl.outbox'::regclass),
                        (SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = 'retl.snapshots'::regclass),
                        (SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = 'retl.batches'::regclass)",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    let before = counters(&mut f.client);
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 300));
    // Only the worker wrote these rows: 300 queued and 300 deleted, 300 snapshot rows, 3 batches.
    wait_until(Duration::from_secs(10), "the worker's statistics to reach pg_stat_all_tables", || {
        f.client.execute("SELECT pg_stat_clear_snapshot()", &[]).unwrap();
        let now = counters(&mut f.client);
        now.0 - before.0 >= 600 && now.1 - before.1 >= 300 && now.2 - before.2 >= 3
    });
}
