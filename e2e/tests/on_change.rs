//! schedule => 'on change': a commit that changes a table the model reads (found through
//! Postgres's own dependency catalog, views of views included) wakes the workers; rolled back
//! changes and unrelated tables wake nothing; changes close together coalesce into few runs;
//! only the diff is sent.
mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn trigger_tables(f: &mut Fixture) -> Vec<String> {
    f.client
        .query("SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = 'retl_on_change' ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn a_commit_to_a_model_table_sends_just_that_change_within_a_second() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 20, "upsert", "", None);
    assert_eq!(f.run().delivered, 20);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', schedule => 'on change')", f.sync));
    assert!(trigger_tables(&mut f).contains(&f.table), "statement trigger on the model's table");
    fake.clear_journal();

    let committed = Instant::now();
    f.exec(&format!("UPDATE {} SET score = 1000 WHERE id = 7", f.table));
    wait_until(SHORT, "the change to arrive", || fake.records_sent() == 1);
    let latency = fake.requests()[0].at.duration_since(committed);
    assert!(latency < Duration::from_secs(1), "commit to delivery took {latency:?}");
    let body = fake.requests()[0].body.clone().unwrap();
    assert_eq!(body["records"].as_array().unwrap().len(), 1);
    assert_eq!(body["records"][0]["key"], json!({"id": 7}));
    assert_eq!(body["records"][0]["fields"]["score"], json!(1000));
    assert_eq!(fake.records(), f.model_state());
    wait_until(SHORT, "the run to be recorded", || f.change_runs() == 1);

    // Back to manual: the trigger goes, and commits wake nothing.
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', schedule => 'manual')", f.sync));
    assert!(!trigger_tables(&mut f).contains(&f.table));
    f.exec(&format!("UPDATE {} SET score = 1 WHERE id = 7", f.table));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(f.change_runs(), 1);
    assert_eq!(fake.records_sent(), 1);
}

#[test]
fn rolled_back_changes_and_unrelated_tables_wake_nothing() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 5, "upsert", "", None);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', schedule => 'on change')", f.sync));
    assert_eq!(f.run().delivered, 5);
    fake.clear_journal();
    let unrelated = format!("{}_other", f.table);
    f.exec(&format!(
        "CREATE TABLE {unrelated} (id int); INSERT INTO {unrelated} VALUES (1);
         BEGIN; UPDATE {t} SET score = -1; ROLLBACK;",
        t = f.table
    ));
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(f.change_runs(), 0, "no run for a rollback or an unrelated table");
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn tables_behind_views_are_found_in_the_catalog() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    ensure_extension(&mut c);
    let base = unique("oc");
    c.batch_execute(&format!(
        "CREATE TABLE {base}_acct (id int PRIMARY KEY, name text);
         CREATE TABLE {base}_usage (acct int, seats int);
         INSERT INTO {base}_acct VALUES (1, 'acme'), (2, 'globex');
         INSERT INTO {base}_usage VALUES (1, 3), (2, 4);
         CREATE VIEW {base}_v AS SELECT a.id, a.name, sum(u.seats)::int AS seats
           FROM {base}_acct a JOIN {base}_usage u ON u.acct = a.id GROUP BY a.id, a.name;
         SELECT retl.create_model(name => '{base}_m', query => 'SELECT * FROM {base}_v', primary_key => '{{id}}');
         CREATE SERVER {base}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{base}_s', model => '{base}_m', destination => '{base}_d', schedule => 'on change');",
        url = fake.url()
    ))
    .unwrap();
    let sources: Vec<String> = c
        .query(
            &format!(
                "SELECT relid::regclass::text FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id
                  WHERE s.name = '{base}_s' ORDER BY 1"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sources, vec![format!("{base}_acct"), format!("{base}_usage")]);
    // A change to the table two views away reaches the destination by itself.
    c.batch_execute(&format!("INSERT INTO {base}_usage VALUES (2, 10)")).unwrap();
    wait_until(SHORT, "the on-change run to deliver", || {
        fake.records().get(&key(2)).map(|r| r["seats"].clone()) == Some(json!(14))
    });
    assert_eq!(fake.records().len(), 2, "the first on-change run sends the whole model once");
}

#[test]
fn changes_close_together_coalesce_into_few_runs() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 50, "upsert", "", None);
    assert_eq!(f.run().delivered, 50);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', schedule => 'on change')", f.sync));
    fake.clear_journal();
    for id in 1..=50 {
        f.exec(&format!("UPDATE {} SET score = -{id} WHERE id = {id}", f.table));
    }
    wait_until(SHORT, "all 50 changes to arrive", || fake.records() == f.model_state());
    wait_until(SHORT, "the runs to finish", || {
        f.count(&format!(
            "SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{}' AND r.status IN ('queued', 'delivering')",
            f.sync
        )) == 0
    });
    let runs = f.change_runs();
    assert!((1..50).contains(&runs), "50 commits made {runs} runs");
    let delivered = f.count(&format!(
        "SELECT sum(delivered)::bigint FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{}' AND r.trigger = 'change'",
        f.sync
    ));
    assert_eq!(delivered, 50, "each changed row sent once: only the diff");
}
