//! The Intercom connector (`type 'intercom'`) against a strict fake of Intercom's API 2.14:
//! contacts created by external_id and updated by id (a 409 for an existing contact turns
//! into an update), custom attributes, archive on exit; audience membership as a tag on
//! existing contacts; companies by company_id; 429 until X-RateLimit-Reset; bad tokens.
mod common;
use common::*;
use retl_e2e::fake_intercom::FakeIntercom;
use serde_json::json;

struct Setup {
    client: postgres::Client,
    table: String,
    sync: String,
}

/// A table of `rows` users (`external_id` 'u1'.., email, plan), a model, an intercom
/// destination with `options`, a user mapping with `token`, and a mirror sync.
fn set_up(ic: &FakeIntercom, rows: i64, options: &str, token: &str, mappings: &str) -> Setup {
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("ic");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (external_id text PRIMARY KEY, email text, plan text, churn_risk float8);
             INSERT INTO {table} SELECT 'u' || i, 'u' || i || '@example.com', 'free', i / 10.0 FROM generate_series(1, {rows}) i;
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{external_id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'intercom', url '{url}'{options});
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token '{token}');",
            url = ic.base_url(),
        ))
        .unwrap();
    client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'mirror', mappings => $4::text::jsonb)",
            &[&sync, &model, &server, &mappings],
        )
        .unwrap();
    Setup { client, table, sync }
}

#[test]
fn contacts_are_created_updated_and_archived_with_their_custom_attributes() {
    let ic = FakeIntercom::start("ic-token-1");
    ic.define_custom_attribute("contact", "plan", "string");
    // u2 is in Intercom already: creating it answers 409, and the row becomes an update.
    let existing = ic.add_contact("u2", "old2@example.com");
    let mut s = set_up(&ic, 3, "", "ic-token-1", r#"{"email": "email", "plan": "plan"}"#);
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered), ("succeeded", 3), "{first:?}");
    let contacts = ic.contacts();
    assert_eq!(contacts["u2"]["id"], existing.as_str());
    for id in ["u1", "u2", "u3"] {
        assert_eq!(contacts[id]["email"], format!("{id}@example.com"));
        assert_eq!(contacts[id]["custom_attributes"]["plan"], "free");
    }
    assert!(ic.calls().iter().all(|c| c.version.as_deref() == Some("2.14")));
    assert!(ic.calls().iter().any(|c| c.method == "POST" && c.path == "/contacts" && c.status == 409));
    assert!(ic.calls().iter().any(|c| c.method == "PUT" && c.path == format!("/contacts/{existing}") && c.status == 200));
    let ids = identities_by_text_key(&mut s.client, &s.sync);
    assert_eq!(ids.len(), 3);

    ic.clear_calls();
    s.client.batch_execute(&format!("UPDATE {t} SET plan = 'pro' WHERE external_id = 'u1'; DELETE FROM {t} WHERE external_id = 'u3';", t = s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.status.as_str(), second.delivered, second.api_calls), ("succeeded", 2, 2), "{second:?}");
    let mut calls: Vec<(String, String)> = ic.calls().into_iter().map(|c| (c.method, c.path)).collect();
    calls.sort();
    assert_eq!(calls, [("POST".to_string(), format!("/contacts/{}/archive", ids["u3"])), ("PUT".to_string(), format!("/contacts/{}", ids["u1"]))]);
    let contacts = ic.contacts();
    assert_eq!(contacts["u1"]["custom_attributes"]["plan"], "pro");
    assert_eq!(contacts["u3"]["archived"], true);
    ic.clear_calls();
    let third = run_sync(&mut s.client, &s.sync);
    assert_eq!((third.delivered, third.api_calls), (0, 0));

    // u3 comes back: its archived contact is unarchived and updated, not duplicated.
    s.client.batch_execute(&format!("INSERT INTO {} VALUES ('u3', 'u3@example.com', 'pro', 0.3)", s.table)).unwrap();
    let fourth = run_sync(&mut s.client, &s.sync);
    assert_eq!((fourth.status.as_str(), fourth.delivered, fourth.api_calls), ("succeeded", 1, 3), "{fourth:?}");
    let trail: Vec<(String, String, u16)> = ic.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect();
    assert_eq!(
        trail,
        [
            ("POST".to_string(), "/contacts".to_string(), 409),
            ("POST".to_string(), format!("/contacts/{}/unarchive", ids["u3"]), 200),
            ("PUT".to_string(), format!("/contacts/{}", ids["u3"]), 200),
        ]
    );
    let contacts = ic.contacts();
    assert_eq!((contacts["u3"]["archived"].as_bool(), contacts["u3"]["custom_attributes"]["plan"].as_str()), (Some(false), Some("pro")));
    assert_eq!(contacts.len(), 3);
}

/// The identity map of a sync whose key is `external_id` (text).
fn identities_by_text_key(client: &mut postgres::Client, sync: &str) -> std::collections::BTreeMap<String, String> {
    client
        .query(
            "SELECT i.key->>'external_id', i.destination_id FROM retl.identities i JOIN retl.syncs y ON y.id = i.sync_id WHERE y.name = $1",
            &[&sync],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn a_contact_intercom_refuses_is_a_row_error_and_the_others_go() {
    let ic = FakeIntercom::start("ic-token-2");
    ic.define_custom_attribute("contact", "plan", "string");
    let mut s = set_up(&ic, 2, "", "ic-token-2", r#"{"email": "email", "plan": "plan"}"#);
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client.batch_execute(&format!("UPDATE {} SET email = 'broken' WHERE external_id = 'u2'", s.table)).unwrap();
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("partial", 1, 1), "{run:?}");
    let known = identities_by_text_key(&mut s.client, &s.sync);
    assert_eq!(known.keys().collect::<Vec<_>>(), ["u1"]);
    let row_error: String = s
        .client
        .query_one("SELECT e.response FROM retl.row_errors e JOIN retl.syncs y ON y.id = e.sync_id WHERE y.name = $1", &[&s.sync])
        .unwrap()
        .get(0);
    assert!(row_error.starts_with("Intercom parameter_invalid: "), "{row_error}");
    assert_eq!(ic.contacts().keys().collect::<Vec<_>>(), ["u1"]);
}

#[test]
fn audience_membership_is_mirrored_as_a_tag_on_existing_contacts() {
    let ic = FakeIntercom::start("ic-token-3");
    for i in 1..=3 {
        ic.add_contact(&format!("u{i}"), &format!("u{i}@example.com"));
    }
    // u4 has no Intercom contact: it cannot be tagged.
    let mut s = set_up(&ic, 4, ", tag 'churn_risk'", "ic-token-3", r#"{"external_id": "external_id"}"#);
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let tagged = |ic: &FakeIntercom| -> Vec<String> {
        ic.contacts().into_iter().filter(|(_, c)| c["tags"].as_array().unwrap().contains(&json!("churn_risk"))).map(|(k, _)| k).collect()
    };
    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered, first.failed), ("partial", 3, 1), "{first:?}");
    assert_eq!(tagged(&ic), ["u1", "u2", "u3"]);
    assert_eq!(
        row_errors_by_text_key(&mut s.client, &s.sync),
        [("u4".to_string(), "Intercom has no contact with this external_id: tagging needs an existing contact".to_string())]
    );
    // u2 leaves: untagged by the id the first run learned, without a search.
    ic.clear_calls();
    s.client.batch_execute(&format!("DELETE FROM {} WHERE external_id IN ('u2', 'u4')", s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.status.as_str(), second.api_calls), ("succeeded", 1), "{second:?}");
    assert_eq!(ic.calls()[0].path, "/tags");
    assert_eq!(tagged(&ic), ["u1", "u3"]);
    assert!(ic.contacts().values().all(|c| c["archived"] == false), "tags never archive contacts");
}

fn row_errors_by_text_key(client: &mut postgres::Client, sync: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT e.key->>'external_id', e.response FROM retl.row_errors e JOIN retl.syncs y ON y.id = e.sync_id WHERE y.name = $1 ORDER BY 1",
            &[&sync],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn companies_by_company_id_a_429_waited_out_and_a_bad_token_reported() {
    let ic = FakeIntercom::start("ic-token-4");
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("icco");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (company_id text PRIMARY KEY, name text, plan text);
             INSERT INTO {table} VALUES ('acme', 'Acme', 'pro'), ('globex', 'Globex', 'free');
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{company_id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'intercom', url '{url}', object 'companies');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token 'ic-token-4');",
            url = ic.base_url(),
        ))
        .unwrap();
    client.execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'mirror')", &[&sync, &model, &server]).unwrap();
    let _drop = DropSyncs(vec![sync.clone()]);
    ic.throttle_next(1);
    let first = run_sync(&mut client, &sync);
    assert_eq!((first.status.as_str(), first.delivered), ("succeeded", 2), "{first:?}");
    assert_eq!(ic.calls().iter().filter(|c| c.status == 429).count(), 1);
    let companies = ic.companies();
    assert_eq!((companies["acme"]["name"].as_str(), companies["acme"]["plan"].as_str()), (Some("Acme"), Some("pro")));
    let usage: Option<String> = client.query_one("SELECT api_usage FROM retl.sync_status WHERE sync = $1", &[&sync]).unwrap().get(0);
    assert!(usage.as_deref().is_some_and(|u| u.starts_with("rate-limit remaining ") && u.ends_with("/10000")), "{usage:?}");

    client.batch_execute(&format!("DELETE FROM {table} WHERE company_id = 'globex'")).unwrap();
    let second = run_sync(&mut client, &sync);
    assert_eq!((second.status.as_str(), second.delivered), ("succeeded", 1), "{second:?}");
    assert_eq!(ic.companies().keys().collect::<Vec<_>>(), ["acme"]);

    client
        .batch_execute(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (SET token 'ic-wrong-secret')"))
        .unwrap();
    client.batch_execute(&format!("UPDATE {table} SET plan = 'enterprise' WHERE company_id = 'acme'")).unwrap();
    let refused = run_sync(&mut client, &sync);
    assert_eq!(refused.status, "failed");
    let error = refused.error.unwrap();
    assert!(error.starts_with("Intercom rejected the access token (Intercom unauthorized: ") && !error.contains("ic-wrong-secret"), "{error}");
}
