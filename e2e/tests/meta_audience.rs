//! The Meta custom audience connector (`type 'meta_audience'`) against a strict fake of the
//! Marketing API's users edge: membership mirrored (added on entry, removed on exit, by the
//! hashes that were added), identifiers normalised and SHA-256 hashed (no raw PII in any
//! request), rows without identifiers refused, rate limits waited out, a bad token reported.
mod common;
use common::*;
use retl_e2e::fake_meta::FakeMeta;
use std::collections::BTreeSet;

const AUDIENCE: &str = "23850000000001";

struct Setup {
    client: postgres::Client,
    table: String,
    sync: String,
}

fn set_up(meta: &FakeMeta, token: &str) -> Setup {
    meta.add_audience(AUDIENCE);
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("meta");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, phone text, ltv numeric);
             INSERT INTO {table} VALUES (1, ' Ann@Example.COM ', '+1 (650) 555-0100', 5000),
                                        (2, 'bo@example.com', NULL, 2000),
                                        (3, 'cy@example.com', '+44 20 7946 0000', 10);
             SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, phone FROM {table} WHERE ltv >= 1000', primary_key => '{{id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'meta_audience', url '{url}', audience_id '{AUDIENCE}');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token '{token}');",
            url = meta.base_url(),
        ))
        .unwrap();
    client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => 'mirror', mappings => '{\"email\": \"email\", \"phone\": \"phone\"}')",
            &[&sync, &model, &server],
        )
        .unwrap();
    Setup { client, table, sync }
}

/// The audience the model describes, hashed the way Meta wants it (computed by Postgres).
fn expected(s: &mut Setup) -> BTreeSet<Vec<String>> {
    s.client
        .query(
            &format!(
                "SELECT coalesce(encode(sha256(convert_to(nullif(lower(btrim(email)), ''), 'UTF8')), 'hex'), ''),
                        coalesce(encode(sha256(convert_to(nullif(ltrim(regexp_replace(phone, '[^0-9]', '', 'g'), '0'), ''), 'UTF8')), 'hex'), '')
                   FROM {} WHERE ltv >= 1000",
                s.table
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| vec![r.get(0), r.get(1)])
        .collect()
}

fn no_raw_pii(meta: &FakeMeta) {
    for call in meta.calls() {
        let body = call.body.map(|b| b.to_string()).unwrap_or_default();
        assert!(!body.contains('@') && !body.contains("650") && !body.to_lowercase().contains("example"), "raw PII sent: {body}");
    }
}

#[test]
fn membership_follows_the_model_with_hashed_identifiers_only() {
    let meta = FakeMeta::start("EAAB-token-1");
    let mut s = set_up(&meta, "EAAB-token-1");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered, first.api_calls), ("succeeded", 2, 1), "{first:?}");
    assert_eq!(meta.members(AUDIENCE), expected(&mut s));
    let path = format!("/v21.0/{AUDIENCE}/users");
    assert!(meta.calls().iter().all(|c| c.method == "POST" && c.path == path), "{:?}", meta.calls());

    // A user enters, another leaves: one add, one removal; unchanged users cost nothing.
    meta.clear_calls();
    s.client.batch_execute(&format!("UPDATE {t} SET ltv = 3000 WHERE id = 3; UPDATE {t} SET ltv = 0 WHERE id = 2;", t = s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.status.as_str(), second.delivered, second.api_calls), ("succeeded", 2, 2), "{second:?}");
    let mut methods: Vec<String> = meta.calls().into_iter().map(|c| c.method).collect();
    methods.sort();
    assert_eq!(methods, ["DELETE", "POST"]);
    assert_eq!(meta.members(AUDIENCE), expected(&mut s));
    meta.clear_calls();
    let third = run_sync(&mut s.client, &s.sync);
    assert_eq!((third.delivered, third.api_calls), (0, 0));

    // A member's phone changes: removed by the old hashes, added by the new ones.
    s.client.batch_execute(&format!("UPDATE {} SET phone = '+1 650 555 0199' WHERE id = 1", s.table)).unwrap();
    let fourth = run_sync(&mut s.client, &s.sync);
    assert_eq!((fourth.status.as_str(), fourth.delivered, fourth.api_calls), ("succeeded", 1, 2), "{fourth:?}");
    assert_eq!(meta.calls().into_iter().map(|c| c.method).collect::<Vec<_>>(), ["DELETE", "POST"]);
    assert_eq!(meta.members(AUDIENCE), expected(&mut s));
    no_raw_pii(&meta);
}

#[test]
fn a_row_without_identifiers_is_refused_and_a_rate_limit_is_waited_out() {
    let meta = FakeMeta::start("EAAB-token-2");
    let mut s = set_up(&meta, "EAAB-token-2");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client.batch_execute(&format!("INSERT INTO {} VALUES (4, '  ', 'n/a', 9000)", s.table)).unwrap();
    meta.throttle_next(1);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed, run.api_calls), ("partial", 2, 1, 2), "{run:?}");
    assert_eq!(meta.calls()[0].status, 400, "the throttled request");
    assert_eq!(
        row_errors(&mut s.client, &s.sync),
        [("4".to_string(), None, "the row has no email or phone to match a Meta user by (after normalising)".to_string())]
    );
    let mut want = expected(&mut s);
    want.retain(|row| row.iter().any(|h| !h.is_empty()));
    assert_eq!(meta.members(AUDIENCE), want);
    no_raw_pii(&meta);
}

#[test]
fn an_expired_token_fails_the_run_without_showing_it() {
    let meta = FakeMeta::start("EAAB-secret-3");
    let mut s = set_up(&meta, "EAAB-secret-3");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    meta.expire_token();
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!(run.status, "failed");
    let error = run.error.unwrap();
    assert!(error.starts_with("Meta rejected the access token (Meta error 190") && error.ends_with("check the token in the user mapping"), "{error}");
    assert!(!error.contains("EAAB-secret-3"));
    assert!(meta.members(AUDIENCE).is_empty());
}
