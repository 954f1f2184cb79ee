//! A strict, throttled fake of the `webhook` destination for the load harness (`retl-load`).
//!
//! It follows the same contract as [`crate::fake_webhook`] (POST JSON `{sync, run_id, records}`,
//! an `Idempotency-Key` whose replays get the stored answer, per-record results) and adds a
//! rate limit it enforces itself: the budget a `rate_limit` of `rate` promises
//! (docs/REFERENCE.md: a token bucket of `rate` requests per second with a burst of one
//! second's worth), checked on arrival as a GCRA with a small allowance for arrival jitter. A
//! request over the budget is answered `429` with `Retry-After` and not applied, so a
//! client that keeps to its `rate_limit` never sees one.
//!
//! Built for volume (millions of records): it keeps each sync's records as a hash of the
//! canonical JSON of their fields, counts instead of journaling, and serves requests on
//! several threads, each stamping the arrival time as soon as it takes a request.

use crate::fake_webhook::canonical_json;
use crate::http_util::request_header;
use serde_json::{json, Value};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use crate::http_server::{Header, Request, Response, Server};

/// Threads taking requests off the listener. The extension sends at most `max_concurrency`
/// requests per worker at once; 4 keep arrival stamps honest while one parses a large body.
const THREADS: usize = 4;

/// Hash of a JSON value's canonical form (object members sorted at every level): equal
/// values, equal hashes. Fed to the hasher as the value is walked, without building the
/// canonical text: building it (a sorted copy of every body, then its text) cost the
/// benchmark's receiver about 40 µs per record, mostly in the allocator, on the cores the
/// extension is measured on.
pub fn fields_hash(v: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    hash_canonical(v, &mut h);
    h.finish()
}

fn hash_canonical(v: &Value, h: &mut impl Hasher) {
    match v {
        Value::Null => h.write_u8(0),
        Value::Bool(b) => {
            h.write_u8(1);
            b.hash(h);
        }
        Value::Number(n) => {
            // Integers and floats apart (1 and 1.0 are different texts); a float by its bits
            // (serde_json writes the shortest text that reads back as the same bits).
            if let Some(u) = n.as_u64() {
                h.write_u8(2);
                h.write_u64(u);
            } else if let Some(i) = n.as_i64() {
                h.write_u8(6);
                h.write_i64(i);
            } else {
                h.write_u8(7);
                h.write_u64(n.as_f64().unwrap_or(f64::NAN).to_bits());
            }
        }
        Value::String(s) => {
            h.write_u8(3);
            s.hash(h);
        }
        Value::Array(items) => {
            h.write_u8(4);
            h.write_usize(items.len());
            items.iter().for_each(|item| hash_canonical(item, h));
        }
        Value::Object(members) => {
            h.write_u8(5);
            h.write_usize(members.len());
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            // Already sorted unless serde_json's preserve_order is on somewhere in the build.
            if !sorted.is_sorted_by(|a, b| a.0 <= b.0) {
                sorted.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (name, value) in sorted {
                name.hash(h);
                hash_canonical(value, h);
            }
        }
    }
}

/// What the fake did for one sync (by the `sync` member of the bodies).
#[derive(Clone, Debug, Default)]
pub struct SyncCounts {
    /// Requests applied (2xx, not replays).
    pub requests: u64,
    /// Records in those requests.
    pub records: u64,
    pub creates: u64,
    pub updates: u64,
    pub deletes: u64,
    /// Upserts/updates carrying exactly the fields the record already had: a change delivered
    /// twice (a correct client sends each version of a row once).
    pub redundant: u64,
    /// Deletes of a key the destination does not have.
    pub absent_deletes: u64,
    /// Inserts of a key the destination already has (answered 409).
    pub duplicate_inserts: u64,
    /// Seconds since the fake started at which each applied request arrived.
    pub arrivals: Vec<f64>,
}

/// Totals over the whole run.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Every request that reached the fake.
    pub requests: u64,
    /// Answered 429 because it exceeded the budget.
    pub throttled: u64,
    /// Answered with the stored response of an Idempotency-Key already applied.
    pub replays: u64,
    /// Refused for breaking the contract (400, 404, 405, 413, 415, 422): a client bug.
    pub invalid: u64,
    /// The first few reasons of `invalid`.
    pub invalid_reasons: Vec<String>,
    /// Most requests that arrived within any 1-second / 10-second window (all of them,
    /// throttled ones included).
    pub max_in_1s: u64,
    pub max_in_10s: u64,
    /// How early the earliest throttled request was, in ms (how far past the budget).
    pub max_early_ms: f64,
    /// Requests that arrived in each second since the fake started.
    pub per_second: Vec<u64>,
}

#[derive(Default)]
struct SyncState {
    counts: SyncCounts,
    /// Canonical key JSON → hash of the fields the destination holds.
    records: HashMap<String, u64>,
}

struct State {
    /// GCRA theoretical arrival time, seconds since `started`.
    tat: f64,
    window: VecDeque<f64>,
    totals: Totals,
    syncs: BTreeMap<String, SyncState>,
    /// Idempotency-Key → (hash of the body, response) of applied requests.
    answered: HashMap<String, (u64, String)>,
}

struct Shared {
    started: Instant,
    rate: f64,
    /// How far ahead of an arrival the TAT may be: (burst - 1) intervals plus the jitter.
    tolerance: f64,
    max_batch: usize,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running fake; it stops when dropped.
pub struct ThrottledWebhook {
    shared: Arc<Shared>,
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ThrottledWebhook {
    /// Serves `POST /hook` on 127.0.0.1 (OS-assigned port) with a budget of `rate` requests
    /// per second after a burst of `max(rate, 1)` (what `rate_limit` promises), allowing
    /// arrivals up to `jitter` earlier than the budget (requests leave the client on time but
    /// do not all take equally long to arrive), and batches of at most `max_batch` records.
    pub fn start(rate: f64, jitter: Duration, max_batch: usize) -> io::Result<ThrottledWebhook> {
        ThrottledWebhook::start_on(0, rate, jitter, max_batch)
    }

    /// [`ThrottledWebhook::start`] on `port` (0: one the OS assigns).
    pub fn start_on(port: u16, rate: f64, jitter: Duration, max_batch: usize) -> io::Result<ThrottledWebhook> {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be > 0");
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        let server = Arc::new(Server::from_listener(listener)?);
        let burst = rate.max(1.0);
        let shared = Arc::new(Shared {
            started: Instant::now(),
            rate,
            tolerance: (burst - 1.0) / rate + jitter.as_secs_f64(),
            max_batch,
            state: Mutex::new(State {
                tat: 0.0,
                window: VecDeque::new(),
                totals: Totals::default(),
                syncs: BTreeMap::new(),
                answered: HashMap::new(),
            }),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..THREADS {
            let (server, shared, stop) = (server.clone(), shared.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fake-throttled-{i}"))
                    .spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            if let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(100)) {
                                let at = shared.started.elapsed().as_secs_f64();
                                serve(&shared, request, at);
                            }
                        }
                    })?,
            );
        }
        Ok(ThrottledWebhook { shared, port, stop, threads })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// When the fake started: arrival times are seconds since then.
    pub fn started(&self) -> Instant {
        self.shared.started
    }

    pub fn totals(&self) -> Totals {
        self.shared.state().totals.clone()
    }

    /// Counts per sync name.
    pub fn per_sync(&self) -> BTreeMap<String, SyncCounts> {
        self.shared.state().syncs.iter().map(|(k, v)| (k.clone(), v.counts.clone())).collect()
    }

    /// How many records the destination holds for `sync`.
    pub fn held(&self, sync: &str) -> usize {
        self.shared.state().syncs.get(sync).map_or(0, |s| s.records.len())
    }

    /// The records the destination holds for `sync`: canonical key JSON → [`fields_hash`].
    pub fn records(&self, sync: &str) -> HashMap<String, u64> {
        self.shared.state().syncs.get(sync).map(|s| s.records.clone()).unwrap_or_default()
    }
}

impl Drop for ThrottledWebhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

fn error_body(msg: &str) -> String {
    json!({ "error": msg }).to_string()
}

fn serve(shared: &Shared, mut request: Request, at: f64) {
    // The budget is decided on arrival, before the body is read: what counts is when the
    // request came, not how long it took to parse.
    let throttle = {
        let mut st = shared.state();
        st.totals.requests += 1;
        let second = at as usize;
        if st.totals.per_second.len() <= second {
            st.totals.per_second.resize(second + 1, 0);
        }
        st.totals.per_second[second] += 1;
        st.window.push_back(at);
        while st.window.front().is_some_and(|&t| t <= at - 10.0) {
            st.window.pop_front();
        }
        let in_10s = st.window.len() as u64;
        let in_1s = st.window.iter().rev().take_while(|&&t| t > at - 1.0).count() as u64;
        st.totals.max_in_10s = st.totals.max_in_10s.max(in_10s);
        st.totals.max_in_1s = st.totals.max_in_1s.max(in_1s);
        let tat = st.tat.max(at);
        if tat - at > shared.tolerance + 1e-9 {
            let early = tat - shared.tolerance - at;
            st.totals.throttled += 1;
            st.totals.max_early_ms = st.totals.max_early_ms.max(early * 1000.0);
            Some(early.ceil().max(1.0) as u64)
        } else {
            st.tat = tat + 1.0 / shared.rate;
            None
        }
    };
    let (status, body, retry_after) = match throttle {
        Some(wait) => (429, error_body("rate limit exceeded"), Some(wait)),
        None => {
            let (status, body) = apply_request(shared, &mut request, at);
            (status, body, None)
        }
    };
    let mut response = Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"));
    if let Some(wait) = retry_after {
        response.add_header(header("Retry-After", &wait.to_string()));
    }
    let _ = request.respond(response);
}

fn apply_request(shared: &Shared, request: &mut Request, at: f64) -> (u16, String) {
    let invalid = |shared: &Shared, status: u16, msg: String| {
        let mut st = shared.state();
        st.totals.invalid += 1;
        if st.totals.invalid_reasons.len() < 10 {
            st.totals.invalid_reasons.push(format!("{status}: {msg}"));
        }
        (status, error_body(&msg))
    };
    let route = request.url().split('?').next().unwrap_or_default().to_string();
    if route != "/hook" {
        return invalid(shared, 404, format!("no such path {route}"));
    }
    if request.method().as_str() != "POST" {
        return invalid(shared, 405, format!("method {} not allowed", request.method()));
    }
    let media = request_header(request, "content-type")
        .map(|ct| ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    if media.as_deref() != Some("application/json") {
        return invalid(shared, 415, "Content-Type must be application/json".into());
    }
    let Some(key) = request_header(request, "idempotency-key").filter(|k| !k.trim().is_empty()) else {
        return invalid(shared, 400, "missing Idempotency-Key header".into());
    };
    let raw = request.take_body();
    let body: Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => return invalid(shared, 400, format!("body is not valid JSON: {e}")),
    };
    // A replay must carry the very same body: the same bytes (the extension sends a batch
    // again as it first serialised it).
    let body_hash = {
        let mut h = DefaultHasher::new();
        raw.hash(&mut h);
        h.finish()
    };
    {
        let mut st = shared.state();
        if let Some((stored_hash, response)) = st.answered.get(&key) {
            if *stored_hash != body_hash {
                drop(st);
                return invalid(shared, 422, "Idempotency-Key reused with a different body".into());
            }
            let response = response.clone();
            st.totals.replays += 1;
            return (200, response);
        }
    }
    let (sync, records) = match validate(&body, shared.max_batch) {
        Ok(v) => v,
        Err((status, msg)) => return invalid(shared, status, msg),
    };
    // Hashing outside the lock: bodies carry up to 1000 records.
    let prepared: Vec<(String, String, Option<u64>)> = records
        .iter()
        .map(|r| {
            let op = r["op"].as_str().unwrap_or_default().to_string();
            (op, canonical_json(&r["key"]), r.get("fields").map(fields_hash))
        })
        .collect();
    let mut st = shared.state();
    if let Some((stored_hash, response)) = st.answered.get(&key) {
        // The same batch applied meanwhile by another thread (a client retry).
        let (same, response) = (*stored_hash == body_hash, response.clone());
        drop(st);
        if !same {
            return invalid(shared, 422, "Idempotency-Key reused with a different body".into());
        }
        shared.state().totals.replays += 1;
        return (200, response);
    }
    let sync_state = st.syncs.entry(sync).or_default();
    let mut results = Vec::with_capacity(prepared.len());
    for (op, key, fields) in prepared {
        let present = sync_state.records.get(&key).copied();
        let c = &mut sync_state.counts;
        let status = match (op.as_str(), fields, present) {
            ("insert", _, Some(_)) => {
                c.duplicate_inserts += 1;
                results.push(json!({"status": 409, "error": "record already exists"}));
                continue;
            }
            ("update", _, None) => {
                results.push(json!({"status": 404, "error": "record not found"}));
                continue;
            }
            ("update" | "upsert", Some(f), Some(old)) => {
                if f == old {
                    c.redundant += 1;
                }
                c.updates += 1;
                sync_state.records.insert(key, f);
                200
            }
            ("insert" | "upsert", Some(f), None) => {
                c.creates += 1;
                sync_state.records.insert(key, f);
                201
            }
            _ => {
                c.deletes += 1;
                if sync_state.records.remove(&key).is_none() {
                    sync_state.counts.absent_deletes += 1;
                }
                204
            }
        };
        results.push(json!({ "status": status }));
    }
    let c = &mut sync_state.counts;
    c.requests += 1;
    c.records += results.len() as u64;
    c.arrivals.push(at);
    let response = json!({ "results": results }).to_string();
    st.answered.insert(key, (body_hash, response.clone()));
    (200, response)
}

/// Whole-request validation (as the strict fake webhook does): the sync's name and records.
fn validate(body: &Value, max_batch: usize) -> Result<(String, &[Value]), (u16, String)> {
    let bad = |msg: String| Err((400, msg));
    let Some(obj) = body.as_object() else {
        return bad("body must be a JSON object".into());
    };
    if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "sync" | "run_id" | "records")) {
        return bad(format!("unknown member {k:?} in body"));
    }
    let Some(sync) = obj.get("sync").and_then(Value::as_str) else {
        return bad("sync must be a string".into());
    };
    if !obj.get("run_id").is_some_and(|v| v.is_i64() || v.is_u64()) {
        return bad("run_id must be an integer".into());
    }
    let Some(records) = obj.get("records").and_then(Value::as_array) else {
        return bad("records must be an array".into());
    };
    if records.is_empty() {
        return bad("records must not be empty".into());
    }
    if records.len() > max_batch {
        return Err((413, format!("batch of {} records exceeds the limit of {max_batch}", records.len())));
    }
    for (i, r) in records.iter().enumerate() {
        let Some(rec) = r.as_object() else {
            return bad(format!("records[{i}]: record must be a JSON object"));
        };
        if let Some(k) = rec.keys().find(|k| !matches!(k.as_str(), "op" | "key" | "fields")) {
            return bad(format!("records[{i}]: unknown member {k:?}"));
        }
        let op = rec.get("op").and_then(Value::as_str).unwrap_or_default();
        if !matches!(op, "insert" | "update" | "upsert" | "delete") {
            return bad(format!("records[{i}]: unknown op {op:?}"));
        }
        if !rec.get("key").and_then(Value::as_object).is_some_and(|k| !k.is_empty()) {
            return bad(format!("records[{i}]: key must be a non-empty JSON object"));
        }
        match (op, rec.get("fields")) {
            ("delete", None) | ("insert" | "update" | "upsert", Some(Value::Object(_))) => {}
            ("delete", Some(_)) => return bad(format!("records[{i}]: fields is forbidden for delete")),
            _ => return bad(format!("records[{i}]: fields must be a JSON object for {op}")),
        }
    }
    Ok((sync.to_string(), records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::send;

    fn post(fake: &ThrottledWebhook, idem: &str, body: &Value) -> (u16, Option<String>, String) {
        let r = send(
            &format!("127.0.0.1:{}", fake.port),
            "POST",
            "/hook",
            &[("Content-Type", "application/json"), ("Idempotency-Key", idem)],
            &body.to_string(),
        );
        (r.status, r.header("Retry-After").map(str::to_string), r.body)
    }

    fn batch(sync: &str, records: Value) -> Value {
        json!({"sync": sync, "run_id": 1, "records": records})
    }

    #[test]
    fn applies_per_sync_and_replays_by_idempotency_key() {
        let fake = ThrottledWebhook::start(1000.0, Duration::ZERO, 10).unwrap();
        let b = batch("a", json!([
            {"op": "upsert", "key": {"id": 1}, "fields": {"id": 1, "x": "p"}},
            {"op": "upsert", "key": {"id": 2}, "fields": {"id": 2, "x": "q"}},
        ]));
        assert_eq!(post(&fake, "k1", &b).0, 200);
        assert_eq!(post(&fake, "k1", &b).0, 200, "a replay");
        let other = batch("a", json!([{"op": "delete", "key": {"id": 1}}]));
        assert_eq!(post(&fake, "k1", &other).0, 422, "same key, other body");
        assert_eq!(post(&fake, "k2", &other).0, 200);
        assert_eq!(post(&fake, "k3", &other).0, 200);
        let same = batch("a", json!([{"op": "upsert", "key": {"id": 2}, "fields": {"x": "q", "id": 2}}]));
        assert_eq!(post(&fake, "k4", &same).0, 200);
        assert_eq!(post(&fake, "k5", &batch("b", json!([{"op": "delete", "key": {"id": 1}, "fields": {}}]))).0, 400);
        let records = fake.records("a");
        assert_eq!(records.len(), 1);
        assert_eq!(records[r#"{"id":2}"#], fields_hash(&json!({"id": 2, "x": "q"})));
        let c = &fake.per_sync()["a"];
        assert_eq!((c.requests, c.records, c.creates, c.deletes), (4, 5, 2, 2));
        assert_eq!((c.redundant, c.absent_deletes), (1, 1));
        let t = fake.totals();
        assert_eq!((t.requests, t.replays, t.invalid, t.throttled), (7, 1, 2, 0));
    }

    #[test]
    fn over_the_budget_is_429_with_retry_after() {
        // 5/s with a burst of 5: the first 5 pass at once, the 6th is early by about 200 ms.
        let fake = ThrottledWebhook::start(5.0, Duration::ZERO, 10).unwrap();
        let body = |i: i64| batch("a", json!([{"op": "upsert", "key": {"id": i}, "fields": {}}]));
        for i in 0..5 {
            assert_eq!(post(&fake, &format!("k{i}"), &body(i)).0, 200, "request {i}");
        }
        let (status, retry_after, _) = post(&fake, "k5", &body(5));
        assert_eq!((status, retry_after.as_deref()), (429, Some("1")));
        let t = fake.totals();
        assert_eq!((t.throttled, t.max_in_1s), (1, 6));
        assert!(t.max_early_ms > 100.0 && t.max_early_ms <= 200.0, "{}", t.max_early_ms);
        assert!(fake.records("a").len() == 5);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(post(&fake, "k5", &body(5)).0, 200, "one interval later");
    }

    #[test]
    fn fields_hash_is_the_canonical_value_s() {
        let h = |text: &str| fields_hash(&serde_json::from_str(text).unwrap());
        // Member order, at any depth, does not matter; whitespace neither.
        assert_eq!(h(r#"{"a": 1, "b": {"x": [1, "s"], "y": null}}"#), h(r#"{"b":{"y":null,"x":[1,"s"]},"a":1}"#));
        // Everything else does: each value, its type, nesting, array order.
        let distinct = [
            r#"{"a": 1}"#, r#"{"a": 1.0}"#, r#"{"a": -1}"#, r#"{"a": "1"}"#, r#"{"a": true}"#, r#"{"a": null}"#,
            r#"{"a": [1]}"#, r#"{"a": {"b": 1}}"#, r#"{"b": 1}"#, r#"{"a": 1, "b": 1}"#, r#"{"a": [1, 2]}"#,
            r#"{"a": [2, 1]}"#, r#"{"a": ["x", "y"]}"#, r#"{"a": ["xy"]}"#, r#"{}"#, r#"[]"#,
        ];
        let hashes: std::collections::HashSet<u64> = distinct.iter().map(|t| h(t)).collect();
        assert_eq!(hashes.len(), distinct.len());
    }
}
