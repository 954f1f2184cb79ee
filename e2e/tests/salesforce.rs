//! The Salesforce connector (`type 'salesforce'`) against a strict fake of Salesforce's REST
//! API: sObject Collections upsert by external id (200 per request, per-record errors),
//! create and update by Id for objects without one, delete by Id, Sforce-Limit-Info in the
//! sync's status, OAuth refresh on INVALID_SESSION_ID, describe at create_sync, and Bulk API
//! 2.0 for large runs.
mod common;
use common::*;
use retl_e2e::fake_salesforce::{FakeSalesforce, FieldSpec};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const MAPPINGS: &str = r#"{"External_Id__c": "ext", "LastName": "last_name", "Email": "email", "Health_Score__c": "score"}"#;
const UPSERT: &str = "/services/data/v62.0/composite/sobjects/Contact/External_Id__c";

struct Setup {
    client: postgres::Client,
    table: String,
    model: String,
    server: String,
    sync: String,
}

/// A contacts table of `rows` rows, a model, a salesforce destination for Contact upserted by
/// External_Id__c with `options`, a user mapping with `mapping`, and a mirror sync.
fn set_up(sf: &FakeSalesforce, rows: i64, options: &str, mapping: &str) -> Setup {
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("sf");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, ext text, last_name text, email text, score float8);
             INSERT INTO {table} SELECT i, 'c-' || i, 'Lee ' || i, 'lee' || i || '@example.com', i / 4.0 FROM generate_series(1, {rows}) i;
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'salesforce', url '{url}', object 'Contact',
                                                                     external_id 'External_Id__c'{options});
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS ({mapping});",
            url = sf.base_url(),
        ))
        .unwrap();
    // Its own transaction: the worker that describes Contact must see the committed server.
    client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'mirror', mappings => $4::text::jsonb)",
            &[&sync, &model, &server, &MAPPINGS],
        )
        .unwrap();
    Setup { client, table, model, server, sync }
}

/// The contacts Salesforce should hold, by external id.
fn expected(s: &mut Setup) -> BTreeMap<String, Value> {
    s.client
        .query(&format!("SELECT ext, last_name, email, score FROM {} ORDER BY id", s.table), &[])
        .unwrap()
        .iter()
        .map(|r| {
            let (ext, last, email, score): (String, Option<String>, Option<String>, Option<f64>) = (r.get(0), r.get(1), r.get(2), r.get(3));
            (ext, json!({"LastName": last, "Email": email, "Health_Score__c": score}))
        })
        .collect()
}

fn held(sf: &FakeSalesforce) -> BTreeMap<String, Value> {
    sf.records("Contact")
        .values()
        .map(|r| {
            let field = |name: &str| r.get(name).cloned().unwrap_or(Value::Null);
            (
                r["External_Id__c"].as_str().unwrap().to_string(),
                json!({"LastName": field("LastName"), "Email": field("Email"), "Health_Score__c": field("Health_Score__c").as_f64()}),
            )
        })
        .collect()
}

fn calls(sf: &FakeSalesforce) -> Vec<(String, String, u16)> {
    sf.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect()
}



#[test]
fn contacts_are_upserted_by_external_id_200_at_a_time_then_updated_and_deleted_by_id() {
    let sf = FakeSalesforce::start("sf-token-1");
    let mut s = set_up(&sf, 250, "", "token 'sf-token-1'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    assert_eq!(calls(&sf), [("GET".into(), "/services/data/v62.0/sobjects/Contact/describe".into(), 200)]);
    sf.clear_calls();

    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered, first.api_calls), ("succeeded", 250, 2), "{first:?}");
    assert_eq!(calls(&sf), [("PATCH".into(), UPSERT.into(), 200), ("PATCH".into(), UPSERT.into(), 200)]);
    // The two requests go out concurrently: in either order.
    let bodies: Vec<Value> = sf.calls().into_iter().map(|c| c.body.unwrap()).collect();
    assert!(bodies.iter().all(|b| b["allOrNone"] == json!(false)));
    let mut sizes: Vec<usize> = bodies.iter().map(|b| b["records"].as_array().unwrap().len()).collect();
    sizes.sort();
    assert_eq!(sizes, [50, 200]);
    let first_contact = bodies.iter().flat_map(|b| b["records"].as_array().unwrap().iter()).find(|r| r["External_Id__c"] == "c-1");
    assert_eq!(
        first_contact,
        Some(&json!({"attributes": {"type": "Contact"}, "External_Id__c": "c-1", "LastName": "Lee 1", "Email": "lee1@example.com", "Health_Score__c": 0.25}))
    );
    assert_eq!(held(&sf), expected(&mut s));
    let ids = identities(&mut s.client, &s.sync);
    assert_eq!(ids.len(), 250);
    assert_eq!(sf.records("Contact")[&ids[&9]]["External_Id__c"], "c-9");
    // The org's API usage, as Salesforce reported it on the last response, is in the status.
    let usage: Option<String> =
        s.client.query_one("SELECT api_usage FROM retl.sync_status WHERE sync = $1", &[&s.sync]).unwrap().get(0);
    assert_eq!(usage, Some(format!("api-usage=3/{}", sf.api_usage().1)));

    sf.clear_calls();
    s.client.batch_execute(&format!("UPDATE {} SET email = 'new9@example.com' WHERE id = 9", s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.delivered, second.api_calls), (1, 1), "{second:?}");
    assert_eq!(sf.records("Contact").len(), 250);
    assert_eq!(held(&sf), expected(&mut s));
    sf.clear_calls();
    let third = run_sync(&mut s.client, &s.sync);
    assert_eq!((third.delivered, third.api_calls), (0, 0));
    assert!(sf.calls().is_empty());

    s.client.batch_execute(&format!("DELETE FROM {} WHERE id IN (9, 10)", s.table)).unwrap();
    let fourth = run_sync(&mut s.client, &s.sync);
    assert_eq!((fourth.status.as_str(), fourth.deletes, fourth.api_calls), ("succeeded", 2, 1), "{fourth:?}");
    let (method, path, status) = calls(&sf).remove(0);
    assert_eq!((method.as_str(), status), ("DELETE", 200));
    let mut deleted: Vec<String> = path
        .strip_prefix("/services/data/v62.0/composite/sobjects?ids=")
        .and_then(|rest| rest.strip_suffix("&allOrNone=false"))
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    deleted.sort();
    let mut want = vec![ids[&9].clone(), ids[&10].clone()];
    want.sort();
    assert_eq!(deleted, want);
    assert_eq!(held(&sf), expected(&mut s));
    assert_eq!(identities(&mut s.client, &s.sync).len(), 248);
}

#[test]
fn per_record_errors_reject_only_those_contacts() {
    let sf = FakeSalesforce::start("sf-token-2");
    let mut s = set_up(&sf, 5, "", "token 'sf-token-2'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client
        .batch_execute(&format!(
            "UPDATE {t} SET last_name = NULL WHERE id = 2; UPDATE {t} SET email = 'not-an-email' WHERE id = 4;",
            t = s.table
        ))
        .unwrap();
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed, run.api_calls), ("partial", 3, 2, 1), "{run:?}");
    assert_eq!(
        row_errors(&mut s.client, &s.sync),
        [
            ("2".to_string(), None, "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)".to_string()),
            ("4".to_string(), None, "INVALID_EMAIL_ADDRESS: Email: invalid email address: not-an-email (fields: Email)".to_string()),
        ]
    );
    let mut want = expected(&mut s);
    want.remove("c-2");
    want.remove("c-4");
    assert_eq!(held(&sf), want);
}

#[test]
fn outages_are_retried_and_the_daily_limit_fails_the_run_keeping_the_rows() {
    let sf = FakeSalesforce::start("sf-token-3");
    let mut s = set_up(&sf, 3, "", "token 'sf-token-3'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    sf.clear_calls();
    sf.fail_next(2, 503);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 3, 3), "{run:?}");
    assert_eq!(calls(&sf), [("PATCH".into(), UPSERT.into(), 503), ("PATCH".into(), UPSERT.into(), 503), ("PATCH".into(), UPSERT.into(), 200)]);
    // Salesforce's REST API does not document 429, but a proxy or a future limit may send one:
    // it is waited out like a 503.
    sf.clear_calls();
    sf.fail_next(1, 429);
    s.client.batch_execute(&format!("UPDATE {} SET score = 8 WHERE id = 2", s.table)).unwrap();
    let throttled = run_sync(&mut s.client, &s.sync);
    assert_eq!((throttled.status.as_str(), throttled.delivered, throttled.api_calls), ("succeeded", 1, 2), "{throttled:?}");
    assert_eq!(calls(&sf), [("PATCH".into(), UPSERT.into(), 429), ("PATCH".into(), UPSERT.into(), 200)]);

    sf.set_api_limit(sf.api_usage().0);
    s.client.batch_execute(&format!("UPDATE {} SET score = 9 WHERE id = 1", s.table)).unwrap();
    let limited = run_sync(&mut s.client, &s.sync);
    assert_eq!((limited.status.as_str(), limited.delivered), ("failed", 0), "{limited:?}");
    assert_eq!(
        limited.error.as_deref(),
        Some("Salesforce API request limit reached (REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded.): the rows stay queued for a later run")
    );
    // A new day: the queued change goes through.
    sf.set_api_limit(15_000);
    let next = run_sync(&mut s.client, &s.sync);
    assert_eq!((next.status.as_str(), next.delivered), ("succeeded", 1), "{next:?}");
    assert_eq!(held(&sf), expected(&mut s));
}

#[test]
fn an_invalid_session_is_refreshed_once_with_either_oauth_flow() {
    // Refresh-token flow: the mapping's token expires, one refresh, the request again.
    let sf = FakeSalesforce::start("sf-at-1");
    sf.configure_oauth("sf-client", "sf-secret", Some("sf-refresh"));
    let mut s = set_up(&sf, 2, "", "token 'sf-at-1', client_id 'sf-client', client_secret 'sf-secret', refresh_token 'sf-refresh'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    sf.expire_token();
    sf.clear_calls();
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 2), "{run:?}");
    assert_eq!(
        calls(&sf),
        [("PATCH".into(), UPSERT.into(), 401), ("POST".into(), "/services/oauth2/token".into(), 200), ("PATCH".into(), UPSERT.into(), 200)]
    );
    assert_eq!(sf.calls()[1].body.clone().unwrap()["grant_type"], "refresh_token");
    assert_eq!(sf.token_calls(), 1);
    assert_eq!(held(&sf), expected(&mut s));

    // Client-credentials flow, no token in the mapping at all: one token request first.
    let sf2 = FakeSalesforce::start("unused");
    sf2.configure_oauth("cc-client", "cc-secret", None);
    let mut s2 = set_up(&sf2, 2, "", "client_id 'cc-client', client_secret 'cc-secret'");
    let _drop2 = DropSyncs(vec![s2.sync.clone()]);
    assert_eq!(sf2.calls()[0].body.clone().unwrap()["grant_type"], "client_credentials");
    let run = run_sync(&mut s2.client, &s2.sync);
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 2), "{run:?}");
    assert_eq!(sf2.token_calls(), 1, "the token from create_sync's describe is reused");
    assert_eq!(held(&sf2), expected(&mut s2));
}

#[test]
fn describe_refuses_unknown_and_read_only_fields_at_create_sync() {
    let sf = FakeSalesforce::start("sf-token-5");
    let mut s = set_up(&sf, 1, "", "token 'sf-token-5'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let other = format!("{}_bad", s.sync);
    let err = s
        .client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mappings => $4::text::jsonb)",
            &[&other, &s.model, &s.server, &r#"{"External_Id__c": "ext", "LastName": "last_name", "Churn__c": "score", "CreatedDate": "email"}"#],
        )
        .unwrap_err();
    let (code, message, _, _) = db_error(&err);
    assert_eq!(code, "42703");
    assert_eq!(
        message,
        format!(
            "sync \"{other}\" cannot write to destination \"{}\": Salesforce Contact has no field \"Churn__c\"; Salesforce \
             Contact field \"CreatedDate\" cannot be written (read-only)",
            s.server
        )
    );
    // An external_id that is no external-id field is refused too.
    s.client
        .batch_execute(&format!("ALTER SERVER {} OPTIONS (SET external_id 'Email')", s.server))
        .unwrap();
    let err = s
        .client
        .execute("SELECT retl.alter_sync(name => $1, mappings => $2::text::jsonb)", &[&s.sync, &MAPPINGS])
        .unwrap_err();
    assert!(db_error(&err).1.ends_with("Salesforce Contact field \"Email\" is not an external id field"), "{err}");
}

#[test]
fn objects_without_external_id_are_created_then_updated_and_deleted_by_their_id() {
    let sf = FakeSalesforce::start("sf-token-6");
    sf.add_object(
        "Churn_Risk__c",
        "a01",
        vec![FieldSpec::new("Name", "string"), FieldSpec::new("Risk__c", "double"), FieldSpec::new("Reason__c", "string")],
    );
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("sfc");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (account text PRIMARY KEY, risk float8, reason text);
             INSERT INTO {table} VALUES ('acme', 0.75, 'usage down'), ('globex', 0.5, NULL);
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{account}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'salesforce', url '{url}', object 'Churn_Risk__c');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token 'sf-token-6');",
            url = sf.base_url(),
        ))
        .unwrap();
    client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'mirror', \
                     mappings => '{\"Name\": \"account\", \"Risk__c\": \"risk\", \"Reason__c\": \"reason\"}')",
            &[&sync, &model, &server],
        )
        .unwrap();
    let _drop = DropSyncs(vec![sync.clone()]);
    let state = || -> BTreeMap<String, (Value, Value)> {
        sf.records("Churn_Risk__c")
            .values()
            .map(|r| (r["Name"].as_str().unwrap().to_string(), (r["Risk__c"].clone(), r.get("Reason__c").cloned().unwrap_or(Value::Null))))
            .collect()
    };
    sf.clear_calls();
    let first = run_sync(&mut client, &sync);
    assert_eq!((first.status.as_str(), first.delivered, first.api_calls), ("succeeded", 2, 1), "{first:?}");
    assert_eq!(calls(&sf), [("POST".into(), "/services/data/v62.0/composite/sobjects".into(), 200)]);
    assert_eq!(
        state(),
        BTreeMap::from([("acme".into(), (json!(0.75), json!("usage down"))), ("globex".into(), (json!(0.5), Value::Null))])
    );
    sf.clear_calls();
    client.batch_execute(&format!("UPDATE {table} SET risk = 0.9 WHERE account = 'acme'; DELETE FROM {table} WHERE account = 'globex'")).unwrap();
    let second = run_sync(&mut client, &sync);
    assert_eq!((second.status.as_str(), second.delivered, second.api_calls), ("succeeded", 2, 2), "{second:?}");
    let mut methods: Vec<String> = sf.calls().iter().map(|c| c.method.clone()).collect();
    methods.sort();
    assert_eq!(methods, ["DELETE", "PATCH"]);
    let update = sf.calls().into_iter().find(|c| c.method == "PATCH").unwrap();
    assert_eq!(update.path, "/services/data/v62.0/composite/sobjects");
    assert!(update.body.unwrap()["records"][0]["id"].as_str().unwrap().starts_with("a01"));
    assert_eq!(state(), BTreeMap::from([("acme".into(), (json!(0.9), json!("usage down")))]));
    assert_eq!(sf.records("Churn_Risk__c").len(), 1);
}

#[test]
fn large_runs_go_through_one_bulk_api_job_and_its_failed_results_become_row_errors() {
    let sf = FakeSalesforce::start("sf-token-7");
    sf.set_bulk_polls_until_complete(2);
    let mut s = set_up(&sf, 8, ", bulk_threshold '5', bulk_poll_ms '50'", "token 'sf-token-7'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client.batch_execute(&format!("UPDATE {} SET last_name = NULL WHERE id = 6", s.table)).unwrap();
    sf.clear_calls();
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("partial", 7, 1), "{run:?}");
    let jobs = "/services/data/v62.0/jobs/ingest";
    let trail: Vec<(String, String, u16)> =
        calls(&sf).into_iter().map(|(m, p, st)| (m, p.split('/').filter(|x| !x.starts_with("750")).collect::<Vec<_>>().join("/"), st)).collect();
    assert_eq!(
        trail,
        [
            ("POST".into(), jobs.into(), 200),
            ("PUT".into(), format!("{jobs}/batches"), 201),
            ("PATCH".into(), jobs.into(), 200),
            ("GET".into(), jobs.into(), 200),
            ("GET".into(), jobs.into(), 200),
            ("GET".into(), jobs.into(), 200),
            ("GET".into(), format!("{jobs}/successfulResults/"), 200),
            ("GET".into(), format!("{jobs}/failedResults/"), 200),
        ]
    );
    assert_eq!(run.api_calls, 8);
    let csv = sf.calls()[1].body.clone().unwrap()["csv"].as_str().unwrap().to_string();
    assert_eq!(csv.lines().next(), Some("External_Id__c,Email,Health_Score__c,LastName"));
    assert_eq!(csv.lines().count(), 9);
    assert_eq!(csv.lines().find(|l| l.starts_with("c-6,")), Some("c-6,lee6@example.com,1.5,#N/A"));
    assert_eq!(
        row_errors(&mut s.client, &s.sync),
        [("6".to_string(), None, "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)".to_string())]
    );
    let mut want = expected(&mut s);
    want.remove("c-6");
    assert_eq!(held(&sf), want);
    assert_eq!(identities(&mut s.client, &s.sync).len(), 7);
    // Below the threshold, changes go through sObject Collections again.
    sf.clear_calls();
    s.client.batch_execute(&format!("UPDATE {} SET last_name = 'Kim' WHERE id = 6", s.table)).unwrap();
    let small = run_sync(&mut s.client, &s.sync);
    assert_eq!((small.status.as_str(), small.delivered, small.api_calls), ("succeeded", 1, 1), "{small:?}");
    assert_eq!(calls(&sf), [("PATCH".into(), UPSERT.into(), 200)]);
    assert_eq!(held(&sf), expected(&mut s));
}

#[test]
fn a_delete_sync_deletes_contacts_it_never_created_by_external_id() {
    let sf = FakeSalesforce::start("sf-token-8");
    let mut s = set_up(&sf, 3, "", "token 'sf-token-8'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    run_sync(&mut s.client, &s.sync);
    let (erase, erase_model, eraser) = (format!("{}_erase", s.table), format!("{}_erase", s.model), format!("{}_erase", s.sync));
    s.client
        .batch_execute(&format!(
            "CREATE TABLE {erase} (ext text PRIMARY KEY);
             INSERT INTO {erase} VALUES ('c-2'), ('c 99/x');
             SELECT retl.create_model(name => '{erase_model}', query => 'SELECT ext FROM {erase}', primary_key => '{{ext}}');"
        ))
        .unwrap();
    s.client
        .execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'delete')", &[&eraser, &erase_model, &s.server])
        .unwrap();
    let _drop_eraser = DropSyncs(vec![eraser.clone()]);
    sf.clear_calls();
    let run = run_sync(&mut s.client, &eraser);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 2, 2), "{run:?}");
    let mut trail = calls(&sf);
    trail.sort();
    assert_eq!(
        trail,
        [
            ("DELETE".into(), "/services/data/v62.0/sobjects/Contact/External_Id__c/c%2099%2Fx".into(), 404),
            ("DELETE".into(), "/services/data/v62.0/sobjects/Contact/External_Id__c/c-2".into(), 204),
        ]
    );
    let left: Vec<String> = held(&sf).into_keys().collect();
    assert_eq!(left, ["c-1", "c-3"]);
}
