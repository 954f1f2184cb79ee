//! On-change runs of a model that is a plain projection of one table plan only the keys that
//! commits touched (logged by the retl_changed_keys triggers in retl.changed_keys), and the
//! destination still ends equal to the model; everything else, and every case the log cannot
//! vouch for, plans the whole model.
mod common;
use common::*;
use serde_json::json;
use std::collections::BTreeSet;

fn sync_id(f: &mut Fixture) -> i64 {
    f.count(&format!("SELECT id FROM retl.syncs WHERE name = '{}'", f.sync))
}

/// Waits until the sync has no run queued or delivering and at least `runs` runs caused by
/// changes; returns the plan scope of its latest run.
fn settle(f: &mut Fixture, runs: i64) -> String {
    settle_within(f, runs, SHORT)
}

/// Like [`settle`], with its own timeout; a timeout shows the sync's runs and their batches.
fn settle_within(f: &mut Fixture, runs: i64, timeout: std::time::Duration) -> String {
    let id = sync_id(f);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let row = f
            .client
            .query_one(
                "SELECT count(*) FILTER (WHERE trigger = 'change'), count(*) FILTER (WHERE status IN ('queued', 'delivering'))
                   FROM retl.runs WHERE sync_id = $1",
                &[&id],
            )
            .unwrap();
        if row.get::<_, i64>(0) >= runs && row.get::<_, i64>(1) == 0 {
            return last_scope(f);
        }
        if std::time::Instant::now() > deadline {
            let state: Vec<String> = f
                .client
                .query(
                    "SELECT format('run %s %s %s: %s delivered, %s calls, %s; batches: %s', r.id, r.trigger, r.status,
                                   r.delivered, r.api_calls, coalesce(r.error, '-'),
                                   (SELECT string_agg(format('%s:%s/%s %s', b.batch_no, b.acknowledged, b.records,
                                                             coalesce(b.error, '')), ' ' ORDER BY b.batch_no)
                                      FROM retl.batches b WHERE b.run_id = r.id))
                       FROM retl.runs r WHERE r.sync_id = $1 ORDER BY r.id",
                    &[&id],
                )
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            panic!("timed out after {timeout:?} waiting for {runs} change runs to finish:\n{}", state.join("\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn last_scope(f: &mut Fixture) -> String {
    let id = sync_id(f);
    f.client
        .query_one(&format!("SELECT plan_scope FROM retl.runs WHERE sync_id = {id} ORDER BY id DESC LIMIT 1"), &[])
        .unwrap()
        .get::<_, Option<String>>(0)
        .unwrap_or_else(|| "unplanned".into())
}

/// The plan scope of each succeeded run of `sync`, oldest first.
fn succeeded_scopes(c: &mut postgres::Client, sync: &str) -> Vec<Option<String>> {
    c.query(
        "SELECT r.plan_scope FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
          WHERE s.name = $1 AND r.status = 'succeeded' ORDER BY r.id",
        &[&sync],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn logged(f: &mut Fixture) -> Vec<Option<String>> {
    let id = sync_id(f);
    f.client
        .query(&format!("SELECT key::text FROM retl.changed_keys WHERE sync_id = {id} ORDER BY 1"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The keys of every request the fake received, with their op.
fn sent(fake: &FakeWebhook) -> BTreeSet<(String, String)> {
    fake.requests()
        .iter()
        .filter_map(|r| r.body.clone())
        .flat_map(|b| b["records"].as_array().cloned().unwrap_or_default())
        .map(|r| (r["op"].as_str().unwrap_or_default().to_string(), r["key"].to_string()))
        .collect()
}

fn on_change(f: &mut Fixture) {
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', schedule => 'on change')", f.sync));
}

#[test]
fn a_projection_plans_only_the_keys_commits_touched() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 50, "mirror", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(f.run().delivered, 50);
    on_change(&mut f);
    let traced: Vec<i16> = f
        .client
        .query_one(&format!("SELECT key_attnums FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id WHERE s.name = '{}'", f.sync), &[])
        .unwrap()
        .get(0);
    assert_eq!(traced, vec![1], "the model key is the table's column 1");
    let triggers: Vec<String> = f
        .client
        .query(&format!("SELECT tgname::text FROM pg_trigger WHERE tgrelid = '{}'::regclass ORDER BY 1", f.table), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        triggers,
        ["retl_changed_keys_delete", "retl_changed_keys_insert", "retl_changed_keys_truncate", "retl_changed_keys_update", "retl_on_change"]
    );
    // The sync was just altered: its first change run plans the whole model.
    assert_eq!(logged(&mut f), vec![None]);
    f.exec(&format!("UPDATE {} SET score = -1 WHERE id = 1", f.table));
    assert_eq!(settle(&mut f, 1), "model");
    assert_eq!(f.last_run().rows_in_model, Some(50));

    // A rolled back change logs nothing, and neither does a statement that touched no row.
    f.exec(&format!("BEGIN; UPDATE {} SET score = 0; ROLLBACK;", f.table));
    assert_eq!(logged(&mut f), Vec::<Option<String>>::new());
    f.exec(&format!("BEGIN; UPDATE {t} SET score = 0 WHERE false; DELETE FROM {t} WHERE false;", t = f.table));
    assert_eq!(logged(&mut f), Vec::<Option<String>>::new());
    f.exec("ROLLBACK");

    // One transaction: an update, an insert, a delete and a key change.
    fake.clear_journal();
    f.exec(&format!(
        "BEGIN;
         UPDATE {t} SET score = 7 WHERE id = 2;
         INSERT INTO {t} VALUES (100, 'new@example.com', 'New', 1);
         DELETE FROM {t} WHERE id = 3;
         UPDATE {t} SET id = 200 WHERE id = 4;
         COMMIT;",
        t = f.table
    ));
    assert_eq!(settle(&mut f, 2), "changed keys");
    let run = f.last_run();
    assert_eq!(
        (run.status.as_str(), run.rows_in_model, run.inserts, run.updates, run.deletes),
        ("succeeded", None, 2, 1, 2),
        "{run:?}"
    );
    let upsert = |id: i64| ("upsert".to_string(), key(id));
    let delete = |id: i64| ("delete".to_string(), key(id));
    assert_eq!(sent(&fake), BTreeSet::from([upsert(2), upsert(100), upsert(200), delete(3), delete(4)]));
    assert_eq!(fake.records(), f.model_state());
    assert_eq!(logged(&mut f), Vec::<Option<String>>::new(), "the plan took the log");

    // An update that changes nothing the sync sends is logged, planned, and sends nothing.
    fake.clear_journal();
    f.exec(&format!("UPDATE {} SET score = score WHERE id = 5", f.table));
    assert_eq!(settle(&mut f, 3), "changed keys");
    assert_eq!(f.last_run().api_calls, 0);
    assert_eq!(fake.request_count(), 0);

    // A manual run plans the whole model (and takes the log too).
    f.exec(&format!("INSERT INTO retl.changed_keys SELECT id, '{{\"id\": 9}}' FROM retl.syncs WHERE name = '{}'", f.sync));
    let run = f.run();
    assert_eq!(run.rows_in_model, Some(50));
    assert_eq!(last_scope(&mut f), "model");
    assert_eq!(logged(&mut f), Vec::<Option<String>>::new());
}

#[test]
fn truncate_pause_and_large_statements_plan_the_whole_model() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 20, "mirror", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    on_change(&mut f);
    f.exec(&format!("UPDATE {} SET score = 1 WHERE id = 1", f.table));
    assert_eq!(settle(&mut f, 1), "model");
    assert_eq!(fake.records(), f.model_state());

    // TRUNCATE logs "everything": the whole model is planned, found empty, and the mass-delete
    // guard keeps the destination as it is until a run allows the deletes.
    f.exec(&format!("TRUNCATE {}", f.table));
    assert_eq!(settle(&mut f, 2), "model");
    let run = f.last_run();
    assert_eq!((run.status.as_str(), run.deletes, run.delivered), ("failed", 20, 0));
    assert_eq!(fake.records().len(), 20);
    let row = f
        .client
        .query_one(
            "SELECT status, planned_deletes FROM retl.run($1, wait => true, allow_mass_delete => true)",
            &[&f.sync],
        )
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1)), ("succeeded".to_string(), 20));
    assert!(fake.records().is_empty());

    // One statement touching more keys than retl._changed_keys_limit() (10,000).
    f.exec(&format!(
        "INSERT INTO {} SELECT i, 'u' || i || '@example.com', 'P' || i, i FROM generate_series(1, 10001) i",
        f.table
    ));
    // 10,001 records in 101 requests: the heaviest step of the suite. Once, in a clean-clone
    // `make test`, it was still delivering after 30 s (not reproduced since; see the note of
    // stop 12), so it gets more time than the small steps. What must arrive is unchanged.
    assert_eq!(settle_within(&mut f, 3, std::time::Duration::from_secs(120)), "model");
    assert_eq!(f.last_run().inserts, 10001);
    assert_eq!(fake.records().len(), 10001);

    // A NULL key value: the whole model is planned, and it refuses the NULL key.
    let runs = f.change_runs();
    f.exec(&format!("ALTER TABLE {t} DROP CONSTRAINT {t}_pkey, ALTER COLUMN id DROP NOT NULL", t = f.table));
    f.exec(&format!("UPDATE {} SET id = NULL WHERE id = 7", f.table));
    assert_eq!(settle(&mut f, runs + 1), "unplanned", "the plan failed");
    let run = f.last_run();
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some(format!("model \"{}\" returned 1 row with a NULL primary key (id)", f.model).as_str())
    );
    f.exec(&format!("DELETE FROM {} WHERE id IS NULL", f.table));
    assert_eq!(settle(&mut f, runs + 2), "model", "a failed plan keeps the log");
    assert_eq!(f.last_run().status, "succeeded");
    assert_eq!(fake.records(), f.model_state());

    // Changes while paused are not logged key by key: the log says "everything", once.
    f.exec(&format!("SELECT retl.pause('{}')", f.sync));
    f.exec(&format!("UPDATE {t} SET score = 5 WHERE id = 8; UPDATE {t} SET score = 6 WHERE id = 9;", t = f.table));
    assert_eq!(logged(&mut f), vec![None]);
    f.exec(&format!("SELECT retl.resume('{}')", f.sync));
    let runs = f.change_runs();
    f.exec(&format!("UPDATE {} SET score = 9 WHERE id = 10", f.table));
    assert_eq!(settle(&mut f, runs + 1), "model");
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn a_key_only_plan_also_plans_rejected_rows_and_refuses_duplicates() {
    let fake = FakeWebhook::start();
    fake.set_rejection_rule(|rec| {
        let email = rec["fields"]["email"].as_str().unwrap_or("");
        (!email.contains('@')).then(|| (400, "email is invalid".to_string()))
    });
    let mut f = Fixture::new(&fake.url(), 10, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.exec(&format!("ALTER TABLE {t} DROP CONSTRAINT {t}_pkey", t = f.table));
    on_change(&mut f);
    f.exec(&format!("UPDATE {} SET score = 1 WHERE id = 1", f.table));
    assert_eq!(settle(&mut f, 1), "model");

    f.exec(&format!("UPDATE {} SET email = 'broken' WHERE id = 3", f.table));
    assert_eq!(settle(&mut f, 2), "changed keys");
    assert_eq!(f.last_run().status, "partial");
    // The next change is to row 5 only; the key-only plan retries row 3 with it.
    fake.clear_journal();
    f.exec(&format!("UPDATE {} SET score = 55 WHERE id = 5", f.table));
    assert_eq!(settle(&mut f, 3), "changed keys");
    assert_eq!(sent(&fake), BTreeSet::from([("upsert".to_string(), key(3)), ("upsert".to_string(), key(5))]));
    f.exec(&format!("UPDATE {} SET email = 'fixed@example.com' WHERE id = 3", f.table));
    assert_eq!(settle(&mut f, 4), "changed keys");
    assert_eq!(f.last_run().status, "succeeded");
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.row_errors e JOIN retl.syncs s ON s.id = e.sync_id WHERE s.name = '{}'", f.sync)), 0);
    assert_eq!(fake.records(), f.model_state());

    // A second row with key 6: the key-only plan sees both rows of that key and refuses.
    f.exec(&format!("INSERT INTO {} VALUES (6, 'twin@example.com', 'Twin', 0)", f.table));
    assert_eq!(settle(&mut f, 5), "unplanned", "the plan failed");
    let run = f.last_run();
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some(format!("model \"{}\" returned 1 duplicate primary key (e.g. {{\"id\": 6}} appears 2 times)", f.model).as_str())
    );
    f.exec(&format!("DELETE FROM {} WHERE name = 'Twin'", f.table));
    assert_eq!(settle(&mut f, 6), "changed keys");
    assert_eq!(f.last_run().status, "succeeded");
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn keys_are_traced_through_views_and_only_through_plain_projections() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    ensure_extension(&mut c);
    let base = unique("ck");
    c.batch_execute(&format!(
        "CREATE TABLE {base}_acct (region text, account_id bigint PRIMARY KEY, plan text);
         CREATE TABLE {base}_usage (account_id bigint, events int);
         CREATE TABLE {base}_kid () INHERITS ({base}_usage);
         INSERT INTO {base}_acct VALUES ('eu', 1, 'pro'), ('us', 2, 'free');
         CREATE VIEW {base}_v AS SELECT account_id AS customer, upper(plan) AS plan FROM {base}_acct WHERE region <> 'xx';
         CREATE SERVER {base}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');",
        url = fake.url()
    ))
    .unwrap();
    let models = [
        // (name, query, key, traced attnums)
        ("view", format!("SELECT customer, plan FROM {base}_v"), "customer", Some(vec![2i16])),
        ("join", format!("SELECT a.account_id, u.events FROM {base}_acct a JOIN {base}_usage u USING (account_id)"), "account_id", None),
        ("agg", format!("SELECT account_id, sum(events) AS events FROM {base}_usage GROUP BY 1"), "account_id", None),
        ("now", format!("SELECT account_id, now() AS seen FROM {base}_acct"), "account_id", None),
        ("expr", format!("SELECT account_id + 0 AS account_id, plan FROM {base}_acct"), "account_id", None),
        ("sublink", format!("SELECT account_id, plan FROM {base}_acct WHERE account_id IN (SELECT account_id FROM {base}_usage)"), "account_id", None),
        ("limit", format!("SELECT account_id, plan FROM {base}_acct LIMIT 10"), "account_id", None),
        ("inherited", format!("SELECT account_id, events FROM {base}_usage"), "account_id", None),
    ];
    let mut syncs = Vec::new();
    for (name, query, key, traced) in &models {
        let (model, sync) = (format!("{base}_{name}_m"), format!("{base}_{name}_s"));
        c.execute("SELECT retl.create_model(name => $1, query => $2, primary_key => ARRAY[$3])", &[&model, query, key])
            .unwrap();
        c.execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, schedule => 'on change', paused => true)",
            &[&sync, &model, &format!("{base}_d")],
        )
        .unwrap();
        syncs.push(sync.clone());
        let found: Vec<Option<Vec<i16>>> = c
            .query(
                "SELECT src.key_attnums FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id WHERE s.name = $1",
                &[&sync],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(found.iter().all(|a| a == traced), "{name}: {found:?}, expected {traced:?}");
    }
    let _drop = DropSyncs(syncs);
    // The traced column is renamed while the sync is paused.
    c.batch_execute(&format!("ALTER TABLE {base}_acct RENAME COLUMN account_id TO acct_no; UPDATE {base}_acct SET plan = 'team' WHERE acct_no = 2"))
        .unwrap();
    let logged: Vec<Option<String>> = c
        .query(
            "SELECT c.key::text FROM retl.changed_keys c JOIN retl.syncs s ON s.id = c.sync_id WHERE s.name = $1 ORDER BY 1",
            &[&format!("{base}_view_s")],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Paused: one "everything" entry from creation stays the only one.
    assert_eq!(logged, vec![None]);
    c.execute("SELECT retl.resume($1)", &[&format!("{base}_view_s")]).unwrap();
    c.batch_execute(&format!("UPDATE {base}_acct SET plan = 'max' WHERE acct_no = 1")).unwrap();
    wait_until(SHORT, "the first run", || fake.records().len() == 2);
    c.batch_execute(&format!("UPDATE {base}_acct SET plan = 'min' WHERE acct_no = 2")).unwrap();
    wait_until(SHORT, "the key-only run", || fake.records().get(&json!({"customer": 2}).to_string()) == Some(&json!({"customer": 2, "plan": "MIN"})));
    wait_until(SHORT, "the second run to be recorded", || succeeded_scopes(&mut c, &format!("{base}_view_s")).len() == 2);
    assert_eq!(
        succeeded_scopes(&mut c, &format!("{base}_view_s")),
        [Some("model".to_string()), Some("changed keys".to_string())],
        "after the rename the first plan covers the whole model, and keys are logged under the new name"
    );
}

#[test]
fn composite_keys_of_other_types_round_trip_through_the_log() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    ensure_extension(&mut c);
    let base = unique("ck");
    let (model, sync) = (format!("{base}_m"), format!("{base}_s"));
    c.batch_execute(&format!(
        "CREATE TABLE {base}_t (region text, day date, visits numeric, PRIMARY KEY (region, day));
         INSERT INTO {base}_t VALUES ('eu', '2026-01-01', 1.50), ('us west', '2026-01-02', 2), ('x\"y''z', '2026-01-03', 3);
         SELECT retl.create_model(name => '{model}', query => 'SELECT region, day, visits FROM {base}_t', primary_key => '{{region,day}}');
         CREATE SERVER {base}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{base}_d', mode => 'mirror', schedule => 'on change');",
        url = fake.url()
    ))
    .unwrap();
    let _drop = DropSyncs(vec![sync.clone()]);
    let scopes = |c: &mut postgres::Client| succeeded_scopes(c, &sync);
    c.batch_execute(&format!("UPDATE {base}_t SET visits = 1.5 WHERE region = 'eu'")).unwrap();
    wait_until(SHORT, "the first run", || scopes(&mut c).len() == 1);
    assert_eq!(fake.records().len(), 3);

    fake.clear_journal();
    c.batch_execute(&format!(
        "UPDATE {base}_t SET visits = 30 WHERE region = 'x\"y''z'; DELETE FROM {base}_t WHERE region = 'us west';"
    ))
    .unwrap();
    wait_until(SHORT, "the key-only runs", || fake.records().len() == 2 && scopes(&mut c).len() >= 2);
    assert_eq!(scopes(&mut c)[1..].iter().flatten().collect::<BTreeSet<_>>(), BTreeSet::from([&"changed keys".to_string()]));
    let k = |region: &str, day: &str| json!({"region": region, "day": day}).to_string();
    let expected: std::collections::BTreeMap<String, serde_json::Value> = [
        (k("eu", "2026-01-01"), json!({"region": "eu", "day": "2026-01-01", "visits": 1.5})),
        (k("x\"y'z", "2026-01-03"), json!({"region": "x\"y'z", "day": "2026-01-03", "visits": 30})),
    ]
    .into_iter()
    .collect();
    assert_eq!(fake.records(), expected);
    assert_eq!(
        sent(&fake),
        BTreeSet::from([
            ("upsert".to_string(), json!({"day": "2026-01-03", "region": "x\"y'z"}).to_string()),
            ("delete".to_string(), json!({"day": "2026-01-02", "region": "us west"}).to_string()),
        ])
    );
}

#[test]
fn replicated_writes_are_logged_and_a_missing_trigger_means_whole_model_plans() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 10, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    on_change(&mut f);
    f.exec(&format!("UPDATE {} SET score = 1 WHERE id = 1", f.table));
    assert_eq!(settle(&mut f, 1), "model");

    // Logical replication applies changes with session_replication_role = replica: the
    // triggers fire always, so such writes wake the sync and are logged.
    f.exec(&format!(
        "SET session_replication_role = replica; UPDATE {} SET score = 22 WHERE id = 2; RESET session_replication_role;",
        f.table
    ));
    assert_eq!(settle(&mut f, 2), "changed keys");
    assert_eq!(fake.records()[&key(2)]["score"], json!(22));

    // A key trigger dropped by hand: the log may miss changes, so the next plan covers the
    // whole model (and sends what the log missed); re-enabling on change puts it back.
    f.exec(&format!("DROP TRIGGER retl_changed_keys_update ON {t}; UPDATE {t} SET score = 33 WHERE id = 3", t = f.table));
    assert_eq!(settle(&mut f, 3), "model");
    assert_eq!(fake.records(), f.model_state());
    on_change(&mut f);
    let armed = f.count(&format!(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{}'::regclass AND tgname LIKE 'retl%' AND tgenabled = 'A'",
        f.table
    ));
    assert_eq!(armed, 5);
    f.exec(&format!("UPDATE {} SET score = 44 WHERE id = 4", f.table));
    assert_eq!(settle(&mut f, 4), "model", "the first run after alter_sync");
    f.exec(&format!("UPDATE {} SET score = 55 WHERE id = 5", f.table));
    assert_eq!(settle(&mut f, 5), "changed keys");
    assert_eq!(fake.records(), f.model_state());
}
