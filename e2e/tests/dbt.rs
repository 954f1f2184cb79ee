//! retl.run(wait => true) as a dbt post-hook calls it: it returns the finished run, raises
//! when the run failed (38000) or was cancelled (55000), never for a partial run, and with a
//! timeout gives up waiting (57014) while the run goes on.
mod common;
use common::*;
use std::time::{Duration, Instant};

/// Id of the latest run of `sync`.
fn last_run_id(f: &mut Fixture) -> i64 {
    f.count(&format!(
        "SELECT max(r.id) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{}'",
        f.sync
    ))
}

#[test]
fn run_wait_returns_the_finished_run_as_a_post_hook_calls_it() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 5, "upsert", "batch_size '2'", None);
    let post_hook = format!("SELECT * FROM retl.run('{}', wait => true)", f.sync);
    let rows = f.client.query(&post_hook, &[]).unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let id: i64 = row.get("id");
    assert_eq!(id, last_run_id(&mut f), "the row is the run just made");
    assert_eq!(row.get::<_, String>("trigger"), "manual");
    assert_eq!(row.get::<_, String>("status"), "succeeded");
    assert_eq!(row.get::<_, Option<i64>>("rows_in_model"), Some(5));
    assert_eq!(
        (row.get::<_, i64>("planned_inserts"), row.get::<_, i64>("planned_updates"), row.get::<_, i64>("planned_deletes")),
        (5, 0, 0)
    );
    assert_eq!((row.get::<_, i64>("delivered"), row.get::<_, i64>("failed"), row.get::<_, i64>("api_calls")), (5, 0, 3));
    assert_eq!(row.get::<_, Option<String>>("error"), None);
    let started: Option<std::time::SystemTime> = row.get("started_at");
    let finished: Option<std::time::SystemTime> = row.get("finished_at");
    assert!(started.is_some() && finished.is_some() && started <= finished, "{started:?} {finished:?}");
    assert_eq!(fake.records(), f.model_state(), "delivered before the call returned");

    // dbt runs hooks inside its transaction (READ COMMITTED): that works, and sees the run.
    f.exec(&format!("UPDATE {} SET name = 'Changed' WHERE id = 4", f.table));
    let mut tx = f.client.transaction().unwrap();
    let row = tx.query_one(&format!("SELECT id, status, planned_updates, delivered FROM retl.run('{}', wait => true)", f.sync), &[]).unwrap();
    let (id, status): (i64, String) = (row.get(0), row.get(1));
    assert_eq!((status.as_str(), row.get::<_, i64>(2), row.get::<_, i64>(3)), ("succeeded", 1, 1));
    let seen: String = tx.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&id]).unwrap().get(0);
    assert_eq!(seen, "succeeded");
    tx.commit().unwrap();
    assert_eq!(fake.records(), f.model_state());

    // A snapshot-isolated transaction could not see the finished run: refused.
    let mut tx = f.client.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).start().unwrap();
    let err = tx.query_one(&format!("SELECT * FROM retl.run('{}', wait => true)", f.sync), &[]).unwrap_err();
    assert_eq!(
        error_text(&err),
        ("55000".to_string(), "retl.run(wait => true) needs the READ COMMITTED isolation level".to_string())
    );
    tx.rollback().unwrap();
}

#[test]
fn a_failed_run_raises_38000_with_the_reason_and_the_counts() {
    let fake = FakeWebhook::builder().token("the-right-token").start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", Some("a-wrong-token"));
    let err = f.client.query(&format!("SELECT * FROM retl.run('{}', wait => true)", f.sync), &[]).unwrap_err();
    let id = last_run_id(&mut f);
    let (code, message, detail, hint) = db_error(&err);
    assert_eq!(code, "38000");
    assert_eq!(
        message,
        format!(
            "run {id} of sync \"{}\" failed: destination rejected the credentials (HTTP 401): check the token in the user mapping",
            f.sync
        )
    );
    assert_eq!(detail.as_deref(), Some("planned 3, delivered 0, rejected 0, 1 API calls"));
    assert_eq!(hint, Some(format!("See SELECT * FROM retl.runs WHERE id = {id} and retl.batches for that run.")));
    // The run is recorded as failed all the same (the worker committed it), the rows stay
    // queued, and the session goes on.
    let run = f.last_run();
    assert_eq!((run.id, run.status.as_str(), run.delivered, run.api_calls), (id, "failed", 0, 1));
    assert_eq!(f.outbox_rows(), 3);
    assert_eq!(f.count("SELECT 1::bigint"), 1);
    // Fixed: the next call returns normally with everything delivered.
    f.exec(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {} OPTIONS (SET token 'the-right-token')", f.server));
    let row = f.client.query_one(&format!("SELECT status, delivered FROM retl.run('{}', wait => true)", f.sync), &[]).unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1)), ("succeeded".into(), 3));
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn a_refused_plan_raises_38000_with_nothing_planned() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    f.exec(&format!("ALTER TABLE {t} DROP CONSTRAINT {t}_pkey; INSERT INTO {t} VALUES (2, 'b@x', 'B', 1)", t = f.table));
    let err = f.client.query_one("SELECT * FROM retl.run($1, wait => true)", &[&f.sync]).unwrap_err();
    let id = last_run_id(&mut f);
    let (code, message, detail, _) = db_error(&err);
    assert_eq!(code, "38000");
    assert_eq!(
        message,
        format!(
            "run {id} of sync \"{}\" failed: model \"{}\" returned 1 duplicate primary key (e.g. {{\"id\": 2}} appears 2 times)",
            f.sync, f.model
        )
    );
    assert_eq!(detail.as_deref(), Some("planned 0, delivered 0, rejected 0, 0 API calls"));
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn a_partial_run_does_not_raise() {
    let fake = FakeWebhook::start();
    fake.set_rejection_rule(|rec| (rec["key"]["id"] == 3).then(|| (422, "email is invalid".to_string())));
    let mut f = Fixture::new(&fake.url(), 5, "upsert", "", None);
    let row = f
        .client
        .query_one(&format!("SELECT id, status, delivered, failed, error FROM retl.run('{}', wait => true)", f.sync), &[])
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), last_run_id(&mut f));
    assert_eq!(
        (row.get::<_, String>(1), row.get::<_, i64>(2), row.get::<_, i64>(3), row.get::<_, Option<String>>(4)),
        ("partial".into(), 4, 1, None)
    );
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.row_errors e JOIN retl.syncs s ON s.id = e.sync_id WHERE s.name = '{}'", f.sync)), 1);
}

#[test]
fn a_timeout_raises_57014_in_time_and_the_run_goes_on() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 4, "upsert", "", None);
    fake.script(vec![Scripted::Delay(Duration::from_secs(4))]);
    let started = Instant::now();
    let err = f
        .client
        .query_one(&format!("SELECT * FROM retl.run('{}', wait => true, timeout => '2 seconds')", f.sync), &[])
        .unwrap_err();
    let waited = started.elapsed();
    let id = last_run_id(&mut f);
    let (code, message, _, hint) = db_error(&err);
    assert_eq!(code, "57014");
    assert_eq!(message, format!("the run did not finish within 2 s; it goes on in the background as run {id}"));
    assert!(hint.unwrap().contains("retl.runs"));
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_millis(2700), "gave up after {waited:?}");
    // The run goes on; the session is usable at once.
    let status: String = f.client.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&id]).unwrap().get(0);
    assert_eq!(status, "delivering");
    assert_eq!(fake.records().len(), 0);
    wait_until(SHORT, "the run to finish in the background", || {
        let status: String = f.client.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&id]).unwrap().get(0);
        status == "succeeded"
    });
    let run = f.last_run();
    assert_eq!((run.id, run.delivered, run.api_calls), (id, 4, 1));
    assert_eq!(fake.records(), f.model_state());
    // A timeout long enough returns the run like no timeout, in fractions of a second too.
    f.exec(&format!("UPDATE {} SET score = 0 WHERE id = 1", f.table));
    let row = f
        .client
        .query_one(&format!("SELECT id, status, delivered FROM retl.run('{}', wait => true, timeout => '9.5 s')", f.sync), &[])
        .unwrap();
    assert_eq!((row.get::<_, String>(1), row.get::<_, i64>(2)), ("succeeded".into(), 1));
    assert_eq!(row.get::<_, i64>(0), last_run_id(&mut f));
    assert!(row.get::<_, i64>(0) > id);
    // And a fractional timeout is shown in milliseconds.
    fake.script(vec![Scripted::Delay(Duration::from_secs(2))]);
    f.exec(&format!("UPDATE {} SET score = 1 WHERE id = 1", f.table));
    let started = Instant::now();
    let err = f
        .client
        .query_one(&format!("SELECT * FROM retl.run('{}', wait => true, timeout => '0.5 s')", f.sync), &[])
        .unwrap_err();
    let waited = started.elapsed();
    let id = last_run_id(&mut f);
    assert_eq!(
        error_text(&err),
        ("57014".to_string(), format!("the run did not finish within 500 ms; it goes on in the background as run {id}"))
    );
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_millis(1200), "gave up after {waited:?}");
    wait_until(SHORT, "the second run to finish", || f.last_run().status == "succeeded");
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn timeout_needs_wait_and_must_be_positive() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    for (sql, expected) in [
        ("SELECT * FROM retl.run($1, timeout => '5 s')", "retl.run: timeout needs wait => true"),
        ("SELECT * FROM retl.run($1, wait => false, timeout => '5 s')", "retl.run: timeout needs wait => true"),
        ("SELECT * FROM retl.run($1, wait => true, timeout => '0 s')", "retl.run: timeout must be positive, got 00:00:00"),
        ("SELECT * FROM retl.run($1, wait => true, timeout => '-1 s')", "retl.run: timeout must be positive, got -00:00:01"),
    ] {
        let err = f.client.query_one(sql, &[&f.sync]).unwrap_err();
        assert_eq!(error_text(&err), ("22023".to_string(), expected.to_string()), "{sql}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{}'", f.sync)), 0, "no run was made");
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn a_run_cancelled_by_pause_raises_55000() {
    let fake = FakeWebhook::start();
    fake.script(vec![Scripted::Delay(Duration::from_millis(1500))]);
    // One record per slice, so the pause is noticed between batches.
    let mut f = Fixture::new(&fake.url(), 4, "upsert", "batch_size '1', max_concurrency '1'", None);
    let sync = f.sync.clone();
    let waiter = std::thread::spawn(move || {
        let mut client = connect();
        client.query_one("SELECT * FROM retl.run($1, wait => true)", &[&sync]).map(|row| row.get::<_, String>("status"))
    });
    wait_until(SHORT, "the first request", || {
        f.count(&format!(
            "SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{}' AND r.status = 'delivering'",
            f.sync
        )) == 1
    });
    f.exec(&format!("SELECT retl.pause('{}')", f.sync));
    let err = waiter.join().unwrap().unwrap_err();
    let id = last_run_id(&mut f);
    assert_eq!(error_text(&err), ("55000".to_string(), format!("run {id} of sync \"{}\" was cancelled: sync was paused", f.sync)));
    let run = f.last_run();
    assert_eq!(run.status, "cancelled");
    assert!(run.delivered <= 1, "the pause is noticed before the next batch: {run:?}");
    assert_eq!(f.outbox_rows(), 4 - run.delivered, "what was not delivered stays queued");
}

#[test]
fn a_wait_cancelled_by_statement_timeout_leaves_the_run_going_and_the_session_usable() {
    let fake = FakeWebhook::start();
    fake.script(vec![Scripted::Delay(Duration::from_millis(2500))]);
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    f.exec("SET statement_timeout = '1s'");
    let started = Instant::now();
    let err = f.client.query_one("SELECT * FROM retl.run($1, wait => true)", &[&f.sync]).unwrap_err();
    let waited = started.elapsed();
    assert_eq!(error_text(&err), ("57014".to_string(), "canceling statement due to statement timeout".to_string()));
    assert!(waited < Duration::from_millis(1800), "cancelled after {waited:?}");
    f.exec("RESET statement_timeout");
    let id = last_run_id(&mut f);
    wait_until(SHORT, "the run to finish in the background", || {
        let status: String = f.client.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&id]).unwrap().get(0);
        status == "succeeded"
    });
    assert_eq!(fake.records(), f.model_state());
    // The session waits for runs again as before.
    f.exec(&format!("UPDATE {} SET score = 7 WHERE id = 3", f.table));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.updates, run.delivered), ("succeeded", 1, 1));
    assert!(run.id > id);
}

#[test]
fn a_sync_dropped_during_the_wait_raises_instead_of_returning_nulls() {
    let fake = FakeWebhook::start();
    fake.script(vec![Scripted::Delay(Duration::from_millis(1500))]);
    // One row a window: drop_sync waits for the worker's window in flight (the first row),
    // then drops the sync before the second window.
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "batch_size '1', max_concurrency '1'", None);
    let sync = f.sync.clone();
    let waiter = {
        let sync = sync.clone();
        std::thread::spawn(move || {
            let mut client = connect();
            client
                .query_one("SELECT id, status FROM retl.run($1, wait => true)", &[&sync])
                .map(|row| (row.get::<_, Option<i64>>(0), row.get::<_, Option<String>>(1)))
        })
    };
    wait_until(SHORT, "the run to be delivering", || {
        f.count(&format!(
            "SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{sync}' AND r.status = 'delivering'"
        )) == 1
    });
    let run_id = f.count(&format!(
        "SELECT max(r.id) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{sync}'"
    ));
    f.exec(&format!("SELECT retl.drop_sync('{sync}')"));
    match waiter.join().unwrap() {
        Ok(row) => panic!("retl.run(wait => true) returned {row:?} for a run whose sync was dropped meanwhile"),
        Err(e) => {
            let (code, message) = error_text(&e);
            assert_eq!(code, "42704", "{e}");
            assert_eq!(message, format!("run {run_id} of sync \"{sync}\" is gone: the sync was dropped while it ran"));
        }
    }
}
