//! Destination faults: 429 with Retry-After, 5xx, per-record rejections, bad credentials,
//! a destination that stays down; and the rate limit.
mod common;
use common::*;
use std::time::{Duration, Instant};

fn idempotency_keys(fake: &FakeWebhook) -> Vec<String> {
    fake.requests()
        .iter()
        .map(|r| r.headers.iter().find(|(k, _)| k == "idempotency-key").map(|(_, v)| v.clone()).unwrap_or_default())
        .collect()
}

#[test]
fn a_429_with_retry_after_is_waited_out() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 5, "upsert", "", None);
    fake.script(vec![Scripted::Status { status: 429, retry_after: Some("2".into()), body: r#"{"error":"slow down"}"#.into() }]);
    let started = Instant::now();
    let run = f.run();
    let elapsed = started.elapsed();
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 5, 2), "{run:?}");
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}, Retry-After said 2 s");
    assert!(elapsed >= Duration::from_secs(2));
    let keys = idempotency_keys(&fake);
    assert_eq!(keys[0], keys[1], "the retry carries the same Idempotency-Key");
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn server_errors_are_retried_until_they_succeed() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    let boom = || Scripted::Status { status: 500, retry_after: None, body: "internal error".into() };
    fake.script(vec![boom(), boom(), Scripted::Status { status: 503, retry_after: None, body: String::new() }]);
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 3, 4), "{run:?}");
    assert_eq!(fake.records(), f.model_state());
    assert_eq!(fake.create_count(&key(1)), 1);
}

#[test]
fn a_rejected_record_lands_in_row_errors_while_the_rest_arrive() {
    let fake = FakeWebhook::start();
    fake.set_rejection_rule(|rec| {
        let email = rec["fields"]["email"].as_str().unwrap_or("");
        (!email.contains('@')).then(|| (400, "email is invalid".to_string()))
    });
    let mut f = Fixture::new(&fake.url(), 5, "upsert", "", None);
    f.exec(&format!("UPDATE {} SET email = 'not-an-email' WHERE id = 3", f.table));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("partial", 4, 1), "{run:?}");
    let mut expected = f.model_state();
    expected.remove(&key(3));
    assert_eq!(fake.records(), expected);
    let err = f
        .client
        .query_one(
            "SELECT e.key::text, e.op, e.payload->>'email', e.http_status, e.response, e.attempts
               FROM retl.row_errors e JOIN retl.syncs s ON s.id = e.sync_id WHERE s.name = $1",
            &[&f.sync],
        )
        .unwrap();
    assert_eq!(err.get::<_, String>(0), r#"{"id": 3}"#);
    assert_eq!(err.get::<_, String>(1), "upsert");
    assert_eq!(err.get::<_, String>(2), "not-an-email");
    assert_eq!(err.get::<_, Option<i32>>(3), Some(400));
    assert_eq!(err.get::<_, String>(4), "email is invalid");
    assert_eq!(err.get::<_, i32>(5), 1);

    // Not fixed: retried on the next run (and counted); fixed: delivered and cleared.
    fake.clear_journal();
    let again = f.run();
    assert_eq!((again.delivered, again.failed, again.api_calls), (0, 1, 1));
    assert_eq!(f.count(&format!("SELECT attempts::bigint FROM retl.row_errors e JOIN retl.syncs s ON s.id = e.sync_id WHERE s.name = '{}'", f.sync)), 2);
    f.exec(&format!("UPDATE {} SET email = 'fixed@example.com' WHERE id = 3", f.table));
    let fixed = f.run();
    assert_eq!((fixed.status.as_str(), fixed.delivered, fixed.failed), ("succeeded", 1, 0));
    assert_eq!(fake.records(), f.model_state());
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.row_errors e JOIN retl.syncs s ON s.id = e.sync_id WHERE s.name = '{}'", f.sync)), 0);
}

#[test]
fn rejected_credentials_fail_the_run_without_leaking_the_token() {
    let fake = FakeWebhook::builder().token("the-right-token").start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", Some("a-wrong-token-XYZ"));
    let run = f.run();
    assert_eq!(run.status, "failed");
    assert_eq!(run.api_calls, 1, "a 401 is not retried");
    let error = run.error.unwrap();
    assert_eq!(error, "destination rejected the credentials (HTTP 401): check the token in the user mapping");
    assert!(fake.records().is_empty());
    assert_eq!(f.outbox_rows(), 2, "nothing is lost: the rows stay queued");
    let leaks = f.count(
        "SELECT (SELECT count(*) FROM retl.runs WHERE error LIKE '%a-wrong-token-XYZ%')
              + (SELECT count(*) FROM retl.batches WHERE error LIKE '%a-wrong-token-XYZ%')
              + (SELECT count(*) FROM retl.row_errors WHERE response LIKE '%a-wrong-token-XYZ%')
              + (SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%a-wrong-token-XYZ%' AND pid <> pg_backend_pid())",
    );
    assert_eq!(leaks, 0);
    // Nor in the server log.
    let log = server_log(&mut f.client);
    assert!(log.contains("pg_reverse_etl worker 1 started"), "read the right log");
    assert!(!log.contains("a-wrong-token-XYZ"), "the token is in the server log");
    // Fix the mapping: the next run delivers everything.
    f.exec(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {} OPTIONS (SET token 'the-right-token')", f.server));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 2));
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn token_env_reads_the_token_from_the_server_environment() {
    // scripts/cluster.sh starts the server with RETL_E2E_TOKEN set to this value.
    let fake = FakeWebhook::builder().token("token-from-the-server-environment").start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    f.exec(&format!("CREATE USER MAPPING FOR CURRENT_USER SERVER {} OPTIONS (token_env 'RETL_E2E_TOKEN')", f.server));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 2), "{run:?}");
    assert_eq!(fake.records(), f.model_state());

    // A variable the server does not have fails the run, naming the variable; nothing is lost.
    f.exec(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {} OPTIONS (SET token_env 'RETL_E2E_UNSET')", f.server));
    f.exec(&format!("UPDATE {} SET score = 0 WHERE id = 1", f.table));
    let run = f.run();
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some(&*format!(
            "destination \"{}\" is misconfigured: environment variable \"RETL_E2E_UNSET\" named by token_env is not set in the server's environment",
            f.server
        ))
    );
    assert_eq!(f.outbox_rows(), 1, "the change stays queued");
}

#[test]
fn a_destination_that_stays_down_fails_the_run_and_the_next_run_converges() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "max_retries '2'", None);
    let down = || Scripted::Status { status: 503, retry_after: Some("0".into()), body: "maintenance".into() };
    fake.script(vec![down(), down(), down()]);
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("failed", 0, 3), "{run:?}");
    assert!(run.error.as_deref().unwrap().contains("HTTP 503"), "{:?}", run.error);
    assert!(fake.records().is_empty());
    let run = f.run();
    assert_eq!((run.status.as_str(), run.inserts, run.delivered), ("succeeded", 3, 3));
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn the_rate_limit_spaces_requests() {
    let fake = FakeWebhook::start();
    // 8 single-record batches at 4 requests/s (burst 4): the last can start no earlier than 1 s in.
    let mut f = Fixture::new(&fake.url(), 8, "upsert", "batch_size '1', rate_limit '4', max_concurrency '2'", None);
    let run = f.run();
    assert_eq!((run.delivered, run.api_calls), (8, 8));
    let mut at: Vec<Instant> = fake.requests().iter().map(|r| r.at).collect();
    at.sort();
    // With a bucket of 4 tokens refilled at 4/s, request k (0-based) cannot start before
    // (k + 1 - 4) / 4 seconds after the first.
    for (k, t) in at.iter().enumerate().skip(4) {
        let earliest = Duration::from_millis(((k as u64 + 1 - 4) * 1000) / 4);
        let actual = *t - at[0];
        assert!(actual + Duration::from_millis(30) >= earliest, "request {k} at {actual:?}, rate limit allows {earliest:?}");
    }
    assert_eq!(fake.records(), f.model_state());
}

use retl_e2e::fault_proxy::{Fault, FaultProxy};

/// A fixture whose destination is the fake behind a fault proxy.
fn behind_proxy(rows: i64, server_options: &str) -> (FakeWebhook, FaultProxy, Fixture) {
    let fake = FakeWebhook::start();
    let proxy = FaultProxy::start(&fake.url());
    let path = fake.url().splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap_or_default();
    let f = Fixture::new(&proxy.url(&path), rows, "upsert", server_options, None);
    (fake, proxy, f)
}

fn each_created_once(fake: &FakeWebhook, rows: i64) {
    for id in 1..=rows {
        assert_eq!(fake.create_count(&key(id)), 1, "record {id} created exactly once");
    }
}

#[test]
fn resets_truncated_and_garbled_answers_and_a_hanging_destination_are_retried_until_the_destination_equals_the_model() {
    // Five batches of four, one at a time; every fault hits a different request.
    let (fake, proxy, mut f) = behind_proxy(20, "batch_size '4', max_concurrency '1', timeout_ms '1500', max_backoff_ms '200', max_retries '8'");
    let _drop = DropSyncs(vec![f.sync.clone()]);
    proxy.script(vec![
        Fault::ResetBeforeForwarding,
        Fault::ResetAfterForwarding,
        Fault::TruncateAnswer,
        Fault::ReplaceBody(r#"{"results": [{"status": 200}, {"sta"#.into()),
        // Results for only part of the batch: not an acknowledgement of the rest.
        Fault::ReplaceBody(r#"{"results": [{"status": 200}]}"#.into()),
        Fault::HangAfterForwarding(Duration::from_secs(4)),
    ]);
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("succeeded", 20, 0), "{run:?}");
    let log: Vec<String> = proxy.log().into_iter().map(|(_, what)| what).collect();
    // Each fault costs exactly one more request.
    assert_eq!(run.api_calls, 5 + 6, "{run:?} {log:?}");
    assert_eq!(&log[..6], [
        "ResetBeforeForwarding",
        "ResetAfterForwarding",
        "TruncateAnswer",
        "ReplaceBody(\"{\\\"results\\\": [{\\\"status\\\": 200}, {\\\"sta\")",
        "ReplaceBody(\"{\\\"results\\\": [{\\\"status\\\": 200}]}\")",
        "HangAfterForwarding(4s)",
    ]);
    assert!(log[6..].iter().all(|what| what == "forwarded"), "{log:?}");
    // The destination applied the requests whose answers were lost: the retries carried the
    // same Idempotency-Key and were recognised as repeats, so nothing was created twice.
    let replays = fake.requests().iter().filter(|r| r.replayed).count();
    assert_eq!(replays, 5, "every fault after forwarding is answered from the idempotency cache");
    assert_eq!(fake.records(), f.model_state());
    each_created_once(&fake, 20);
    // The transport faults are in the server log, without the URL.
    let log = server_log(&mut f.client);
    let reset = format!(
        "sync {} run {} batch 1: a request to {} got no answer: request failed: error sending request: client error (SendRequest): connection error: Connection reset by peer",
        f.sync, run.id, f.server
    );
    assert!(log.contains(&reset), "the reset is logged for the sync");
    assert!(!log.contains(&proxy.url("/")), "no URL in the log");
}

#[test]
fn a_5xx_storm_longer_than_the_backoff_ceiling_is_ridden_out_without_hammering() {
    let (fake, proxy, mut f) = behind_proxy(6, "batch_size '3', max_concurrency '1', max_backoff_ms '500', max_retries '12'");
    let _drop = DropSyncs(vec![f.sync.clone()]);
    // 3 s of 503s: six times the longest backoff.
    proxy.storm(503, None, Duration::from_secs(3));
    let started = Instant::now();
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 6), "{run:?}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    let storm = proxy.log().iter().filter(|(_, what)| what == "storm 503").count();
    // Backoff never drops under 80% of 500 ms once at the ceiling: at most ~1 + 3 / 0.4 tries.
    assert!((3..=12).contains(&storm), "{storm} requests during a 3 s storm");
    assert_eq!(fake.records(), f.model_state());
    each_created_once(&fake, 6);
}

#[test]
fn a_429_storm_outlasting_the_retries_fails_the_run_keeping_the_rows_and_the_next_run_converges() {
    let (fake, proxy, mut f) = behind_proxy(4, "max_backoff_ms '2000', max_retries '2'");
    let _drop = DropSyncs(vec![f.sync.clone()]);
    proxy.storm(429, Some("1"), Duration::from_secs(6));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("failed", 0, 3), "{run:?}");
    assert_eq!(run.error.as_deref(), Some("gave up after 3 attempts: HTTP 429: {\"error\":\"storm 429\"}"));
    // Retry-After was honoured: the three requests are a second or more apart.
    let at: Vec<Instant> = proxy.log().iter().map(|(at, _)| *at).collect();
    assert!(at.windows(2).all(|w| w[1] - w[0] >= Duration::from_millis(950)), "{:?}", at.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>());
    assert_eq!(f.outbox_rows(), 4, "nothing is lost");
    assert_eq!(fake.request_count(), 0);
    wait_until(SHORT, "the storm to pass", || proxy.log().len() >= 3 && {
        std::thread::sleep(Duration::from_millis(200));
        true
    });
    std::thread::sleep(Duration::from_secs(4));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 4), "{run:?}");
    assert_eq!(fake.records(), f.model_state());
    each_created_once(&fake, 4);
}
