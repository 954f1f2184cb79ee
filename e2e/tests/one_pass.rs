//! The one-pass plan of a whole model (syncs with fingerprints, hash version 4, since 0.8.0):
//! the snapshot's fingerprints in memory, the model streamed once, only new and changed rows
//! written to the outbox. What it queues must be exactly what the SQL plan queued, and its
//! fingerprints exactly those SQL computes (`retl._fingerprint`, used by previews and by plans
//! of changed keys), or rows would be sent again and again.
mod common;
use common::*;
use serde_json::json;

fn preview(f: &mut Fixture) -> Vec<(String, String)> {
    f.client
        .query("SELECT op, key::text FROM retl.preview($1) ORDER BY key", &[&f.sync])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn hash_version(f: &mut Fixture) -> i16 {
    f.client
        .query_one("SELECT hash_version FROM retl.syncs WHERE name = $1", &[&f.sync])
        .unwrap()
        .get(0)
}

/// 12,000 rows: more than one cursor fetch (10,000) and more than one outbox write (5,000).
const ROWS: i64 = 12_000;

#[test]
fn a_whole_model_plan_queues_exactly_what_changed() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), ROWS, "mirror", "batch_size '1000'", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(hash_version(&mut f), 4);
    // Values kept out of line (TOAST): one compressible, one not.
    f.exec(&format!(
        "UPDATE {t} SET name = repeat('long name ', 20000) WHERE id = 7;
         UPDATE {t} SET email = (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 4000) i) WHERE id = 8;",
        t = f.table
    ));

    let first = f.run();
    assert_eq!(
        (first.status.as_str(), first.rows_in_model, first.inserts, first.updates, first.deletes, first.delivered),
        ("succeeded", Some(ROWS), ROWS, 0, 0, ROWS),
        "{first:?}"
    );
    assert_eq!(fake.records(), f.model_state());

    // Nothing changed: nothing queued, no request, and SQL's fingerprints agree.
    fake.clear_journal();
    let again = f.run();
    assert_eq!((again.status.as_str(), again.rows_in_model, again.inserts + again.updates + again.deletes), ("succeeded", Some(ROWS), 0), "{again:?}");
    assert_eq!(fake.request_count(), 0);
    assert_eq!(preview(&mut f), []);

    // Three updated (one to NULL, one of the long values), two deleted, two new.
    f.exec(&format!(
        "UPDATE {t} SET score = score + 1 WHERE id = 1;
         UPDATE {t} SET email = NULL WHERE id = 11999;
         UPDATE {t} SET name = name || '!' WHERE id = 7;
         DELETE FROM {t} WHERE id IN (2, 6000);
         INSERT INTO {t} VALUES (20001, 'new@example.com', 'New', 1), (20002, NULL, NULL, NULL);",
        t = f.table
    ));
    let planned = preview(&mut f);
    fake.clear_journal();
    let run = f.run();
    assert_eq!(
        (run.status.as_str(), run.rows_in_model, run.inserts, run.updates, run.deletes, run.delivered),
        ("succeeded", Some(ROWS), 2, 3, 2, 7),
        "{run:?}"
    );
    let mut expected: Vec<(String, String)> = [
        ("delete", 2),
        ("delete", 6000),
        ("upsert", 1),
        ("upsert", 7),
        ("upsert", 11999),
        ("upsert", 20001),
        ("upsert", 20002),
    ]
    .iter()
    .map(|(op, id)| (op.to_string(), key(*id)))
    .collect();
    expected.sort();
    assert_eq!(ops_sent(&fake), expected);
    // The preview (the SQL plan) showed exactly what the one-pass plan sent.
    let mut planned: Vec<(String, String)> =
        planned.into_iter().map(|(op, k)| (op, serde_json::from_str::<serde_json::Value>(&k).unwrap().to_string())).collect();
    planned.sort();
    assert_eq!(planned, expected);
    assert_eq!(fake.records(), f.model_state());
    fake.clear_journal();
    let last = f.run();
    assert_eq!(last.inserts + last.updates + last.deletes, 0, "{last:?}");
    assert_eq!(fake.request_count(), 0);

    // A widened integer column (int to bigint) writes the same payload: nothing is sent.
    f.client
        .execute(
            "SELECT retl.alter_model(name => $1, query => $2)",
            &[&f.model, &format!("SELECT id, email, name, score::bigint AS score FROM {}", f.table)],
        )
        .unwrap();
    let widened = run_from_row(
        &f.client
            .query_one(&format!("SELECT {RUN_COLUMNS} FROM retl.run($1, allow_schema_change => true, wait => true)"), &[&f.sync])
            .unwrap(),
    );
    assert_eq!((widened.status.as_str(), widened.inserts + widened.updates + widened.deletes), ("succeeded", 0), "{widened:?}");
    assert_eq!(fake.request_count(), 0);
}

/// An insert-mode sync sends new keys only; an update-mode sync sends changed ones too, as
/// updates.
#[test]
fn modes_choose_what_a_whole_model_plan_queues() {
    for (mode, inserts, updates, ops) in [("insert", 1, 0, vec!["insert"]), ("update", 1, 1, vec!["update", "update"])] {
        let fake = FakeWebhook::start();
        let mut f = Fixture::new(&fake.url(), 3, mode, "", None);
        let _drop = DropSyncs(vec![f.sync.clone()]);
        if mode == "update" {
            for id in 1..=3 {
                fake.preload(json!({"id": id}), json!({"old": true}));
            }
        }
        assert_eq!(f.run().delivered, 3, "{mode}");
        if mode == "update" {
            fake.preload(json!({"id": 4}), json!({"old": true}));
        }
        f.exec(&format!("UPDATE {t} SET score = 0 WHERE id = 2; DELETE FROM {t} WHERE id = 3; INSERT INTO {t} VALUES (4, 'd@x', 'D', 4)", t = f.table));
        fake.clear_journal();
        let run = f.run();
        assert_eq!((run.status.as_str(), run.inserts, run.updates, run.deletes), ("succeeded", inserts, updates, 0), "{mode}: {run:?}");
        let sent: Vec<String> = ops_sent(&fake).into_iter().map(|(op, _)| op).collect();
        assert_eq!(sent, ops, "{mode}");
    }
}

/// A run that plans only the keys commits touched (SQL fingerprints) and the next whole-model
/// run (the one-pass plan's) agree: after the change run, the whole model sends nothing.
#[test]
fn changed_key_plans_and_whole_model_plans_agree() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 50, "mirror", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(f.run().delivered, 50);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', schedule => 'on change')", f.sync));
    // The first change run after the alter plans the whole model; the second only its keys.
    for (round, sql) in [
        (1, format!("UPDATE {} SET score = -1 WHERE id = 1", f.table)),
        (2, format!("UPDATE {t} SET name = 'Changed' WHERE id = 2; INSERT INTO {t} VALUES (51, 'n@x', 'N', 5)", t = f.table)),
    ] {
        f.exec(&sql);
        let sync = f.sync.clone();
        wait_until(SHORT, "the change run to finish", || {
            let row = f
                .client
                .query_one(
                    "SELECT count(*) FILTER (WHERE trigger = 'change'), count(*) FILTER (WHERE status IN ('queued', 'delivering'))
                       FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1",
                    &[&sync],
                )
                .unwrap();
            row.get::<_, i64>(0) >= round && row.get::<_, i64>(1) == 0
        });
    }
    let scope: Option<String> = f
        .client
        .query_one(
            "SELECT r.plan_scope FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1 ORDER BY r.id DESC LIMIT 1",
            &[&f.sync],
        )
        .unwrap()
        .get(0);
    assert_eq!(scope.as_deref(), Some("changed keys"));
    assert_eq!(fake.records(), f.model_state());
    fake.clear_journal();
    let whole = f.run();
    assert_eq!((whole.status.as_str(), whole.inserts + whole.updates + whole.deletes), ("succeeded", 0), "{whole:?}");
    assert_eq!(fake.request_count(), 0);
}

/// A key the snapshot holds, returned twice, or a NULL key, hands the plan to the SQL plan,
/// which refuses it exactly as before: nothing queued, nothing sent. Once fixed, the run sends
/// exactly what changed meanwhile.
#[test]
fn a_key_seen_twice_or_null_after_the_first_run_is_refused_with_nothing_queued() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 5, "mirror", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(f.run().delivered, 5);
    f.exec(&format!(
        "ALTER TABLE {t} DROP CONSTRAINT {t}_pkey; INSERT INTO {t} VALUES (2, 'b2@x', 'B2', 1); UPDATE {t} SET score = 0 WHERE id = 1",
        t = f.table
    ));
    fake.clear_journal();
    let run = f.run();
    assert_eq!(
        (run.status.as_str(), run.error),
        ("failed", Some(format!("model \"{}\" returned 1 duplicate primary key (e.g. {{\"id\": 2}} appears 2 times)", f.model)))
    );
    assert_eq!((f.outbox_rows(), fake.request_count()), (0, 0));

    f.exec(&format!(
        "DELETE FROM {t} WHERE email = 'b2@x'; ALTER TABLE {t} ALTER id DROP NOT NULL; INSERT INTO {t} VALUES (NULL, 'n@x', 'N', 1)",
        t = f.table
    ));
    let run = f.run();
    assert_eq!(
        (run.status.as_str(), run.error),
        ("failed", Some(format!("model \"{}\" returned 1 row with a NULL primary key (id)", f.model)))
    );
    assert_eq!((f.outbox_rows(), fake.request_count()), (0, 0));

    f.exec(&format!("DELETE FROM {t} WHERE id IS NULL", t = f.table));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.inserts, run.updates, run.deletes), ("succeeded", 0, 1, 0), "{run:?}");
    assert_eq!(ops_sent(&fake), [("upsert".to_string(), key(1))]);
    assert_eq!(fake.records(), f.model_state());
}

/// An outbox row's sync is its run's (only the run is checked, since 0.9.0 once per
/// statement): dropping a sync whose run failed with rows still queued leaves none of its rows
/// behind, nor its snapshot or runs.
#[test]
fn dropping_a_sync_leaves_nothing_of_it_behind() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 5, "upsert", "", None);
    assert_eq!(f.run().delivered, 5);
    // Every request refused from now on: the next run fails with its rows queued.
    f.exec(&format!("ALTER SERVER {} OPTIONS (SET url 'http://127.0.0.1:9/hook')", f.server));
    f.exec(&format!("UPDATE {} SET score = score + 1", f.table));
    let failed = f.run();
    assert_eq!((failed.status.as_str(), failed.updates), ("failed", 5), "{failed:?}");
    let id: i64 = f.client.query_one("SELECT id FROM retl.syncs WHERE name = $1", &[&f.sync]).unwrap().get(0);
    let left = |c: &mut postgres::Client| -> (i64, i64, i64) {
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM retl.outbox WHERE sync_id = $1), (SELECT count(*) FROM retl.snapshots WHERE sync_id = $1),
                        (SELECT count(*) FROM retl.runs WHERE sync_id = $1)",
                &[&id],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(left(&mut f.client), (5, 5, 2));
    f.exec(&format!("SELECT retl.drop_sync('{}')", f.sync));
    assert_eq!(left(&mut f.client), (0, 0, 0));
}

/// Mapped payloads are `to_jsonb` of a row whose columns are named after the destination
/// fields when every field can name a column, and `jsonb_build_object` when one cannot (a
/// Postgres name holds 63 bytes; a longer alias would be cut). Either way every field arrives
/// under its exact name with the model's value: names with spaces, quotes and capitals, one
/// that is the payload row's alias, a column mapped to several fields, NULLs.
#[test]
fn mapped_payloads_carry_every_field_under_its_exact_name() {
    for longest in [63, 64] {
        let fake = FakeWebhook::start();
        let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
        let _drop = DropSyncs(vec![f.sync.clone()]);
        let long_field = format!("{}_score", "x".repeat(longest - 6));
        assert_eq!(long_field.len(), longest);
        let mappings = json!({
            "Email Address": "email",
            "we\"ird 'name'": "name",
            "retl_payload_row": "score",
            "score": "score",
            long_field.clone(): "score",
        });
        f.client
            .execute("SELECT retl.alter_sync(name => $1, mappings => $2::text::jsonb)", &[&f.sync, &mappings.to_string()])
            .unwrap();
        assert_eq!(hash_version(&mut f), 4);
        f.exec(&format!("UPDATE {} SET email = NULL WHERE id = 2", f.table));
        let expected = |f: &mut Fixture| -> std::collections::BTreeMap<String, serde_json::Value> {
            f.model_state()
                .into_iter()
                .map(|(key, row)| {
                    let fields = json!({
                        "Email Address": row["email"],
                        "we\"ird 'name'": row["name"],
                        "retl_payload_row": row["score"],
                        "score": row["score"],
                        long_field.clone(): row["score"],
                    });
                    (key, fields)
                })
                .collect()
        };
        let first = f.run();
        assert_eq!((first.status.as_str(), first.inserts, first.delivered), ("succeeded", 3, 3), "{longest}: {first:?}");
        assert_eq!(fake.records(), expected(&mut f), "{longest}");
        // A changed row goes through the same statement.
        f.exec(&format!("UPDATE {} SET score = 7, name = NULL WHERE id = 3", f.table));
        let changed = f.run();
        assert_eq!((changed.status.as_str(), changed.updates, changed.delivered), ("succeeded", 1, 1), "{longest}: {changed:?}");
        assert_eq!(fake.records(), expected(&mut f), "{longest}");
    }
}

/// The outbox's (op, key, payload) of `sync`'s rows as jsonb text, by key.
fn outbox_text(client: &mut postgres::Client, sync: &str) -> Vec<(String, String, String)> {
    client
        .query(
            "SELECT o.op, o.key::text, o.payload::text FROM retl.outbox o JOIN retl.syncs s ON s.id = o.sync_id
              WHERE s.name = $1 ORDER BY o.key",
            &[&sync],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Asserts two equally long lists of rows are equal, showing the first row that differs.
fn assert_same_rows(got: &[(String, String, String)], expected: &[(String, String, String)], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: rows");
    if let Some((g, e)) = got.iter().zip(expected).find(|(g, e)| g != e) {
        assert_eq!(g, e, "{what}: the first row that differs");
    }
}

/// A model whose columns are all of types the worker builds jsonb from itself (jsonb_rows.rs)
/// gets keys and payloads, to the byte, as SQL builds them (`jsonb_build_object` and
/// `to_jsonb`, under the settings plans run with): booleans, every integer width at its
/// limits, real and double with NaN, infinities and -0, numeric with its scale, NaN and
/// infinities, a numeric domain, text with quotes, backslashes, control characters and an
/// emoji, values kept out of line (compressed and not), padded char(n), empty varchar, dates
/// and timestamps (BC, infinite, fractional seconds), uuid, interval, NULL in every column, a
/// two-column key, and field names jsonb must sort by length (mapped, one longer than a
/// Postgres name). 12,006 rows: more than one write of 5,000 to the outbox.
#[test]
fn keys_and_payloads_built_by_the_worker_are_those_sql_builds() {
    let fake = FakeWebhook::start();
    // The fixture's destination; the model and sync are this test's own (a two-column key).
    let mut f = Fixture::new(&fake.url(), 0, "upsert", "batch_size '1000'", None);
    let (table, domain, model) = (format!("{}_types", f.table), format!("{}_amount", f.table), format!("{}_types", f.model));
    f.sync = format!("{}_types", f.sync);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.exec(&format!(
        "CREATE DOMAIN {domain} AS numeric(12,2) CHECK (VALUE > -1000000);
         CREATE TABLE {table} (id bigint, code varchar(8), b boolean, i2 smallint, i4 integer, i8 bigint, r real,
           d double precision, n numeric, n3 numeric(10,3), amount {domain}, t text, v varchar(20), c char(5),
           dt date, ts timestamp, tz timestamptz, u uuid, iv interval, PRIMARY KEY (id, code));
         INSERT INTO {table} (id, code) VALUES (1, 'nulls');
         INSERT INTO {table} VALUES
           (2, 'max', true, 32767, 2147483647, 9223372036854775807, 'NaN', 'Infinity', 'NaN', 1.5, 12.5,
            E'quote \" back \\\\ newline \\n tab \\t bell \\x07 emoji \\U0001F600', '', 'ab',
            '2024-02-29', 'infinity', '2024-07-01 12:00:00.5+02', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '1 year 2 months 3 days 04:05:06.5'),
           (3, 'min', false, -32768, -2147483648, -9223372036854775808, '-Infinity', '-0', '-Infinity', 0, -999999.99,
            'x', 'twenty characters!!!', 'abcde', '0044-03-15 BC', '2024-02-29 13:14:15.123456', '-infinity',
            '00000000-0000-0000-0000-000000000000', '-1 days -00:00:01'),
           (4, 'long', true, 0, 0, 0, 3.4e38, 1e300, 123456789012345678901234567890.123456789, 0.001, 0,
            repeat('long text ', 100000), NULL, NULL, 'infinity', '1999-12-31 23:59:59', 'epoch', NULL, '0'),
           (5, 'other', NULL, NULL, 1, NULL, 0.1, 0.1, 1e-20, -0.5, 1.1,
            (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 4000) i), 'é', 'ü', NULL, NULL, NULL, NULL,
            'P1Y'::interval);
         INSERT INTO {table} SELECT i, 'gen', i % 2 = 0, i % 100, i, i * 1000, i / 7.0, i / 3.0, i / 8.0, i / 1000.0,
           i / 100.0, 'row ' || i, 'v' || i, 'c' || i % 10, date '2020-01-01' + i, timestamp '2020-01-01' + i * interval '1 minute',
           timestamptz '2020-01-01 00:00:00+00' + i * interval '1 second', md5(i::text)::uuid, i * interval '1 hour'
           FROM generate_series(6, 12006) i;"
    ));
    let columns = "id, code, b, i2, i4, i8, r, d, n, n3, amount, t, v, c, dt, ts, tz, u, iv";
    f.client
        .execute(
            "SELECT retl.create_model(name => $1, query => $2, primary_key => '{id,code}')",
            &[&model, &format!("SELECT {columns} FROM {table}")],
        )
        .unwrap();
    f.client
        .execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3)", &[&f.sync, &model, &f.server])
        .unwrap();
    let long_field = format!("{}_t", "x".repeat(70));
    let mapped = format!(
        r#"{{"Code": "code", "b": "b", "a number": "n", "amount": "amount", "d": "d", "{long_field}": "t", "zz": "tz", "iv": "iv"}}"#
    );
    // What SQL builds, under the settings plans run with (the server's TimeZone: the test
    // cluster's is the default).
    f.exec("SET IntervalStyle = iso_8601; SET DateStyle = ISO; SET extra_float_digits = 1");
    let model_view = format!("retl_models.{model}");
    for mappings in [None, Some(mapped.as_str())] {
        if let Some(mappings) = mappings {
            f.client
                .execute("SELECT retl.alter_sync(name => $1, mappings => $2::text::jsonb)", &[&f.sync, &mappings])
                .unwrap();
            // The snapshot is the unmapped payloads': every row is changed.
            f.exec(&format!("UPDATE {table} SET b = NOT coalesce(b, false)"));
        }
        let payload = match mappings {
            None => "to_jsonb(m)".to_string(),
            Some(_) => format!(
                "jsonb_build_object('Code', code, 'b', b, 'a number', n, 'amount', amount, 'd', d, '{long_field}', t, 'zz', tz, 'iv', iv)"
            ),
        };
        let expected: Vec<(String, String, String)> = f
            .client
            .query(
                &format!(
                    "SELECT $1::text, jsonb_build_object('id', id, 'code', code)::text AS key, ({payload})::text
                       FROM {model_view} m ORDER BY jsonb_build_object('id', id, 'code', code)"
                ),
                &[&"upsert"],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(expected.len(), 12_006);
        // The rows stay in the outbox while a lock on the snapshot holds up their recording.
        let mut holder = connect();
        let mut lock = holder.transaction().unwrap();
        lock.batch_execute("LOCK TABLE retl.snapshots IN SHARE MODE").unwrap();
        let run_id: i64 = f.client.query_one("SELECT id FROM retl.run($1)", &[&f.sync]).unwrap().get(0);
        wait_until(SHORT, "the run to be planned", || {
            f.count(&format!("SELECT count(*) FROM retl.runs WHERE id = {run_id} AND planned_at IS NOT NULL")) == 1
        });
        let queued = outbox_text(&mut f.client, &f.sync);
        lock.rollback().unwrap();
        assert_same_rows(&queued, &expected, if mappings.is_none() { "whole rows" } else { "mapped" });
        let run = f.last_run();
        wait_until(SHORT, "the run to finish", || {
            f.count(&format!("SELECT count(*) FROM retl.runs WHERE id = {run_id} AND status = 'succeeded'")) == 1
        });
        assert_eq!((run.id, f.outbox_rows()), (run_id, 0));
        assert_eq!(fake.records().len(), 12_006);
    }
}
