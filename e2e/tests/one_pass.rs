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
