//! ALTER EXTENSION pg_reverse_etl UPDATE from every earlier release (0.1.0 to 0.9.0): syncs defined under an
//! earlier version and their state (run history, snapshot, row errors) survive, the next run
//! sends exactly what the snapshot says is missing, on-change syncs keep running (and, from
//! 0.3.0, plan only the changed keys), and an upgraded catalog equals a freshly installed one.
//!
//! These tests drop and re-create the extension in the workers' database: `make e2e` runs test
//! files one after the other, and every other file creates the extension when it is missing.
mod common;
use common::*;
use retl_e2e::cluster::connect_db;
use serde_json::json;

const FIRST: &str = "0.1.0";
const SECOND: &str = "0.2.0";
const THIRD: &str = "0.3.0";
const FOURTH: &str = "0.4.0";
const FIFTH: &str = "0.5.0";
const SIXTH: &str = "0.6.0";
const SEVENTH: &str = "0.7.0";
const EIGHTH: &str = "0.8.0";
const NINTH: &str = "0.9.0";
const TENTH: &str = "0.10.0";
const PREVIOUS: &str = "0.11.0";
const CURRENT: &str = env!("CARGO_PKG_VERSION");

#[test]
fn syncs_and_their_state_survive_the_upgrade_from_0_1_0() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{FIRST}'"
    ))
    .unwrap();
    let base = unique("up");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    // Defined with the 0.1.0 API.
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, score int);
         INSERT INTO {table} SELECT i, 'u' || i || '@example.com', i FROM generate_series(1, 5) i;
         SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, score FROM {table}', primary_key => '{{id}}');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', mode => 'upsert');",
        url = fake.url()
    ))
    .unwrap();

    // Until the update the workers wait, and 0.1.0's run(wait) says what to do.
    let err = c.query_one(&format!("SELECT * FROM retl.run('{sync}', wait => true)"), &[]).unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "55000");
    assert_eq!(
        db.message(),
        format!("the pg_reverse_etl library is version {CURRENT} but the extension's SQL objects are version {FIRST}")
    );
    assert_eq!(db.hint(), Some(&*format!("Run ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'; the workers wait until then.")));

    // The state a 0.1.0 worker leaves: a finished run, rows 1-4 acknowledged (in the snapshot,
    // and held by the destination), row 5 rejected by the destination.
    c.batch_execute(&format!(
        "INSERT INTO retl.runs (sync_id, status, rows_in_model, planned_inserts, delivered, failed, api_calls, started_at, planned_at, finished_at)
         SELECT id, 'partial', 5, 5, 4, 1, 1, now(), now(), now() FROM retl.syncs WHERE name = '{sync}';
         INSERT INTO retl.snapshots (sync_id, key, hash)
         SELECT s.id, jsonb_build_object('id', m.id), retl._row_hash(to_jsonb(m.*)::text)
           FROM retl_models.{model} m, retl.syncs s WHERE s.name = '{sync}' AND m.id <= 4;
         INSERT INTO retl.row_errors (sync_id, key, run_id, op, payload, http_status, response)
         SELECT s.id, '{{\"id\": 5}}', r.id, 'upsert', to_jsonb(m.*), 422, 'score too low'
           FROM retl.syncs s JOIN retl.runs r ON r.sync_id = s.id, retl_models.{model} m WHERE s.name = '{sync}' AND m.id = 5;"
    ))
    .unwrap();
    for id in 1..=4i64 {
        fake.preload(json!({"id": id}), json!({"id": id, "email": format!("u{id}@example.com"), "score": id}));
    }
    c.batch_execute(&format!("UPDATE {table} SET score = 99 WHERE id = 2")).unwrap();

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();

    let version: String = c.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_reverse_etl'", &[]).unwrap().get(0);
    assert_eq!(version, CURRENT);
    let kept = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM retl.runs r WHERE r.sync_id = s.id),
                        (SELECT count(*) FROM retl.snapshots n WHERE n.sync_id = s.id),
                        (SELECT count(*) FROM retl.row_errors e WHERE e.sync_id = s.id),
                        s.schedule, s.next_run_at IS NULL,
                        (SELECT array_agg(relid::regclass::text) FROM retl.sync_sources src WHERE src.sync_id = s.id)
                   FROM retl.syncs s WHERE s.name = '{sync}'"
            ),
            &[],
        )
        .unwrap();
    assert_eq!((kept.get::<_, i64>(0), kept.get::<_, i64>(1), kept.get::<_, i64>(2)), (1, 4, 1));
    assert_eq!((kept.get::<_, String>(3), kept.get::<_, bool>(4)), ("manual".to_string(), true));
    assert_eq!(kept.get::<_, Vec<String>>(5), vec![table.clone()]);

    // The next run sends exactly row 2 (changed) and row 5 (never acknowledged).
    let run = c
        .query_one(
            &format!("SELECT status, planned_inserts, planned_updates, delivered, api_calls FROM retl.run('{sync}', wait => true)"),
            &[],
        )
        .unwrap();
    assert_eq!(run.get::<_, String>(0), "succeeded");
    assert_eq!(
        (run.get::<_, i64>(1), run.get::<_, i64>(2), run.get::<_, i64>(3), run.get::<_, i64>(4)),
        (1, 1, 2, 1)
    );
    let sent = keys_in_request(&fake, 0);
    assert_eq!(sent, [key(2), key(5)].into_iter().collect());
    assert_eq!(fake.records().len(), 5);
    assert_eq!(fake.records()[&key(2)]["score"], json!(99));
    let errors: i64 = c.query_one("SELECT count(*) FROM retl.row_errors", &[]).unwrap().get(0);
    assert_eq!(errors, 0, "row 5 was delivered: its error is cleared");

    // On-change syncs (0.2.0) work on the upgraded sync.
    c.batch_execute(&format!("SELECT retl.alter_sync(name => '{sync}', schedule => 'on change')")).unwrap();
    c.batch_execute(&format!("UPDATE {table} SET score = 7 WHERE id = 3")).unwrap();
    wait_until(SHORT, "the change to arrive", || fake.records()[&key(3)]["score"] == json!(7));
}

#[test]
fn a_live_on_change_sync_survives_the_upgrade_from_0_2_0_and_then_plans_only_changed_keys() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{SECOND}'"
    ))
    .unwrap();
    let base = unique("up2");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    // Defined with the 0.2.0 API: an on-change sync.
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, score int);
         INSERT INTO {table} SELECT i, 'u' || i || '@example.com', i FROM generate_series(1, 5) i;
         SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, score FROM {table}', primary_key => '{{id}}');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', mode => 'upsert', schedule => 'on change');",
        url = fake.url()
    ))
    .unwrap();
    // The state a 0.2.0 worker leaves: a finished run, rows 1-4 acknowledged (hash version 2).
    c.batch_execute(&format!(
        "INSERT INTO retl.runs (sync_id, trigger, status, rows_in_model, planned_inserts, delivered, api_calls, started_at, planned_at, finished_at)
         SELECT id, 'change', 'succeeded', 4, 4, 4, 1, now(), now(), now() FROM retl.syncs WHERE name = '{sync}';
         INSERT INTO retl.snapshots (sync_id, key, hash)
         SELECT s.id, jsonb_build_object('id', m.id), retl._row_hash('v2:id,email,score|' || (m)::text)
           FROM retl_models.{model} m, retl.syncs s WHERE s.name = '{sync}' AND m.id <= 4;"
    ))
    .unwrap();
    for id in 1..=4i64 {
        fake.preload(json!({"id": id}), json!({"id": id, "email": format!("u{id}@example.com"), "score": id}));
    }

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();

    let kept = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM retl.runs r WHERE r.sync_id = s.id),
                        (SELECT string_agg(r.plan_scope, ',') FROM retl.runs r WHERE r.sync_id = s.id),
                        (SELECT count(*) FROM retl.snapshots n WHERE n.sync_id = s.id),
                        (SELECT src.key_attnums FROM retl.sync_sources src WHERE src.sync_id = s.id),
                        (SELECT count(*) FROM retl.changed_keys k WHERE k.sync_id = s.id AND k.key IS NULL),
                        (SELECT count(*) FROM pg_trigger g WHERE g.tgrelid = '{table}'::regclass AND g.tgname LIKE 'retl%' AND g.tgenabled = 'A'),
                        s.schedule, s.hash_version
                   FROM retl.syncs s WHERE s.name = '{sync}'"
            ),
            &[],
        )
        .unwrap();
    assert_eq!((kept.get::<_, i64>(0), kept.get::<_, String>(1), kept.get::<_, i64>(2)), (1, "model".to_string(), 4));
    assert_eq!(kept.get::<_, Vec<i16>>(3), vec![1], "the model's key is traced to the table");
    assert_eq!(kept.get::<_, i64>(4), 1, "the first run after the upgrade plans the whole model");
    assert_eq!(kept.get::<_, i64>(5), 5, "retl_on_change and the four retl_changed_keys triggers, firing always");
    assert_eq!((kept.get::<_, String>(6), kept.get::<_, i16>(7)), ("on change".to_string(), 2));

    // A change: the whole model is planned once, and exactly rows 3 (changed) and 5 (never
    // acknowledged) are sent.
    c.batch_execute(&format!("UPDATE {table} SET score = 33 WHERE id = 3")).unwrap();
    wait_until(SHORT, "rows 3 and 5 to arrive", || fake.records().len() == 5 && fake.records()[&key(3)]["score"] == json!(33));
    assert_eq!(keys_in_request(&fake, 0), [key(3), key(5)].into_iter().collect());
    // The next change plans only its key.
    c.batch_execute(&format!("UPDATE {table} SET score = 44 WHERE id = 4")).unwrap();
    wait_until(SHORT, "row 4 to arrive", || fake.records()[&key(4)]["score"] == json!(44));
    assert_eq!(keys_in_request(&fake, 1), [key(4)].into_iter().collect());
    let scopes: Vec<Option<String>> = c
        .query(
            &format!("SELECT r.plan_scope FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{sync}' ORDER BY r.id"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(scopes, [Some("model".to_string()), Some("model".to_string()), Some("changed keys".to_string())]);
    c.batch_execute(&format!("SELECT retl.drop_sync('{sync}')")).unwrap();
}

#[test]
fn a_sync_with_an_identity_map_and_row_errors_survives_the_upgrade_from_0_3_0() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{THIRD}'"
    ))
    .unwrap();
    let base = unique("up3");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    // Defined with the 0.3.0 API.
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, score int);
         INSERT INTO {table} SELECT i, 'u' || i || '@example.com', i FROM generate_series(1, 5) i;
         SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, score FROM {table}', primary_key => '{{id}}');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', mode => 'mirror');",
        url = fake.url()
    ))
    .unwrap();
    // The state a 0.3.0 worker leaves: a finished run, rows 1-4 acknowledged, destination ids
    // learned for two of them, and a rejected row.
    c.batch_execute(&format!(
        "INSERT INTO retl.runs (sync_id, trigger, status, rows_in_model, planned_inserts, delivered, failed, api_calls, started_at, planned_at, finished_at, plan_scope)
         SELECT id, 'manual', 'partial', 5, 5, 4, 1, 1, now(), now(), now(), 'model' FROM retl.syncs WHERE name = '{sync}';
         INSERT INTO retl.snapshots (sync_id, key, hash)
         SELECT s.id, jsonb_build_object('id', m.id), retl._row_hash('v2:id,email,score|' || (m)::text)
           FROM retl_models.{model} m, retl.syncs s WHERE s.name = '{sync}' AND m.id <= 4;
         INSERT INTO retl.identities (sync_id, key, destination_id)
         SELECT s.id, jsonb_build_object('id', i), 'dest-' || i FROM retl.syncs s, generate_series(1, 2) i WHERE s.name = '{sync}';
         INSERT INTO retl.row_errors (sync_id, key, run_id, op, payload, http_status, response)
         SELECT s.id, '{{\"id\": 5}}', r.id, 'upsert', '{{}}', 422, 'refused' FROM retl.syncs s JOIN retl.runs r ON r.sync_id = s.id WHERE s.name = '{sync}';"
    ))
    .unwrap();
    for id in 1..=4i64 {
        fake.preload(json!({"id": id}), json!({"id": id, "email": format!("u{id}@example.com"), "score": id}));
    }

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();

    let kept = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM retl.runs r WHERE r.sync_id = s.id AND r.api_usage IS NULL),
                        (SELECT count(*) FROM retl.snapshots n WHERE n.sync_id = s.id),
                        (SELECT string_agg(i.destination_id, ',' ORDER BY i.destination_id) FROM retl.identities i WHERE i.sync_id = s.id),
                        (SELECT count(*) FROM retl.row_errors e WHERE e.sync_id = s.id),
                        (SELECT st.api_usage IS NULL AND st.last_status = 'partial' FROM retl.sync_status st WHERE st.sync = s.name)
                   FROM retl.syncs s WHERE s.name = '{sync}'"
            ),
            &[],
        )
        .unwrap();
    assert_eq!(
        (kept.get::<_, i64>(0), kept.get::<_, i64>(1), kept.get::<_, String>(2), kept.get::<_, i64>(3), kept.get::<_, bool>(4)),
        (1, 4, "dest-1,dest-2".to_string(), 1, true)
    );
    // The next run sends exactly the row the snapshot lacks, and the identities stay.
    c.batch_execute(&format!("UPDATE {table} SET score = 55 WHERE id = 5")).unwrap();
    let run = run_sync(&mut c, &sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 1, 1), "{run:?}");
    assert_eq!(keys_in_request(&fake, 0), [key(5)].into_iter().collect());
    assert_eq!(fake.records().len(), 5);
    let identities: i64 = c
        .query_one(&format!("SELECT count(*) FROM retl.identities i JOIN retl.syncs s ON s.id = i.sync_id WHERE s.name = '{sync}'"), &[])
        .unwrap()
        .get(0);
    assert_eq!(identities, 2);
    c.batch_execute(&format!("SELECT retl.drop_sync('{sync}')")).unwrap();
}

#[test]
fn a_live_mirror_sync_survives_the_upgrade_from_0_4_0_and_is_then_guarded() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{FOURTH}'"
    ))
    .unwrap();
    let base = unique("up4");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    // Defined with the 0.4.0 API. The installed library is 0.5.0 and its workers wait for the
    // matching SQL, so the state a 0.4.0 worker leaves (a partial run, rows 1-5 acknowledged,
    // row 6 rejected) is written as such.
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, score int);
         INSERT INTO {table} SELECT i, 'u' || i || '@example.com', i FROM generate_series(1, 6) i;
         SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, score FROM {table}', primary_key => '{{id}}');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', mode => 'mirror');
         INSERT INTO retl.runs (sync_id, trigger, status, rows_in_model, planned_inserts, delivered, failed, api_calls,
                                started_at, planned_at, finished_at, plan_scope, api_usage)
         SELECT id, 'manual', 'partial', 6, 6, 5, 1, 1, now(), now(), now(), 'model', 'api-usage=1/100'
           FROM retl.syncs WHERE name = '{sync}';
         INSERT INTO retl.snapshots (sync_id, key, hash)
         SELECT s.id, jsonb_build_object('id', m.id), retl._row_hash('v2:id,email,score|' || (m)::text)
           FROM retl_models.{model} m, retl.syncs s WHERE s.name = '{sync}' AND m.id <= 5;
         INSERT INTO retl.row_errors (sync_id, key, run_id, op, payload, http_status, response)
         SELECT s.id, '{{\"id\": 6}}', r.id, 'upsert', '{{}}', 422, 'refused'
           FROM retl.syncs s JOIN retl.runs r ON r.sync_id = s.id WHERE s.name = '{sync}';",
        url = fake.url()
    ))
    .unwrap();
    for id in 1..=5i64 {
        fake.preload(json!({"id": id}), json!({"id": id, "email": format!("u{id}@example.com"), "score": id}));
    }

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();

    // State kept; the sync has the 0.5.0 defaults; the row error has no hash yet.
    let kept = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM retl.snapshots n WHERE n.sync_id = s.id),
                        (SELECT count(*) FROM retl.row_errors e WHERE e.sync_id = s.id AND e.hash IS NULL),
                        s.max_delete_percent::text, s.alert_after_failures, s.nulls, st.api_usage, st.last_status,
                        st.open_alerts
                   FROM retl.syncs s JOIN retl.sync_status st ON st.sync = s.name WHERE s.name = '{sync}'"
            ),
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            kept.get::<_, i64>(0),
            kept.get::<_, i64>(1),
            kept.get::<_, String>(2),
            kept.get::<_, i32>(3),
            kept.get::<_, String>(4),
            kept.get::<_, Option<String>>(5),
            kept.get::<_, String>(6),
            kept.get::<_, i64>(7)
        ),
        (5, 1, "50".to_string(), 3, "send".to_string(), Some("api-usage=1/100".to_string()), "partial".to_string(), 0)
    );
    // The next run sends exactly the row the snapshot lacks and records its schema contract.
    let run = run_sync(&mut c, &sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 1, 1), "{run:?}");
    assert_eq!(keys_in_request(&fake, 0), [key(6)].into_iter().collect());
    let contract: String = c.query_one("SELECT model_columns::text FROM retl.runs WHERE id = $1", &[&run.id]).unwrap().get(0);
    assert_eq!(contract, r#"{"id": "bigint", "email": "text", "score": "integer"}"#);
    // The upgraded mirror sync is guarded: 4 of 6 deletes are refused, nothing is sent.
    c.batch_execute(&format!("DELETE FROM {table} WHERE id <= 4")).unwrap();
    let requests = fake.request_count();
    let run = run_sync(&mut c, &sync);
    assert_eq!((run.status.as_str(), run.deletes, run.delivered), ("failed", 4, 0));
    assert_eq!((fake.request_count(), fake.records().len()), (requests, 6));
    c.batch_execute(&format!("SELECT retl.drop_sync('{sync}')")).unwrap();
}

#[test]
fn a_live_sync_keeps_its_row_hashes_through_the_upgrade_from_0_5_0_and_new_syncs_hash_values() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{FIFTH}'"
    ))
    .unwrap();
    let base = unique("up5");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    // Defined with the 0.5.0 API; the state a 0.5.0 worker leaves (rows 1-4 acknowledged with
    // hashes of version 2, row 5 not yet sent) is written as such: the workers wait for 0.6.0.
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, score numeric, seen interval);
         INSERT INTO {table} SELECT i, 'u' || i || '@example.com', i, i * interval '1 day' FROM generate_series(1, 5) i;
         SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, score, seen FROM {table}', primary_key => '{{id}}');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', mode => 'upsert');
         INSERT INTO retl.runs (sync_id, trigger, status, rows_in_model, planned_inserts, delivered, api_calls,
                                started_at, planned_at, finished_at, plan_scope, model_columns)
         SELECT id, 'manual', 'succeeded', 4, 4, 4, 1, now(), now(), now(), 'model',
                '{{\"id\": \"bigint\", \"email\": \"text\", \"score\": \"numeric\", \"seen\": \"interval\"}}'
           FROM retl.syncs WHERE name = '{sync}';
         SET IntervalStyle = iso_8601;
         INSERT INTO retl.snapshots (sync_id, key, hash)
         SELECT s.id, jsonb_build_object('id', m.id), retl._row_hash('v2:id,email,score,seen|' || (m)::text)
           FROM retl_models.{model} m, retl.syncs s WHERE s.name = '{sync}' AND m.id <= 4;
         RESET IntervalStyle;",
        url = fake.url()
    ))
    .unwrap();
    for id in 1..=4i64 {
        fake.preload(json!({"id": id}), json!({"id": id, "email": format!("u{id}@example.com"), "score": id, "seen": format!("P{id}D")}));
    }

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();

    // The sync keeps hashing as its snapshot was hashed: the next run sends only row 5.
    assert_eq!(hash_version(&mut c, &sync), 2);
    only_the_missing_row_5_is_sent(&mut c, &fake, &sync);
    // Version 2 hashes the text, so a numeric's new trailing zero is a change there.
    c.batch_execute(&format!("UPDATE {table} SET score = 2.0 WHERE id = 2")).unwrap();
    let run = run_sync(&mut c, &sync);
    assert_eq!((run.status.as_str(), run.updates, run.delivered), ("succeeded", 1, 1), "{run:?}");
    assert_eq!(fake.records(), model_records(&mut c, &model));

    // A sync created now gets fingerprints (version 4): everything once, then nothing; a
    // numeric's trailing zero and an interval written differently are changes.
    let fake3 = FakeWebhook::start();
    let sync3 = a_new_sync_gets_fingerprints(&mut c, &fake3, &format!("{base}_3"), &model, "upsert", 5);
    c.batch_execute(&format!("UPDATE {table} SET score = 3.00 WHERE id = 3; UPDATE {table} SET seen = interval '96 hours' WHERE id = 4"))
        .unwrap();
    let run = run_sync(&mut c, &sync3);
    assert_eq!((run.status.as_str(), run.updates, run.delivered), ("succeeded", 2, 2), "{run:?}");
    assert_eq!(keys_in_request(&fake3, 1), [key(3), key(4)].into_iter().collect());
    assert_eq!(fake3.records(), model_records(&mut c, &model));
    c.batch_execute(&format!("SELECT retl.drop_sync('{sync}'); SELECT retl.drop_sync('{sync3}')")).unwrap();
}

#[test]
fn a_live_sync_survives_the_upgrade_from_0_6_0_and_its_model_can_then_be_changed_in_place() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{SIXTH}'"
    ))
    .unwrap();
    let base = unique("up6");
    // Defined with the 0.6.0 API: the workers wait for 0.7.0.
    let (table, model, sync) = live_sync_with_v3_hashes(&mut c, &fake, &base, "upsert");

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();

    // State kept: the next run sends only row 5.
    let runs: i64 = c
        .query_one("SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1", &[&sync])
        .unwrap()
        .get(0);
    assert_eq!(runs, 1);
    only_the_missing_row_5_is_sent(&mut c, &fake, &sync);
    assert_eq!(fake.records(), model_records(&mut c, &model));

    // What 0.7.0 adds works on the upgraded catalog: the model changes in place (one row's
    // value: one update), and the export applies as a no-op.
    c.execute(
        "SELECT retl.alter_model(name => $1, query => $2)",
        &[&model, &format!("SELECT id, email, CASE WHEN id = 3 THEN 30 ELSE score END AS score FROM {table}")],
    )
    .unwrap();
    let run = run_sync(&mut c, &sync);
    assert_eq!((run.status.as_str(), run.inserts, run.updates, run.delivered), ("succeeded", 0, 1, 1), "{run:?}");
    assert_eq!(fake.records(), model_records(&mut c, &model));
    let changes: i64 = c.query_one("SELECT count(*) FROM retl.apply(retl.export())", &[]).unwrap().get(0);
    assert_eq!(changes, 0);
    c.batch_execute(&format!("SELECT retl.drop_sync('{sync}')")).unwrap();
}

#[test]
fn a_live_sync_keeps_its_hashes_through_the_upgrade_from_0_7_0_and_new_syncs_get_fingerprints() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{SEVENTH}'"
    ))
    .unwrap();
    let base = unique("up7");
    // Defined with the 0.7.0 API: the workers wait for 0.8.0.
    let (table, model, sync) = live_sync_with_v3_hashes(&mut c, &fake, &base, "mirror");

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();

    // The sync keeps its version 3 hashes (and the SQL plan): the next run sends only row 5.
    assert_eq!(hash_version(&mut c, &sync), 3);
    only_the_missing_row_5_is_sent(&mut c, &fake, &sync);
    c.batch_execute(&format!("DELETE FROM {table} WHERE id = 1")).unwrap();
    let run = run_sync(&mut c, &sync);
    assert_eq!((run.status.as_str(), run.deletes, run.delivered), ("succeeded", 1, 1), "{run:?}");
    assert_eq!(fake.records(), model_records(&mut c, &model));

    // A sync created after the upgrade gets fingerprints and the one-pass plan: everything
    // once, then nothing, then exactly what changed.
    let fake4 = FakeWebhook::start();
    let sync4 = a_new_sync_gets_fingerprints(&mut c, &fake4, &format!("{base}_4"), &model, "mirror", 4);
    c.batch_execute(&format!("UPDATE {table} SET score = 20 WHERE id = 2; DELETE FROM {table} WHERE id = 3")).unwrap();
    let run = run_sync(&mut c, &sync4);
    assert_eq!((run.status.as_str(), run.updates, run.deletes, run.delivered), ("succeeded", 1, 1, 2), "{run:?}");
    assert_eq!(fake4.records(), model_records(&mut c, &model));
    c.batch_execute(&format!("SELECT retl.drop_sync('{sync}'); SELECT retl.drop_sync('{sync4}')")).unwrap();
}

#[test]
fn a_live_sync_with_queued_rows_survives_the_upgrade_from_0_8_0_and_its_references_are_still_kept() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{EIGHTH}'"
    ))
    .unwrap();
    let base = unique("up8");
    // Defined with the 0.8.0 API (the workers wait for 0.9.0): rows 1-4 acknowledged, row 5
    // not yet sent, and a failed run that left an update of row 1 queued.
    let (_table, model, sync) = live_sync_with_v3_hashes(&mut c, &fake, &base, "upsert");
    c.batch_execute(&format!(
        "UPDATE retl.syncs SET hash_version = 3 WHERE name = '{sync}';
         INSERT INTO retl.runs (sync_id, trigger, status, planned_updates, started_at, planned_at, finished_at, error)
         SELECT id, 'manual', 'failed', 1, now(), now(), now(), 'delivery failed' FROM retl.syncs WHERE name = '{sync}';
         INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash)
         SELECT s.id, r.id, 'upsert', '{{\"id\": 1}}', '{{\"id\": 1, \"email\": \"u1@example.com\", \"score\": 1}}', '\\x00'
           FROM retl.syncs s JOIN retl.runs r ON r.sync_id = s.id AND r.status = 'failed' WHERE s.name = '{sync}';"
    ))
    .unwrap();
    let counts = |c: &mut postgres::Client| queued_snapshot_and_runs(c, &sync);
    assert_eq!(counts(&mut c), (1, 4, 2));

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();

    // Nothing lost: the queued row, the snapshot, the history.
    assert_eq!(counts(&mut c), (1, 4, 2));
    let fkeys: i64 = c
        .query_one("SELECT count(*) FROM pg_constraint WHERE conrelid IN ('retl.outbox'::regclass, 'retl.snapshots'::regclass) AND contype = 'f'", &[])
        .unwrap()
        .get(0);
    assert_eq!(fkeys, 0, "checked by statement triggers instead");

    // The references are still kept: a row of a run or sync that does not exist is refused
    // (and nothing of its statement stays), a reference cannot change, and deleting a run or a
    // sync deletes its rows.
    let refused = c
        .batch_execute(
            "INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash) VALUES (1, -7, 'upsert', '{\"id\": 9}', '{}', '\\x00')",
        )
        .unwrap_err();
    let db = refused.as_db_error().unwrap();
    assert_eq!(
        (db.code().code(), db.message()),
        ("23503", "insert into table \"outbox\" refers to run -7, which does not exist")
    );
    let refused = c
        .batch_execute("INSERT INTO retl.snapshots (sync_id, key, hash) VALUES (-8, '{\"id\": 9}', '\\x00')")
        .unwrap_err();
    let db = refused.as_db_error().unwrap();
    assert_eq!(
        (db.code().code(), db.message()),
        ("23503", "insert into table \"snapshots\" refers to sync -8, which does not exist")
    );
    let refused = c.batch_execute("UPDATE retl.outbox SET run_id = run_id + 1000").unwrap_err();
    let db = refused.as_db_error().unwrap();
    assert_eq!((db.code().code(), db.message()), ("0A000", "the run of a row of retl.outbox cannot change"));
    assert_eq!(counts(&mut c), (1, 4, 2));

    // The next run plans afresh (the leftover superseded) and sends what the snapshot lacks.
    only_the_missing_row_5_is_sent(&mut c, &fake, &sync);
    assert_eq!(counts(&mut c), (0, 5, 3));
    assert_eq!(fake.records(), model_records(&mut c, &model));

    // Deleting a run deletes its queued rows (a failed run's, written here as a plan would).
    c.batch_execute(&format!(
        "INSERT INTO retl.runs (sync_id, trigger, status, started_at, finished_at, error)
         SELECT id, 'manual', 'failed', now(), now(), 'delivery failed' FROM retl.syncs WHERE name = '{sync}';
         INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash)
         SELECT r.sync_id, r.id, 'upsert', jsonb_build_object('id', i), '{{}}', '\\x00'
           FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id, generate_series(1, 3) i
          WHERE s.name = '{sync}' AND r.status = 'failed' AND r.planned_at IS NULL;"
    ))
    .unwrap();
    assert_eq!(counts(&mut c), (3, 5, 4));
    c.batch_execute(&format!(
        "DELETE FROM retl.runs r USING retl.syncs s WHERE s.id = r.sync_id AND s.name = '{sync}' AND r.planned_at IS NULL"
    ))
    .unwrap();
    assert_eq!(counts(&mut c), (0, 5, 3));
    c.batch_execute(&format!("SELECT retl.drop_sync('{sync}')")).unwrap();
    assert_eq!(counts(&mut c), (0, 0, 0));
    let orphans: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM retl.outbox o WHERE NOT EXISTS (SELECT FROM retl.runs r WHERE r.id = o.run_id))
                  + (SELECT count(*) FROM retl.snapshots n WHERE NOT EXISTS (SELECT FROM retl.syncs s WHERE s.id = n.sync_id))",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);
}

#[test]
fn a_run_delivering_during_the_upgrade_from_0_9_0_is_delivered_after_it() {
    a_run_delivering_during_the_upgrade_is_delivered_after_it(NINTH);
}

#[test]
fn a_run_delivering_during_the_upgrade_from_0_10_0_is_delivered_after_it() {
    a_run_delivering_during_the_upgrade_is_delivered_after_it(TENTH);
}

#[test]
fn a_run_delivering_during_the_upgrade_from_0_11_0_is_delivered_after_it() {
    a_run_delivering_during_the_upgrade_is_delivered_after_it(PREVIOUS);
}

/// A run that was delivering when the database was updated from `from` (its rows queued in
/// the outbox, whose key 0.10.0 and 0.11.0 each rebuilt; 0.11.0 files them by sync, run and id)
/// is delivered after the update: the destination gets exactly the queued rows, the snapshot
/// takes them, the outbox empties, and the next run sends nothing. The snapshot keeps its rows
/// and has room on its pages (fillfactor 90); a row filed under another sync is refused (by
/// the reference check 0.12.0 replaced).
fn a_run_delivering_during_the_upgrade_is_delivered_after_it(from: &str) {
    let fake = FakeWebhook::start();
    let mut c = connect();
    c.batch_execute(&format!(
        "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE; CREATE EXTENSION pg_reverse_etl VERSION '{from}'"
    ))
    .unwrap();
    let base = unique("updeliver");
    // Defined with the old API (the workers wait for the update): rows 1-4 acknowledged, then
    // a run planned the new row 5 and the change of row 2 and was delivering them.
    let (table, model, sync) = live_sync_with_v3_hashes(&mut c, &fake, &base, "upsert");
    c.batch_execute(&format!(
        "UPDATE retl.syncs SET hash_version = 3 WHERE name = '{sync}';
         UPDATE {table} SET score = 20 WHERE id = 2;
         INSERT INTO retl.runs (sync_id, trigger, status, rows_in_model, planned_inserts, planned_updates, started_at, planned_at,
                                plan_scope, model_columns)
         SELECT id, 'manual', 'delivering', 5, 1, 1, now(), now(), 'model',
                '{{\"id\": \"bigint\", \"email\": \"text\", \"score\": \"integer\"}}'
           FROM retl.syncs WHERE name = '{sync}';
         INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash)
         SELECT s.id, r.id, 'upsert', jsonb_build_object('id', m.id), to_jsonb(m.*), {V3_HASH}
           FROM retl.syncs s JOIN retl.runs r ON r.sync_id = s.id AND r.status = 'delivering',
                retl_models.{model} m
          WHERE s.name = '{sync}' AND m.id IN (5, 2) ORDER BY m.id DESC;"
    ))
    .unwrap();
    let counts = |c: &mut postgres::Client| queued_snapshot_and_runs(c, &sync);
    assert_eq!(counts(&mut c), (2, 4, 2));

    c.batch_execute(&format!("ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'")).unwrap();
    let (fillfactor, indexes): (Vec<String>, Vec<String>) = c
        .query_one(
            "SELECT (SELECT reloptions FROM pg_class WHERE oid = 'retl.snapshots'::regclass),
                    (SELECT array_agg(pg_get_indexdef(indexrelid)) FROM pg_index WHERE indrelid = 'retl.outbox'::regclass)",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (fillfactor, indexes),
        (
            vec!["fillfactor=90".to_string()],
            vec!["CREATE UNIQUE INDEX outbox_pkey ON retl.outbox USING btree (sync_id, run_id, id)".to_string()]
        )
    );
    // Rows are found by sync, run and id: a row filed under another sync than its run's is
    // refused (it would never be found).
    let (run_id, sync_id): (i64, i64) = c
        .query_one(
            "SELECT r.id, r.sync_id FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1 ORDER BY r.id DESC LIMIT 1",
            &[&sync],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    let misfiled = c
        .batch_execute(&format!(
            "INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash)
             VALUES ({}, {run_id}, 'upsert', '{{\"id\": 9}}', '{{}}', '\\x00')",
            sync_id + 1000
        ))
        .unwrap_err();
    let (code, message, _, _) = db_error(&misfiled);
    assert_eq!(
        (code.as_str(), message),
        (
            "23503",
            format!(
                "insert into table \"outbox\" files a row of run {run_id} under sync {}, but run {run_id} is of sync {sync_id}",
                sync_id + 1000
            )
        )
    );

    // The workers take the run up where it was: both queued rows, in one request.
    wait_until(std::time::Duration::from_secs(30), "the queued run to be delivered", || {
        last_run_of(&mut c, &sync).status != "delivering"
    });
    let run = last_run_of(&mut c, &sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("succeeded", 2, 0), "{run:?}");
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(keys_in_request(&fake, 0), [key(5), key(2)].into_iter().collect());
    assert_eq!(fake.records(), model_records(&mut c, &model));
    assert_eq!(counts(&mut c), (0, 5, 2));

    // The snapshot holds what was delivered: the next run sends nothing.
    let run = run_sync(&mut c, &sync);
    assert_eq!((run.status.as_str(), run.inserts, run.updates, run.deletes, run.api_calls), ("succeeded", 0, 0, 0, 0), "{run:?}");
    assert_eq!(fake.requests().len(), 1);
}

/// Inside the transaction that creates the extension, which is what a restore with
/// `pg_restore --single-transaction` runs, the outbox's and the snapshot's references are
/// not checked: a dump is consistent, and its order of the tables' data no longer accounts for
/// these two references. Outside it they are.
#[test]
fn references_are_not_checked_while_a_restore_creates_the_extension() {
    let mut admin = connect();
    let db = unique("restoring");
    admin.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    {
        let mut c = connect_db(&db);
        let orphan = |id: i32| format!("INSERT INTO retl.snapshots (sync_id, key, hash) VALUES (-8, '{{\"id\": {id}}}', '\\x00')");
        c.batch_execute(&format!("BEGIN; CREATE EXTENSION pg_reverse_etl; {}; COMMIT", orphan(1))).unwrap();
        let refused = c.batch_execute(&orphan(2)).unwrap_err();
        assert_eq!(refused.as_db_error().unwrap().code().code(), "23503");
        let held: i64 = c.query_one("SELECT count(*) FROM retl.snapshots", &[]).unwrap().get(0);
        assert_eq!(held, 1);
    }
    admin.batch_execute(&format!("DROP DATABASE {db}")).unwrap();
}

/// The version-3 hash of a row `m` of the models these tests define (id, email, score), as SQL.
const V3_HASH: &str =
    "int8send(hash_record_extended(ROW(m.id, (m.email)::text COLLATE \"C\", m.score), hashtextextended('v3:id,email,score', 0)))";

/// A sync as a worker of 0.6.0 or 0.7.0 leaves it, written as such (the workers wait for the
/// library's version): a table and model of rows 1-5, a `mode` sync to `fake` whose run
/// acknowledged rows 1-4 with hashes of version 3 (the fake holds them), row 5 not yet sent.
/// Returns (table, model, sync).
fn live_sync_with_v3_hashes(c: &mut postgres::Client, fake: &FakeWebhook, base: &str, mode: &str) -> (String, String, String) {
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, score int);
         INSERT INTO {table} SELECT i, 'u' || i || '@example.com', i FROM generate_series(1, 5) i;
         SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, score FROM {table}', primary_key => '{{id}}');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', mode => '{mode}');
         INSERT INTO retl.runs (sync_id, trigger, status, rows_in_model, planned_inserts, delivered, api_calls,
                                started_at, planned_at, finished_at, plan_scope, model_columns)
         SELECT id, 'manual', 'succeeded', 4, 4, 4, 1, now(), now(), now(), 'model',
                '{{\"id\": \"bigint\", \"email\": \"text\", \"score\": \"integer\"}}'
           FROM retl.syncs WHERE name = '{sync}';
         INSERT INTO retl.snapshots (sync_id, key, hash)
         SELECT s.id, jsonb_build_object('id', m.id), {V3_HASH}
           FROM retl_models.{model} m, retl.syncs s WHERE s.name = '{sync}' AND m.id <= 4;",
        url = fake.url()
    ))
    .unwrap();
    for id in 1..=4i64 {
        fake.preload(json!({"id": id}), json!({"id": id, "email": format!("u{id}@example.com"), "score": id}));
    }
    (table, model, sync)
}

/// A `mode` sync of `model` (`rows` rows) created after an upgrade, to `fake`: it gets
/// fingerprints (hash version 4), its first run sends every row, the next nothing. Returns it.
fn a_new_sync_gets_fingerprints(c: &mut postgres::Client, fake: &FakeWebhook, base: &str, model: &str, mode: &str, rows: i64) -> String {
    let (server, sync) = (format!("{base}_d"), format!("{base}_s"));
    c.batch_execute(&format!(
        "CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', mode => '{mode}');",
        url = fake.url()
    ))
    .unwrap();
    assert_eq!(hash_version(c, &sync), 4);
    assert_eq!(run_sync(c, &sync).delivered, rows);
    assert_eq!(fake.records(), model_records(c, model));
    let run = run_sync(c, &sync);
    assert_eq!((run.status.as_str(), run.inserts + run.updates + run.deletes), ("succeeded", 0), "{run:?}");
    sync
}

/// How many rows of `sync` the outbox, the snapshot and the run history hold.
fn queued_snapshot_and_runs(c: &mut postgres::Client, sync: &str) -> (i64, i64, i64) {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM retl.outbox o JOIN retl.syncs s ON s.id = o.sync_id WHERE s.name = $1),
                    (SELECT count(*) FROM retl.snapshots n JOIN retl.syncs s ON s.id = n.sync_id WHERE s.name = $1),
                    (SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1)",
            &[&sync],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// The sync's hash version.
fn hash_version(c: &mut postgres::Client, sync: &str) -> i16 {
    c.query_one("SELECT hash_version FROM retl.syncs WHERE name = $1", &[&sync]).unwrap().get(0)
}

/// The next run of a sync whose rows 1-4 were acknowledged before the upgrade (their hashes
/// kept) sends row 5 alone, in the fake's first request.
fn only_the_missing_row_5_is_sent(c: &mut postgres::Client, fake: &FakeWebhook, sync: &str) {
    let run = run_sync(c, sync);
    assert_eq!((run.status.as_str(), run.inserts, run.updates, run.delivered), ("succeeded", 1, 0, 1), "{run:?}");
    assert_eq!(keys_in_request(fake, 0), [key(5)].into_iter().collect());
}

/// The model's rows as a webhook destination holds them: canonical key JSON -> payload.
fn model_records(c: &mut postgres::Client, model: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
    c.batch_execute("SET IntervalStyle = iso_8601").unwrap();
    let rows = c
        .query(&format!("SELECT jsonb_build_object('id', id)::text, to_jsonb(m)::text FROM retl_models.{model} m"), &[])
        .unwrap();
    c.batch_execute("RESET IntervalStyle").unwrap();
    let parse = |text: String| serde_json::from_str::<serde_json::Value>(&text).unwrap();
    rows.into_iter().map(|r| (parse(r.get(0)).to_string(), parse(r.get(1)))).collect()
}

/// Every object of the extension, described in a way that differs when anything users or the
/// workers see differs: columns, defaults, constraints, indexes, triggers, view and function
/// definitions, privileges, comments.
fn describe_catalog(c: &mut postgres::Client) -> Vec<String> {
    let sql = r#"
        SELECT 'member ' || pg_describe_object(classid, objid, objsubid)
          FROM pg_depend
         WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
           AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_reverse_etl')
        UNION ALL
        SELECT format('column %s.%s %s %s notnull=%s default=%s', c.relname, a.attname, a.attnum,
                      format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
          FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
          LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'retl'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT format('constraint %s %s', conrelid::regclass, pg_get_constraintdef(oid))
          FROM pg_constraint WHERE connamespace = 'retl'::regnamespace
        UNION ALL
        SELECT format('index %s', regexp_replace(pg_get_indexdef(indexrelid), '\S+_idx\d* ', 'IDX '))
          FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'retl'::regnamespace
        UNION ALL
        SELECT format('relation %s kind=%s acl=%s options=%s comment=%s def=%s', c.relname, c.relkind, c.relacl, c.reloptions,
                      obj_description(c.oid, 'pg_class'),
                      CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END)
          FROM pg_class c WHERE c.relnamespace = 'retl'::regnamespace AND c.relkind IN ('r', 'v')
        UNION ALL
        SELECT format('trigger %s', pg_get_triggerdef(t.oid))
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'retl'::regnamespace AND NOT t.tgisinternal
        UNION ALL
        SELECT format('function %s acl=%s comment=%s def=%s', p.oid::regprocedure, p.proacl,
                      obj_description(p.oid, 'pg_proc'), pg_get_functiondef(p.oid))
          FROM pg_proc p WHERE p.pronamespace = 'retl'::regnamespace
        ORDER BY 1"#;
    c.query(sql, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)).collect()
}

#[test]
fn an_upgraded_catalog_equals_a_fresh_install() {
    let mut admin = connect();
    let fresh_db = unique("fresh");
    admin.batch_execute(&format!("CREATE DATABASE {fresh_db}")).unwrap();
    let fresh = {
        let mut fr = connect_db(&fresh_db);
        fr.batch_execute("CREATE EXTENSION pg_reverse_etl").unwrap();
        describe_catalog(&mut fr)
    };
    admin.batch_execute(&format!("DROP DATABASE {fresh_db}")).unwrap();
    assert!(fresh.len() > 100, "the description covers the catalog ({} lines)", fresh.len());
    for from in [FIRST, SECOND, THIRD, FOURTH, FIFTH, SIXTH, SEVENTH, EIGHTH, NINTH, TENTH, PREVIOUS] {
        let upgraded_db = unique("upgraded");
        admin.batch_execute(&format!("CREATE DATABASE {upgraded_db}")).unwrap();
        let upgraded = {
            let mut up = connect_db(&upgraded_db);
            up.batch_execute(&format!(
                "CREATE EXTENSION pg_reverse_etl VERSION '{from}'; ALTER EXTENSION pg_reverse_etl UPDATE TO '{CURRENT}'"
            ))
            .unwrap();
            describe_catalog(&mut up)
        };
        admin.batch_execute(&format!("DROP DATABASE {upgraded_db}")).unwrap();
        let only_upgraded: Vec<&String> = upgraded.iter().filter(|l| !fresh.contains(l)).collect();
        let only_fresh: Vec<&String> = fresh.iter().filter(|l| !upgraded.contains(l)).collect();
        assert!(
            only_upgraded.is_empty() && only_fresh.is_empty(),
            "from {from}: only after the upgrade:\n{}\n\nonly in a fresh install:\n{}",
            only_upgraded.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
            only_fresh.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
    }
}
