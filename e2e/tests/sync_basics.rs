//! The core loop: first run sends everything, the next only what changed, a run with no
//! change makes no request; batching, preview, wake-at-commit, composite keys, audiences.
mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn first_run_sends_everything_then_only_changes_then_nothing() {
    let fake = FakeWebhook::builder().token("s3cret-token").start();
    let mut f = Fixture::new(&fake.url(), 25, "upsert", "batch_size '10'", Some("s3cret-token"));

    let first = f.run();
    assert_eq!(first.status, "succeeded", "{first:?}");
    assert_eq!((first.rows_in_model, first.inserts, first.updates, first.deletes), (Some(25), 25, 0, 0));
    assert_eq!((first.delivered, first.failed, first.api_calls), (25, 0, 3));
    assert_eq!(fake.request_count(), 3, "25 rows in batches of 10");
    let sizes: Vec<usize> = fake
        .requests()
        .iter()
        .map(|r| r.body.as_ref().unwrap()["records"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 25);
    assert!(sizes.iter().all(|&n| n <= 10), "{sizes:?}");
    assert_eq!(fake.records(), f.model_state());
    for r in fake.requests() {
        let auth = r.headers.iter().find(|(k, _)| k == "authorization").map(|(_, v)| v.clone());
        assert_eq!(auth.as_deref(), Some("Bearer s3cret-token"));
        let body = r.body.as_ref().unwrap();
        assert_eq!(body["sync"], json!(f.sync));
        assert_eq!(body["run_id"], json!(first.id));
        assert!(body["records"].as_array().unwrap().iter().all(|rec| rec["op"] == "upsert"));
    }

    f.exec(&format!("UPDATE {} SET score = score + 1 WHERE id IN (4, 17)", f.table));
    fake.clear_journal();
    let second = f.run();
    assert_eq!(second.status, "succeeded");
    assert_eq!((second.inserts, second.updates, second.deletes, second.delivered, second.api_calls), (0, 2, 0, 2, 1));
    assert_eq!(fake.records_sent(), 2);
    let sent = keys_in_request(&fake, 0);
    assert_eq!(sent, [key(4), key(17)].into_iter().collect());
    assert_eq!(fake.records(), f.model_state());

    fake.clear_journal();
    let third = f.run();
    assert_eq!(third.status, "succeeded");
    assert_eq!((third.inserts + third.updates + third.deletes, third.delivered, third.api_calls), (0, 0, 0));
    assert_eq!(fake.request_count(), 0, "a run with no changes makes zero requests");

    let status = f
        .client
        .query_one(
            "SELECT last_status, runs, success_rate::float8, queue_depth, failing_rows, rows_synced FROM retl.sync_status WHERE sync = $1",
            &[&f.sync],
        )
        .unwrap();
    assert_eq!(status.get::<_, String>(0), "succeeded");
    assert_eq!(status.get::<_, i64>(1), 3);
    assert_eq!(status.get::<_, f64>(2), 1.0);
    assert_eq!((status.get::<_, i64>(3), status.get::<_, i64>(4), status.get::<_, i64>(5)), (0, 0, 25));
}

#[test]
fn preview_shows_the_diff_and_sends_nothing() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "mirror", "", None);
    assert_eq!(f.run().delivered, 3);
    f.exec(&format!(
        "UPDATE {t} SET name = 'Renamed' WHERE id = 2; DELETE FROM {t} WHERE id = 3; INSERT INTO {t} VALUES (9, 'new@example.com', 'New', 1)",
        t = f.table
    ));
    fake.clear_journal();
    let rows = f
        .client
        .query("SELECT op, key::text, payload::text FROM retl.preview($1)", &[&f.sync])
        .unwrap();
    let got: Vec<(String, String, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        got,
        vec![
            ("upsert".into(), r#"{"id": 2}"#.into(), Some(r#"{"id": 2, "name": "Renamed", "email": "user2@example.com", "score": 20}"#.into())),
            ("delete".into(), r#"{"id": 3}"#.into(), None),
            ("upsert".into(), r#"{"id": 9}"#.into(), Some(r#"{"id": 9, "name": "New", "email": "new@example.com", "score": 1}"#.into())),
        ]
    );
    assert_eq!(fake.request_count(), 0);
    assert_eq!(f.outbox_rows(), 0, "preview queues nothing");
}

#[test]
fn run_without_wait_is_queued_and_starts_when_the_transaction_commits() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 4, "upsert", "", None);
    let mut tx = f.client.transaction().unwrap();
    let queued = tx.query_one(&format!("SELECT {RUN_COLUMNS} FROM retl.run($1)"), &[&f.sync]).unwrap();
    let queued = run_from_row(&queued);
    assert_eq!(queued.status, "queued");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.request_count(), 0, "nothing happens before commit");
    tx.commit().unwrap();
    let id = queued.id;
    wait_until(SHORT, "the queued run to finish", || {
        let status: String = f.client.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&id]).unwrap().get(0);
        status == "succeeded"
    });
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn composite_keys_and_explicit_mappings() {
    let fake = FakeWebhook::start();
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("ck");
    client
        .batch_execute(&format!(
            "CREATE TABLE {base} (account text, region text, seats int, secret text);
             INSERT INTO {base} VALUES ('acme', 'eu', 5, 'x'), ('acme', 'us', 7, 'y'), ('globex', 'eu', 2, 'z');
             SELECT retl.create_model(name => '{base}_m', query => '{base}', primary_key => '{{account,region}}');
             CREATE SERVER {base}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
             SELECT retl.create_sync(name => '{base}_s', model => '{base}_m', destination => '{base}_d',
                                     mappings => '{{\"Seats__c\": \"seats\", \"Region\": \"region\"}}');",
            url = fake.url()
        ))
        .unwrap();
    let row = client.query_one(&format!("SELECT status, delivered FROM retl.run('{base}_s', wait => true)"), &[]).unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1)), ("succeeded".into(), 3));
    let records = fake.records();
    assert_eq!(records.len(), 3);
    assert_eq!(
        records[&json!({"account": "acme", "region": "us"}).to_string()],
        json!({"Region": "us", "Seats__c": 7}),
        "only mapped columns are sent, under the destination's field names"
    );
}

#[test]
fn audience_sync_sends_only_matching_rows_and_mirror_removes_leavers() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 10, "upsert", "", None);
    let audience = format!("{}_high", f.model);
    let sync = format!("{}_aud", f.sync);
    f.exec(&format!(
        "SELECT retl.create_audience(name => '{audience}', model => '{}', filter => 'score >= 80');
         SELECT retl.create_sync(name => '{sync}', audience => '{audience}', destination => '{}', mode => 'mirror');",
        f.model, f.server
    ));
    let run = f.client.query_one(&format!("SELECT delivered FROM retl.run('{sync}', wait => true)"), &[]).unwrap();
    assert_eq!(run.get::<_, i64>(0), 3);
    let keys: std::collections::BTreeSet<String> = fake.records().into_keys().collect();
    assert_eq!(keys, [key(8), key(9), key(10)].into_iter().collect());
    f.exec(&format!("UPDATE {} SET score = 0 WHERE id = 9", f.table));
    let run = f
        .client
        .query_one(&format!("SELECT planned_deletes, delivered FROM retl.run('{sync}', wait => true)"), &[])
        .unwrap();
    assert_eq!((run.get::<_, i64>(0), run.get::<_, i64>(1)), (1, 1));
    assert!(!fake.records().contains_key(&key(9)));
    assert_eq!(fake.records().len(), 2);
}

#[test]
fn changing_the_mappings_resends_every_row_under_the_new_field_names() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', mappings => '{{\"mail\": \"email\"}}')", f.sync));
    assert_eq!(f.run().delivered, 3);
    assert_eq!(fake.records()[&key(2)], json!({"mail": "user2@example.com"}));
    fake.clear_journal();
    assert_eq!(f.run().api_calls, 0, "nothing changed");
    // Same column, new destination field: the destination holds other fields now.
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', mappings => '{{\"email_address\": \"email\"}}')", f.sync));
    let run = f.run();
    assert_eq!((run.updates, run.delivered), (3, 3));
    assert_eq!(fake.records()[&key(2)], json!({"email_address": "user2@example.com"}));
}
