//! A strict in-process fake of the `webhook` destination contract.
//!
//! The real connector is meant to follow the contract exactly, so the fake rejects
//! everything the contract forbids instead of being lenient: a lenient fake would let
//! connector bugs pass the end-to-end tests. Every request is journaled (including
//! rejected and scripted ones) so tests can assert on what was actually sent.

use crate::http_util::FakeServer;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use crate::http_server::{Header, Request, Response};

/// A response (or delay) forced onto the next request, ahead of any validation.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// Answer with exactly this; nothing is validated or applied.
    Status {
        status: u16,
        retry_after: Option<String>,
        body: String,
    },
    /// Sleep this long, then process the request normally (for client timeout tests).
    /// Other requests are served meanwhile.
    Delay(Duration),
}

impl Scripted {
    /// Shorthand: that status with body `{"error":"scripted"}` and no Retry-After.
    pub fn status(status: u16) -> Self {
        Scripted::Status {
            status,
            retry_after: None,
            body: json!({ "error": "scripted" }).to_string(),
        }
    }
}

/// One request as the fake saw it and answered it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// When the request arrived (it is journaled once answered, so delayed requests
    /// appear in completion order but keep their arrival time).
    pub at: Instant,
    pub method: String,
    /// The request target as sent, query string included.
    pub path: String,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body if it parsed as JSON.
    pub body: Option<Value>,
    pub status: u16,
    /// True when the answer was a stored response for an already-answered Idempotency-Key.
    pub replayed: bool,
    /// The body as received (invalid UTF-8 replaced): see [`RecordedRequest::raw_body`].
    raw_body: String,
}

impl RecordedRequest {
    /// The body exactly as sent, for what parsing hides (e.g. the digits of a number).
    pub fn raw_body(&self) -> &str {
        &self.raw_body
    }

    /// First value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Per-record veto run before the operation is applied: `Some((status, error))` rejects the record.
pub type RejectionRule = Arc<dyn Fn(&Value) -> Option<(u16, String)> + Send + Sync>;
/// Called after every journaled request (used by the demo receiver to log).
pub type RequestObserver = Arc<dyn Fn(&RecordedRequest) + Send + Sync>;

/// Canonical text of a JSON value: object members sorted at every level. Done by hand
/// rather than relying on `Value::to_string`, because any crate in the build enabling
/// serde_json's `preserve_order` would silently make `to_string` order-sensitive.
pub fn canonical_json(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

#[derive(Default)]
struct State {
    records: BTreeMap<String, Value>,
    creates: HashMap<String, usize>,
    journal: Vec<RecordedRequest>,
    records_sent: usize,
    /// Idempotency-Key → (request body, response body) of requests answered with a 2xx.
    answered: HashMap<String, (Option<Value>, String)>,
    script: VecDeque<Scripted>,
    rule: Option<RejectionRule>,
}

struct Config {
    path: String,
    token: Option<String>,
    max_batch: usize,
    inspection: bool,
    observer: Option<RequestObserver>,
}

struct Shared {
    config: Config,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the journal from the other assertions.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builder for [`FakeWebhook`].
pub struct Builder {
    port: u16,
    config: Config,
}

impl Builder {
    /// Require `Authorization: Bearer <token>`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.config.token = Some(token.into());
        self
    }
    pub fn max_batch(mut self, max: usize) -> Self {
        self.config.max_batch = max;
        self
    }
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.config.path = path.into();
        self
    }
    /// Fixed port on 127.0.0.1 (default 0: OS-assigned).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Also serve `GET /_records` and `GET /_requests` (not journaled, not scripted).
    pub fn inspection_endpoints(mut self, on: bool) -> Self {
        self.config.inspection = on;
        self
    }
    /// Called with every journaled request once it is answered.
    pub fn on_request(mut self, f: impl Fn(&RecordedRequest) + Send + Sync + 'static) -> Self {
        self.config.observer = Some(Arc::new(f));
        self
    }

    pub fn try_start(self) -> io::Result<FakeWebhook> {
        let shared = Arc::new(Shared {
            config: self.config,
            state: Mutex::default(),
        });
        let handler_shared = shared.clone();
        let server = FakeServer::try_start("webhook", self.port, move |request| {
            serve(request, &handler_shared)
        })?;
        Ok(FakeWebhook {
            addr: SocketAddr::from(([127, 0, 0, 1], server.port())),
            shared,
            _server: Arc::new(server),
        })
    }

    /// Starts the server; panics if the port cannot be bound.
    pub fn start(self) -> FakeWebhook {
        self.try_start().expect("fake webhook: cannot start server")
    }
}

/// The running fake. Clones share the same server and state; it stops when the last clone drops.
#[derive(Clone)]
pub struct FakeWebhook {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _server: Arc<FakeServer>,
}

impl FakeWebhook {
    pub fn builder() -> Builder {
        Builder {
            port: 0,
            config: Config {
                path: "/hook".into(),
                token: None,
                max_batch: 1000,
                inspection: false,
                observer: None,
            },
        }
    }

    /// Defaults: OS-assigned port, path `/hook`, no token, batches of at most 1000.
    pub fn start() -> FakeWebhook {
        Self::builder().start()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The destination URL to configure, e.g. `http://127.0.0.1:PORT/hook`.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.shared.config.path)
    }

    /// Current records: canonical key JSON → fields.
    pub fn records(&self) -> BTreeMap<String, Value> {
        self.shared.state().records.clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.state().journal.len()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().journal.clone()
    }

    /// Records carried by requests that were processed (not replayed, not rejected, not scripted).
    pub fn records_sent(&self) -> usize {
        self.shared.state().records_sent
    }

    /// How many times the key was created (by insert or upsert); `key_json` need not be canonical.
    pub fn create_count(&self, key_json: &str) -> usize {
        let key = serde_json::from_str::<Value>(key_json)
            .map_or_else(|_| key_json.to_string(), |v| canonical_json(&v));
        self.shared.state().creates.get(&key).copied().unwrap_or(0)
    }

    /// Seeds a record as if it already existed in the destination (not counted as a create).
    pub fn preload(&self, key: Value, fields: Value) {
        self.shared
            .state()
            .records
            .insert(canonical_json(&key), fields);
    }

    pub fn set_rejection_rule(
        &self,
        rule: impl Fn(&Value) -> Option<(u16, String)> + Send + Sync + 'static,
    ) {
        self.shared.state().rule = Some(Arc::new(rule));
    }

    pub fn clear_rejection_rule(&self) {
        self.shared.state().rule = None;
    }

    /// Queues responses for the next requests, after anything already queued.
    pub fn script(&self, items: Vec<Scripted>) {
        self.shared.state().script.extend(items);
    }

    /// Forgets the journal and `records_sent`; records, create counts and answered
    /// Idempotency-Keys are destination state and are kept.
    pub fn clear_journal(&self) {
        let mut st = self.shared.state();
        st.journal.clear();
        st.records_sent = 0;
    }
}

fn serve(request: Request, shared: &Arc<Shared>) {
    let inspection = request.method().as_str() == "GET"
        && matches!(request.url(), "/_records" | "/_requests");
    if shared.config.inspection && inspection {
        let reply = inspection_reply(shared, request.url());
        let _ = request.respond(reply);
        return;
    }
    // The script is consumed in arrival order, here on the accept thread.
    let scripted = shared.state().script.pop_front();
    if let Some(Scripted::Delay(d)) = scripted {
        // A delayed request runs on its own thread so the connector's retry can be
        // served while the original attempt is still "in flight".
        let shared = shared.clone();
        std::thread::spawn(move || {
            let at = Instant::now();
            std::thread::sleep(d);
            handle(&shared, request, None, at);
        });
    } else {
        handle(shared, request, scripted, Instant::now());
    }
}

fn inspection_reply(shared: &Shared, url: &str) -> Response {
    let st = shared.state();
    let body = if url == "/_records" {
        let mut m = Map::new();
        for (k, v) in &st.records {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    } else {
        json!({ "count": st.journal.len(), "records_sent": st.records_sent })
    };
    json_response(200, &body.to_string())
}

fn json_response(status: u16, body: &str) -> Response {
    Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

fn error(status: u16, msg: impl AsRef<str>) -> (u16, String) {
    (status, json!({ "error": msg.as_ref() }).to_string())
}

fn handle(shared: &Shared, mut request: Request, scripted: Option<Scripted>, at: Instant) {
    let method = request.method().to_string();
    let path = request.url().to_string();
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().to_ascii_lowercase(),
                h.value.as_str().to_string(),
            )
        })
        .collect();
    let mut raw = Vec::new();
    let read_ok = request.as_reader().read_to_end(&mut raw).is_ok();
    let body: Option<Value> = serde_json::from_slice(&raw).ok();

    let mut recorded = RecordedRequest {
        at,
        method,
        path,
        headers,
        body,
        status: 0,
        replayed: false,
        raw_body: String::from_utf8_lossy(&raw).into_owned(),
    };
    let mut extra_headers = Vec::new();
    let (status, text) = match scripted {
        Some(Scripted::Status {
            status,
            retry_after,
            body,
        }) => {
            if let Some(ra) = retry_after {
                extra_headers.push(header("Retry-After", &ra));
            }
            (status, body)
        }
        _ if !read_ok => error(400, "could not read the request body"),
        _ => {
            let (status, text, allow) = respond(shared, &mut recorded, &raw);
            if allow {
                extra_headers.push(header("Allow", "POST"));
            }
            (status, text)
        }
    };
    recorded.status = status;
    let observer = {
        let mut st = shared.state();
        st.journal.push(recorded.clone());
        shared.config.observer.clone()
    };
    if let Some(obs) = observer {
        obs(&recorded);
    }
    let mut response = json_response(status, &text);
    if serde_json::from_str::<Value>(&text).is_err() {
        // Scripted bodies may be plain text ("internal error"), as real gateways send.
        response.add_header(header("Content-Type", "text/plain"));
    }
    for h in extra_headers {
        response.add_header(h);
    }
    // The client may have given up (timeout tests); that is not the fake's problem.
    let _ = request.respond(response);
}

/// Applies the contract to one unscripted request. Returns (status, body, send Allow header).
fn respond(shared: &Shared, rec: &mut RecordedRequest, raw: &[u8]) -> (u16, String, bool) {
    let cfg = &shared.config;
    let route = rec.path.split('?').next().unwrap_or_default();
    if route != cfg.path {
        let (s, b) = error(404, format!("no such path {route}"));
        return (s, b, false);
    }
    if rec.method != "POST" {
        let (s, b) = error(405, format!("method {} not allowed", rec.method));
        return (s, b, true);
    }
    let (s, b) = check(shared, rec, raw);
    (s, b, false)
}

fn check(shared: &Shared, rec: &mut RecordedRequest, raw: &[u8]) -> (u16, String) {
    let cfg = &shared.config;
    if let Some(token) = &cfg.token {
        if rec.header("authorization") != Some(format!("Bearer {token}").as_str()) {
            return error(401, "invalid token");
        }
    }
    let media_type = rec.header("content-type").map(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    if media_type.as_deref() != Some("application/json") {
        return error(415, "Content-Type must be application/json");
    }
    let key = match rec.header("idempotency-key") {
        Some(k) if !k.trim().is_empty() => k.to_string(),
        _ => return error(400, "missing Idempotency-Key header"),
    };

    let mut st = shared.state();
    if let Some((stored_body, stored_response)) = st.answered.get(&key) {
        // Reusing a key for a different batch would make the destination drop the new
        // changes silently, so that is a connector bug the fake must surface.
        if *stored_body != rec.body {
            return error(422, "Idempotency-Key reused with a different body");
        }
        rec.replayed = true;
        return (200, stored_response.clone());
    }

    let records = match rec
        .body
        .as_ref()
        .ok_or_else(|| invalid_json(raw))
        .and_then(|b| validate(b, cfg.max_batch))
    {
        Ok(r) => r,
        Err(e) => return e,
    };
    let rule = st.rule.clone();
    let results: Vec<Value> = records
        .iter()
        .map(|r| apply(&mut st, rule.as_ref(), r))
        .collect();
    st.records_sent += records.len();
    let response = json!({ "results": results }).to_string();
    st.answered
        .insert(key, (rec.body.clone(), response.clone()));
    (200, response)
}

fn invalid_json(raw: &[u8]) -> (u16, String) {
    match serde_json::from_slice::<Value>(raw) {
        Err(e) => error(400, format!("body is not valid JSON: {e}")),
        Ok(_) => error(400, "body is not valid JSON"),
    }
}

/// Whole-request validation: any violation rejects the request before anything is applied.
fn validate(body: &Value, max_batch: usize) -> Result<Vec<Value>, (u16, String)> {
    let bad = |msg: String| Err(error(400, msg));
    let Some(obj) = body.as_object() else {
        return bad("body must be a JSON object".into());
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "sync" | "run_id" | "records"))
    {
        return bad(format!("unknown member {k:?} in body"));
    }
    if !obj.get("sync").is_some_and(Value::is_string) {
        return bad("sync must be a string".into());
    }
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
        return Err(error(
            413,
            format!(
                "batch of {} records exceeds the limit of {max_batch}",
                records.len()
            ),
        ));
    }
    for (i, r) in records.iter().enumerate() {
        if let Err(msg) = validate_record(r) {
            return bad(format!("records[{i}]: {msg}"));
        }
    }
    Ok(records.clone())
}

fn validate_record(r: &Value) -> Result<(), String> {
    let obj = r.as_object().ok_or("record must be a JSON object")?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "op" | "key" | "fields"))
    {
        return Err(format!("unknown member {k:?}"));
    }
    let op = obj
        .get("op")
        .and_then(Value::as_str)
        .ok_or("op must be a string")?;
    if !matches!(op, "insert" | "update" | "upsert" | "delete") {
        return Err(format!("unknown op {op:?}"));
    }
    match obj.get("key").and_then(Value::as_object) {
        Some(k) if !k.is_empty() => {}
        _ => return Err("key must be a non-empty JSON object".into()),
    }
    match (op, obj.get("fields")) {
        ("delete", Some(_)) => Err("fields is forbidden for delete".into()),
        ("delete", None) => Ok(()),
        (_, Some(Value::Object(_))) => Ok(()),
        (_, _) => Err(format!("fields must be a JSON object for {op}")),
    }
}

fn apply(st: &mut State, rule: Option<&RejectionRule>, r: &Value) -> Value {
    if let Some((status, msg)) = rule.and_then(|f| f(r)) {
        return json!({ "status": status, "error": msg });
    }
    let key = canonical_json(&r["key"]);
    let fields = r.get("fields").cloned();
    let present = st.records.contains_key(&key);
    let (status, err) = match (r["op"].as_str().unwrap_or_default(), fields) {
        ("insert", _) if present => (409, Some("record already exists")),
        ("update", _) if !present => (404, Some("record not found")),
        ("update" | "upsert", Some(f)) if present => {
            st.records.insert(key, f);
            (200, None)
        }
        ("insert" | "upsert", Some(f)) => {
            *st.creates.entry(key.clone()).or_default() += 1;
            st.records.insert(key, f);
            (201, None)
        }
        _ => {
            // Deletes are idempotent: a missing record is already deleted.
            st.records.remove(&key);
            (204, None)
        }
    };
    match err {
        Some(e) => json!({ "status": status, "error": e }),
        None => json!({ "status": status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::{send, Reply};

    /// `127.0.0.1:PORT`, where [`send`] reaches the fake.
    fn addr(fake: &FakeWebhook) -> String {
        fake.addr().to_string()
    }

    fn post(fake: &FakeWebhook, idem: &str, body: &Value) -> Reply {
        send(
            &addr(fake),
            "POST",
            "/hook",
            &[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", idem),
            ],
            &body.to_string(),
        )
    }

    fn batch(records: Value) -> Value {
        json!({ "sync": "s1", "run_id": 7, "records": records })
    }

    fn statuses(r: &Reply) -> Vec<u64> {
        r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["status"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn valid_upsert_batch_creates_and_replaces() {
        let fake = FakeWebhook::start();
        fake.preload(json!({"id": 2}), json!({"name": "old"}));
        let r = post(
            &fake,
            "k1",
            &batch(json!([
                {"op": "upsert", "key": {"id": 1}, "fields": {"name": "a"}},
                {"op": "upsert", "key": {"id": 2}, "fields": {"name": "b"}},
            ])),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(statuses(&r), [201, 200]);
        let recs = fake.records();
        assert_eq!(recs[r#"{"id":1}"#], json!({"name": "a"}));
        assert_eq!(recs[r#"{"id":2}"#], json!({"name": "b"}));
        assert_eq!(fake.records_sent(), 2);
        assert_eq!(fake.create_count(r#"{ "id": 1 }"#), 1);
        assert_eq!(fake.create_count(r#"{"id":2}"#), 0);
        let journal = fake.requests();
        assert_eq!(journal.len(), 1);
        assert_eq!(journal[0].header("Idempotency-Key"), Some("k1"));
        assert!(!journal[0].replayed);
    }

    #[test]
    fn missing_idempotency_key_is_rejected_and_nothing_applied() {
        let fake = FakeWebhook::start();
        let body = batch(json!([{"op": "upsert", "key": {"id": 1}, "fields": {}}]));
        let r = send(
            &addr(&fake),
            "POST",
            "/hook",
            &[("Content-Type", "application/json")],
            &body.to_string(),
        );
        assert_eq!(r.status, 400);
        assert_eq!(r.json(), json!({"error": "missing Idempotency-Key header"}));
        assert!(fake.records().is_empty());
        assert_eq!(fake.records_sent(), 0);
        assert_eq!(fake.request_count(), 1);
    }

    #[test]
    fn token_must_match_exactly() {
        let fake = FakeWebhook::builder().token("t0p").start();
        let body = batch(json!([{"op": "upsert", "key": {"id": 1}, "fields": {}}])).to_string();
        for auth in ["Bearer wrong", "bearer t0p", "t0p", "Bearer t0p2"] {
            let r = send(
                &addr(&fake),
                "POST",
                "/hook",
                &[
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", "k"),
                    ("Authorization", auth),
                ],
                &body,
            );
            assert_eq!(r.status, 401, "{auth:?}");
            assert_eq!(r.json(), json!({"error": "invalid token"}));
        }
        assert!(fake.records().is_empty());
        let r = send(
            &addr(&fake),
            "POST",
            "/hook",
            &[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "k"),
                ("Authorization", "Bearer t0p"),
            ],
            &body,
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }

    #[test]
    fn routing_and_content_type() {
        let fake = FakeWebhook::start();
        assert_eq!(send(&addr(&fake), "POST", "/other", &[], "").status, 404);
        let r = send(&addr(&fake), "GET", "/hook", &[], "");
        assert_eq!((r.status, r.header("Allow")), (405, Some("POST")));
        let r = send(
            &addr(&fake),
            "POST",
            "/hook",
            &[("Content-Type", "text/plain"), ("Idempotency-Key", "k")],
            "{}",
        );
        assert_eq!(r.status, 415);
        // Inspection endpoints are off unless asked for.
        assert_eq!(send(&addr(&fake), "GET", "/_records", &[], "").status, 404);
    }

    #[test]
    fn batch_over_the_limit_is_413() {
        let fake = FakeWebhook::builder().max_batch(2).start();
        let rec = json!({"op": "upsert", "key": {"id": 1}, "fields": {}});
        let r = post(&fake, "k", &batch(json!([rec, rec, rec])));
        assert_eq!(r.status, 413);
        assert_eq!(
            r.json(),
            json!({"error": "batch of 3 records exceeds the limit of 2"})
        );
        assert!(fake.records().is_empty());
    }

    #[test]
    fn malformed_batches_are_rejected_whole() {
        let fake = FakeWebhook::start();
        let good = json!({"op": "upsert", "key": {"id": 1}, "fields": {"a": 1}});
        let cases = [
            batch(json!([good, {"op": "delete", "key": {"id": 2}, "fields": {}}])),
            batch(json!([good, {"op": "insert", "key": {"id": 2}}])),
            batch(json!([good, {"op": "upsert", "key": {}, "fields": {}}])),
            batch(json!([good, {"op": "merge", "key": {"id": 2}, "fields": {}}])),
            batch(json!([good, {"op": "upsert", "key": {"id": 2}, "fields": {}, "extra": 1}])),
            batch(json!([])),
            json!({"sync": "s", "run_id": "7", "records": [good]}),
            json!({"run_id": 7, "records": [good]}),
        ];
        for (i, body) in cases.iter().enumerate() {
            let r = post(&fake, &format!("k{i}"), body);
            assert_eq!(r.status, 400, "case {i}: {}", r.body);
            assert!(r.json()["error"].is_string());
        }
        assert_eq!(post(&fake, "bad", &json!([1])).status, 400);
        let r = send(
            &addr(&fake),
            "POST",
            "/hook",
            &[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "k"),
            ],
            "{not json",
        );
        assert_eq!(r.status, 400);
        assert!(fake.records().is_empty());
        assert_eq!(fake.records_sent(), 0);
        let r = post(
            &fake,
            "k0",
            &batch(json!([{"op": "delete", "key": {"id": 2}, "fields": {}}])),
        );
        assert_eq!(
            r.json(),
            json!({"error": "records[0]: fields is forbidden for delete"})
        );
    }

    #[test]
    fn replay_returns_stored_response_without_reapplying() {
        let fake = FakeWebhook::start();
        let body = batch(json!([{"op": "insert", "key": {"id": 1}, "fields": {"v": 1}}]));
        let first = post(&fake, "same", &body);
        assert_eq!(statuses(&first), [201]);
        let again = post(&fake, "same", &body);
        assert_eq!(
            (again.status, again.body.as_str()),
            (200, first.body.as_str())
        );
        assert_eq!(fake.create_count(r#"{"id":1}"#), 1);
        assert_eq!(fake.records_sent(), 1);
        let replayed: Vec<bool> = fake.requests().iter().map(|r| r.replayed).collect();
        assert_eq!(replayed, [false, true]);
        // Same key, different batch: a connector bug, not a replay.
        let other = batch(json!([{"op": "insert", "key": {"id": 9}, "fields": {}}]));
        assert_eq!(post(&fake, "same", &other).status, 422);
        assert_eq!(fake.records().len(), 1);
    }

    #[test]
    fn scripted_429_then_normal_processing() {
        let fake = FakeWebhook::start();
        fake.script(vec![Scripted::Status {
            status: 429,
            retry_after: Some("2".into()),
            body: r#"{"error":"slow down"}"#.into(),
        }]);
        let body = batch(json!([{"op": "upsert", "key": {"id": 1}, "fields": {}}]));
        let r = post(&fake, "k", &body);
        assert_eq!((r.status, r.header("Retry-After")), (429, Some("2")));
        assert_eq!(r.json(), json!({"error": "slow down"}));
        assert!(fake.records().is_empty());
        let r = post(&fake, "k", &body);
        assert_eq!(statuses(&r), [201]);
        assert_eq!(
            fake.requests().iter().map(|r| r.status).collect::<Vec<_>>(),
            [429, 200]
        );
        assert_eq!(fake.records_sent(), 1);
        fake.script(vec![Scripted::Status {
            status: 500,
            retry_after: None,
            body: "internal error".into(),
        }]);
        let r = post(&fake, "k2", &body);
        assert_eq!(
            (r.status, r.header("Content-Type"), r.body.as_str()),
            (500, Some("text/plain"), "internal error")
        );
    }

    #[test]
    fn scripted_delay_does_not_block_other_requests() {
        let fake = FakeWebhook::start();
        fake.script(vec![Scripted::Delay(Duration::from_millis(500))]);
        let body = batch(json!([{"op": "upsert", "key": {"id": 1}, "fields": {}}]));
        // Whichever request arrives first is delayed; the other (a "retry" with the same
        // key) must be answered meanwhile, so the delayed one completes last, as a replay.
        let send_one = || {
            let (fake, body) = (fake.clone(), body.clone());
            std::thread::spawn(move || post(&fake, "k", &body))
        };
        let first = send_one();
        std::thread::sleep(Duration::from_millis(50));
        let second = send_one();
        for t in [first, second] {
            assert_eq!(statuses(&t.join().unwrap()), [201]);
        }
        let journal = fake.requests();
        assert_eq!(
            journal.iter().map(|r| r.replayed).collect::<Vec<_>>(),
            [false, true]
        );
        assert_eq!(fake.create_count(r#"{"id":1}"#), 1);
        assert_eq!(fake.records_sent(), 1);
    }

    #[test]
    fn per_record_outcomes() {
        let fake = FakeWebhook::start();
        fake.preload(json!({"id": 1}), json!({"email": "a@x"}));
        fake.set_rejection_rule(|r| {
            let email = r["fields"]["email"].as_str()?;
            (!email.contains('@')).then(|| (422, "email is invalid".to_string()))
        });
        let r = post(
            &fake,
            "k",
            &batch(json!([
                {"op": "insert", "key": {"id": 1}, "fields": {"email": "b@x"}},
                {"op": "update", "key": {"id": 2}, "fields": {"email": "c@x"}},
                {"op": "insert", "key": {"id": 3}, "fields": {"email": "nope"}},
                {"op": "delete", "key": {"id": 4}},
                {"op": "delete", "key": {"id": 1}},
            ])),
        );
        assert_eq!(
            r.json(),
            json!({"results": [
                {"status": 409, "error": "record already exists"},
                {"status": 404, "error": "record not found"},
                {"status": 422, "error": "email is invalid"},
                {"status": 204},
                {"status": 204},
            ]})
        );
        assert!(fake.records().is_empty());
        assert_eq!(fake.create_count(r#"{"id":3}"#), 0);
    }

    #[test]
    fn inspection_endpoints_and_observer() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fake = {
            let seen = seen.clone();
            FakeWebhook::builder()
                .inspection_endpoints(true)
                .on_request(move |r| seen.lock().unwrap().push(r.status))
                .start()
        };
        post(
            &fake,
            "k",
            &batch(json!([{"op": "upsert", "key": {"b": 1, "a": 2}, "fields": {"x": 1}}])),
        );
        assert_eq!(
            send(&addr(&fake), "GET", "/_records", &[], "").json(),
            json!({r#"{"a":2,"b":1}"#: {"x": 1}})
        );
        assert_eq!(
            send(&addr(&fake), "GET", "/_requests", &[], "").json(),
            json!({"count": 1, "records_sent": 1})
        );
        assert_eq!(*seen.lock().unwrap(), [200]);
        assert_eq!(fake.request_count(), 1);
    }
}
