//! The HubSpot connector (`type 'hubspot'`) against a strict fake of HubSpot's CRM v3 API:
//! batch upsert by a unique property, batch archive by the record ids the identity map
//! learned, 207 multi-status per-record errors, 429s, OAuth token refresh, and the properties
//! check at create_sync.
mod common;
use common::*;
use retl_e2e::fake_hubspot::{FakeHubSpot, PropertySpec};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const MAPPINGS: &str =
    r#"{"email": "email", "firstname": "firstname", "health_score": "health_score", "lifecyclestage": "stage"}"#;

struct Setup {
    client: postgres::Client,
    table: String,
    model: String,
    server: String,
    sync: String,
}

/// A customers table of `rows` rows, a model, a hubspot destination for contacts at the fake
/// with `mapping` as the user mapping's options, and a mirror sync.
fn set_up(hs: &FakeHubSpot, rows: i64, mapping: &str) -> Setup {
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("hs");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, firstname text, health_score float8, stage text);
             INSERT INTO {table} SELECT i, 'user' || i || '@example.com', 'Ann ' || i, i / 10.0, 'lead' FROM generate_series(1, {rows}) i;
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'hubspot', url '{url}', object 'contacts');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS ({mapping});",
            url = hs.base_url(),
        ))
        .unwrap();
    // Its own transaction: the worker that checks the fields must see the committed server.
    client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'mirror', mappings => $4::text::jsonb)",
            &[&sync, &model, &server, &MAPPINGS],
        )
        .unwrap();
    Setup { client, table, model, server, sync }
}

/// The contacts HubSpot should hold, by email: the table's rows as HubSpot property strings.
fn expected(s: &mut Setup) -> BTreeMap<String, Value> {
    s.client
        .query(&format!("SELECT email, firstname, coalesce(health_score::text, ''), stage FROM {} ORDER BY id", s.table), &[])
        .unwrap()
        .iter()
        .map(|r| {
            let (email, firstname, score, stage): (String, String, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
            (email, json!({"firstname": firstname, "health_score": score, "lifecyclestage": stage}))
        })
        .collect()
}

/// What the fake holds, in the same shape.
fn held(hs: &FakeHubSpot) -> BTreeMap<String, Value> {
    hs.objects("contacts")
        .values()
        .map(|p| {
            (
                p["email"].as_str().unwrap().to_string(),
                json!({"firstname": p["firstname"], "health_score": p["health_score"], "lifecyclestage": p["lifecyclestage"]}),
            )
        })
        .collect()
}

fn calls(hs: &FakeHubSpot) -> Vec<(String, String, u16)> {
    hs.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect()
}


const UPSERT: &str = "/crm/v3/objects/contacts/batch/upsert";
const ARCHIVE: &str = "/crm/v3/objects/contacts/batch/archive";

#[test]
fn contacts_are_upserted_in_batches_of_100_then_updated_and_archived_by_id() {
    let hs = FakeHubSpot::start("pat-1");
    let mut s = set_up(&hs, 150, "token 'pat-1'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    // create_sync asked HubSpot for the contact properties, nothing else.
    assert_eq!(calls(&hs), [("GET".into(), "/crm/v3/properties/contacts".into(), 200)]);
    hs.clear_calls();

    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered, first.api_calls), ("succeeded", 150, 2), "{first:?}");
    assert_eq!(calls(&hs), [("POST".into(), UPSERT.into(), 200), ("POST".into(), UPSERT.into(), 200)]);
    // The two requests go out concurrently: in either order.
    let bodies: Vec<Value> = hs.calls().into_iter().map(|c| c.body.unwrap()).collect();
    let mut sizes: Vec<usize> = bodies.iter().map(|b| b["inputs"].as_array().unwrap().len()).collect();
    sizes.sort();
    assert_eq!(sizes, [50, 100]);
    let input = bodies.iter().flat_map(|b| b["inputs"].as_array().unwrap().iter()).find(|i| i["id"] == "user1@example.com").unwrap();
    assert_eq!(
        input,
        &json!({"id": "user1@example.com", "idProperty": "email", "objectWriteTraceId": input["objectWriteTraceId"],
                "properties": {"firstname": "Ann 1", "health_score": "0.1", "lifecyclestage": "lead"}})
    );
    assert_eq!(held(&hs), expected(&mut s));
    // Every key's HubSpot id is in the identity map.
    let ids = identities(&mut s.client, &s.sync);
    assert_eq!(ids.len(), 150);
    let contacts = hs.objects("contacts");
    assert_eq!(contacts[&ids[&7]]["email"], "user7@example.com");

    // One update: one input, the same HubSpot record; unchanged rows cost nothing.
    hs.clear_calls();
    s.client.batch_execute(&format!("UPDATE {} SET stage = 'customer' WHERE id = 7", s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.delivered, second.api_calls), (1, 1), "{second:?}");
    assert_eq!(hs.calls()[0].body.as_ref().unwrap()["inputs"].as_array().unwrap().len(), 1);
    assert_eq!(hs.objects("contacts").len(), 150);
    assert_eq!(held(&hs), expected(&mut s));
    hs.clear_calls();
    let third = run_sync(&mut s.client, &s.sync);
    assert_eq!((third.delivered, third.api_calls), (0, 0));
    assert!(hs.calls().is_empty());

    // A deleted row is archived by its HubSpot id, and forgotten by the identity map.
    s.client.batch_execute(&format!("DELETE FROM {} WHERE id IN (7, 8)", s.table)).unwrap();
    let fourth = run_sync(&mut s.client, &s.sync);
    assert_eq!((fourth.status.as_str(), fourth.deletes, fourth.api_calls), ("succeeded", 2, 1), "{fourth:?}");
    assert_eq!(calls(&hs), [("POST".into(), ARCHIVE.into(), 204)]);
    let archived_body = hs.calls()[0].body.clone().unwrap();
    let mut archived: Vec<&str> = archived_body["inputs"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    archived.sort();
    let mut want = vec![ids[&7].as_str(), ids[&8].as_str()];
    want.sort();
    assert_eq!(archived, want);
    assert_eq!(held(&hs), expected(&mut s));
    assert_eq!(identities(&mut s.client, &s.sync).len(), 148);
}

#[test]
fn a_207_rejects_only_the_invalid_contact() {
    let hs = FakeHubSpot::start("pat-2");
    let mut s = set_up(&hs, 5, "token 'pat-2'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client.batch_execute(&format!("UPDATE {} SET health_score = NULL, stage = 'prospect' WHERE id = 3", s.table)).unwrap();
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed, run.api_calls), ("partial", 4, 1, 1), "{run:?}");
    assert_eq!(calls(&hs)[1], ("POST".into(), UPSERT.into(), 207));
    let mut want = expected(&mut s);
    want.remove("user3@example.com");
    assert_eq!(held(&hs), want);
    let errors = row_errors(&mut s.client, &s.sync);
    let [(key, status, response)] = &errors[..] else { panic!("one row error: {errors:?}") };
    let (key, status) = (key.clone(), *status);
    assert_eq!((key.as_str(), status), ("3", Some(207)));
    assert!(response.starts_with("VALIDATION_ERROR: ") && response.contains("prospect") && response.ends_with("(INVALID_OPTION)"), "{response}");
    // Fixed in the warehouse, the contact goes through on the next run.
    s.client.batch_execute(&format!("UPDATE {} SET stage = 'lead' WHERE id = 3", s.table)).unwrap();
    let again = run_sync(&mut s.client, &s.sync);
    assert_eq!((again.status.as_str(), again.delivered), ("succeeded", 1), "{again:?}");
    // The NULL score went as "": on a new contact that leaves the property unset.
    let mut want = expected(&mut s);
    want.get_mut("user3@example.com").unwrap()["health_score"] = Value::Null;
    assert_eq!(held(&hs), want);
    let sent = hs.calls().last().unwrap().body.clone().unwrap();
    assert_eq!(sent["inputs"][0]["properties"]["health_score"], json!(""));
}

#[test]
fn rate_limited_requests_are_waited_out() {
    let hs = FakeHubSpot::start("pat-3");
    let mut s = set_up(&hs, 3, "token 'pat-3'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    hs.clear_calls();
    hs.throttle_next(2);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 3, 3), "{run:?}");
    assert_eq!(
        calls(&hs),
        [("POST".into(), UPSERT.into(), 429), ("POST".into(), UPSERT.into(), 429), ("POST".into(), UPSERT.into(), 200)]
    );
    assert_eq!(held(&hs), expected(&mut s));
}

#[test]
fn the_rate_limit_keeps_within_hubspots_rolling_ten_second_window() {
    // HubSpot's 100 requests per rolling 10 s at the default 9/s, scaled down to 20 per 10 s at
    // 1.5/s so the test takes seconds: a burst of 1.5 plus 15 in any 10 s never exceeds 20.
    let hs = FakeHubSpot::start("pat-8");
    hs.set_rolling_limit(20);
    let mut s = set_up(&hs, 25, "token 'pat-8'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client
        .batch_execute(&format!("ALTER SERVER {} OPTIONS (ADD batch_size '1', ADD rate_limit '1.5')", s.server))
        .unwrap();
    hs.clear_calls();
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 25, 25), "{run:?}");
    assert!(hs.calls().iter().all(|c| c.status == 200), "no 429: {:?}", calls(&hs));
    assert_eq!(held(&hs), expected(&mut s));
}

#[test]
fn an_expired_token_is_refreshed_once_and_a_bad_refresh_token_fails_the_run_without_secrets() {
    let hs = FakeHubSpot::start("at-initial");
    hs.configure_oauth("client-1", "cs-secret-1", "rt-secret-1");
    let mut s = set_up(&hs, 3, "token 'at-initial', client_id 'client-1', client_secret 'cs-secret-1', refresh_token 'rt-secret-1'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered), ("succeeded", 3), "{first:?}");
    assert_eq!(hs.token_calls(), 0);

    // Expired: one 401, one refresh, the same request again; the next run reuses the new token.
    hs.expire_token();
    hs.clear_calls();
    s.client.batch_execute(&format!("UPDATE {} SET firstname = 'Bo' WHERE id = 1", s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.status.as_str(), second.delivered), ("succeeded", 1), "{second:?}");
    assert_eq!(
        calls(&hs),
        [("POST".into(), UPSERT.into(), 401), ("POST".into(), "/oauth/v1/token".into(), 200), ("POST".into(), UPSERT.into(), 200)]
    );
    assert_eq!(hs.token_calls(), 1);
    s.client.batch_execute(&format!("UPDATE {} SET firstname = 'Cy' WHERE id = 2", s.table)).unwrap();
    let third = run_sync(&mut s.client, &s.sync);
    assert_eq!((third.status.as_str(), third.delivered), ("succeeded", 1), "{third:?}");
    assert_eq!(hs.token_calls(), 1);
    assert_eq!(held(&hs), expected(&mut s));

    // A refresh token HubSpot no longer accepts: refreshed once, then the run fails saying why.
    s.client
        .batch_execute(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {} OPTIONS (SET refresh_token 'rt-revoked')", s.server))
        .unwrap();
    hs.expire_token();
    s.client.batch_execute(&format!("UPDATE {} SET firstname = 'Di' WHERE id = 3", s.table)).unwrap();
    let fourth = run_sync(&mut s.client, &s.sync);
    assert_eq!((fourth.status.as_str(), fourth.delivered), ("failed", 0), "{fourth:?}");
    assert_eq!(hs.token_calls(), 2);
    let error = fourth.error.unwrap();
    assert_eq!(
        error,
        format!(
            "could not refresh the access token at {}/oauth/v1/token (HTTP 400: BAD_REFRESH_TOKEN: missing or unknown \
             refresh token): check client_id, client_secret and refresh_token in the user mapping",
            hs.base_url()
        )
    );
    let leaked: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM (SELECT error FROM retl.runs UNION ALL SELECT error FROM retl.batches UNION ALL SELECT response FROM retl.row_errors) t \
              WHERE error ~ '(cs-secret-1|rt-secret-1|rt-revoked|at-initial)'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    // Nothing was lost: the change waits in the outbox.
    let queued: i64 = s
        .client
        .query_one("SELECT count(*) FROM retl.outbox o JOIN retl.syncs y ON y.id = o.sync_id WHERE y.name = $1", &[&s.sync])
        .unwrap()
        .get(0);
    assert_eq!(queued, 1);
}

#[test]
fn unknown_or_read_only_properties_are_refused_at_create_sync() {
    let hs = FakeHubSpot::start("pat-5");
    let mut s = set_up(&hs, 2, "token 'pat-5'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let other = format!("{}_bad", s.sync);
    let create = |client: &mut postgres::Client, mappings: Option<&str>| {
        client.execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mappings => $4::text::jsonb)",
            &[&other, &s.model, &s.server, &mappings],
        )
    };
    let err = create(&mut s.client, Some(r#"{"email": "email", "favourite_colour": "firstname", "hs_object_id": "id"}"#)).unwrap_err();
    let (code, message, _, hint) = db_error(&err);
    assert_eq!(code, "42703");
    assert_eq!(
        message,
        format!(
            "sync \"{other}\" cannot write to destination \"{}\": HubSpot contacts have no property \"favourite_colour\"; \
             HubSpot contacts property \"hs_object_id\" cannot be written (read-only)",
            s.server
        )
    );
    assert!(hint.unwrap().starts_with("Fields are the mappings' keys"));
    // Without mappings every model column is a field, and "id" and "stage" are no HubSpot properties.
    let (_, message, _, _) = db_error(&create(&mut s.client, None).unwrap_err());
    assert!(message.ends_with("HubSpot contacts have no property \"id\" and \"stage\""), "{message}");
    let exists: i64 = s.client.query_one("SELECT count(*) FROM retl.syncs WHERE name = $1", &[&other]).unwrap().get(0);
    assert_eq!(exists, 0);

    // alter_sync is checked the same way and leaves the sync as it was.
    let err = s
        .client
        .execute("SELECT retl.alter_sync(name => $1, mappings => '{\"email\": \"email\", \"nickname\": \"firstname\"}')", &[&s.sync])
        .unwrap_err();
    assert!(db_error(&err).1.ends_with("HubSpot contacts have no property \"nickname\""));
    let mappings: String = s.client.query_one("SELECT mappings::text FROM retl.syncs WHERE name = $1", &[&s.sync]).unwrap().get(0);
    assert_eq!(serde_json::from_str::<Value>(&mappings).unwrap(), serde_json::from_str::<Value>(MAPPINGS).unwrap());

    // An unreachable destination says so (HV00N); retl.check_destination = off defines the sync anyway.
    s.client
        .batch_execute(&format!("ALTER SERVER {} OPTIONS (SET url 'http://127.0.0.1:9')", s.server))
        .unwrap();
    let err = create(&mut s.client, Some(MAPPINGS)).unwrap_err();
    let (code, message, _, hint) = db_error(&err);
    assert_eq!(code, "HV00N");
    assert!(message.starts_with(&format!("could not check the fields of sync \"{other}\" against destination \"{}\": ", s.server)), "{message}");
    assert!(hint.unwrap().contains("SET retl.check_destination = off"));
    s.client.batch_execute("SET retl.check_destination = off").unwrap();
    create(&mut s.client, Some(MAPPINGS)).unwrap();
    s.client.batch_execute("RESET retl.check_destination").unwrap();
    s.client.execute("SELECT retl.drop_sync($1)", &[&other]).unwrap();
}

#[test]
fn custom_objects_are_upserted_by_their_own_unique_property() {
    let hs = FakeHubSpot::start("pat-6");
    let prop = |name: &str, kind: &str, unique: bool| PropertySpec { name: name.into(), kind: kind.into(), read_only: false, unique };
    hs.add_object("p_accounts", vec![prop("account_key", "string", true), prop("plan", "string", false), prop("seats", "number", false)]);
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("hsc");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (account_key text PRIMARY KEY, plan text, seats int);
             INSERT INTO {table} VALUES ('acme', 'pro', 40), ('globex', 'free', 3);
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{account_key}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'hubspot', url '{url}', object 'p_accounts', id_property 'account_key');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token 'pat-6');",
            url = hs.base_url(),
        ))
        .unwrap();
    client.execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3)", &[&sync, &model, &server]).unwrap();
    let _drop = DropSyncs(vec![sync.clone()]);
    let run = run_sync(&mut client, &sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 2, 1), "{run:?}");
    let held: BTreeMap<String, (Value, Value)> = hs
        .objects("p_accounts")
        .values()
        .map(|p| (p["account_key"].as_str().unwrap().to_string(), (p["plan"].clone(), p["seats"].clone())))
        .collect();
    assert_eq!(
        held,
        BTreeMap::from([("acme".into(), (json!("pro"), json!("40"))), ("globex".into(), (json!("free"), json!("3")))])
    );
}

#[test]
fn a_delete_sync_looks_up_contacts_it_never_created_and_archives_them() {
    let hs = FakeHubSpot::start("pat-7");
    let mut s = set_up(&hs, 3, "token 'pat-7'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    run_sync(&mut s.client, &s.sync);
    let created = hs.objects("contacts");
    let id_of = |email: &str| created.iter().find(|(_, p)| p["email"] == email).map(|(id, _)| id.clone()).unwrap();
    // An erasure list: one contact HubSpot has, one it never had. A different sync, so its
    // identity map knows neither.
    let (erase, erase_model, eraser) = (format!("{}_erase", s.table), format!("{}_erase", s.model), format!("{}_erase", s.sync));
    s.client
        .batch_execute(&format!(
            "CREATE TABLE {erase} (email text PRIMARY KEY);
             INSERT INTO {erase} VALUES ('user2@example.com'), ('nobody@example.com');
             SELECT retl.create_model(name => '{erase_model}', query => 'SELECT email FROM {erase}', primary_key => '{{email}}');"
        ))
        .unwrap();
    s.client
        .execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'delete')", &[&eraser, &erase_model, &s.server])
        .unwrap();
    let _drop_eraser = DropSyncs(vec![eraser.clone()]);
    hs.clear_calls();
    let run = run_sync(&mut s.client, &eraser);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 2, 2), "{run:?}");
    assert_eq!(
        calls(&hs),
        [("POST".into(), "/crm/v3/objects/contacts/batch/read".into(), 207), ("POST".into(), ARCHIVE.into(), 204)]
    );
    assert_eq!(hs.calls()[1].body.clone().unwrap(), json!({"inputs": [{"id": id_of("user2@example.com")}]}));
    assert_eq!(hs.archived("contacts"), vec![id_of("user2@example.com")]);
    assert_eq!(hs.objects("contacts").len(), 2);
}

/// Where `value` breaks `schema` (a subset of JSON Schema as OpenAPI uses it: `$ref`, `type`,
/// `required`, `properties`, `additionalProperties`, `items`); members a schema does not list
/// count as violations too, so nothing we send goes unchecked.
fn violations(spec: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let target = spec.pointer(reference.trim_start_matches('#')).unwrap_or_else(|| panic!("no {reference}"));
        return violations(spec, target, value, at, out);
    }
    let ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !ok {
        out.push(format!("{at}: {value} is not of type {}", schema["type"]));
        return;
    }
    for name in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        if value.get(name).is_none() {
            out.push(format!("{at}: required member {name} is missing"));
        }
    }
    if let Some(members) = value.as_object() {
        for (name, member) in members {
            match (schema["properties"].get(name), &schema["additionalProperties"]) {
                (Some(sub), _) => violations(spec, sub, member, &format!("{at}.{name}"), out),
                (None, extra) if extra.is_object() => violations(spec, extra, member, &format!("{at}.{name}"), out),
                (None, _) => out.push(format!("{at}: member {name} is not in the schema")),
            }
        }
    }
    for (i, item) in value.as_array().into_iter().flatten().enumerate() {
        violations(spec, &schema["items"], item, &format!("{at}[{i}]"), out);
    }
}

#[test]
fn every_request_matches_hubspots_published_schema_when_the_spec_is_at_hand() {
    // The vendor spec is reference data outside the project: without it, nothing to compare.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/specs/hubspot/crm-contacts-v3.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("{} not found: skipped", path.display());
        return;
    };
    let spec: Value = serde_json::from_str(&text).unwrap();
    let hs = FakeHubSpot::start("pat-9");
    let mut s = set_up(&hs, 3, "token 'pat-9'");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    run_sync(&mut s.client, &s.sync);
    s.client.batch_execute(&format!("DELETE FROM {} WHERE id = 1", s.table)).unwrap();
    run_sync(&mut s.client, &s.sync);
    let (erase, erase_model, eraser) = (format!("{}_erase", s.table), format!("{}_erase", s.model), format!("{}_erase", s.sync));
    s.client
        .batch_execute(&format!(
            "CREATE TABLE {erase} (email text PRIMARY KEY); INSERT INTO {erase} VALUES ('user2@example.com');
             SELECT retl.create_model(name => '{erase_model}', query => 'SELECT email FROM {erase}', primary_key => '{{email}}');"
        ))
        .unwrap();
    s.client
        .execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'delete')", &[&eraser, &erase_model, &s.server])
        .unwrap();
    let _drop_eraser = DropSyncs(vec![eraser.clone()]);
    run_sync(&mut s.client, &eraser);

    let mut checked = std::collections::BTreeSet::new();
    for call in hs.calls().into_iter().filter(|c| c.method == "POST") {
        let operation = &spec["paths"][&call.path]["post"];
        let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{} is not in the spec", call.path);
        let mut out = Vec::new();
        violations(&spec, schema, call.body.as_ref().unwrap(), "body", &mut out);
        assert!(out.is_empty(), "{}: {out:?}", call.path);
        checked.insert(call.path.rsplit('/').next().unwrap().to_string());
    }
    assert_eq!(checked, ["archive", "read", "upsert"].into_iter().map(String::from).collect());
}

#[test]
fn companies_are_upserted_by_domain_by_default() {
    let hs = FakeHubSpot::start("pat-10");
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("hsco");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (domain text PRIMARY KEY, name text, annualrevenue bigint);
             INSERT INTO {table} VALUES ('acme.example', 'Acme', 5000000), ('globex.example', 'Globex', NULL);
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{domain}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'hubspot', url '{url}', object 'companies');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token 'pat-10');",
            url = hs.base_url(),
        ))
        .unwrap();
    client.execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3)", &[&sync, &model, &server]).unwrap();
    let _drop = DropSyncs(vec![sync.clone()]);
    let run = run_sync(&mut client, &sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 2, 1), "{run:?}");
    let body = hs.calls().last().unwrap().body.clone().unwrap();
    assert!(body["inputs"].as_array().unwrap().iter().all(|i| i["idProperty"] == "domain"), "{body}");
    let held: BTreeMap<String, (Value, Value)> = hs
        .objects("companies")
        .values()
        .map(|p| (p["domain"].as_str().unwrap().to_string(), (p["name"].clone(), p.get("annualrevenue").cloned().unwrap_or(Value::Null))))
        .collect();
    assert_eq!(
        held,
        BTreeMap::from([
            ("acme.example".into(), (json!("Acme"), json!("5000000"))),
            ("globex.example".into(), (json!("Globex"), Value::Null)),
        ])
    );
}
