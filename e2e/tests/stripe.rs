//! The Stripe connector (`type 'stripe'`) against a strict fake of Stripe's Customers API:
//! customers updated form-encoded with `metadata[...]`, one stable Idempotency-Key per row and
//! run (a retried request is replayed, not applied twice), removal unsets the sync's metadata,
//! errors classified by type, bad keys reported without the key.
mod common;
use common::*;
use retl_e2e::fake_stripe::FakeStripe;
use serde_json::{json, Value};
use std::collections::BTreeMap;

const MAPPINGS: &str = r#"{"id": "stripe_customer_id", "metadata.plan": "plan", "metadata.health_score": "health_score"}"#;

struct Setup {
    client: postgres::Client,
    table: String,
    server: String,
    sync: String,
}

fn set_up(stripe: &FakeStripe, rows: i64, key: &str) -> Setup {
    for i in 1..=rows {
        stripe.add_customer(&format!("cus_{i}"), &format!("a{i}@example.com"));
    }
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("st");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, stripe_customer_id text, plan text, health_score float8);
             INSERT INTO {table} SELECT i, 'cus_' || i, 'pro', i / 4.0 FROM generate_series(1, {rows}) i;
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'stripe', url '{url}');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token '{key}');",
            url = stripe.base_url(),
        ))
        .unwrap();
    client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'mirror', mappings => $4::text::jsonb)",
            &[&sync, &model, &server, &MAPPINGS],
        )
        .unwrap();
    Setup { client, table, server, sync }
}

/// Each customer's metadata, as Stripe holds it.
fn metadata(stripe: &FakeStripe) -> BTreeMap<String, Value> {
    stripe.customers().into_iter().map(|(id, c)| (id, c["metadata"].clone())).collect()
}

#[test]
fn metadata_is_set_updated_left_alone_and_unset_on_removal() {
    let stripe = FakeStripe::start("sk_test_1");
    let mut s = set_up(&stripe, 2, "sk_test_1");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered, first.api_calls), ("succeeded", 2, 2), "{first:?}");
    assert_eq!(
        metadata(&stripe),
        BTreeMap::from([
            ("cus_1".into(), json!({"plan": "pro", "health_score": "0.25"})),
            ("cus_2".into(), json!({"plan": "pro", "health_score": "0.5"})),
        ])
    );
    let call = stripe.calls().into_iter().find(|c| c.path == "/v1/customers/cus_1").unwrap();
    assert_eq!(call.form, [("metadata[health_score]".to_string(), "0.25".to_string()), ("metadata[plan]".to_string(), "pro".to_string())]);
    assert_eq!(call.idempotency_key.as_ref().map(String::len), Some(64));
    // Emails were not the sync's to touch.
    assert_eq!(stripe.customers()["cus_1"]["email"], "a1@example.com");

    stripe.clear_calls();
    s.client.batch_execute(&format!("UPDATE {t} SET plan = 'enterprise' WHERE id = 2; DELETE FROM {t} WHERE id = 1;", t = s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.status.as_str(), second.delivered, second.api_calls), ("succeeded", 2, 2), "{second:?}");
    assert_eq!(
        metadata(&stripe),
        BTreeMap::from([("cus_1".into(), json!({})), ("cus_2".into(), json!({"plan": "enterprise", "health_score": "0.5"}))])
    );
    assert_eq!(stripe.customers().len(), 2, "removal never deletes the customer");
    stripe.clear_calls();
    let third = run_sync(&mut s.client, &s.sync);
    assert_eq!((third.delivered, third.api_calls), (0, 0));
    assert!(stripe.calls().is_empty());
}

#[test]
fn a_retried_request_keeps_its_idempotency_key_and_a_refused_row_does_not_hold_back_the_others() {
    let stripe = FakeStripe::start("sk_test_2");
    let mut s = set_up(&stripe, 3, "sk_test_2");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client.batch_execute(&format!("UPDATE {} SET stripe_customer_id = 'cus_gone' WHERE id = 3", s.table)).unwrap();
    stripe.throttle_next(1);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("partial", 2, 1), "{run:?}");
    let calls = stripe.calls();
    let throttled = calls.iter().find(|c| c.status == 429).expect("one 429");
    let again: Vec<_> = calls.iter().filter(|c| c.path == throttled.path && c.status != 429).collect();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].idempotency_key, throttled.idempotency_key, "the retry reuses the key");
    assert_eq!(
        row_errors(&mut s.client, &s.sync),
        [("3".to_string(), Some(404), "Stripe invalid_request_error (resource_missing): No such customer: 'cus_gone'".to_string())]
    );
    assert_eq!(metadata(&stripe)["cus_3"], json!({}));
    assert_eq!(metadata(&stripe)["cus_1"]["plan"], "pro");
}

#[test]
fn a_wrong_key_fails_the_run_and_is_not_shown() {
    let stripe = FakeStripe::start("sk_test_right");
    let mut s = set_up(&stripe, 1, "sk_test_wrong_secret");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!(run.status, "failed");
    assert_eq!(run.error.as_deref(), Some("Stripe rejected the API key (HTTP 401): check the secret key in the user mapping"));
    let leaked: i64 = s
        .client
        .query_one("SELECT count(*) FROM (SELECT error FROM retl.runs UNION ALL SELECT error FROM retl.batches) t WHERE error LIKE '%wrong_secret%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    let _ = &s.server;
}
