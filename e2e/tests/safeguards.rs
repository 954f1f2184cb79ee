//! Plan-time safeguards: a refused plan is a failed run with a clear message, nothing is
//! queued and the destination is untouched; an explicit override lets one run through.

mod common;

use common::*;
use serde_json::{json, Value};

/// The sync's outbox rows, snapshot rows and the fake's request count, in that order.
fn state(f: &mut Fixture, fake: &FakeWebhook) -> (i64, i64, usize) {
    let snapshot = f.count(&format!(
        "SELECT count(*) FROM retl.snapshots sn JOIN retl.syncs s ON s.id = sn.sync_id WHERE s.name = '{}'",
        f.sync
    ));
    (f.outbox_rows(), snapshot, fake.request_count())
}

fn run_error(f: &mut Fixture, extra: &str) -> (String, String) {
    let e = f
        .client
        .query_one(&format!("SELECT * FROM retl.run('{}', wait => true{extra})", f.sync), &[])
        .expect_err("the run should fail");
    let (code, message, _, _) = db_error(&e);
    (code, message)
}

#[test]
fn row_cap_refuses_the_whole_plan_before_anything_is_queued() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 10, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', max_rows => 5)", f.sync));

    let (code, message) = run_error(&mut f, "");
    let run = f.last_run();
    assert_eq!(code, "38000");
    let expected = format!(
        "run would send 10 changes, more than max_rows 5 of sync \"{s}\"; nothing was queued. If this is expected, \
         raise the cap: SELECT retl.alter_sync(name => '{s}', max_rows => ...)",
        s = f.sync
    );
    assert_eq!(message, format!("run {} of sync \"{}\" failed: {expected}", run.id, f.sync));
    // The failed run shows what the plan would have sent; nothing was queued or sent.
    assert_eq!((run.status.as_str(), run.inserts, run.delivered), ("failed", 10, 0));
    assert_eq!(run.error.as_deref(), Some(expected.as_str()));
    assert_eq!(state(&mut f, &fake), (0, 0, 0));

    f.exec(&format!("SELECT retl.alter_sync(name => '{}', max_rows => 10)", f.sync));
    assert_eq!(f.run().status, "succeeded");
    assert_eq!(fake.records().len(), 10);
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn a_mirror_run_deleting_more_than_the_percentage_needs_an_override() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 10, "mirror", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(f.run().delivered, 10);
    let requests_before = fake.request_count();

    // 4 of 10 (40%) is within the default max_delete_percent of 50.
    f.exec(&format!("DELETE FROM {} WHERE id <= 4", f.table));
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', max_delete_percent => 30)", f.sync));
    let (_, message) = run_error(&mut f, "");
    let run = f.last_run();
    assert!(
        message.ends_with(&format!(
            "failed: run would delete 4 of the 10 rows it delivered (40%), more than max_delete_percent 30; \
             nothing was queued. If this is intended, run it once with SELECT retl.run('{}', allow_mass_delete => true)",
            f.sync
        )),
        "{message}"
    );
    assert_eq!((run.status.as_str(), run.deletes, run.delivered), ("failed", 4, 0));
    // Destination untouched: all 10 rows still there, no request made, nothing queued.
    assert_eq!(fake.records().len(), 10);
    assert_eq!(state(&mut f, &fake), (0, 10, requests_before));

    // Back to the default (50): 40% passes.
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', reset => '{{max_delete_percent}}')", f.sync));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.deletes, run.delivered), ("succeeded", 4, 4));
    assert_eq!(fake.records(), f.model_state());

    // 5 of the 6 left (83%) is refused, then passes once with the override.
    f.exec(&format!("DELETE FROM {} WHERE id <= 9", f.table));
    let (_, message) = run_error(&mut f, "");
    assert!(message.contains("run would delete 5 of the 6 rows it delivered (83.3%), more than max_delete_percent 50"), "{message}");
    assert_eq!(fake.records().len(), 6);
    let row = f
        .client
        .query_one(
            &format!("SELECT status, planned_deletes, delivered, allow_mass_delete FROM retl.run('{}', wait => true, allow_mass_delete => true)", f.sync),
            &[],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1), row.get::<_, i64>(2), row.get::<_, bool>(3)),
        ("succeeded".to_string(), 5, 5, true)
    );
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn an_empty_model_never_empties_the_destination_without_an_override() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "mirror", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.run();
    // Even with the percentage guard off.
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', max_delete_percent => 100)", f.sync));
    f.exec(&format!("TRUNCATE {}", f.table));
    let requests = fake.request_count();
    let (_, message) = run_error(&mut f, "");
    assert!(
        message.ends_with(&format!(
            "failed: model \"{m}\" of mirror sync \"{s}\" returned no rows: the run would delete all 3 rows the sync \
             delivered; nothing was queued. If this is intended, run it once with SELECT retl.run('{s}', allow_mass_delete => true)",
            m = f.model,
            s = f.sync
        )),
        "{message}"
    );
    assert_eq!(f.last_run().rows_in_model, Some(0));
    assert_eq!(fake.records().len(), 3);
    assert_eq!(state(&mut f, &fake), (0, 3, requests));

    // The override on a queued (not waited for) run.
    f.exec(&format!("SELECT retl.run('{}', allow_mass_delete => true)", f.sync));
    let sync = f.sync.clone();
    wait_until(SHORT, "the allowed run succeeds", || {
        let run = last_run_of(&mut f.client, &sync);
        run.status == "succeeded"
    });
    assert!(fake.records().is_empty());
}

#[test]
fn delete_syncs_are_capped_by_max_delete_rows() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 5, "delete", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', max_delete_rows => 3)", f.sync));
    let (_, message) = run_error(&mut f, "");
    assert!(message.contains("failed: run would delete 5 rows, more than max_delete_rows 3; nothing was queued."), "{message}");
    assert_eq!(fake.request_count(), 0);
    let run = run_sync_with(&mut f, "allow_mass_delete => true");
    assert_eq!((run.0.as_str(), run.1), ("succeeded", 5));
}

fn run_sync_with(f: &mut Fixture, extra: &str) -> (String, i64) {
    let row = f
        .client
        .query_one(&format!("SELECT status, delivered FROM retl.run('{}', wait => true, {extra})", f.sync), &[])
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn a_mapped_column_that_changed_type_or_vanished_fails_the_run_and_a_new_column_does_not() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.exec(&format!(
        "SELECT retl.alter_sync(name => '{}', mappings => '{{\"email\": \"email\", \"score\": \"score\"}}')",
        f.sync
    ));
    let first = f.run();
    assert_eq!(first.status, "succeeded");
    let contract: String = f
        .client
        .query_one("SELECT model_columns::text FROM retl.runs WHERE id = $1", &[&first.id])
        .unwrap()
        .get(0);
    let contract: Value = serde_json::from_str(&contract).unwrap();
    assert_eq!(contract, json!({"id": "bigint", "email": "text", "score": "integer"}));

    // A new column (and a changed unmapped one) is no breach.
    f.exec(&format!(
        "DROP VIEW retl_models.{m}; CREATE VIEW retl_models.{m} AS SELECT id, email, name || '!' AS name, score, now() AS seen FROM {t}",
        m = f.model,
        t = f.table
    ));
    f.exec(&format!("UPDATE {} SET score = score + 1", f.table));
    assert_eq!(f.run().status, "succeeded");
    let requests = fake.request_count();

    // The mapped column score becomes text: refused, nothing queued.
    f.exec(&format!(
        "DROP VIEW retl_models.{m}; CREATE VIEW retl_models.{m} AS SELECT id, email, name, (score * 2)::text AS score FROM {t}",
        m = f.model,
        t = f.table
    ));
    let last_ok = f.last_run().id;
    let (_, message) = run_error(&mut f, "");
    assert!(
        message.ends_with(&format!(
            "failed: model \"{m}\" of sync \"{s}\" changed since the last successful run (run {last_ok}): column \
             \"score\" is now text (was integer); nothing was queued. If this is intended, run it once with SELECT \
             retl.run('{s}', allow_schema_change => true)",
            m = f.model,
            s = f.sync
        )),
        "{message}"
    );
    assert_eq!((f.outbox_rows(), fake.request_count()), (0, requests));

    // Accepted once: the new types become the contract.
    assert_eq!(run_sync_with(&mut f, "allow_schema_change => true"), ("succeeded".to_string(), 3));
    assert_eq!(fake.records()[&key(2)]["score"], json!("42"));
    assert_eq!(f.run().status, "succeeded");
}

#[test]
fn without_mappings_a_column_that_disappears_breaks_the_contract() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    let first = f.run();
    f.exec(&format!(
        "DROP VIEW retl_models.{m}; CREATE VIEW retl_models.{m} AS SELECT id, email, score FROM {t}",
        m = f.model,
        t = f.table
    ));
    let (_, message) = run_error(&mut f, "");
    assert!(
        message.contains(&format!("changed since the last successful run (run {}): column \"name\" (text) is gone;", first.id)),
        "{message}"
    );
}

#[test]
fn nulls_keep_never_overwrites_a_destination_value_with_null() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', nulls => 'keep')", f.sync));
    f.run();
    fake.clear_journal();
    f.exec(&format!("UPDATE {} SET name = NULL, score = NULL WHERE id = 1", f.table));
    assert_eq!(f.run().delivered, 1);
    let sent = fake.requests()[0].body.clone().unwrap()["records"][0].clone();
    assert_eq!(sent["fields"], json!({"id": 1, "email": "user1@example.com"}));

    // With 'send' (the default) the nulls go out.
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', reset => '{{nulls}}')", f.sync));
    f.exec(&format!("UPDATE {} SET email = NULL WHERE id = 1", f.table));
    fake.clear_journal();
    f.run();
    let sent = fake.requests()[0].body.clone().unwrap()["records"][0].clone();
    assert_eq!(sent["fields"], json!({"id": 1, "email": null, "name": null, "score": null}));
}

#[test]
fn the_destination_daily_row_quota_and_each_sync_share_of_it() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "daily_row_quota '5'", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(f.run().delivered, 3);
    f.exec(&format!("INSERT INTO {} VALUES (4, 'a@x', 'A', 1), (5, 'b@x', 'B', 2), (6, 'c@x', 'C', 3)", f.table));
    let requests = fake.request_count();
    let (_, message) = run_error(&mut f, "");
    assert!(
        message.ends_with(&format!(
            "failed: run would send 3 rows to destination \"{}\" and exceed its daily_row_quota (all syncs together): \
             3 of 5 rows were sent in the last 24 hours; nothing was queued",
            f.server
        )),
        "{message}"
    );
    assert_eq!((f.outbox_rows(), fake.request_count()), (0, requests));

    // A second sync to the same destination with a fifth of the quota (1 row).
    let other = format!("{}_2", f.sync);
    let _drop2 = DropSyncs(vec![other.clone()]);
    f.exec(&format!(
        "SELECT retl.create_sync(name => '{other}', model => '{}', destination => '{}', quota_share => 0.2)",
        f.model, f.server
    ));
    let e = f.client.query_one(&format!("SELECT * FROM retl.run('{other}', wait => true)"), &[]).unwrap_err();
    assert!(
        db_error(&e).1.ends_with(&format!(
            "failed: run would send 6 rows to destination \"{}\" and exceed the share of sync \"{other}\" (0.2 of \
             daily_row_quota 5): 0 of 1 rows were sent in the last 24 hours; nothing was queued",
            f.server
        )),
        "{}",
        db_error(&e).1
    );
}

#[test]
fn safeguard_settings_are_checked_with_clear_errors() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    let cases = [
        ("max_delete_percent => 150", "max_delete_percent must be between 0 and 100, got 150"),
        ("max_rows => 0", "max_rows must be at least 1, got 0"),
        ("quota_share => 0", "quota_share must be greater than 0 and at most 1, got 0"),
        ("nulls => 'skip'", "nulls must be 'send' or 'keep', got 'skip'"),
        ("freshness => '-1 hour'", "freshness must be a positive interval, got -01:00:00"),
        ("alert_row_error_rate => 2", "alert_row_error_rate must be between 0 and 1, got 2"),
        ("alert_queue_depth => 0", "alert_queue_depth must be at least 1, got 0"),
    ];
    for (arg, problem) in cases {
        let e = f
            .client
            .batch_execute(&format!("SELECT retl.alter_sync(name => '{}', {arg})", f.sync))
            .expect_err(arg);
        let (code, message, _, _) = db_error(&e);
        assert_eq!((code.as_str(), message), ("22023", format!("sync \"{}\": {problem}", f.sync)), "{arg}");
    }
    let e = f
        .client
        .batch_execute(&format!("SELECT retl.alter_sync(name => '{}', reset => '{{max_rows, colour}}')", f.sync))
        .unwrap_err();
    assert_eq!(db_error(&e).1, "alter_sync cannot reset \"colour\"");
    // An alert destination must be a slack or webhook destination.
    let hub = format!("{}_hub", f.server);
    f.exec(&format!("CREATE SERVER {hub} FOREIGN DATA WRAPPER retl OPTIONS (type 'hubspot', object 'contacts')"));
    let e = f
        .client
        .batch_execute(&format!("SELECT retl.alter_sync(name => '{}', alert_destination => '{hub}')", f.sync))
        .unwrap_err();
    assert_eq!(
        db_error(&e).1,
        format!("alert destination \"{hub}\" of sync \"{}\" is of type \"hubspot\"", f.sync)
    );
    // Nothing was half-applied.
    let row = f
        .client
        .query_one(
            "SELECT max_rows, max_delete_percent::text, nulls, alert_destination FROM retl.syncs WHERE name = $1",
            &[&f.sync],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, Option<i64>>(0), row.get::<_, String>(1), row.get::<_, String>(2), row.get::<_, Option<String>>(3)),
        (None, "50".to_string(), "send".to_string(), None)
    );
    f.exec(&format!("DROP SERVER {hub}"));
}
