//! The Customer.io connector (`type 'customerio'`) against a strict fake of the Track API:
//! people identified with their attributes, deleted when they leave a mirror sync or are
//! listed by an erasure sync, refusals per person, 429s waited out, bad credentials reported
//! without the key.
mod common;
use common::*;
use retl_e2e::fake_customerio::FakeCustomerIo;
use serde_json::{json, Value};
use std::collections::BTreeMap;

struct Setup {
    client: postgres::Client,
    table: String,
    model: String,
    server: String,
    sync: String,
}

fn set_up(cio: &FakeCustomerIo, rows: i64, token: &str, mode: &str) -> Setup {
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("cio");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id text PRIMARY KEY, email text, plan text);
             INSERT INTO {table} SELECT 'u' || i, 'u' || i || '@example.com', 'free' FROM generate_series(1, {rows}) i;
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'customerio', url '{url}');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token '{token}');",
            url = cio.base_url(),
        ))
        .unwrap();
    client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => $4, mappings => '{\"email\": \"email\", \"plan\": \"plan\"}')",
            &[&sync, &model, &server, &mode],
        )
        .unwrap();
    Setup { client, table, model, server, sync }
}

fn expected(s: &mut Setup) -> BTreeMap<String, Value> {
    s.client
        .query(&format!("SELECT id, email, plan FROM {} ORDER BY id", s.table), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), json!({"email": r.get::<_, String>(1), "plan": r.get::<_, String>(2)})))
        .collect()
}

#[test]
fn people_are_identified_updated_left_alone_and_deleted() {
    let cio = FakeCustomerIo::start("site1", "key1");
    let mut s = set_up(&cio, 3, "site1:key1", "mirror");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered, first.api_calls), ("succeeded", 3, 3), "{first:?}");
    assert_eq!(cio.customers(), expected(&mut s));
    assert!(cio.calls().iter().all(|c| c.method == "PUT" && c.path.starts_with("/api/v1/customers/u")));

    cio.clear_calls();
    s.client.batch_execute(&format!("UPDATE {t} SET plan = 'pro' WHERE id = 'u2'; DELETE FROM {t} WHERE id = 'u3';", t = s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.status.as_str(), second.delivered), ("succeeded", 2), "{second:?}");
    // Exactly one request per change, and the fake saw exactly those.
    assert_eq!(second.api_calls, 2, "{second:?}: the fake saw {:?}", cio.calls());
    let mut calls: Vec<(String, String)> = cio.calls().into_iter().map(|c| (c.method, c.path)).collect();
    calls.sort();
    assert_eq!(calls, [("DELETE".into(), "/api/v1/customers/u3".into()), ("PUT".into(), "/api/v1/customers/u2".into())]);
    assert_eq!(cio.customers(), expected(&mut s));
    assert_eq!(cio.deleted(), ["u3"]);
    cio.clear_calls();
    let third = run_sync(&mut s.client, &s.sync);
    assert_eq!((third.delivered, third.api_calls), (0, 0));
    assert!(cio.calls().is_empty());

    // An erasure list: a delete sync removes the people it names.
    let (erase, erase_model, eraser) = (format!("{}_erase", s.table), format!("{}_erase", s.model), format!("{}_erase", s.sync));
    s.client
        .batch_execute(&format!(
            "CREATE TABLE {erase} (id text PRIMARY KEY); INSERT INTO {erase} VALUES ('u1');
             SELECT retl.create_model(name => '{erase_model}', query => 'SELECT id FROM {erase}', primary_key => '{{id}}');"
        ))
        .unwrap();
    s.client
        .execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'delete')", &[&eraser, &erase_model, &s.server])
        .unwrap();
    let _drop_eraser = DropSyncs(vec![eraser.clone()]);
    let erased = run_sync(&mut s.client, &eraser);
    assert_eq!((erased.status.as_str(), erased.delivered), ("succeeded", 1), "{erased:?}");
    assert_eq!(cio.deleted(), ["u3", "u1"]);
    assert_eq!(cio.customers().keys().collect::<Vec<_>>(), ["u2"]);
}

#[test]
fn a_refused_person_is_a_row_error_a_429_is_waited_out_and_bad_credentials_fail_the_run() {
    let cio = FakeCustomerIo::start("site2", "key-secret-2");
    let mut s = set_up(&cio, 3, "site2:key-secret-2", "upsert");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client.batch_execute(&format!("UPDATE {} SET email = 'not-an-email' WHERE id = 'u2'", s.table)).unwrap();
    cio.throttle_next(1);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("partial", 2, 1), "{run:?}");
    assert_eq!(cio.calls().iter().filter(|c| c.status == 429).count(), 1);
    let errors = row_errors(&mut s.client, &s.sync);
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].0.as_str(), errors[0].1), ("u2", Some(400)));
    assert!(errors[0].2.starts_with("Customer.io: ") && errors[0].2.contains("email"), "{errors:?}");
    let mut want = expected(&mut s);
    want.remove("u2");
    assert_eq!(cio.customers(), want);

    s.client
        .batch_execute(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {} OPTIONS (SET token 'site2:wrong-key')", s.server))
        .unwrap();
    s.client.batch_execute(&format!("UPDATE {} SET plan = 'pro' WHERE id = 'u1'", s.table)).unwrap();
    let refused = run_sync(&mut s.client, &s.sync);
    assert_eq!(refused.status, "failed");
    assert_eq!(
        refused.error.as_deref(),
        Some("Customer.io rejected the credentials (HTTP 401): check SITE_ID:API_KEY in the user mapping")
    );
}
