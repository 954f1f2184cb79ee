//! The generic HTTP connector (`type 'http'`) against a strict fake of a small REST API: the
//! URL, method, headers and body come from the server's Liquid templates, one request per
//! record; the API's own answers decide what is delivered, rejected or retried.
mod common;
use common::*;
use retl_e2e::fake_users_api::FakeUsersApi;
use serde_json::{json, Value};
use std::collections::BTreeMap;

struct Setup {
    client: postgres::Client,
    table: String,
    sync: String,
    server: String,
}

fn set_up(api: &FakeUsersApi, rows: i64) -> Setup {
    set_up_with(api, rows, "", &format!("token '{}'", api.api_key()))
}

/// `set_up` with more server options (", name 'value'") and the user mapping's options.
fn set_up_with(api: &FakeUsersApi, rows: i64, server_options: &str, mapping: &str) -> Setup {
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("http");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            r#"CREATE TABLE {table} (id bigint PRIMARY KEY, email text, name text, score int);
               INSERT INTO {table} SELECT i, 'user' || i || '@example.com', 'Person ' || i, i * 10 FROM generate_series(1, {rows}) i;
               SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, name, score FROM {table}', primary_key => '{{id}}');
               CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (
                   type 'http',
                   url '{base_url}/v1/users/{{{{ key.id }}}}',
                   method '{{% if op == ''delete'' %}}DELETE{{% else %}}PUT{{% endif %}}',
                   headers '{{"X-Api-Key": "{{{{ token }}}}"}}',
                   body '{{"email": {{{{ fields.email | json }}}}, "name": {{{{ fields.name | json }}}}, "score": {{{{ fields.score | json }}}}}}',
                   max_concurrency '2'{server_options});
               CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS ({mapping});
               SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', mode => 'mirror');"#,
            base_url = api.base_url(),
        ))
        .unwrap();
    Setup { client, table, sync, server }
}

fn run(s: &mut Setup) -> Run {
    run_sync(&mut s.client, &s.sync)
}

/// The users the API should hold: the table's rows, by id.
fn expected(s: &mut Setup) -> BTreeMap<String, Value> {
    s.client
        .query(&format!("SELECT id, email, name, score FROM {} ORDER BY id", s.table), &[])
        .unwrap()
        .iter()
        .map(|r| {
            let (id, email, name, score): (i64, Option<String>, Option<String>, Option<i32>) = (r.get(0), r.get(1), r.get(2), r.get(3));
            (id.to_string(), json!({"email": email, "name": name, "score": score}))
        })
        .collect()
}

fn calls(api: &FakeUsersApi) -> Vec<(String, String, u16)> {
    let mut calls: Vec<_> = api.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect();
    calls.sort();
    calls
}

#[test]
fn templates_drive_put_and_delete_per_record_against_the_api() {
    let api = FakeUsersApi::start("key-123");
    let mut s = set_up(&api, 3);
    let _drop = DropSyncs(vec![s.sync.clone()]);

    let first = run(&mut s);
    assert_eq!((first.status.as_str(), first.delivered, first.api_calls), ("succeeded", 3, 3), "{first:?}");
    assert_eq!(
        calls(&api),
        [("PUT".into(), "/v1/users/1".into(), 201), ("PUT".into(), "/v1/users/2".into(), 201), ("PUT".into(), "/v1/users/3".into(), 201)]
    );
    assert_eq!(api.users(), expected(&mut s));

    // One change, one delete, one NULL: exactly those calls; then nothing at all.
    api.clear_calls();
    s.client
        .batch_execute(&format!(
            "UPDATE {t} SET score = 99, name = NULL WHERE id = 2; DELETE FROM {t} WHERE id = 3;",
            t = s.table
        ))
        .unwrap();
    let second = run(&mut s);
    assert_eq!((second.status.as_str(), second.delivered, second.api_calls), ("succeeded", 2, 2), "{second:?}");
    assert_eq!(calls(&api), [("DELETE".into(), "/v1/users/3".into(), 204), ("PUT".into(), "/v1/users/2".into(), 200)]);
    assert_eq!(api.users(), expected(&mut s));
    assert_eq!(api.users()["2"], json!({"email": "user2@example.com", "name": null, "score": 99}));
    api.clear_calls();
    let third = run(&mut s);
    assert_eq!((third.delivered, third.api_calls), (0, 0));
    assert!(api.calls().is_empty());
}

#[test]
fn the_apis_answers_decide_rejections_retries_and_failures() {
    let api = FakeUsersApi::start("key-456");
    let mut s = set_up(&api, 4);
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client.batch_execute(&format!("UPDATE {} SET email = 'not-an-email' WHERE id = 2", s.table)).unwrap();
    // The first two requests are throttled (429, Retry-After: 1) and retried.
    api.throttle_next(2);
    let first = run(&mut s);
    assert_eq!((first.status.as_str(), first.delivered, first.failed), ("partial", 3, 1), "{first:?}");
    let mut want = expected(&mut s);
    want.remove("2");
    assert_eq!(api.users(), want);
    let throttled = api.calls().iter().filter(|c| c.status == 429).count();
    assert_eq!(throttled, 2);
    let (status, response): (Option<i32>, String) = s
        .client
        .query_one(
            "SELECT e.http_status, e.response FROM retl.row_errors e JOIN retl.syncs y ON y.id = e.sync_id WHERE y.name = $1",
            &[&s.sync],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(status, Some(422));
    assert_eq!(response, r#"HTTP 422: {"error":"invalid email"}"#);

    // A template that names a column the model does not have: the record is refused with the
    // reason, and nothing is sent for it.
    s.client
        .batch_execute(&format!(
            "ALTER SERVER {} OPTIONS (SET body '{{\"email\": {{{{ fields.mail | json }}}}}}'); UPDATE {} SET score = 1 WHERE id = 1;",
            s.server, s.table
        ))
        .unwrap();
    api.clear_calls();
    let second = run(&mut s);
    assert_eq!(second.status, "partial", "{second:?}");
    let message: String = s
        .client
        .query_one(
            "SELECT e.response FROM retl.row_errors e JOIN retl.syncs y ON y.id = e.sync_id WHERE y.name = $1 AND e.key = '{\"id\": 1}'",
            &[&s.sync],
        )
        .unwrap()
        .get(0);
    assert!(message.starts_with("body template: ") && message.contains("mail"), "{message}");
    assert!(api.calls().iter().all(|c| c.path != "/v1/users/1"), "{:?}", api.calls());

    // A wrong key: the API answers 401 and the run fails without the key in sight.
    s.client
        .batch_execute(&format!(
            "ALTER SERVER {server} OPTIONS (SET body '{{\"email\": {{{{ fields.email | json }}}}, \"name\": {{{{ fields.name | json }}}}, \"score\": {{{{ fields.score | json }}}}}}');
             ALTER USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (SET token 'wrong-key-789');",
            server = s.server
        ))
        .unwrap();
    let third = run(&mut s);
    assert_eq!(third.status, "failed");
    assert_eq!(
        third.error.as_deref(),
        Some("destination rejected the credentials (HTTP 401): check the token in the user mapping")
    );
    let leaked: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM retl.runs WHERE error LIKE '%wrong-key-789%' OR error LIKE '%key-456%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
}

#[test]
fn bad_http_options_are_refused_at_create_server() {
    let mut c = connect();
    ensure_extension(&mut c);
    let name = unique("httpbad");
    let err = c
        .batch_execute(&format!(
            "CREATE SERVER {name} FOREIGN DATA WRAPPER retl OPTIONS (type 'http', url 'https://api.example.com/{{{{ key.id }}', body '{{}}')"
        ))
        .unwrap_err();
    let (code, message) = error_text(&err);
    assert_eq!(code, "HV024");
    assert_eq!(message, "option \"url\" must be an http or https URL, got \"https://api.example.com/{{ key.id }\"");
    let err = c
        .batch_execute(&format!(
            "CREATE SERVER {name} FOREIGN DATA WRAPPER retl OPTIONS (type 'http', url 'https://api.example.com/x', body '{{% if %}}')"
        ))
        .unwrap_err();
    let (code, message) = error_text(&err);
    assert_eq!(code, "HV024");
    assert!(message.starts_with("option \"body\" is not a valid template: "), "{message}");
}

#[test]
fn ids_the_api_assigns_are_kept_and_used_for_updates_and_deletes() {
    let api = FakeUsersApi::start("key-789");
    let mut s = set_up(&api, 3);
    let _drop = DropSyncs(vec![s.sync.clone()]);
    // Create with POST (the API picks the id), then update and delete by that id.
    s.client
        .batch_execute(&format!(
            r#"ALTER SERVER {} OPTIONS (
                   SET url '{}/v1/users{{% if destination_id %}}/{{{{ destination_id }}}}{{% endif %}}',
                   SET method '{{% if op == ''delete'' %}}DELETE{{% elsif destination_id %}}PUT{{% else %}}POST{{% endif %}}',
                   ADD result_id '/user/id')"#,
            s.server,
            api.base_url()
        ))
        .unwrap();
    let first = run(&mut s);
    assert_eq!((first.status.as_str(), first.delivered), ("succeeded", 3), "{first:?}");
    assert!(api.calls().iter().all(|c| (c.method.as_str(), c.path.as_str(), c.status) == ("POST", "/v1/users", 201)));
    let identities: BTreeMap<String, String> = s
        .client
        .query(
            "SELECT i.key::text, i.destination_id FROM retl.identities i JOIN retl.syncs y ON y.id = i.sync_id WHERE y.name = $1",
            &[&s.sync],
        )
        .unwrap()
        .iter()
        .map(|r| (serde_json::from_str::<Value>(r.get(0)).unwrap().to_string(), r.get(1)))
        .collect();
    assert_eq!(identities.len(), 3);
    let mut ids: Vec<&String> = identities.values().collect();
    ids.sort();
    assert_eq!(ids, ["u1", "u2", "u3"]);
    // The API holds each row under the id it gave it.
    for (key, id) in &identities {
        let row: i64 = serde_json::from_str::<Value>(key).unwrap()["id"].as_i64().unwrap();
        assert_eq!(api.users()[id]["email"], json!(format!("user{row}@example.com")));
    }

    api.clear_calls();
    s.client
        .batch_execute(&format!("UPDATE {t} SET score = 5 WHERE id = 1; DELETE FROM {t} WHERE id = 2;", t = s.table))
        .unwrap();
    let second = run(&mut s);
    assert_eq!((second.status.as_str(), second.delivered), ("succeeded", 2), "{second:?}");
    let (id1, id2) = (identities[&key(1)].clone(), identities[&key(2)].clone());
    assert_eq!(
        calls(&api),
        [("DELETE".to_string(), format!("/v1/users/{id2}"), 204), ("PUT".to_string(), format!("/v1/users/{id1}"), 200)]
    );
    assert_eq!(api.users()[&id1]["score"], json!(5));
    assert!(!api.users().contains_key(&id2));
    let left: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM retl.identities i JOIN retl.syncs y ON y.id = i.sync_id WHERE y.name = $1",
            &[&s.sync],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 2, "the deleted key's id is forgotten");
}

#[test]
fn an_oauth_client_gets_a_token_first_and_a_new_one_when_it_is_refused() {
    let api = FakeUsersApi::start("unused-key");
    api.configure_oauth("app-7", "app-secret-7");
    let token_url = format!(", token_url '{}/oauth/token'", api.base_url());
    let mut s = set_up_with(&api, 2, &token_url, "client_id 'app-7', client_secret 'app-secret-7'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    // No token in the mapping: the client-credentials grant gets one before the first request.
    let first = run(&mut s);
    assert_eq!((first.status.as_str(), first.delivered), ("succeeded", 2), "{first:?}");
    assert_eq!(api.token_calls(), 1);
    assert_eq!(api.users(), expected(&mut s));
    // The key is revoked: one 401, one new token, the same request again.
    api.expire_keys();
    api.clear_calls();
    s.client.batch_execute(&format!("UPDATE {} SET score = 7 WHERE id = 1", s.table)).unwrap();
    let second = run(&mut s);
    assert_eq!((second.status.as_str(), second.delivered), ("succeeded", 1), "{second:?}");
    assert_eq!(
        api.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect::<Vec<_>>(),
        [("PUT".into(), "/v1/users/1".into(), 401), ("POST".into(), "/oauth/token".into(), 200), ("PUT".into(), "/v1/users/1".into(), 200)]
    );
    assert_eq!(api.token_calls(), 2);
    assert_eq!(api.users(), expected(&mut s));
    // Without token_url the OAuth client cannot be used, and the run says so.
    s.client.batch_execute(&format!("ALTER SERVER {} OPTIONS (DROP token_url)", s.server)).unwrap();
    s.client.batch_execute(&format!("UPDATE {} SET score = 8 WHERE id = 1", s.table)).unwrap();
    let third = run(&mut s);
    assert_eq!(third.status, "failed");
    assert_eq!(
        third.error.as_deref().unwrap(),
        format!(
            "destination \"{}\" is misconfigured: option \"client_id\" and \"client_secret\" of the user mapping need the \
             server's \"token_url\" (the OAuth token endpoint) on a destination of type 'http'",
            s.server
        )
    );
}

#[test]
fn a_template_naming_a_field_the_sync_does_not_send_is_refused_at_create_sync() {
    let api = FakeUsersApi::start("key-789");
    let mut s = set_up(&api, 1);
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let model: String = s.client.query_one("SELECT m.name FROM retl.syncs y JOIN retl.models m ON m.id = y.model_id WHERE y.name = $1", &[&s.sync]).unwrap().get(0);
    let other = format!("{}_narrow", s.sync);
    // The body template names fields.name and fields.score, which these mappings do not send.
    let err = s
        .client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mappings => '{\"email\": \"email\"}')",
            &[&other, &model, &s.server],
        )
        .unwrap_err();
    let (code, message, _, _) = db_error(&err);
    assert_eq!(code, "42703");
    let prefix = format!("sync \"{other}\" cannot write to destination \"{}\": body template: ", s.server);
    assert!(message.starts_with(&prefix) && message.contains("name"), "{message}");
    let exists: i64 = s.client.query_one("SELECT count(*) FROM retl.syncs WHERE name = $1", &[&other]).unwrap().get(0);
    assert_eq!(exists, 0);
    assert!(api.calls().is_empty(), "checking templates calls nothing");
}
