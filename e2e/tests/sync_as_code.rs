//! Sync-as-code: retl.apply(spec) makes the caller's models, audiences and syncs match a JSON
//! spec (creating, altering in place, and with prune => true dropping), all or nothing, and
//! idempotent; retl.export() writes them as a spec that applies as a no-op. Altering keeps a
//! sync's snapshot: the next run sends only what the change changed. retl.alter_model also
//! brings back a model whose view a DROP ... CASCADE removed (what dbt does to a table).
//!
//! Each test works as a role of its own: prune only ever drops the caller's objects, so other
//! tests' objects in the same database are out of its reach.
mod common;
use common::*;
use retl_e2e::cluster::connect_as;
use serde_json::{json, Value};

/// A role with a table it may read and two webhook destinations (one fake each).
struct Team {
    admin: postgres::Client,
    me: postgres::Client,
    role: String,
    base: String,
    fake1: FakeWebhook,
    fake2: FakeWebhook,
}

/// What retl.apply returned: (action, kind, name, detail).
type Actions = Vec<(String, String, String, Option<String>)>;

impl Team {
    fn new() -> Team {
        let mut admin = connect();
        ensure_extension(&mut admin);
        let base = unique("sac");
        let role = format!("{base}_r");
        let (fake1, fake2) = (FakeWebhook::start(), FakeWebhook::start());
        admin
            .batch_execute(&format!(
                "CREATE TABLE {base}_people (id bigint PRIMARY KEY, email text, name text, score int);
                 INSERT INTO {base}_people SELECT i, 'user' || i || '@example.com', 'Person ' || i, i * 10
                   FROM generate_series(1, 5) i;
                 CREATE SERVER {base}_d1 FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{u1}');
                 CREATE SERVER {base}_d2 FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{u2}');
                 CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}';
                 GRANT SELECT ON {base}_people TO {role};
                 GRANT USAGE ON FOREIGN SERVER {base}_d1, {base}_d2 TO {role};",
                u1 = fake1.url(),
                u2 = fake2.url()
            ))
            .unwrap();
        let me = connect_as(&role, &format!("pw-{role}"));
        Team { admin, me, role, base, fake1, fake2 }
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.base)
    }

    /// A model over the table, an audience of it, a sync of each (the second after the first).
    fn spec(&self, query: &str) -> Value {
        let b = &self.base;
        json!({
            "models": {format!("{b}_m"): {"query": query, "primary_key": ["id"]}},
            "audiences": {format!("{b}_a"): {"model": format!("{b}_m"), "filter": "score >= 30"}},
            "syncs": {
                format!("{b}_s1"): {"destination": format!("{b}_d1"), "model": format!("{b}_m"), "mode": "upsert"},
                format!("{b}_s2"): {"destination": format!("{b}_d2"), "audience": format!("{b}_a"), "mode": "mirror",
                                    "after": [format!("{b}_s1")], "schedule": "0 3 1 1 *"}
            }
        })
    }

    fn query(&self) -> String {
        format!("SELECT id, email, name, score FROM public.{}_people", self.base)
    }

    fn apply(&mut self, spec: &Value, prune: bool, dry_run: bool) -> Result<Actions, postgres::Error> {
        let rows = self.me.query(
            "SELECT action, kind, name, detail FROM retl.apply(spec => $1::text::jsonb, prune => $2, dry_run => $3)",
            &[&spec.to_string(), &prune, &dry_run],
        )?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
    }

    fn export(&mut self) -> Value {
        let text: String = self.me.query_one("SELECT retl.export()::text", &[]).unwrap().get(0);
        serde_json::from_str(&text).unwrap()
    }

    /// What the table holds, as a webhook destination holds it, for the rows matching `keep`.
    fn people(&mut self, keep: impl Fn(i32) -> bool) -> std::collections::BTreeMap<String, Value> {
        let rows = self
            .admin
            .query(&format!("SELECT id, email, name, score FROM {}_people ORDER BY id", self.base), &[])
            .unwrap();
        rows.iter()
            .filter(|r| keep(r.get::<_, i32>(3)))
            .map(|r| {
                let id: i64 = r.get(0);
                let (email, name, score): (String, String, i32) = (r.get(1), r.get(2), r.get(3));
                (key(id), json!({"id": id, "email": email, "name": name, "score": score}))
            })
            .collect()
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        // The role's own prune is its clean-up: an empty spec.
        if let Err(e) = self.apply(&json!({}), true, false) {
            eprintln!("clean-up apply: {e:?}");
        }
        let _ = self.admin.batch_execute(&format!(
            "DROP SERVER IF EXISTS {b}_d1, {b}_d2 CASCADE; DROP TABLE IF EXISTS {b}_people CASCADE; DROP ROLE IF EXISTS {r}",
            b = self.base,
            r = self.role
        ));
    }
}

fn act(action: &str, kind: &str, name: &str, detail: Option<&str>) -> (String, String, String, Option<String>) {
    (action.into(), kind.into(), name.into(), detail.map(Into::into))
}

#[test]
fn a_spec_creates_what_is_missing_and_applying_it_or_its_export_again_changes_nothing() {
    let mut t = Team::new();
    let spec = t.spec(&t.query());
    let (m, a, s1, s2) = (t.name("m"), t.name("a"), t.name("s1"), t.name("s2"));
    assert_eq!(
        t.apply(&spec, false, false).unwrap(),
        vec![act("create", "model", &m, None), act("create", "audience", &a, None), act("create", "sync", &s1, None),
             act("create", "sync", &s2, None)]
    );
    assert_eq!(t.apply(&spec, false, false).unwrap(), vec![], "applying the same spec again changes nothing");

    // The export is the spec, settings at their defaults left out (mode is always written).
    let exported = t.export();
    assert_eq!(exported, spec, "{exported:#}");
    assert_eq!(t.apply(&exported, true, false).unwrap(), vec![]);

    // What was created works: owned by the role, parents in place, both syncs deliver.
    let owners: Vec<String> = t
        .me
        .query("SELECT owner::text FROM retl.syncs WHERE name IN ($1, $2)", &[&s1, &s2])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(owners, vec![t.role.clone(), t.role.clone()]);
    let after: Vec<String> = t.me.query_one("SELECT after FROM retl.sync_status WHERE sync = $1", &[&s2]).unwrap().get(0);
    assert_eq!(after, vec![s1.clone()]);
    assert_eq!(run_sync(&mut t.me, &s1).delivered, 5);
    assert_eq!(t.fake1.records(), t.people(|_| true));
    // s2 runs after s1 succeeded, by itself.
    let expected = t.people(|score| score >= 30);
    wait_until(SHORT, "s2 ran after s1", || t.fake2.records() == expected);
}

#[test]
fn a_changed_spec_alters_in_place_and_the_next_runs_send_only_what_changed() {
    let mut t = Team::new();
    let (m, a, s1, s2) = (t.name("m"), t.name("a"), t.name("s1"), t.name("s2"));
    t.apply(&t.spec(&t.query()), false, false).unwrap();
    assert_eq!(run_sync(&mut t.me, &s1).delivered, 5);
    let expected = t.people(|score| score >= 30);
    wait_until(SHORT, "s2 ran after s1", || t.fake2.records() == expected);
    let s2_done = format!("SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{s2}' AND r.status = 'succeeded'");
    wait_until(SHORT, "s2's run finished", || t.me.query_one(&s2_done, &[]).unwrap().get::<_, i64>(0) == 1);
    let requests = (t.fake1.request_count(), t.fake2.request_count());

    // Person 2's score becomes 99 (they join the audience), person 3 leaves it (>= 40 now);
    // s1 gets safeguards, s2 loses its parent and gets another schedule.
    let mut spec = t.spec(&format!(
        "SELECT id, email, name, CASE WHEN id = 2 THEN 99 ELSE score END AS score FROM public.{}_people",
        t.base
    ));
    spec["audiences"][&a]["filter"] = json!("score >= 40");
    spec["syncs"][&s1]["max_rows"] = json!(100);
    spec["syncs"][&s1]["freshness"] = json!("1 hour");
    spec["syncs"][&s2].as_object_mut().unwrap().remove("after");
    spec["syncs"][&s2]["schedule"] = json!("0 4 1 1 *");
    assert_eq!(
        t.apply(&spec, false, false).unwrap(),
        vec![act("alter", "model", &m, Some("query")), act("alter", "audience", &a, Some("filter")),
             act("alter", "sync", &s1, Some("max_rows, freshness")), act("alter", "sync", &s2, Some("after, schedule"))]
    );
    let row = t
        .me
        .query_one("SELECT max_rows, freshness::text FROM retl.syncs WHERE name = $1", &[&s1])
        .unwrap();
    assert_eq!((row.get::<_, Option<i64>>(0), row.get::<_, Option<String>>(1)), (Some(100), Some("01:00:00".into())));
    let row = t.me.query_one("SELECT schedule, after FROM retl.sync_status WHERE sync = $1", &[&s2]).unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, Option<Vec<String>>>(1)), ("0 4 1 1 *".into(), None));

    // The snapshots were kept: one update to s1's destination; one row in and one out of s2's.
    let run = run_sync(&mut t.me, &s1);
    assert_eq!((run.status.as_str(), run.inserts, run.updates, run.deletes, run.api_calls), ("succeeded", 0, 1, 0, 1), "{run:?}");
    assert_eq!(keys_in_request(&t.fake1, requests.0), [key(2)].into_iter().collect());
    let mut expected = t.people(|_| true);
    expected.get_mut(&key(2)).unwrap()["score"] = json!(99);
    assert_eq!(t.fake1.records(), expected);
    let run = run_sync(&mut t.me, &s2);
    assert_eq!((run.status.as_str(), run.inserts, run.updates, run.deletes), ("succeeded", 1, 0, 1), "{run:?}");
    expected.retain(|_, v| v["score"].as_i64().unwrap() >= 40);
    assert_eq!(t.fake2.records(), expected);

    // Keys left out go back to their defaults.
    spec["syncs"][&s1].as_object_mut().unwrap().retain(|k, _| k != "max_rows" && k != "freshness");
    assert_eq!(t.apply(&spec, false, false).unwrap(), vec![act("alter", "sync", &s1, Some("max_rows, freshness"))]);
    let row = t
        .me
        .query_one("SELECT max_rows, freshness::text FROM retl.syncs WHERE name = $1", &[&s1])
        .unwrap();
    assert_eq!((row.get::<_, Option<i64>>(0), row.get::<_, Option<String>>(1)), (None, None));
    assert_eq!(t.export(), spec);
}

#[test]
fn prune_drops_only_the_callers_objects_the_spec_leaves_out_and_a_dry_run_changes_nothing() {
    let mut t = Team::new();
    let (m, a, s1, s2) = (t.name("m"), t.name("a"), t.name("s1"), t.name("s2"));
    let spec = t.spec(&t.query());
    t.apply(&spec, false, false).unwrap();
    // Another role's model (the test's superuser's), not in the spec.
    let theirs = t.name("theirs");
    t.admin
        .execute("SELECT retl.create_model(name => $1, query => $2)", &[&theirs, &format!("{}_people", t.base)])
        .unwrap();

    let mut smaller = spec.clone();
    smaller["syncs"].as_object_mut().unwrap().remove(&s2);
    smaller["audiences"] = json!({});
    let expected = vec![act("drop", "sync", &s2, None), act("drop", "audience", &a, None)];
    assert_eq!(t.apply(&smaller, true, true).unwrap(), expected, "a dry run reports");
    assert_eq!(t.export(), spec, "and changes nothing");
    assert_eq!(t.apply(&smaller, false, false).unwrap(), vec![], "without prune nothing is dropped");
    assert_eq!(t.apply(&smaller, true, false).unwrap(), expected);
    assert_eq!(t.export(), smaller);

    // A spec naming a sync's parent that is left out: the link goes first, then the parent.
    let mut chained = smaller.clone();
    chained["syncs"][&s2] = json!({"destination": t.name("d2"), "model": m, "after": [s1]});
    t.apply(&chained, false, false).unwrap();
    let mut only_child = chained.clone();
    only_child["syncs"].as_object_mut().unwrap().remove(&s1);
    only_child["syncs"][&s2].as_object_mut().unwrap().remove("after");
    assert_eq!(
        t.apply(&only_child, true, false).unwrap(),
        vec![act("drop", "sync", &s1, None), act("alter", "sync", &s2, Some("after"))]
    );

    // Even for a member of retl_admin, who may drop every model, prune drops only their own.
    t.admin.batch_execute(&format!("GRANT retl_admin TO {}", t.role)).unwrap();
    assert_eq!(
        t.apply(&json!({}), true, false).unwrap(),
        vec![act("drop", "sync", &s2, None), act("drop", "model", &m, None)]
    );
    let left: i64 = t.admin.query_one("SELECT count(*) FROM retl.models WHERE name = $1", &[&theirs]).unwrap().get(0);
    assert_eq!(left, 1, "another role's model is not the caller's to prune");
    t.admin.execute("SELECT retl.drop_model($1)", &[&theirs]).unwrap();
}

#[test]
fn bad_specs_are_refused_with_what_is_wrong_and_nothing_applied() {
    let mut t = Team::new();
    let (m, s1) = (t.name("m"), t.name("s1"));
    let refused = |t: &mut Team, spec: Value| -> (String, String) { error_text(&t.apply(&spec, true, false).unwrap_err()) };
    let bad = |msg: &str| ("22023".to_string(), msg.to_string());

    assert_eq!(refused(&mut t, json!({"model": {}})), bad(r#"spec has unknown key "model""#));
    assert_eq!(refused(&mut t, json!({"models": []})), bad(r#"spec: "models" must be an object of models by name, got array"#));
    assert_eq!(
        refused(&mut t, json!({"models": {"m": {"query": "people", "key": ["id"]}}})),
        bad(r#"spec: model "m" has an unknown key "key""#)
    );
    let err = t.apply(&json!({"models": {"m": {"query": "people", "key": ["id"]}}}), false, false).unwrap_err();
    assert_eq!(err.as_db_error().unwrap().hint(), Some("A model takes: primary_key, query."));
    assert_eq!(
        refused(&mut t, json!({"syncs": {"s": {"destination": "d", "model": "m", "max_rows": "10"}}})),
        bad(r#"spec: sync "s" has "max_rows" of type string, expected number"#)
    );
    assert_eq!(
        refused(&mut t, json!({"models": {"m": {"query": "people", "primary_key": ["id", 2]}}})),
        bad(r#"spec: model "m" has "primary_key" with an element that is not a string"#)
    );
    assert_eq!(refused(&mut t, json!({"syncs": {"s": {"model": "m"}}})), bad(r#"spec: sync "s" needs "destination""#));
    assert_eq!(
        refused(&mut t, json!({"syncs": {"s": {"destination": "d", "model": "m", "audience": "a"}}})),
        bad(r#"spec: sync "s" needs exactly one of "model" and "audience""#)
    );
    assert_eq!(refused(&mut t, json!({"models": {"m": {}}})), bad(r#"spec: model "m" needs "query""#));

    // A spec that fails half-way leaves nothing behind: the model before the bad sync is gone.
    let mut spec = t.spec(&t.query());
    spec["syncs"][&s1]["destination"] = json!("nowhere");
    assert_eq!(
        refused(&mut t, spec.clone()),
        ("42704".to_string(), r#"destination "nowhere" does not exist"#.to_string())
    );
    assert_eq!(t.export(), json!({"models": {}, "audiences": {}, "syncs": {}}));

    // What cannot change in place is refused, naming what to do instead.
    let spec = t.spec(&t.query());
    t.apply(&spec, false, false).unwrap();
    let mut moved = spec.clone();
    moved["models"][format!("{m}2")] = json!({"query": t.query()});
    moved["syncs"][&s1]["model"] = json!(format!("{m}2"));
    assert_eq!(
        refused(&mut t, moved),
        ("0A000".to_string(), format!(r#"spec: sync "{s1}" reads model "{m}", not "{m}2""#))
    );
    let mut rekeyed = spec.clone();
    rekeyed["models"][&m]["primary_key"] = json!(["email"]);
    let err = t.apply(&rekeyed, false, false).unwrap_err();
    assert_eq!(error_text(&err), ("55000".to_string(), format!(r#"cannot change the primary key of model "{m}" while syncs use it"#)));
    assert_eq!(
        err.as_db_error().unwrap().detail(),
        Some(&*format!(r#"Used by "{s1}", "{}", whose snapshots are keyed by (id)."#, t.name("s2")))
    );
    assert_eq!(t.export(), spec, "nothing of the refused specs was applied");
}

#[test]
fn alter_model_brings_back_a_model_whose_table_was_replaced_and_keeps_what_was_delivered() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 5, "upsert", "", None);
    assert_eq!(f.run().delivered, 5);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', schedule => 'on change')", f.sync));

    // What dbt's table materialization does: build the new table, swap, drop the old one with
    // CASCADE (which takes the model's view with it).
    let t = f.table.clone();
    f.exec(&format!(
        "CREATE TABLE {t}__tmp AS SELECT * FROM {t}; ALTER TABLE {t}__tmp ADD PRIMARY KEY (id);
         UPDATE {t}__tmp SET name = 'Changed' WHERE id = 3;
         ALTER TABLE {t} RENAME TO {t}__bak; ALTER TABLE {t}__tmp RENAME TO {t}; DROP TABLE {t}__bak CASCADE;"
    ));
    assert_eq!(f.count(&format!("SELECT count(*) FROM pg_class WHERE oid = to_regclass('retl_models.{}')", f.model)), 0);

    f.client.execute("SELECT retl.alter_model(name => $1)", &[&f.model]).unwrap();
    // The view is back, and the new table carries the on-change trigger.
    assert_eq!(f.count(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{t}'::regclass AND tgname = 'retl_on_change'")), 1);

    // The next run sends the one changed row, not all five again.
    let run = f.run();
    assert_eq!((run.status.as_str(), run.inserts, run.updates, run.deletes, run.delivered), ("succeeded", 0, 1, 0, 1), "{run:?}");
    assert_eq!(fake.records(), f.model_state());
    // And a commit to the new table runs the sync by itself.
    let before = f.change_runs();
    f.exec(&format!("UPDATE {t} SET score = 1000 WHERE id = 4"));
    wait_until(SHORT, "a change run delivered the update", || fake.records() == f.model_state());
    assert!(f.change_runs() > before);
    f.exec(&format!("SELECT retl.drop_sync('{}')", f.sync));
}

#[test]
fn alter_model_refuses_what_would_break_a_sync_and_changes_nothing() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    f.exec(&format!(
        "SELECT retl.alter_sync(name => '{}', mappings => '{{\"email\": \"email\", \"score\": \"score\"}}')",
        f.sync
    ));
    let err = f
        .client
        .execute("SELECT retl.alter_model(name => $1, query => $2)", &[&f.model, &format!("SELECT id, email FROM {}", f.table)])
        .unwrap_err();
    assert_eq!(error_text(&err), ("42703".to_string(), format!(r#"mapped column "score" is not in model "{}""#, f.model)));
    let err = f
        .client
        .execute("SELECT retl.alter_model(name => $1, query => $2)", &[&f.model, &format!("SELECT email, score FROM {}", f.table)])
        .unwrap_err();
    assert_eq!(error_text(&err), ("42703".to_string(), format!(r#"primary key column "id" is not in model "{}""#, f.model)));
    let err = f.client.execute("SELECT retl.alter_model(name => 'no_such_model')", &[]).unwrap_err();
    assert_eq!(error_text(&err), ("42704".to_string(), r#"model "no_such_model" does not exist"#.to_string()));
    let query: String = f.client.query_one("SELECT query FROM retl.models WHERE name = $1", &[&f.model]).unwrap().get(0);
    assert_eq!(query, format!("SELECT id, email, name, score FROM {}", f.table));
    assert_eq!(f.run().delivered, 3, "the sync still works");

    // A change it survives: a new column it does not map. The view keeps its grants, and the
    // next run sends nothing (what the sync sends did not change).
    let reader = unique("reader");
    f.exec(&format!("CREATE ROLE {reader}; GRANT SELECT ON retl_models.{} TO {reader}", f.model));
    f.client
        .execute(
            "SELECT retl.alter_model(name => $1, query => $2)",
            &[&f.model, &format!("SELECT id, email, name, score, score * 2 AS double_score FROM {}", f.table)],
        )
        .unwrap();
    let acl: String = f
        .client
        .query_one(&format!("SELECT relacl::text FROM pg_class WHERE oid = 'retl_models.{}'::regclass", f.model), &[])
        .unwrap()
        .get(0);
    assert!(acl.contains(&format!("{reader}=r/")), "{acl}");
    let run = f.run();
    assert_eq!((run.status.as_str(), run.rows_in_model, run.inserts + run.updates + run.deletes), ("succeeded", Some(3), 0), "{run:?}");
    f.exec(&format!("SELECT retl.drop_sync('{}'); DROP OWNED BY {reader}; DROP ROLE {reader}", f.sync));
}
