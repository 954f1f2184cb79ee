//! Delivery against a scripted HTTP/1.1 server on 127.0.0.1 (one thread per connection,
//! `Connection: close`), so retries, timing and headers are observed end to end.

use super::*;
use crate::connector::{for_config, idempotency_key};
use crate::options::parse_server_options;
use crate::ratelimit::{LocalBucket, SharedGcra, TokenBucket};
use crate::record::Op;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

const TOKEN: &str = "sk_test_123";

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![],
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

#[derive(Clone, Debug)]
struct Seen {
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: Value,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    fn ids(&self) -> Vec<i64> {
        self.body["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"]["id"].as_i64().unwrap())
            .collect()
    }
}

type Script = dyn Fn(usize, &Seen) -> Reply + Send + Sync;

/// Starts a server answering request number n (0-based, in arrival order) with `script(n, req)`.
fn serve(script: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script: Arc<Script> = Arc::new(script);
    let log = seen.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let (script, log) = (script.clone(), log.clone());
            thread::spawn(move || handle(stream.unwrap(), &*script, &log));
        }
    });
    (url, seen)
}

fn handle(mut stream: TcpStream, script: &Script, log: &Mutex<Vec<Seen>>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    while raw.len() < head_end + length {
        let n = stream.read(&mut buf).unwrap();
        raw.extend_from_slice(&buf[..n]);
    }
    let seen = Seen {
        headers,
        // Null for a body that is not JSON (a form-encoded token request).
        body: serde_json::from_slice(&raw[head_end..]).unwrap_or(Value::Null),
    };
    let n = {
        let mut log = log.lock().unwrap();
        log.push(seen.clone());
        log.len() - 1
    };
    let r = script(n, &seen);
    thread::sleep(r.delay);
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        r.body.len()
    );
    for (k, v) in &r.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&r.body);
    let _ = stream.write_all(out.as_bytes());
}

fn records(ids: std::ops::RangeInclusive<i64>) -> Vec<OutboxRecord> {
    ids.map(|id| OutboxRecord {
        id,
        op: Op::Upsert,
        key: json!({"id": id}),
        fields: Some(json!({"n": id})),
        destination_id: None,
    })
    .collect()
}

fn limits(max_retries: u32) -> DeliveryLimits {
    DeliveryLimits {
        max_concurrency: 4,
        timeout: Duration::from_secs(3),
        max_retries,
        retry_base: Duration::from_millis(10),
        max_backoff: Duration::from_secs(60),
    }
}

fn webhook(url: &str) -> Box<dyn Destination> {
    for_config(&parse_server_options(&[("type".into(), "webhook".into()), ("url".into(), url.into())]).unwrap())
}

fn never() -> bool {
    false
}

/// The job of run 9 of sync "crm" (key scope "crm-uid"): no rate limit, never stopped.
fn crm<'a>(dest: &'a dyn Destination, limits: &'a DeliveryLimits, auth: &'a crate::oauth::Auth) -> Job<'a> {
    Job { dest, limits, budget: None, sync_name: "crm", key_scope: "crm-uid", run_id: 9, auth, should_stop: &never }
}

/// Runs one delivery of `batches` for sync "crm", run 9.
async fn run(
    url: &str,
    limits: &DeliveryLimits,
    budget: Option<&dyn RateBudget>,
    batches: Vec<Vec<OutboxRecord>>,
    should_stop: &dyn Fn() -> bool,
) -> Vec<BatchReport> {
    Deliverer::new(limits.timeout)
        .unwrap()
        .deliver(Job { budget, should_stop, ..crm(webhook(url).as_ref(), limits, &crate::oauth::Auth::fixed(Some(TOKEN))) }, batches)
        .await
}

fn acked(ids: &[i64], api_calls: u32) -> BatchReport {
    BatchReport {
        acked: ids.to_vec(),
        api_calls,
        ..Default::default()
    }
}

#[tokio::test]
async fn all_acked_with_documented_request() {
    let (url, seen) = serve(|_, _| reply(200, ""));
    let reports = run(&url, &limits(5), None, vec![records(1..=2), records(3..=3)], &|| false).await;
    assert_eq!(reports, vec![acked(&[1, 2], 1), acked(&[3], 1)]);
    let seen = seen.lock().unwrap();
    let first = seen.iter().find(|s| s.ids() == [1, 2]).unwrap();
    assert_eq!(
        first.body,
        json!({"sync": "crm", "run_id": 9, "records": [
            {"op": "upsert", "key": {"id": 1}, "fields": {"n": 1}},
            {"op": "upsert", "key": {"id": 2}, "fields": {"n": 2}}]})
    );
    assert_eq!(first.header("authorization"), Some("Bearer sk_test_123"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("user-agent"), Some(crate::USER_AGENT));
    let key = idempotency_key("crm-uid", 9, &records(1..=2));
    assert_eq!(first.header("idempotency-key"), Some(key.as_str()));
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (url, seen) = serve(|n, _| match n {
        0 => Reply {
            headers: vec![("Retry-After", "1".into())],
            ..reply(429, "slow down")
        },
        _ => reply(200, ""),
    });
    let start = Instant::now();
    let reports = run(&url, &limits(5), None, vec![records(1..=2)], &|| false).await;
    assert!(start.elapsed() >= Duration::from_secs(1), "{:?}", start.elapsed());
    assert_eq!(reports, vec![acked(&[1, 2], 2)]);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn server_errors_are_retried_with_the_same_idempotency_key() {
    let (url, seen) = serve(|n, _| if n < 2 { reply(500, "oops") } else { reply(200, "") });
    let reports = run(&url, &limits(5), None, vec![records(1..=3)], &|| false).await;
    assert_eq!(reports, vec![acked(&[1, 2, 3], 3)]);
    let keys: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.header("idempotency-key").unwrap().to_string())
        .collect();
    assert_eq!(keys, vec![idempotency_key("crm-uid", 9, &records(1..=3)); 3]);
}

#[tokio::test]
async fn per_record_rejection() {
    let (url, _) = serve(|_, _| {
        reply(
            207,
            r#"{"results": [{"status": 200}, {"status": 422, "error": "email is invalid"}, {"status": 200}]}"#,
        )
    });
    let reports = run(&url, &limits(5), None, vec![records(1..=3)], &|| false).await;
    assert_eq!(
        reports,
        vec![BatchReport {
            acked: vec![1, 3],
            rejected: vec![Rejection {
                id: 2,
                status: Some(422),
                message: "email is invalid".into(),
                attempts: 1
            }],
            api_calls: 1,
            ..Default::default()
        }]
    );
}

#[tokio::test]
async fn per_record_retry_resends_only_those_records() {
    let (url, seen) = serve(|n, req| match n {
        0 => reply(
            200,
            r#"{"results": [{"status": 200}, {"status": 503, "error": "busy"}, {"status": 422}]}"#,
        ),
        _ => {
            assert_eq!(req.ids(), [2]);
            reply(200, r#"{"results": [{"status": 201}]}"#)
        }
    });
    let reports = run(&url, &limits(5), None, vec![records(1..=3)], &|| false).await;
    assert_eq!(
        reports,
        vec![BatchReport {
            acked: vec![1, 2],
            rejected: vec![Rejection {
                id: 3,
                status: Some(422),
                message: "HTTP 422".into(),
                attempts: 1
            }],
            api_calls: 2,
            ..Default::default()
        }]
    );
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[1].header("idempotency-key"),
        Some(idempotency_key("crm-uid", 9, &records(2..=2)).as_str())
    );
}

#[tokio::test]
async fn unauthorized_is_fatal_and_stops_other_batches() {
    let (url, seen) = serve(|_, req| reply(401, &format!("bad {}", req.header("authorization").unwrap())));
    let limits = DeliveryLimits {
        max_concurrency: 1,
        ..limits(5)
    };
    let reports = run(&url, &limits, None, vec![records(1..=2), records(3..=3)], &|| false).await;
    let message = "destination rejected the credentials (HTTP 401): check the token in the user mapping";
    assert_eq!(
        reports,
        vec![
            BatchReport {
                unresolved: vec![1, 2],
                api_calls: 1,
                error: Some(message.into()),
                fatal: true,
                ..Default::default()
            },
            BatchReport {
                unresolved: vec![3],
                error: Some("stopped: another batch failed fatally".into()),
                ..Default::default()
            },
        ]
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn retries_exhausted_leave_records_unresolved() {
    // The body echoes the token: it must come out redacted.
    let (url, seen) = serve(|_, _| reply(503, &format!("busy, token {TOKEN}")));
    let reports = run(&url, &limits(2), None, vec![records(1..=2)], &|| false).await;
    assert_eq!(
        reports,
        vec![BatchReport {
            unresolved: vec![1, 2],
            api_calls: 3,
            error: Some("gave up after 3 attempts: HTTP 503: busy, token [redacted]".into()),
            ..Default::default()
        }]
    );
    assert_eq!(seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn retry_after_beyond_max_backoff_gives_up_at_once() {
    let (url, _) = serve(|_, _| Reply {
        headers: vec![("Retry-After", "120".into())],
        ..reply(429, "")
    });
    let start = Instant::now();
    let reports = run(&url, &limits(5), None, vec![records(1..=1)], &|| false).await;
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(
        reports[0].error.as_deref(),
        Some("Retry-After 120s exceeds max_backoff 60s: HTTP 429")
    );
    assert_eq!((reports[0].unresolved.clone(), reports[0].api_calls), (vec![1], 1));
}

#[tokio::test]
async fn stop_request_interrupts_a_backoff() {
    let (url, _) = serve(|_, _| reply(503, ""));
    let limits = DeliveryLimits {
        retry_base: Duration::from_secs(10),
        ..limits(5)
    };
    let start = Instant::now();
    let stop = || start.elapsed() > Duration::from_millis(300);
    let reports = run(&url, &limits, None, vec![records(1..=1)], &stop).await;
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    assert_eq!(
        reports,
        vec![BatchReport {
            unresolved: vec![1],
            api_calls: 1,
            error: Some("stopped: worker shutting down".into()),
            ..Default::default()
        }]
    );
}

#[tokio::test]
async fn rate_limit_holds_across_concurrent_batches() {
    let (url, seen) = serve(|_, _| reply(200, ""));
    // Burst 1: ten requests at 5/s need nine 200 ms refills.
    let bucket = LocalBucket::new(TokenBucket::new(5.0, 1.0));
    let batches: Vec<_> = (1..=10).map(|id| records(id..=id)).collect();
    let start = Instant::now();
    let reports = run(&url, &limits(5), Some(&bucket), batches, &|| false).await;
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1790) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    assert_eq!(
        reports.iter().map(|r| r.acked.clone()).collect::<Vec<_>>(),
        (1..=10).map(|i| vec![i]).collect::<Vec<_>>()
    );
    assert_eq!(seen.lock().unwrap().len(), 10);
}

#[tokio::test]
async fn shared_budget_holds_across_concurrent_deliveries() {
    // Two workers' deliveries to one destination, each with its own view of one shared
    // budget: ten requests at 5/s, burst 1, between them.
    let (url, seen) = serve(|_, _| reply(200, ""));
    let tat = std::sync::atomic::AtomicU64::new(0);
    let (first, second) = (SharedGcra::new(&tat, 5.0, 1.0), SharedGcra::new(&tat, 5.0, 1.0));
    let batches = |from: i64| (from..from + 5).map(|id| records(id..=id)).collect::<Vec<_>>();
    let (limits, never) = (limits(5), || false);
    let start = Instant::now();
    let (a, b) = tokio::join!(
        run(&url, &limits, Some(&first), batches(1), &never),
        run(&url, &limits, Some(&second), batches(6), &never),
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1790) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    let acked: Vec<i64> = a.iter().chain(&b).flat_map(|r| r.acked.clone()).collect();
    assert_eq!(acked, (1..=10).collect::<Vec<_>>());
    assert_eq!(seen.lock().unwrap().len(), 10);
}

#[tokio::test]
async fn stop_request_abandons_a_request_in_flight() {
    let (url, seen) = serve(|_, _| Reply {
        delay: Duration::from_secs(5),
        ..reply(200, "")
    });
    let limits = DeliveryLimits {
        timeout: Duration::from_secs(30),
        ..limits(5)
    };
    let start = Instant::now();
    let stop = || start.elapsed() > Duration::from_millis(200);
    let reports = run(&url, &limits, None, vec![records(1..=2), records(3..=3)], &stop).await;
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    let stopped = |ids: &[i64]| BatchReport {
        unresolved: ids.to_vec(),
        api_calls: 1,
        error: Some("stopped: worker shutting down".into()),
        ..Default::default()
    };
    assert_eq!(reports, vec![stopped(&[1, 2]), stopped(&[3])]);
    assert_eq!(seen.lock().unwrap().len(), 2, "both requests were in flight");
}

#[tokio::test]
async fn timeouts_are_reported_without_the_token() {
    let (url, _) = serve(|_, _| Reply {
        delay: Duration::from_secs(2),
        ..reply(200, "")
    });
    let limits = DeliveryLimits {
        timeout: Duration::from_millis(300),
        ..limits(0)
    };
    let reports = run(&url, &limits, None, vec![records(1..=1)], &|| false).await;
    assert_eq!(
        reports[0].error.as_deref(),
        Some("gave up after 1 attempt: request failed: timed out after 300ms")
    );
    assert_eq!(reports[0].unresolved, [1]);
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/hook?key={TOKEN}");
    let reports = run(&url, &limits(1), None, vec![records(1..=1)], &|| false).await;
    let error = reports[0].error.clone().unwrap();
    assert!(
        error.starts_with("gave up after 2 attempts: request failed: "),
        "{error}"
    );
    assert!(!error.contains(TOKEN), "{error}");
    assert_eq!((reports[0].unresolved.clone(), reports[0].api_calls), (vec![1], 2));
    // Both unanswered attempts are kept for the server log, without the secret.
    assert_eq!(reports[0].transport_failures.len(), 2);
    assert!(reports[0].transport_failures.iter().all(|f| f.starts_with("request failed: ") && !f.contains(TOKEN)));
}

#[test]
fn limits_from_config() {
    let cfg = parse_server_options(&[("type".into(), "webhook".into()), ("url".into(), "http://x".into())]).unwrap();
    assert_eq!(
        DeliveryLimits::from_config(&cfg),
        DeliveryLimits {
            max_concurrency: 4,
            timeout: Duration::from_secs(30),
            max_retries: 5,
            retry_base: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
        }
    );
    assert_eq!(show(Duration::from_secs(30)), "30s");
    assert_eq!(show(Duration::from_millis(1500)), "1500ms");
}

#[tokio::test]
async fn concurrency_is_bounded_by_max_concurrency_and_used() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (counter, top) = (in_flight.clone(), peak.clone());
    let (url, seen) = serve(move |_, _| {
        let now = counter.fetch_add(1, Ordering::SeqCst) + 1;
        top.fetch_max(now, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(150));
        counter.fetch_sub(1, Ordering::SeqCst);
        reply(200, "")
    });
    let batches: Vec<_> = (1..=9).map(|id| records(id..=id)).collect();
    let limits = DeliveryLimits { max_concurrency: 3, ..limits(0) };
    let reports = run(&url, &limits, None, batches, &|| false).await;
    assert_eq!(reports.iter().map(|r| r.acked.len()).sum::<usize>(), 9);
    assert_eq!(seen.lock().unwrap().len(), 9);
    assert_eq!(peak.load(Ordering::SeqCst), 3, "three requests in flight at most, and at once");
}

#[tokio::test]
async fn a_batch_is_handed_over_while_the_batches_after_it_are_still_in_flight() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    // The second batch is answered only once the test lets it, or after 2 s (within the
    // requests' timeout): a delivery that held the first report back until every batch was
    // done then fails the assertion below instead of hanging.
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let second_answered = Arc::new(AtomicBool::new(false));
    let answered = second_answered.clone();
    let (url, _) = serve(move |_, request| {
        if request.ids() == [2] {
            let _ = released.lock().unwrap().recv_timeout(Duration::from_secs(2));
            answered.store(true, Ordering::SeqCst);
        }
        reply(200, "")
    });
    let limits = limits(0);
    let deliverer = Deliverer::new(limits.timeout).unwrap();
    let dest = webhook(&url);
    let auth = crate::oauth::Auth::fixed(Some(TOKEN));
    let mut delivery = deliverer.start(crm(dest.as_ref(), &limits, &auth), vec![records(1..=1), records(2..=2)]);
    delivery.close();
    let first = delivery.next().await.expect("a report for the first batch");
    assert_eq!(first, acked(&[1], 1));
    assert!(!second_answered.load(Ordering::SeqCst), "the first report waited for the second batch's answer");
    release.send(()).unwrap();
    assert_eq!(delivery.next().await.expect("a report for the second batch"), acked(&[2], 1));
    assert_eq!(delivery.next().await, None);
}

#[tokio::test]
async fn batches_added_to_a_delivery_go_out_in_order_as_soon_as_they_are_sent() {
    let (url, seen) = serve(|_, _| reply(200, ""));
    let limits = DeliveryLimits { max_concurrency: 1, ..limits(0) };
    let deliverer = Deliverer::new(limits.timeout).unwrap();
    let dest = webhook(&url);
    let auth = crate::oauth::Auth::fixed(Some(TOKEN));
    let mut delivery = deliverer.start(crm(dest.as_ref(), &limits, &auth), vec![records(1..=2)]);
    assert_eq!(delivery.next().await, Some(acked(&[1, 2], 1)));
    delivery.push(records(3..=3));
    delivery.push(records(4..=5));
    assert_eq!(delivery.unsent(), 2);
    delivery.send().await;
    assert_eq!(delivery.unsent(), 1, "one batch at a time (max_concurrency 1)");
    // No runtime turns from here: the request must already be on its way.
    let deadline = Instant::now() + Duration::from_secs(2);
    while seen.lock().unwrap().len() < 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(seen.lock().unwrap().len(), 2, "send() wrote out the request of the batch it started");
    assert_eq!(delivery.next().await, Some(acked(&[3], 1)));
    delivery.close();
    assert_eq!(delivery.next().await, Some(acked(&[4, 5], 1)));
    assert_eq!(delivery.next().await, None);
    let ids: Vec<Vec<i64>> = seen.lock().unwrap().iter().map(Seen::ids).collect();
    assert_eq!(ids, [vec![1, 2], vec![3], vec![4, 5]]);
}

#[tokio::test]
async fn a_delivery_left_open_with_nothing_to_send_ends_instead_of_waiting_forever() {
    let (url, _) = serve(|_, _| reply(200, ""));
    let limits = limits(0);
    let deliverer = Deliverer::new(limits.timeout).unwrap();
    let dest = webhook(&url);
    let auth = crate::oauth::Auth::fixed(Some(TOKEN));
    let mut delivery = deliverer.start(crm(dest.as_ref(), &limits, &auth), vec![records(1..=1)]);
    assert_eq!(delivery.next().await, Some(acked(&[1], 1)));
    assert_eq!(delivery.next().await, None);
}

/// A webhook whose every success answer "resolves" the records again (a destination that keeps
/// naming other ids): delivery must stop after a bounded number of lookups.
struct EndlessLookup(Box<dyn Destination>);

impl Destination for EndlessLookup {
    fn kind(&self) -> &'static str {
        "endless"
    }
    fn max_batch_size(&self) -> usize {
        10
    }
    fn build_request(&self, ctx: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        self.0.build_request(ctx, records, token)
    }
    fn classify(&self, records: &[OutboxRecord], _: &HttpResponse) -> ResponseOutcome {
        ResponseOutcome::PerRecord(records.iter().map(|r| RecordResult::Resolved(format!("id-{}", r.id))).collect())
    }
}

#[tokio::test]
async fn lookups_in_a_row_are_bounded() {
    let (url, seen) = serve(|_, _| reply(200, "{}"));
    let dest = EndlessLookup(webhook(&url));
    let reports = Deliverer::new(Duration::from_secs(3))
        .unwrap()
        .deliver(crm(&dest, &limits(5), &crate::oauth::Auth::fixed(None)), vec![records(1..=2)])
        .await;
    assert_eq!(seen.lock().unwrap().len(), 1 + MAX_RESOLUTIONS as usize);
    assert_eq!(reports[0].unresolved, vec![1, 2]);
    assert_eq!(reports[0].error.as_deref(), Some("endless connector kept resolving destination ids (4 times)"));
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_per_delivery_and_shared_by_the_batches() {
    use crate::oauth::{Auth, OAuthClient};
    use crate::options::OAuthSecrets;
    // The token endpoint and the webhook are the same scripted server: POSTs carrying the old
    // token get 401, the form post to /token gets a new token, the rest succeed.
    let (url, seen) = serve(|_, req| {
        if req.body.is_null() {
            reply(200, r#"{"access_token": "fresh", "token_type": "bearer"}"#)
        } else if req.header("authorization") == Some("Bearer stale") {
            reply(401, "{}")
        } else {
            reply(200, "{}")
        }
    });
    let auth = Auth::new(
        Some("stale".into()),
        Some(OAuthClient {
            token_url: url.replace("/hook", "/token"),
            secrets: OAuthSecrets { client_id: "cid".into(), client_secret: "cs".into(), refresh_token: Some("rt".into()) },
        }),
    );
    let reports = Deliverer::new(Duration::from_secs(3))
        .unwrap()
        .deliver(crm(webhook(&url).as_ref(), &limits(5), &auth), vec![records(1..=2), records(3..=4)])
        .await;
    assert_eq!(reports.iter().flat_map(|r| r.acked.clone()).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let seen = seen.lock().unwrap();
    let token_requests = seen.iter().filter(|s| s.body.is_null()).count();
    assert_eq!(token_requests, 1, "one refresh for both batches");
    assert_eq!((auth.token().as_deref(), auth.generation()), (Some("fresh"), 1));
}

/// A webhook reporting the `X-Usage` header of its answers as API usage.
struct CountingUsage(Box<dyn Destination>);

impl Destination for CountingUsage {
    fn kind(&self) -> &'static str {
        "counting"
    }
    fn max_batch_size(&self) -> usize {
        10
    }
    fn build_request(&self, ctx: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        self.0.build_request(ctx, records, token)
    }
    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        self.0.classify(records, resp)
    }
    fn usage(&self, resp: &HttpResponse) -> Option<ApiUsage> {
        let spent = resp.header("X-Usage")?.parse().ok()?;
        Some(ApiUsage { order: (0, spent), shown: format!("used {spent}") })
    }
}

#[tokio::test]
async fn the_latest_usage_reading_wins_whichever_batch_it_answered() {
    // The first batch is answered last, with the higher count: batches are recorded in order,
    // so each report must carry the latest reading, not its own.
    let (url, _) = serve(|_, seen| {
        let first = seen.ids() == [1];
        if first {
            thread::sleep(Duration::from_millis(300));
        }
        Reply { headers: vec![("X-Usage", if first { "8" } else { "7" }.to_string())], ..reply(200, "") }
    });
    let reports = Deliverer::new(Duration::from_secs(3))
        .unwrap()
        .deliver(crm(&CountingUsage(webhook(&url)), &limits(0), &crate::oauth::Auth::fixed(Some(TOKEN))), vec![records(1..=1), records(2..=2)])
        .await;
    let shown: Vec<_> = reports.iter().map(|r| r.api_usage.as_ref().map(|u| u.shown.as_str())).collect();
    assert_eq!(shown, [Some("used 8"), Some("used 8")]);
}

#[test]
fn a_later_limit_window_is_a_later_reading_even_with_less_spent() {
    let mut kept = None;
    ApiUsage::keep_latest(&mut kept, ApiUsage { order: (100, 90), shown: "a".into() });
    ApiUsage::keep_latest(&mut kept, ApiUsage { order: (100, 80), shown: "b".into() });
    assert_eq!(kept.as_ref().map(|u| u.shown.as_str()), Some("a"));
    ApiUsage::keep_latest(&mut kept, ApiUsage { order: (110, 1), shown: "c".into() });
    assert_eq!(kept.map(|u| u.shown), Some("c".to_string()));
}

#[tokio::test]
async fn a_host_outside_the_allowed_hosts_is_never_contacted_and_fails_the_delivery_at_once() {
    let (url, seen) = serve(|_, _| reply(200, ""));
    let policy = crate::host_policy::HostPolicy::parse("api.example.com").unwrap();
    let reports = Deliverer::with_policy(Duration::from_secs(3), policy)
        .unwrap()
        .deliver(crm(webhook(&url).as_ref(), &limits(5), &crate::oauth::Auth::fixed(Some(TOKEN))), vec![records(1..=2), records(3..=3)])
        .await;
    assert!(seen.lock().unwrap().is_empty());
    let refused = "request refused: host \"127.0.0.1\" is not in retl.allowed_hosts (\"api.example.com\"): a superuser can add it to that setting";
    assert_eq!(reports[0].error.as_deref(), Some(refused));
    assert_eq!((reports[0].fatal, reports[0].api_calls, reports[0].unresolved.clone()), (true, 1, vec![1, 2]));
    assert_eq!(reports[1].unresolved, vec![3]);
}

/// A resolver whose every name points at the cloud metadata address.
struct MetadataDns;

impl reqwest::dns::Resolve for MetadataDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = crate::host_policy::HostPolicy::default();
        let host = name.as_str().to_string();
        Box::pin(async move {
            policy.check_resolved(&host, "169.254.169.254".parse().unwrap())?;
            Ok(Box::new(std::iter::empty()) as reqwest::dns::Addrs)
        })
    }
}

#[tokio::test]
async fn a_name_resolving_to_a_refused_address_is_refused_not_retried() {
    let http = Http {
        client: reqwest::Client::builder().dns_resolver(Arc::new(MetadataDns)).build().unwrap(),
        policy: Arc::new(crate::host_policy::HostPolicy::default()),
    };
    let request = HttpRequest { method: reqwest::Method::GET, url: "http://innocent.example/".into(), headers: vec![], body: vec![] };
    assert_eq!(
        send(&http, request, Duration::from_secs(3)).await.err(),
        Some(SendError::Refused(
            "request refused: host \"innocent.example\" resolves to 169.254.169.254, a link-local address (cloud metadata services answer there): refused unless retl.allowed_hosts lists that address explicitly".into()
        ))
    );
}
