//! Sync modes: mirror deletes exactly what left the model, update never creates, insert never
//! updates, delete erases what a tombstone model lists.
mod common;
use common::*;
use serde_json::json;

#[test]
fn mirror_deletes_exactly_the_removed_keys() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 6, "mirror", "", None);
    assert_eq!(f.run().delivered, 6);
    // A record this sync never delivered must survive: mirror only deletes its own keys.
    fake.preload(json!({"id": 1000}), json!({"owner": "someone else"}));
    f.exec(&format!("DELETE FROM {} WHERE id IN (2, 5)", f.table));
    fake.clear_journal();
    let run = f.run();
    assert_eq!((run.status.as_str(), run.deletes, run.delivered), ("succeeded", 2, 2));
    assert_eq!(ops_sent(&fake), vec![("delete".into(), key(2)), ("delete".into(), key(5))]);
    let mut expected = f.model_state();
    expected.insert(key(1000), json!({"owner": "someone else"}));
    assert_eq!(fake.records(), expected);
    let snapshot = f.count(&format!(
        "SELECT count(*) FROM retl.snapshots sn JOIN retl.syncs s ON s.id = sn.sync_id WHERE s.name = '{}'",
        f.sync
    ));
    assert_eq!(snapshot, 4);
}

#[test]
fn upsert_mode_never_deletes() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    f.run();
    f.exec(&format!("DELETE FROM {} WHERE id = 1", f.table));
    fake.clear_journal();
    let run = f.run();
    assert_eq!((run.deletes, run.api_calls), (0, 0));
    assert_eq!(fake.records().len(), 3);
}

#[test]
fn update_mode_never_creates() {
    let fake = FakeWebhook::start();
    // The destination already knows ids 1 and 2; the model also has 3 and 4.
    fake.preload(json!({"id": 1}), json!({"old": true}));
    fake.preload(json!({"id": 2}), json!({"old": true}));
    let mut f = Fixture::new(&fake.url(), 4, "update", "", None);
    let run = f.run();
    assert_eq!(run.status, "partial", "{run:?}");
    assert_eq!((run.delivered, run.failed), (2, 2));
    assert_eq!(ops_sent(&fake).iter().filter(|(op, _)| op != "update").count(), 0, "only updates are sent");
    let records = fake.records();
    assert_eq!(records.len(), 2, "nothing was created");
    assert_eq!(records[&key(1)], f.model_state()[&key(1)]);
    let errors = f
        .client
        .query(
            "SELECT e.key::text, e.op, e.http_status, e.response FROM retl.row_errors e JOIN retl.syncs s ON s.id = e.sync_id
              WHERE s.name = $1 ORDER BY e.key",
            &[&f.sync],
        )
        .unwrap();
    let errors: Vec<(String, String, Option<i32>, String)> =
        errors.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(
        errors,
        vec![
            (r#"{"id": 3}"#.into(), "update".into(), Some(404), "record not found".into()),
            (r#"{"id": 4}"#.into(), "update".into(), Some(404), "record not found".into()),
        ]
    );
}

#[test]
fn insert_mode_never_updates() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "insert", "", None);
    let run = f.run();
    assert_eq!((run.inserts, run.delivered), (3, 3));
    assert_eq!(fake.create_count(&key(1)), 1);
    f.exec(&format!("UPDATE {t} SET name = 'changed' WHERE id = 1; INSERT INTO {t} VALUES (4, 'd@x', 'D', 4)", t = f.table));
    fake.clear_journal();
    let run = f.run();
    assert_eq!((run.inserts, run.updates, run.delivered), (1, 0, 1));
    assert_eq!(ops_sent(&fake), vec![("insert".into(), key(4))]);
    assert_eq!(fake.records()[&key(1)]["name"], json!("Person 1"), "the change was not sent");
}

#[test]
fn delete_mode_erases_every_listed_key_once() {
    let fake = FakeWebhook::start();
    for id in 1..=5 {
        fake.preload(json!({"id": id}), json!({"name": format!("P{id}")}));
    }
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("del");
    client
        .batch_execute(&format!(
            "CREATE TABLE {base}_erasure (id bigint);
             INSERT INTO {base}_erasure VALUES (2), (4);
             SELECT retl.create_model(name => '{base}_m', query => 'SELECT id FROM {base}_erasure', primary_key => '{{id}}');
             CREATE SERVER {base}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
             SELECT retl.create_sync(name => '{base}_s', model => '{base}_m', destination => '{base}_d', mode => 'delete');",
            url = fake.url()
        ))
        .unwrap();
    let run_sql = format!("SELECT planned_deletes, delivered, api_calls FROM retl.run('{base}_s', wait => true)");
    let row = client.query_one(&run_sql, &[]).unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2, 2));
    assert_eq!(ops_sent(&fake), vec![("delete".into(), key(2)), ("delete".into(), key(4))]);
    let left: Vec<String> = fake.records().into_keys().collect();
    assert_eq!(left, vec![key(1), key(3), key(5)]);
    // Already erased keys are not sent again; a new tombstone is.
    client.batch_execute(&format!("INSERT INTO {base}_erasure VALUES (5)")).unwrap();
    fake.clear_journal();
    let row = client.query_one(&run_sql, &[]).unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (1, 1, 1));
    assert_eq!(ops_sent(&fake), vec![("delete".into(), key(5))]);
}
