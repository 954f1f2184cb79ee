//! A strict local fake of the parts of HubSpot's CRM v3 API that the `hubspot` connector uses:
//!
//! * `GET  /crm/v3/properties/{objectType}` — the object's property definitions;
//! * `POST /crm/v3/objects/{objectType}/batch/upsert` — create or update up to 100 records
//!   matched on a unique property (`idProperty`);
//! * `POST /crm/v3/objects/{objectType}/batch/archive` — archive up to 100 records by HubSpot id;
//! * `POST /crm/v3/objects/{objectType}/batch/read` — read up to 100 live records by HubSpot id
//!   or by the value of a unique property (`idProperty`);
//! * `POST /oauth/v1/token` — the OAuth `refresh_token` grant.
//!
//! Strictness: a request the real API would refuse is refused here too, with HubSpot's status
//! codes and error shapes — a lenient fake would let connector bugs through the end-to-end
//! tests. API calls need `Authorization: Bearer <token>` (401 `INVALID_AUTHENTICATION`, or
//! `EXPIRED_AUTHENTICATION` after [`FakeHubSpot::expire_token`]); POST bodies must be
//! `application/json` (415) and follow the OpenAPI schema exactly — unknown members, missing
//! required members, non-string property values, more than 100 inputs, duplicate upsert ids,
//! unknown or read-only properties and an `idProperty` that is not a unique property all get a
//! whole-request 400 `VALIDATION_ERROR`. Bad property *values* (email, number, enumeration
//! option, datetime, bool) refuse only their own record: the others are applied and the answer
//! is 207 with `errors`. Upsert results come back updated-first, then created, and read results
//! in HubSpot id order, so a client that assumes input order is caught. A read that misses some
//! ids is a 207 with one `OBJECT_NOT_FOUND` error listing them all. Rate limiting
//! (`TEN_SECONDLY_ROLLING`) is scriptable. Every request, refused or not, is journaled in
//! [`FakeHubSpot::calls`].
//!
//! Not modelled: search, reading archived records (`archived=true`), associations, property
//! history (`propertiesWithHistory` must be empty), email case-folding, and the
//! `authorization_code` grant. A read request asking for them is refused with a 400 that says so,
//! rather than answered wrongly.

use crate::http_util::{form_fields, request_header, FakeServer};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use crate::http_server::{Header, Request, Response};

/// HubSpot's documented limit for every batch endpoint.
const MAX_BATCH: usize = 100;
/// The `TEN_SECONDLY_ROLLING` window.
const WINDOW: Duration = Duration::from_secs(10);
/// Advertised in `X-HubSpot-RateLimit-Max` when no limit is enforced (a private app's default).
const DEFAULT_MAX: usize = 100;
const TOKEN_PATH: &str = "/oauth/v1/token";
/// The creation / last-modification stamp properties: contacts say `createdate`, custom objects
/// `hs_createdate`; the first one an object defines is the one it uses.
const CREATED: [&str; 2] = ["createdate", "hs_createdate"];
const MODIFIED: [&str; 2] = ["lastmodifieddate", "hs_lastmodifieddate"];
const LIFECYCLE_STAGES: [(&str, &str); 8] = [
    ("subscriber", "Subscriber"),
    ("lead", "Lead"),
    ("marketingqualifiedlead", "Marketing Qualified Lead"),
    ("salesqualifiedlead", "Sales Qualified Lead"),
    ("opportunity", "Opportunity"),
    ("customer", "Customer"),
    ("evangelist", "Evangelist"),
    ("other", "Other"),
];

/// One request as the fake saw it and answered it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The request target as sent, query string included.
    pub path: String,
    pub status: u16,
    /// The body parsed as JSON; for the token endpoint, the form fields as a JSON object with
    /// `client_secret` and `refresh_token` masked as `"***"`.
    pub body: Option<Value>,
}

/// A property definition. `kind` is HubSpot's property `type`: "string", "number",
/// "enumeration", "datetime" or "bool".
#[derive(Clone, Debug)]
pub struct PropertySpec {
    pub name: String,
    pub kind: String,
    pub read_only: bool,
    pub unique: bool,
}

fn spec(name: &str, kind: &str, read_only: bool, unique: bool) -> PropertySpec {
    PropertySpec {
        name: name.into(),
        kind: kind.into(),
        read_only,
        unique,
    }
}

/// A property plus what [`PropertySpec`] cannot say: the allowed options of an enumeration
/// (empty = not checked, which is the case for enumerations declared through `add_object`).
struct Property {
    spec: PropertySpec,
    options: Vec<(String, String)>,
}

struct Record {
    properties: Map<String, Value>,
    created_at: String,
    updated_at: String,
}

struct ObjectType {
    group: String,
    properties: Vec<Property>,
    /// Live records by HubSpot id.
    records: BTreeMap<String, Record>,
    archived: Vec<String>,
}

impl ObjectType {
    fn new(group: &str, specs: Vec<PropertySpec>) -> ObjectType {
        let properties = specs
            .into_iter()
            .map(|spec| {
                let options = match (spec.name.as_str(), spec.kind.as_str()) {
                    ("lifecyclestage", "enumeration") => LIFECYCLE_STAGES
                        .iter()
                        .map(|(v, l)| (v.to_string(), l.to_string()))
                        .collect(),
                    (_, "bool") => {
                        vec![("true".into(), "Yes".into()), ("false".into(), "No".into())]
                    }
                    _ => Vec::new(),
                };
                Property { spec, options }
            })
            .collect();
        ObjectType {
            group: group.into(),
            properties,
            records: BTreeMap::new(),
            archived: Vec::new(),
        }
    }

    fn property(&self, name: &str) -> Option<&Property> {
        self.properties.iter().find(|p| p.spec.name == name)
    }

    /// The live record whose `property` equals `value`.
    fn find(&self, property: &str, value: &str) -> Option<String> {
        self.records
            .iter()
            .find(|(_, r)| r.properties.get(property).and_then(Value::as_str) == Some(value))
            .map(|(id, _)| id.clone())
    }

    /// Sets the first of `names` the object defines (contacts say `createdate`, custom objects
    /// `hs_createdate`).
    fn stamp(&self, props: &mut Map<String, Value>, names: &[&str], value: &str) {
        if let Some(name) = self.first_defined(names) {
            props.insert(name.to_string(), Value::String(value.into()));
        }
    }

    fn first_defined<'a>(&self, names: &[&'a str]) -> Option<&'a str> {
        names.iter().copied().find(|n| self.property(n).is_some())
    }
}

struct State {
    objects: BTreeMap<String, ObjectType>,
    /// Object type ids (`0-1`) → names (`contacts`).
    aliases: HashMap<String, String>,
    next_id: u64,
    calls: Vec<Call>,
    throttle_next: usize,
    rolling_limit: Option<usize>,
    /// Arrival times of the API requests admitted in the current window.
    window: VecDeque<Instant>,
    valid_tokens: HashSet<String>,
    /// Expired token → when it expired (HubSpot says how long ago).
    expired_tokens: HashMap<String, Instant>,
    /// (client_id, client_secret, refresh_token)
    oauth: Option<(String, String, String)>,
    token_calls: usize,
}

pub struct FakeHubSpot {
    state: Arc<Mutex<State>>,
    server: FakeServer,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not hide the journal from the other assertions.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeHubSpot {
    /// Starts the fake on 127.0.0.1 with `token` as the one valid access token.
    pub fn start(token: &str) -> FakeHubSpot {
        let mut objects = BTreeMap::new();
        objects.insert(
            "contacts".to_string(),
            ObjectType::new(
                "contactinformation",
                vec![
                    spec("email", "string", false, true),
                    spec("firstname", "string", false, false),
                    spec("lastname", "string", false, false),
                    spec("phone", "string", false, false),
                    spec("lifecyclestage", "enumeration", false, false),
                    spec("health_score", "number", false, false),
                    spec("hs_object_id", "number", true, false),
                    spec("createdate", "datetime", true, false),
                    spec("lastmodifieddate", "datetime", true, false),
                ],
            ),
        );
        objects.insert(
            "companies".to_string(),
            ObjectType::new(
                "companyinformation",
                vec![
                    spec("domain", "string", false, true),
                    spec("name", "string", false, false),
                    spec("industry", "string", false, false),
                    spec("annualrevenue", "number", false, false),
                    spec("hs_object_id", "number", true, false),
                    spec("createdate", "datetime", true, false),
                    spec("hs_lastmodifieddate", "datetime", true, false),
                ],
            ),
        );
        let aliases = [("0-1", "contacts"), ("0-2", "companies")]
            .into_iter()
            .map(|(a, n)| (a.to_string(), n.to_string()))
            .collect();
        let state = Arc::new(Mutex::new(State {
            objects,
            aliases,
            next_id: 1001,
            calls: Vec::new(),
            throttle_next: 0,
            rolling_limit: None,
            window: VecDeque::new(),
            valid_tokens: HashSet::from([token.to_string()]),
            expired_tokens: HashMap::new(),
            oauth: None,
            token_calls: 0,
        }));
        let handler_state = state.clone();
        let server = FakeServer::start("HubSpot", move |request| serve(request, &handler_state));
        FakeHubSpot { state, server }
    }

    /// `http://127.0.0.1:PORT`, to use in place of `https://api.hubapi.com`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Defines (or redefines the properties of) a custom object type such as `p_accounts` or
    /// `2-123456`. `hs_object_id`, `hs_createdate` and `hs_lastmodifieddate` are added
    /// read-only when not given, as HubSpot defines them on every custom object.
    pub fn add_object(&self, object_type: &str, properties: Vec<PropertySpec>) {
        let mut properties = properties;
        for (name, kind) in [
            ("hs_object_id", "number"),
            ("hs_createdate", "datetime"),
            ("hs_lastmodifieddate", "datetime"),
        ] {
            if !properties.iter().any(|p| p.name == name) {
                properties.push(spec(name, kind, true, false));
            }
        }
        let mut st = lock(&self.state);
        let mut object = ObjectType::new(&format!("{object_type}_information"), properties);
        if let Some(old) = st.objects.remove(object_type) {
            object.records = old.records;
            object.archived = old.archived;
        }
        st.objects.insert(object_type.to_string(), object);
    }

    /// Live (not archived) records of an object type: HubSpot id → properties (string values).
    pub fn objects(&self, object_type: &str) -> BTreeMap<String, Value> {
        let st = lock(&self.state);
        resolve(&st, object_type)
            .map(|name| {
                st.objects[&name]
                    .records
                    .iter()
                    .map(|(id, r)| (id.clone(), Value::Object(r.properties.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// HubSpot ids archived, in archive order.
    pub fn archived(&self, object_type: &str) -> Vec<String> {
        let st = lock(&self.state);
        resolve(&st, object_type)
            .map(|name| st.objects[&name].archived.clone())
            .unwrap_or_default()
    }

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state).calls.clone()
    }

    pub fn clear_calls(&self) {
        lock(&self.state).calls.clear();
    }

    /// The next `n` API requests (not token requests) get HubSpot's ten-secondly 429.
    pub fn throttle_next(&self, n: usize) {
        lock(&self.state).throttle_next = n;
    }

    /// Enforces at most `max_per_10s` API requests in any rolling 10 s. Only admitted requests
    /// count, so a client that waits out the window always gets through again.
    pub fn set_rolling_limit(&self, max_per_10s: usize) {
        lock(&self.state).rolling_limit = Some(max_per_10s);
    }

    /// Accepts the `refresh_token` grant for these credentials.
    pub fn configure_oauth(&self, client_id: &str, client_secret: &str, refresh_token: &str) {
        lock(&self.state).oauth =
            Some((client_id.into(), client_secret.into(), refresh_token.into()));
    }

    /// Every access token valid so far now answers 401 `EXPIRED_AUTHENTICATION`; only a token
    /// obtained afterwards from `/oauth/v1/token` works.
    pub fn expire_token(&self) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let tokens: Vec<String> = st.valid_tokens.drain().collect();
        st.expired_tokens
            .extend(tokens.into_iter().map(|t| (t, now)));
    }

    /// POST `/oauth/v1/token` requests received, successful or not.
    pub fn token_calls(&self) -> usize {
        lock(&self.state).token_calls
    }
}

/// The object name for a path segment: a name, or a built-in object type id.
fn resolve(st: &State, object_type: &str) -> Option<String> {
    let name = st
        .aliases
        .get(object_type)
        .map_or(object_type, String::as_str);
    st.objects.contains_key(name).then(|| name.to_string())
}

// ---------------------------------------------------------------------------------------------
// Small helpers: randomness, time, HubSpot error bodies, forms.

fn random_u64() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64: enough to make ids look unrelated; nothing here needs real randomness.
    let mut z = nanos ^ SEQ.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A version-4-shaped UUID, as HubSpot's `correlationId`.
fn correlation_id() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// Milliseconds since the epoch as ISO 8601 UTC with milliseconds, HubSpot's timestamp format.
fn iso(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn iso_now() -> String {
    iso(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}

type Outcome = (u16, Option<Value>);

/// HubSpot's error body for API calls.
fn hs_error(status: u16, category: &str, message: impl Into<String>) -> Outcome {
    let message = message.into();
    (
        status,
        Some(
            json!({"status": "error", "message": message, "correlationId": correlation_id(), "category": category}),
        ),
    )
}

/// A schema violation, in the words HubSpot's JSON deserializer uses.
fn invalid_json(detail: impl std::fmt::Display) -> Outcome {
    hs_error(
        400,
        "VALIDATION_ERROR",
        format!("Invalid input JSON on line 1: {detail}"),
    )
}

/// One property problem: the `Property values were not valid` list item and the `errors` entry.
struct PropertyProblem {
    name: String,
    code: &'static str,
    message: String,
}

impl PropertyProblem {
    fn new(name: &str, code: &'static str, message: String) -> Self {
        PropertyProblem {
            name: name.into(),
            code,
            message,
        }
    }
}

/// HubSpot's message for property problems embeds a JSON list of them.
fn problems_message(problems: &[PropertyProblem]) -> String {
    let list: Vec<Value> = problems
        .iter()
        .map(|p| {
            json!({"isValid": false, "message": p.message, "error": p.code, "name": p.name, "localizedErrorMessage": p.message})
        })
        .collect();
    format!("Property values were not valid: {}", Value::Array(list))
}

/// The whole-request 400 for property problems (unknown or read-only properties).
fn problems_error(problems: &[PropertyProblem]) -> Outcome {
    let (status, mut body) = hs_error(400, "VALIDATION_ERROR", problems_message(problems));
    if let Some(body) = body.as_mut() {
        body["errors"] = Value::Array(problems_details(problems));
    }
    (status, body)
}

fn problems_details(problems: &[PropertyProblem]) -> Vec<Value> {
    problems
        .iter()
        .map(|p| json!({"message": p.message, "code": p.code, "in": p.name, "context": {"propertyName": [p.name]}}))
        .collect()
}

fn media_type_is(content_type: Option<&str>, expected: &str) -> bool {
    content_type.is_some_and(|c| {
        c.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case(expected)
    })
}

/// `application/x-www-form-urlencoded` fields, first occurrence wins (as servlet containers do).
fn parse_form(body: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for (k, v) in form_fields(body) {
        if !fields.iter().any(|(n, _)| *n == k) {
            fields.push((k, v));
        }
    }
    fields
}

// ---------------------------------------------------------------------------------------------
// Request handling.

struct Incoming {
    method: String,
    /// The path without the query string.
    route: String,
    /// The query string, without the `?` ("" when there is none).
    query: String,
    content_type: Option<String>,
    authorization: Option<String>,
    raw: Vec<u8>,
}

fn serve(mut request: Request, state: &Mutex<State>) {
    let method = request.method().as_str().to_string();
    let path = request.url().to_string();
    let mut raw = Vec::new();
    let read_ok = request.as_reader().read_to_end(&mut raw).is_ok();
    let incoming = Incoming {
        method: method.clone(),
        route: path.split('?').next().unwrap_or_default().to_string(),
        query: path.split_once('?').map_or("", |(_, q)| q).to_string(),
        content_type: request_header(&request, "Content-Type"),
        authorization: request_header(&request, "Authorization"),
        raw,
    };
    let mut st = lock(state);
    let (status, reply, headers, recorded) = if incoming.route == TOKEN_PATH {
        let (status, reply, recorded) = token_endpoint(&mut st, &incoming);
        (status, reply, Vec::new(), recorded)
    } else {
        let recorded = serde_json::from_slice(&incoming.raw).ok();
        let (status, reply, headers) = if read_ok {
            api_request(&mut st, &incoming)
        } else {
            let (s, r) = hs_error(400, "VALIDATION_ERROR", "could not read the request body");
            (s, r, Vec::new())
        };
        (status, reply, headers, recorded)
    };
    st.calls.push(Call {
        method,
        path,
        status,
        body: recorded,
    });
    drop(st);
    let mut response = Response::from_string(reply.map(|r| r.to_string()).unwrap_or_default())
        .with_status_code(status);
    if status != 204 {
        response.add_header(
            Header::from_bytes("Content-Type", "application/json;charset=utf-8").unwrap(),
        );
    }
    for (name, value) in headers {
        response.add_header(Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap());
    }
    // The client may have given up; that is not the fake's problem.
    let _ = request.respond(response);
}

fn rate_headers(max: usize, remaining: usize) -> Vec<(String, String)> {
    vec![
        (
            "X-HubSpot-RateLimit-Interval-Milliseconds".into(),
            WINDOW.as_millis().to_string(),
        ),
        ("X-HubSpot-RateLimit-Max".into(), max.to_string()),
        (
            "X-HubSpot-RateLimit-Remaining".into(),
            remaining.to_string(),
        ),
    ]
}

/// Rate limiting first (HubSpot throttles before looking at the request), then the API proper.
fn api_request(st: &mut State, req: &Incoming) -> (u16, Option<Value>, Vec<(String, String)>) {
    let now = Instant::now();
    while st
        .window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= WINDOW)
    {
        st.window.pop_front();
    }
    let max = st.rolling_limit.unwrap_or(DEFAULT_MAX);
    let over_limit = st
        .rolling_limit
        .is_some_and(|limit| st.window.len() >= limit);
    if st.throttle_next > 0 || over_limit {
        st.throttle_next = st.throttle_next.saturating_sub(1);
        let body = json!({
            "status": "error",
            "message": "You have reached your ten_secondly_rolling limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": correlation_id(),
            "policyName": "TEN_SECONDLY_ROLLING",
            "groupName": "private-app:fake-hubspot",
        });
        return (429, Some(body), rate_headers(max, 0));
    }
    st.window.push_back(now);
    let remaining = match st.rolling_limit {
        Some(limit) => limit.saturating_sub(st.window.len()),
        // Nothing is ever refused with the limit off, so never advertise 0 (a client that
        // backs off on Remaining: 0 would slow down for no reason).
        None => DEFAULT_MAX.saturating_sub(st.window.len()).max(1),
    };
    let (status, body) = api(st, req);
    (status, body, rate_headers(max, remaining))
}

fn authenticate(st: &State, authorization: Option<&str>) -> Result<(), Outcome> {
    // The auth scheme is case-insensitive (RFC 7235); the token is not.
    let token = authorization
        .and_then(|a| a.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, token)| token.trim());
    match token {
        Some(t) if st.valid_tokens.contains(t) => Ok(()),
        Some(t) if st.expired_tokens.contains_key(t) => {
            let ago = st.expired_tokens[t].elapsed().as_secs();
            Err(hs_error(
                401,
                "EXPIRED_AUTHENTICATION",
                format!("The OAuth token used to make this call expired {ago} second(s) ago."),
            ))
        }
        _ => Err(hs_error(
            401,
            "INVALID_AUTHENTICATION",
            "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find \
             more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
        )),
    }
}

fn api(st: &mut State, req: &Incoming) -> Outcome {
    if let Err(refused) = authenticate(st, req.authorization.as_deref()) {
        return refused;
    }
    let segments: Vec<&str> = req.route.trim_start_matches('/').split('/').collect();
    let (object_type, operation) = match segments.as_slice() {
        ["crm", "v3", "properties", t] => (*t, None),
        ["crm", "v3", "objects", t, "batch", op @ ("upsert" | "archive" | "read")] => {
            (*t, Some(*op))
        }
        _ => {
            return hs_error(
                404,
                "OBJECT_NOT_FOUND",
                format!("No such endpoint: {} {}", req.method, req.route),
            )
        }
    };
    let expected_method = if operation.is_some() { "POST" } else { "GET" };
    if req.method != expected_method {
        return hs_error(
            405,
            "VALIDATION_ERROR",
            format!("HTTP {} is not supported by this endpoint", req.method),
        );
    }
    let Some(name) = resolve(st, object_type) else {
        return hs_error(
            404,
            "OBJECT_NOT_FOUND",
            format!("Unable to infer object type from: {object_type}"),
        );
    };
    let Some(op) = operation else {
        return (200, Some(properties_listing(&st.objects[&name])));
    };
    if !media_type_is(req.content_type.as_deref(), "application/json") {
        let sent = req.content_type.as_deref().unwrap_or("no Content-Type");
        return hs_error(
            415,
            "VALIDATION_ERROR",
            format!("HTTP 415 Unsupported Media Type: {sent}; use application/json"),
        );
    }
    let body: Value = match serde_json::from_slice(&req.raw) {
        Ok(v) => v,
        Err(e) => {
            return hs_error(
                400,
                "VALIDATION_ERROR",
                format!(
                    "Invalid input JSON on line {}, column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )
        }
    };
    let State {
        objects, next_id, ..
    } = st;
    let object = objects.get_mut(&name).expect("resolved");
    if op == "read" {
        return match archived_query(&req.query).and_then(|()| parse_read(object, &body)) {
            Ok(read) => batch_read(object, &name, &read),
            Err(refused) => refused,
        };
    }
    if op == "upsert" {
        match parse_upsert(object, &body) {
            Ok(inputs) => upsert(object, next_id, inputs),
            Err(refused) => refused,
        }
    } else {
        match parse_archive(&body) {
            Ok(ids) => {
                for id in ids {
                    // Unknown or already archived ids are ignored: HubSpot answers 204 anyway.
                    if object.records.remove(&id).is_some() {
                        object.archived.push(id);
                    }
                }
                (204, None)
            }
            Err(refused) => refused,
        }
    }
}

/// `GET /crm/v3/properties/{objectType}`, shaped like HubSpot's properties API.
fn properties_listing(object: &ObjectType) -> Value {
    let results: Vec<Value> = object
        .properties
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field_type = match p.spec.kind.as_str() {
                "number" => "number",
                "enumeration" => "select",
                "datetime" => "date",
                "bool" => "booleancheckbox",
                _ => "text",
            };
            let options: Vec<Value> = p
                .options
                .iter()
                .enumerate()
                .map(|(j, (value, label))| {
                    json!({"label": label, "value": value, "description": "", "displayOrder": j, "hidden": false})
                })
                .collect();
            json!({
                "name": p.spec.name,
                "label": label(&p.spec.name),
                "type": p.spec.kind,
                "fieldType": field_type,
                "description": "",
                "groupName": object.group,
                "options": options,
                "displayOrder": i,
                "calculated": false,
                "externalOptions": false,
                "hasUniqueValue": p.spec.unique,
                "hidden": false,
                "modificationMetadata": {
                    "archivable": true,
                    "readOnlyDefinition": true,
                    "readOnlyValue": p.spec.read_only,
                },
            })
        })
        .collect();
    json!({ "results": results })
}

fn label(name: &str) -> String {
    let known = [
        ("email", "Email"),
        ("firstname", "First Name"),
        ("lastname", "Last Name"),
        ("phone", "Phone Number"),
        ("lifecyclestage", "Lifecycle Stage"),
        ("hs_object_id", "Record ID"),
        ("createdate", "Create Date"),
        ("lastmodifieddate", "Last Modified Date"),
        ("domain", "Company Domain Name"),
        ("annualrevenue", "Annual Revenue"),
    ];
    if let Some((_, l)) = known.iter().find(|(n, _)| *n == name) {
        return l.to_string();
    }
    name.trim_start_matches("hs_")
        .split('_')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map_or_else(String::new, |f| f.to_uppercase().chain(c).collect())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The members a JSON object may have; anything else is an "Unrecognized field", as HubSpot's
/// deserializer says.
fn only_members(value: &Value, at: &str, allowed: &[&str]) -> Result<(), Outcome> {
    let Some(object) = value.as_object() else {
        return Err(invalid_json(format!(
            "{at} must be a JSON object, got {value}"
        )));
    };
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(invalid_json(format!(
            "Unrecognized field \"{unknown}\" in {at}, not marked as ignorable"
        ))),
        None => Ok(()),
    }
}

/// `inputs` of a batch body whose members may be `allowed`, at most [`MAX_BATCH`] of them.
fn batch_inputs<'a>(body: &'a Value, allowed: &[&str]) -> Result<&'a Vec<Value>, Outcome> {
    only_members(body, "the request body", allowed)?;
    let inputs = match body.get("inputs") {
        Some(Value::Array(inputs)) => inputs,
        Some(other) => {
            return Err(invalid_json(format!(
                "inputs must be an array, got {other}"
            )))
        }
        None => return Err(invalid_json("Missing required field \"inputs\"")),
    };
    if inputs.len() > MAX_BATCH {
        return Err(hs_error(
            400,
            "VALIDATION_ERROR",
            format!(
                "Batch input size must be at most {MAX_BATCH}, got {}",
                inputs.len()
            ),
        ));
    }
    Ok(inputs)
}

fn string_member(
    input: &Value,
    at: &str,
    member: &str,
    required: bool,
) -> Result<Option<String>, Outcome> {
    match input.get(member) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid_json(format!(
            "{at}.{member} must be a string, got {other}"
        ))),
        None if required => Err(invalid_json(format!(
            "Missing required field \"{member}\" in {at}"
        ))),
        None => Ok(None),
    }
}

fn parse_archive(body: &Value) -> Result<Vec<String>, Outcome> {
    let mut ids = Vec::new();
    for (i, input) in batch_inputs(body, &["inputs"])?.iter().enumerate() {
        let at = format!("inputs[{i}]");
        only_members(input, &at, &["id"])?;
        ids.extend(string_member(input, &at, "id", true)?);
    }
    Ok(ids)
}

struct UpsertInput {
    id: String,
    id_property: String,
    trace: Option<String>,
    properties: Map<String, Value>,
}

/// Everything that refuses the whole upsert request (nothing is applied).
fn parse_upsert(object: &ObjectType, body: &Value) -> Result<Vec<UpsertInput>, Outcome> {
    let mut inputs = Vec::new();
    for (i, input) in batch_inputs(body, &["inputs"])?.iter().enumerate() {
        let at = format!("inputs[{i}]");
        only_members(
            input,
            &at,
            &["id", "idProperty", "objectWriteTraceId", "properties"],
        )?;
        let id = string_member(input, &at, "id", true)?.unwrap_or_default();
        let trace = string_member(input, &at, "objectWriteTraceId", false)?;
        let properties = match input.get("properties") {
            Some(Value::Object(p)) => p.clone(),
            Some(other) => {
                return Err(invalid_json(format!(
                    "{at}.properties must be an object, got {other}"
                )))
            }
            None => {
                return Err(invalid_json(format!(
                    "Missing required field \"properties\" in {at}"
                )))
            }
        };
        // The schema says string values; HubSpot wants numbers, booleans and dates as strings too.
        if let Some((name, value)) = properties.iter().find(|(_, v)| !v.is_string()) {
            return Err(invalid_json(format!(
                "{at}.properties.{name} must be a string, got {value}"
            )));
        }
        let Some(id_property) = string_member(input, &at, "idProperty", false)? else {
            return Err(hs_error(
                400,
                "VALIDATION_ERROR",
                format!("{at}: idProperty is required for upsert (the name of a unique property)"),
            ));
        };
        if id.is_empty() {
            return Err(hs_error(
                400,
                "VALIDATION_ERROR",
                format!("{at}: id must not be empty"),
            ));
        }
        inputs.push(UpsertInput {
            id,
            id_property,
            trace,
            properties,
        });
    }

    let mut problems = Vec::new();
    for input in &inputs {
        for name in std::iter::once(&input.id_property).chain(input.properties.keys()) {
            let problem = match object.property(name) {
                None => PropertyProblem::new(
                    name,
                    "PROPERTY_DOESNT_EXIST",
                    format!("Property \"{name}\" does not exist"),
                ),
                Some(p) if p.spec.read_only => PropertyProblem::new(
                    name,
                    "READ_ONLY_VALUE",
                    format!("\"{name}\" is a read only property; its value cannot be set."),
                ),
                Some(_) => continue,
            };
            if !problems
                .iter()
                .any(|p: &PropertyProblem| p.name == problem.name)
            {
                problems.push(problem);
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems_error(&problems));
    }
    for input in &inputs {
        if !object
            .property(&input.id_property)
            .is_some_and(|p| p.spec.unique)
        {
            return Err(hs_error(
                400,
                "VALIDATION_ERROR",
                format!(
                    "Property \"{}\" is not a unique property, so it cannot be used as idProperty",
                    input.id_property
                ),
            ));
        }
        // The record is matched and keyed on `id`; a different value for the same property
        // in `properties` is contradictory, never what a correct client means.
        if let Some(v) = input
            .properties
            .get(&input.id_property)
            .filter(|v| v.as_str() != Some(&input.id))
        {
            return Err(hs_error(
                400,
                "VALIDATION_ERROR",
                format!(
                    "properties.{} is {v} but id is \"{}\"; they must agree",
                    input.id_property, input.id
                ),
            ));
        }
    }
    let mut seen = HashSet::new();
    let duplicates: Vec<&str> = inputs
        .iter()
        .map(|i| i.id.as_str())
        .filter(|id| !seen.insert(*id))
        .collect();
    if !duplicates.is_empty() {
        return Err(hs_error(
            400,
            "VALIDATION_ERROR",
            format!("Duplicate IDs found in batch input: {}", json!(duplicates)),
        ));
    }
    Ok(inputs)
}

fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && !s.chars().any(char::is_whitespace)
        && domain.split_once('.').is_some()
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}

fn valid_number(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c))
        && s.parse::<f64>().is_ok_and(f64::is_finite)
}

/// Epoch milliseconds, or an ISO 8601 date / date-time: what HubSpot accepts for datetimes.
fn valid_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    let epoch_ms = !b.is_empty() && b.iter().all(u8::is_ascii_digit);
    // YYYY-MM-DD, alone or followed by a time ("T...").
    let date = b.len() >= 10
        && b[..10].iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        });
    epoch_ms || (date && (b.len() == 10 || b[10] == b'T'))
}

/// Per-record value checks: a failure refuses that record only.
fn value_problems(object: &ObjectType, values: &Map<String, Value>) -> Vec<PropertyProblem> {
    let mut problems = Vec::new();
    for (name, value) in values {
        let (Some(p), Some(v)) = (object.property(name), value.as_str()) else {
            continue;
        };
        if v.is_empty() {
            continue; // "" clears a value; nothing to validate
        }
        let problem = match p.spec.kind.as_str() {
            _ if name == "email" && !valid_email(v) => {
                Some(("INVALID_EMAIL", format!("Email address {v} is invalid")))
            }
            "number" if !valid_number(v) => Some((
                "INVALID_FLOAT",
                format!("{v} was not a valid number for property {name}"),
            )),
            "enumeration" if !p.options.is_empty() && !p.options.iter().any(|(o, _)| o == v) => {
                let allowed: Vec<&str> = p.options.iter().map(|(o, _)| o.as_str()).collect();
                Some((
                    "INVALID_OPTION",
                    format!(
                        "{v} was not one of the allowed options for {name}: [{}]",
                        allowed.join(", ")
                    ),
                ))
            }
            "datetime" if !valid_datetime(v) => Some((
                "INVALID_DATETIME",
                format!("{v} is not a valid datetime for {name} (epoch milliseconds or ISO 8601)"),
            )),
            "bool" if v != "true" && v != "false" => Some((
                "INVALID_BOOLEAN",
                format!("{v} is not a valid boolean for {name} (true or false)"),
            )),
            _ => None,
        };
        if let Some((code, message)) = problem {
            problems.push(PropertyProblem::new(name, code, message));
        }
    }
    problems
}

/// A per-record entry of a 207's `errors` (HubSpot's StandardError).
fn record_error(
    input: &UpsertInput,
    category: &str,
    message: String,
    details: Vec<Value>,
) -> Value {
    let mut context = Map::new();
    if let Some(trace) = &input.trace {
        context.insert("objectWriteTraceId".into(), json!([trace]));
    }
    context.insert("id".into(), json!([input.id]));
    json!({"status": "error", "category": category, "message": message, "context": context, "errors": details, "links": {}})
}

fn upsert(object: &mut ObjectType, next_id: &mut u64, inputs: Vec<UpsertInput>) -> Outcome {
    let now = iso_now();
    let (mut updated, mut created, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for input in inputs {
        let mut values = input.properties.clone();
        values.insert(input.id_property.clone(), Value::String(input.id.clone()));
        let problems = value_problems(object, &values);
        if !problems.is_empty() {
            errors.push(record_error(
                &input,
                "VALIDATION_ERROR",
                problems_message(&problems),
                problems_details(&problems),
            ));
            continue;
        }
        let target = object.find(&input.id_property, &input.id);
        // Another unique property may already hold this value on a different record.
        let conflict = values.iter().find_map(|(name, v)| {
            let unique = object.property(name).is_some_and(|p| p.spec.unique);
            let v = v.as_str().filter(|v| unique && !v.is_empty())?;
            object
                .find(name, v)
                .filter(|other| Some(other) != target.as_ref())
                .map(|other| (name.clone(), v, other))
        });
        if let Some((name, v, other)) = conflict {
            let message =
                format!("A record with {name} \"{v}\" already exists. Existing ID: {other}");
            let details = vec![json!({"message": message, "code": "CONFLICT", "in": name})];
            errors.push(record_error(&input, "CONFLICT", message, details));
            continue;
        }
        let (id, is_new) = match target {
            Some(id) => {
                let mut props = object.records[&id].properties.clone();
                for (name, v) in values {
                    if v.as_str() == Some("") {
                        props.remove(&name);
                    } else {
                        props.insert(name, v);
                    }
                }
                object.stamp(&mut props, &MODIFIED, &now);
                let record = object.records.get_mut(&id).expect("found");
                record.properties = props;
                record.updated_at = now.clone();
                (id, false)
            }
            None => {
                let id = next_id.to_string();
                *next_id += 1;
                let mut props: Map<String, Value> = values
                    .into_iter()
                    .filter(|(_, v)| v.as_str() != Some(""))
                    .collect();
                props.insert("hs_object_id".into(), Value::String(id.clone()));
                object.stamp(&mut props, &CREATED, &now);
                object.stamp(&mut props, &MODIFIED, &now);
                let record = Record {
                    properties: props,
                    created_at: now.clone(),
                    updated_at: now.clone(),
                };
                object.records.insert(id.clone(), record);
                (id, true)
            }
        };
        let record = &object.records[&id];
        let mut result = json!({
            "id": id,
            "properties": record.properties,
            "createdAt": record.created_at,
            "updatedAt": record.updated_at,
            "archived": false,
            "new": is_new,
        });
        if let Some(trace) = &input.trace {
            result["objectWriteTraceId"] = json!(trace);
        }
        if is_new {
            created.push(result)
        } else {
            updated.push(result)
        }
    }
    // Deliberately not input order: HubSpot does not promise it, clients must match results
    // by objectWriteTraceId or the idProperty value.
    updated.extend(created);
    let mut body = json!({
        "status": "COMPLETE",
        "results": updated,
        "requestedAt": now,
        "startedAt": now,
        "completedAt": iso_now(),
    });
    if errors.is_empty() {
        return (200, Some(body));
    }
    body["numErrors"] = json!(errors.len());
    body["errors"] = Value::Array(errors);
    (207, Some(body))
}

/// The `archived` query parameter of a batch read. Only `false` (the default) is modelled:
/// archived records keep no properties here, so `true` is refused rather than answered wrongly.
fn archived_query(query: &str) -> Result<(), Outcome> {
    match parse_form(query).into_iter().find(|(k, _)| k == "archived") {
        None => Ok(()),
        Some((_, v)) if v.eq_ignore_ascii_case("false") => Ok(()),
        Some((_, v)) if v.eq_ignore_ascii_case("true") => Err(hs_error(
            400,
            "VALIDATION_ERROR",
            "archived=true is not modelled by the fake HubSpot: it keeps no archived records",
        )),
        Some((_, v)) => Err(hs_error(
            400,
            "VALIDATION_ERROR",
            format!("Query parameter archived must be true or false, got \"{v}\""),
        )),
    }
}

/// A required member that must be an array of strings.
fn string_array(body: &Value, member: &str) -> Result<Vec<String>, Outcome> {
    match body.get(member) {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid_json(format!("{member}[{i}] must be a string, got {v}")))
            })
            .collect(),
        Some(other) => Err(invalid_json(format!(
            "{member} must be an array, got {other}"
        ))),
        None => Err(invalid_json(format!("Missing required field \"{member}\""))),
    }
}

struct ReadRequest {
    /// `None`: the ids are HubSpot record ids.
    id_property: Option<String>,
    ids: Vec<String>,
    properties: Vec<String>,
}

/// Everything that refuses the whole read request.
fn parse_read(object: &ObjectType, body: &Value) -> Result<ReadRequest, Outcome> {
    let inputs = batch_inputs(
        body,
        &[
            "idProperty",
            "inputs",
            "properties",
            "propertiesWithHistory",
        ],
    )?;
    let mut ids = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let at = format!("inputs[{i}]");
        only_members(input, &at, &["id"])?;
        ids.extend(string_member(input, &at, "id", true)?);
    }
    // Unknown names are not an error: HubSpot reads just leave them out.
    let properties = string_array(body, "properties")?;
    if !string_array(body, "propertiesWithHistory")?.is_empty() {
        return Err(hs_error(
            400,
            "VALIDATION_ERROR",
            "propertiesWithHistory is not modelled by the fake HubSpot (it keeps no property \
             history); send []",
        ));
    }
    let id_property = match body.get("idProperty") {
        None => None,
        Some(Value::String(name)) => Some(name.clone()),
        Some(other) => {
            return Err(invalid_json(format!(
                "idProperty must be a string, got {other}"
            )))
        }
    };
    if let Some(name) = &id_property {
        match object.property(name) {
            None => {
                return Err(problems_error(&[PropertyProblem::new(
                    name,
                    "PROPERTY_DOESNT_EXIST",
                    format!("Property \"{name}\" does not exist"),
                )]))
            }
            Some(p) if !p.spec.unique => {
                return Err(hs_error(
                    400,
                    "VALIDATION_ERROR",
                    format!(
                        "Property \"{name}\" is not a unique property, so it cannot be used as \
                         idProperty"
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(ReadRequest {
        id_property,
        ids,
        properties,
    })
}

/// The object name HubSpot uses in batch read errors ("Could not get some CONTACT objects").
fn object_label(name: &str) -> String {
    match name {
        "contacts" => "CONTACT".into(),
        "companies" => "COMPANY".into(),
        other => other.to_uppercase(),
    }
}

/// `POST /crm/v3/objects/{objectType}/batch/read` on live records. Each record found comes back
/// once, in HubSpot id order; the ids not found (as given, first occurrence) make one 207 error.
fn batch_read(object: &ObjectType, name: &str, read: &ReadRequest) -> Outcome {
    let requested_at = iso_now();
    let mut found = BTreeSet::new();
    let mut missing: Vec<&str> = Vec::new();
    for id in &read.ids {
        let hit = match &read.id_property {
            Some(property) => object.find(property, id),
            None => object.records.contains_key(id).then(|| id.clone()),
        };
        match hit {
            Some(record_id) => {
                found.insert(record_id);
            }
            None if !missing.contains(&id.as_str()) => missing.push(id),
            None => {}
        }
    }
    // HubSpot always adds the record id and the creation / modification stamps.
    let always: Vec<&str> = std::iter::once("hs_object_id")
        .chain(object.first_defined(&CREATED))
        .chain(object.first_defined(&MODIFIED))
        .collect();
    let results: Vec<Value> = found
        .iter()
        .map(|id| {
            let record = &object.records[id];
            let properties: Map<String, Value> = record
                .properties
                .iter()
                .filter(|(k, _)| read.properties.contains(k) || always.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            json!({
                "id": id,
                "properties": properties,
                "createdAt": record.created_at,
                "updatedAt": record.updated_at,
                "archived": false,
            })
        })
        .collect();
    let mut body = json!({
        "status": "COMPLETE",
        "results": results,
        "requestedAt": requested_at,
        "startedAt": requested_at,
        "completedAt": iso_now(),
    });
    if missing.is_empty() {
        return (200, Some(body));
    }
    body["numErrors"] = json!(1);
    body["errors"] = json!([{
        "status": "error",
        "category": "OBJECT_NOT_FOUND",
        "message": format!(
            "Could not get some {} objects, they may be deleted or not exist. Check that ids are valid.",
            object_label(name)
        ),
        "context": {"ids": missing},
        "errors": [],
        "links": {},
    }]);
    (207, Some(body))
}

/// `POST /oauth/v1/token`: the `refresh_token` grant. Returns (status, reply, journaled body).
fn token_endpoint(st: &mut State, req: &Incoming) -> (u16, Option<Value>, Option<Value>) {
    let token_error = |status: &str, message: &str| {
        (
            400,
            Some(json!({"status": status, "message": message, "correlationId": correlation_id()})),
        )
    };
    if req.method != "POST" {
        let (s, r) = hs_error(
            405,
            "VALIDATION_ERROR",
            format!("HTTP {} is not supported by this endpoint", req.method),
        );
        return (s, r, None);
    }
    st.token_calls += 1;
    if !media_type_is(
        req.content_type.as_deref(),
        "application/x-www-form-urlencoded",
    ) {
        let (s, r) = token_error(
            "BAD_REQUEST",
            "Content-Type must be application/x-www-form-urlencoded",
        );
        let recorded = serde_json::from_slice::<Value>(&req.raw)
            .ok()
            .map(mask_secrets);
        return (s, r, recorded);
    }
    let fields = parse_form(&String::from_utf8_lossy(&req.raw));
    let recorded = mask_secrets(Value::Object(
        fields.iter().map(|(k, v)| (k.clone(), json!(v))).collect(),
    ));
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let (status, reply) = if field("grant_type") != Some("refresh_token") {
        token_error("BAD_GRANT_TYPE", "missing or unknown grant type")
    } else {
        match &st.oauth {
            Some((id, secret, _))
                if field("client_id") != Some(id) || field("client_secret") != Some(secret) =>
            {
                token_error("BAD_CLIENT_ID", "missing or unknown client id")
            }
            None => token_error("BAD_CLIENT_ID", "missing or unknown client id"),
            Some((_, _, refresh)) if field("refresh_token") != Some(refresh) => {
                token_error("BAD_REFRESH_TOKEN", "missing or unknown refresh token")
            }
            Some((_, _, refresh)) => {
                let access = format!("fake-oauth-{:016x}{:016x}", random_u64(), random_u64());
                let reply = json!({"token_type": "bearer", "refresh_token": refresh, "access_token": access, "expires_in": 1800});
                st.valid_tokens.insert(access);
                (200, Some(reply))
            }
        }
    };
    (status, reply, Some(recorded))
}

/// Secrets never go into the journal (tests print it on failure).
fn mask_secrets(mut body: Value) -> Value {
    if let Some(object) = body.as_object_mut() {
        for name in ["client_secret", "refresh_token"] {
            if let Some(v) = object.get_mut(name) {
                *v = json!("***");
            }
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::{send, Reply};
    use crate::http_util::percent_decode;

    const TOKEN: &str = "pat-na1-test";

    /// `127.0.0.1:PORT`, where [`send`] reaches the fake.
    fn addr(fake: &FakeHubSpot) -> String {
        fake.base_url().trim_start_matches("http://").to_string()
    }

    fn post_as(fake: &FakeHubSpot, token: &str, path: &str, body: &Value) -> Reply {
        let auth = format!("Bearer {token}");
        send(
            &addr(fake),
            "POST",
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            &body.to_string(),
        )
    }

    fn upsert(fake: &FakeHubSpot, object: &str, inputs: Value) -> Reply {
        post_as(
            fake,
            TOKEN,
            &format!("/crm/v3/objects/{object}/batch/upsert"),
            &json!({ "inputs": inputs }),
        )
    }

    fn contact(email: &str, trace: &str, props: Value) -> Value {
        json!({"id": email, "idProperty": "email", "objectWriteTraceId": trace, "properties": props})
    }

    fn form_post(fake: &FakeHubSpot, form: &str) -> Reply {
        send(
            &addr(fake),
            "POST",
            "/oauth/v1/token",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            form,
        )
    }

    #[test]
    fn iso_timestamps() {
        assert_eq!(iso(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(iso(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn upsert_creates_then_updates_by_email() {
        let fake = FakeHubSpot::start(TOKEN);
        let r = upsert(
            &fake,
            "contacts",
            json!([contact(
                "ann@example.com",
                "t1",
                json!({"firstname": "Ann", "health_score": "7"})
            )]),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let first = r.json();
        assert_eq!(first["status"], "COMPLETE");
        let result = &first["results"][0];
        assert_eq!(
            (result["id"].as_str(), result["new"].as_bool()),
            (Some("1001"), Some(true))
        );
        assert_eq!(result["objectWriteTraceId"], "t1");
        assert_eq!(result["properties"]["email"], "ann@example.com");
        assert_eq!(result["properties"]["hs_object_id"], "1001");
        assert!(result["properties"]["createdate"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        for stamp in ["requestedAt", "startedAt", "completedAt"] {
            assert!(first[stamp].is_string(), "{stamp}");
        }

        // Same email: same record, merged properties, "" clears a value.
        let r = upsert(
            &fake,
            "0-1",
            json!([contact(
                "ann@example.com",
                "t2",
                json!({"lastname": "Lee", "health_score": "", "email": "ann@example.com"})
            )]),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let result = &r.json()["results"][0];
        assert_eq!(
            (result["id"].as_str(), result["new"].as_bool()),
            (Some("1001"), Some(false))
        );
        let objects = fake.objects("contacts");
        assert_eq!(objects.len(), 1);
        let ann = &objects["1001"];
        assert_eq!(
            (ann["firstname"].as_str(), ann["lastname"].as_str()),
            (Some("Ann"), Some("Lee"))
        );
        assert!(ann.get("health_score").is_none());
        assert!(ann["lastmodifieddate"].is_string());
        let calls = fake.calls();
        assert_eq!(
            calls.iter().map(|c| c.status).collect::<Vec<_>>(),
            [200, 200]
        );
        assert_eq!(calls[1].path, "/crm/v3/objects/0-1/batch/upsert");
        assert_eq!(
            calls[1].body.as_ref().unwrap()["inputs"][0]["objectWriteTraceId"],
            "t2"
        );
    }

    #[test]
    fn results_are_updated_first_then_created() {
        let fake = FakeHubSpot::start(TOKEN);
        upsert(
            &fake,
            "contacts",
            json!([contact("b@x.io", "b", json!({}))]),
        );
        let r = upsert(
            &fake,
            "contacts",
            json!([
                contact("a@x.io", "a", json!({})),
                contact("b@x.io", "b2", json!({}))
            ]),
        );
        let traces: Vec<Value> = r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["objectWriteTraceId"].clone())
            .collect();
        assert_eq!(traces, [json!("b2"), json!("a")]);
        // The id counter is shared by all object types.
        let r = upsert(
            &fake,
            "companies",
            json!([{"id": "x.io", "idProperty": "domain", "properties": {"name": "X"}}]),
        );
        assert_eq!(r.json()["results"][0]["id"], "1003");
        assert_eq!(fake.objects("0-2")["1003"]["domain"], "x.io");
    }

    #[test]
    fn bad_values_refuse_only_their_record_with_207() {
        let fake = FakeHubSpot::start(TOKEN);
        let r = upsert(
            &fake,
            "contacts",
            json!([
                contact(
                    "good@example.com",
                    "ok-1",
                    json!({"lifecyclestage": "lead"})
                ),
                contact("not-an-email", "bad-1", json!({"firstname": "X"})),
                contact("also@example.com", "ok-2", json!({"health_score": "4.5"})),
                contact("num@example.com", "bad-2", json!({"health_score": "high"})),
                contact(
                    "opt@example.com",
                    "bad-3",
                    json!({"lifecyclestage": "prospect"})
                ),
            ]),
        );
        assert_eq!(r.status, 207, "{}", r.body);
        let body = r.json();
        assert_eq!(body["numErrors"], 3);
        assert_eq!(body["results"].as_array().unwrap().len(), 2);
        let errors = body["errors"].as_array().unwrap();
        let email_error = &errors[0];
        assert_eq!(email_error["status"], "error");
        assert_eq!(email_error["category"], "VALIDATION_ERROR");
        assert_eq!(
            email_error["context"]["objectWriteTraceId"],
            json!(["bad-1"])
        );
        assert_eq!(email_error["context"]["id"], json!(["not-an-email"]));
        assert_eq!(email_error["errors"][0]["code"], "INVALID_EMAIL");
        assert_eq!(email_error["errors"][0]["in"], "email");
        assert!(email_error["message"]
            .as_str()
            .unwrap()
            .contains("not-an-email"));
        assert_eq!(errors[1]["errors"][0]["code"], "INVALID_FLOAT");
        assert_eq!(errors[2]["errors"][0]["code"], "INVALID_OPTION");
        let emails: Vec<String> = fake
            .objects("contacts")
            .values()
            .map(|p| p["email"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(emails, ["good@example.com", "also@example.com"]);
        for bad in [
            "a@b",
            "a@@b.com",
            "@b.com",
            "a b@c.com",
            "a@b.com@c.org",
            "a@.com",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn more_than_100_inputs_is_400() {
        let fake = FakeHubSpot::start(TOKEN);
        let inputs: Vec<Value> = (0..101)
            .map(|i| contact(&format!("u{i}@x.io"), &i.to_string(), json!({})))
            .collect();
        let r = upsert(&fake, "contacts", json!(inputs));
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["category"], "VALIDATION_ERROR");
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .contains("at most 100"));
        assert!(fake.objects("contacts").is_empty());
        assert_eq!(upsert(&fake, "contacts", json!(inputs[..100])).status, 200);
        let archive: Vec<Value> = (0..101).map(|i| json!({"id": i.to_string()})).collect();
        let r = post_as(
            &fake,
            TOKEN,
            "/crm/v3/objects/contacts/batch/archive",
            &json!({"inputs": archive}),
        );
        assert_eq!(r.status, 400);
    }

    #[test]
    fn unknown_property_is_400_naming_it() {
        let fake = FakeHubSpot::start(TOKEN);
        let r = upsert(
            &fake,
            "contacts",
            json!([contact(
                "a@x.io",
                "t",
                json!({"xyz": "1", "firstname": "A"})
            )]),
        );
        assert_eq!(r.status, 400);
        let body = r.json();
        assert_eq!(body["category"], "VALIDATION_ERROR");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with("Property values were not valid: "),
            "{message}"
        );
        assert!(
            message.contains(r#"Property \"xyz\" does not exist"#),
            "{message}"
        );
        assert!(message.contains("PROPERTY_DOESNT_EXIST"), "{message}");
        assert_eq!(body["errors"][0]["context"]["propertyName"], json!(["xyz"]));
        assert!(body["correlationId"].as_str().unwrap().len() == 36);
        assert!(fake.objects("contacts").is_empty());
    }

    #[test]
    fn read_only_property_is_400() {
        let fake = FakeHubSpot::start(TOKEN);
        for prop in ["hs_object_id", "createdate", "lastmodifieddate"] {
            let r = upsert(
                &fake,
                "contacts",
                json!([contact("a@x.io", "t", json!({ prop: "1" }))]),
            );
            assert_eq!(r.status, 400, "{prop}");
            let message = r.json()["message"].as_str().unwrap().to_string();
            assert!(
                message.contains("READ_ONLY_VALUE") && message.contains(prop),
                "{message}"
            );
        }
        assert!(fake.objects("contacts").is_empty());
    }

    #[test]
    fn schema_violations_are_400() {
        let fake = FakeHubSpot::start(TOKEN);
        let cases = [
            json!({"inputs": [contact("a@x.io", "t", json!({"health_score": 5}))]}),
            json!({"inputs": [contact("a@x.io", "t", json!({"firstname": null}))]}),
            json!({"inputs": [contact("a@x.io", "t", json!({"firstname": true}))]}),
            json!({}),
            json!({"inputs": {}}),
            json!([]),
            json!({"inputs": [], "extra": 1}),
            json!({"inputs": [{"id": "a@x.io", "idProperty": "email"}]}),
            json!({"inputs": [{"idProperty": "email", "properties": {}}]}),
            json!({"inputs": [{"id": 5, "idProperty": "email", "properties": {}}]}),
            json!({"inputs": [{"id": "a@x.io", "properties": {}}]}),
            json!({"inputs": [{"id": "Ann", "idProperty": "firstname", "properties": {}}]}),
            json!({"inputs": [{"id": "a@x.io", "idProperty": "email", "properties": {}, "associations": []}]}),
            json!({"inputs": [contact("a@x.io", "t", json!({"email": "b@x.io"}))]}),
            json!({"inputs": [contact("a@x.io", "1", json!({})), contact("a@x.io", "2", json!({}))]}),
        ];
        for (i, body) in cases.iter().enumerate() {
            let r = post_as(&fake, TOKEN, "/crm/v3/objects/contacts/batch/upsert", body);
            assert_eq!(r.status, 400, "case {i}: {}", r.body);
            assert_eq!(r.json()["category"], "VALIDATION_ERROR", "case {i}");
        }
        let r = post_as(
            &fake,
            TOKEN,
            "/crm/v3/objects/contacts/batch/upsert",
            &cases[0],
        );
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("Invalid input JSON on line 1"));
        let r = post_as(
            &fake,
            TOKEN,
            "/crm/v3/objects/contacts/batch/upsert",
            &cases[14],
        );
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("Duplicate IDs found in batch input"));
        let auth = format!("Bearer {TOKEN}");
        let r = send(
            &addr(&fake),
            "POST",
            "/crm/v3/objects/contacts/batch/upsert",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            "{not json",
        );
        assert_eq!(r.status, 400);
        let r = send(
            &addr(&fake),
            "POST",
            "/crm/v3/objects/contacts/batch/upsert",
            &[("Authorization", &auth), ("Content-Type", "text/plain")],
            "{}",
        );
        assert_eq!(r.status, 415);
        let r = post_as(
            &fake,
            TOKEN,
            "/crm/v3/objects/deals_x/batch/upsert",
            &json!({"inputs": []}),
        );
        assert_eq!(
            (r.status, r.json()["category"].as_str()),
            (404, Some("OBJECT_NOT_FOUND"))
        );
        assert_eq!(
            post_as(
                &fake,
                TOKEN,
                "/crm/v3/objects/contacts/batch/merge",
                &json!({})
            )
            .status,
            404
        );
        assert_eq!(
            send(
                &addr(&fake),
                "GET",
                "/crm/v3/objects/contacts/batch/upsert",
                &[("Authorization", &auth)],
                ""
            )
            .status,
            405
        );
        assert!(fake.objects("contacts").is_empty());
        assert_eq!(fake.calls().len(), cases.len() + 7);
    }

    #[test]
    fn archive_is_204_and_removes() {
        let fake = FakeHubSpot::start(TOKEN);
        upsert(
            &fake,
            "contacts",
            json!([
                contact("a@x.io", "a", json!({})),
                contact("b@x.io", "b", json!({}))
            ]),
        );
        let archive = |ids: Value| {
            post_as(
                &fake,
                TOKEN,
                "/crm/v3/objects/contacts/batch/archive",
                &json!({ "inputs": ids }),
            )
        };
        let r = archive(json!([{"id": "1001"}, {"id": "9999"}]));
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        assert_eq!(
            fake.objects("contacts").keys().collect::<Vec<_>>(),
            ["1002"]
        );
        assert_eq!(fake.archived("contacts"), ["1001"]);
        // Already archived: still 204, nothing changes.
        assert_eq!(archive(json!([{"id": "1001"}])).status, 204);
        assert_eq!(fake.archived("0-1"), ["1001"]);
        assert_eq!(archive(json!([{"id": 1002}])).status, 400);
        assert_eq!(
            archive(json!([{"id": "1002", "idProperty": "email"}])).status,
            400
        );
        assert_eq!(fake.objects("contacts").len(), 1);
        // An archived record's email is free again: the upsert creates a new record.
        let r = upsert(
            &fake,
            "contacts",
            json!([contact("a@x.io", "a", json!({}))]),
        );
        assert_eq!(r.json()["results"][0]["id"], "1003");
    }

    #[test]
    fn missing_or_wrong_token_is_401() {
        let fake = FakeHubSpot::start(TOKEN);
        let body = json!({"inputs": [contact("a@x.io", "t", json!({}))]}).to_string();
        for auth in [None, Some("Bearer wrong"), Some(TOKEN), Some("Basic cGF0")] {
            let mut headers = vec![("Content-Type", "application/json")];
            headers.extend(auth.map(|a| ("Authorization", a)));
            let r = send(
                &addr(&fake),
                "POST",
                "/crm/v3/objects/contacts/batch/upsert",
                &headers,
                &body,
            );
            assert_eq!(r.status, 401, "{auth:?}");
            let json = r.json();
            assert_eq!(json["category"], "INVALID_AUTHENTICATION");
            assert_eq!(json["status"], "error");
            assert!(json["message"]
                .as_str()
                .unwrap()
                .starts_with("Authentication credentials not found."));
            assert!(r.header("X-HubSpot-RateLimit-Max").is_some());
        }
        assert_eq!(
            send(&addr(&fake), "GET", "/crm/v3/properties/contacts", &[], "").status,
            401
        );
        assert!(fake.objects("contacts").is_empty());
        assert!(fake.calls().iter().all(|c| c.status == 401));
    }

    #[test]
    fn expired_token_then_refresh() {
        let fake = FakeHubSpot::start(TOKEN);
        fake.configure_oauth("client-1", "s3cr+t", "refresh-1");
        assert_eq!(upsert(&fake, "contacts", json!([])).status, 200);
        fake.expire_token();
        let r = upsert(
            &fake,
            "contacts",
            json!([contact("a@x.io", "t", json!({}))]),
        );
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["category"], "EXPIRED_AUTHENTICATION");
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("The OAuth token used to make this call expired"));

        let good = "grant_type=refresh_token&client_id=client-1&client_secret=s3cr%2Bt&refresh_token=refresh-1";
        let r = form_post(
            &fake,
            "grant_type=refresh_token&client_id=client-1&client_secret=s3cr%2Bt&refresh_token=nope",
        );
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["status"], "BAD_REFRESH_TOKEN");
        let r = form_post(&fake, "grant_type=refresh_token&client_id=other&client_secret=s3cr%2Bt&refresh_token=refresh-1");
        assert_eq!(
            (r.status, r.json()["status"].as_str()),
            (400, Some("BAD_CLIENT_ID"))
        );
        // "+" is a space in forms, so an unescaped "+" in the secret is a different secret.
        let r = form_post(&fake, "grant_type=refresh_token&client_id=client-1&client_secret=s3cr+t&refresh_token=refresh-1");
        assert_eq!(r.json()["status"], "BAD_CLIENT_ID");
        let r = form_post(
            &fake,
            "grant_type=authorization_code&code=x&client_id=client-1",
        );
        assert_eq!(r.json()["status"], "BAD_GRANT_TYPE");
        let r = send(
            &addr(&fake),
            "POST",
            "/oauth/v1/token",
            &[("Content-Type", "application/json")],
            "{}",
        );
        assert_eq!(r.status, 400);

        let r = form_post(&fake, good);
        assert_eq!(r.status, 200, "{}", r.body);
        let token = r.json();
        assert_eq!(
            (token["token_type"].as_str(), token["expires_in"].as_u64()),
            (Some("bearer"), Some(1800))
        );
        assert_eq!(token["refresh_token"], "refresh-1");
        let access = token["access_token"].as_str().unwrap();
        assert_ne!(access, TOKEN);
        let r = post_as(
            &fake,
            access,
            "/crm/v3/objects/contacts/batch/upsert",
            &json!({"inputs": [contact("a@x.io", "t", json!({}))]}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(fake.token_calls(), 6);
        let token_call = fake
            .calls()
            .into_iter()
            .rev()
            .find(|c| c.path == "/oauth/v1/token")
            .unwrap();
        assert_eq!(
            token_call.body,
            Some(
                json!({"grant_type": "refresh_token", "client_id": "client-1", "client_secret": "***", "refresh_token": "***"})
            )
        );
        // The refreshed token expires too.
        fake.expire_token();
        assert_eq!(upsert(&fake, "contacts", json!([])).status, 401);
        assert_eq!(
            post_as(
                &fake,
                access,
                "/crm/v3/objects/contacts/batch/archive",
                &json!({"inputs": []})
            )
            .status,
            401
        );
    }

    #[test]
    fn throttle_next_is_429_with_headers() {
        let fake = FakeHubSpot::start(TOKEN);
        fake.throttle_next(2);
        for _ in 0..2 {
            let r = upsert(
                &fake,
                "contacts",
                json!([contact("a@x.io", "t", json!({}))]),
            );
            assert_eq!(r.status, 429);
            let body = r.json();
            assert_eq!(body["policyName"], "TEN_SECONDLY_ROLLING");
            assert_eq!(body["errorType"], "RATE_LIMIT");
            assert_eq!(
                body["message"],
                "You have reached your ten_secondly_rolling limit."
            );
            assert_eq!(
                r.header("X-HubSpot-RateLimit-Interval-Milliseconds"),
                Some("10000")
            );
            assert_eq!(r.header("X-HubSpot-RateLimit-Max"), Some("100"));
            assert_eq!(r.header("X-HubSpot-RateLimit-Remaining"), Some("0"));
            assert_eq!(r.header("Retry-After"), None);
        }
        // Token requests are not API requests: never throttled.
        fake.throttle_next(1);
        assert_eq!(form_post(&fake, "grant_type=refresh_token").status, 400);
        assert_eq!(upsert(&fake, "contacts", json!([])).status, 429);
        let r = upsert(
            &fake,
            "contacts",
            json!([contact("a@x.io", "t", json!({}))]),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("X-HubSpot-RateLimit-Max"), Some("100"));
        assert_eq!(fake.objects("contacts").len(), 1);
        let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [429, 429, 400, 429, 200]);
    }

    #[test]
    fn rolling_limit_is_enforced() {
        let fake = FakeHubSpot::start(TOKEN);
        fake.set_rolling_limit(3);
        let remaining: Vec<Option<String>> = (0..3)
            .map(|_| {
                let r = upsert(&fake, "contacts", json!([]));
                assert_eq!(r.status, 200);
                assert_eq!(r.header("X-HubSpot-RateLimit-Max"), Some("3"));
                r.header("X-HubSpot-RateLimit-Remaining")
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(
            remaining,
            [Some("2".into()), Some("1".into()), Some("0".into())]
        );
        let r = upsert(&fake, "contacts", json!([]));
        assert_eq!(
            (r.status, r.header("X-HubSpot-RateLimit-Remaining")),
            (429, Some("0"))
        );
    }

    #[test]
    fn properties_endpoint_lists_flags() {
        let fake = FakeHubSpot::start(TOKEN);
        let auth = format!("Bearer {TOKEN}");
        let r = send(
            &addr(&fake),
            "GET",
            "/crm/v3/properties/contacts?archived=false",
            &[("Authorization", &auth)],
            "",
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("X-HubSpot-RateLimit-Interval-Milliseconds"),
            Some("10000")
        );
        let results = r.json()["results"].as_array().unwrap().clone();
        let find = |name: &str| results.iter().find(|p| p["name"] == name).unwrap().clone();
        let email = find("email");
        assert_eq!(
            (email["hasUniqueValue"].as_bool(), email["type"].as_str()),
            (Some(true), Some("string"))
        );
        assert_eq!(email["modificationMetadata"]["readOnlyValue"], false);
        assert_eq!(email["groupName"], "contactinformation");
        let id = find("hs_object_id");
        assert_eq!(
            (
                id["hasUniqueValue"].as_bool(),
                id["modificationMetadata"]["readOnlyValue"].as_bool()
            ),
            (Some(false), Some(true))
        );
        let stage = find("lifecyclestage");
        assert_eq!(
            (stage["type"].as_str(), stage["fieldType"].as_str()),
            (Some("enumeration"), Some("select"))
        );
        assert_eq!(stage["options"].as_array().unwrap().len(), 8);
        assert_eq!(stage["options"][2]["value"], "marketingqualifiedlead");
        assert_eq!(find("health_score")["type"], "number");
        let r = send(
            &addr(&fake),
            "GET",
            "/crm/v3/properties/0-2",
            &[("Authorization", &auth)],
            "",
        );
        let domain = r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "domain")
            .cloned()
            .unwrap();
        assert_eq!(domain["hasUniqueValue"], true);
        let r = send(
            &addr(&fake),
            "GET",
            "/crm/v3/properties/nope",
            &[("Authorization", &auth)],
            "",
        );
        assert_eq!(
            (r.status, r.json()["category"].as_str()),
            (404, Some("OBJECT_NOT_FOUND"))
        );
        assert_eq!(
            send(
                &addr(&fake),
                "GET",
                "/crm/v4/whatever",
                &[("Authorization", &auth)],
                ""
            )
            .status,
            404
        );
    }

    #[test]
    fn custom_object_via_add_object() {
        let fake = FakeHubSpot::start(TOKEN);
        let prop = |name: &str, kind: &str, unique: bool| PropertySpec {
            name: name.into(),
            kind: kind.into(),
            read_only: false,
            unique,
        };
        fake.add_object(
            "p_accounts",
            vec![
                prop("account_key", "string", true),
                prop("name", "string", false),
                prop("seats", "number", false),
                prop("active", "bool", false),
                prop("renews_at", "datetime", false),
            ],
        );
        let input = |key: &str, props: Value| json!({"id": key, "idProperty": "account_key", "properties": props});
        let r = upsert(
            &fake,
            "p_accounts",
            json!([
                input(
                    "k1",
                    json!({"name": "Acme", "seats": "12", "active": "true", "renews_at": "2025-01-31T00:00:00Z"})
                ),
                input("k2", json!({"active": "yes"})),
                input("k3", json!({"renews_at": "next week"})),
            ]),
        );
        assert_eq!(r.status, 207, "{}", r.body);
        let codes: Vec<Value> = r.json()["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["errors"][0]["code"].clone())
            .collect();
        assert_eq!(codes, [json!("INVALID_BOOLEAN"), json!("INVALID_DATETIME")]);
        let objects = fake.objects("p_accounts");
        assert_eq!(objects.len(), 1);
        let acme = objects.values().next().unwrap();
        assert_eq!(
            (acme["account_key"].as_str(), acme["seats"].as_str()),
            (Some("k1"), Some("12"))
        );
        assert!(acme["hs_createdate"].is_string() && acme["hs_lastmodifieddate"].is_string());
        assert_eq!(
            acme["hs_object_id"],
            objects.keys().next().unwrap().as_str()
        );
        // The auto-added system properties are read-only, and only unique ones are idProperty.
        let r = upsert(
            &fake,
            "p_accounts",
            json!([input("k9", json!({"hs_createdate": "1"}))]),
        );
        assert_eq!(r.status, 400);
        let r = upsert(
            &fake,
            "p_accounts",
            json!([{"id": "Acme", "idProperty": "name", "properties": {}}]),
        );
        assert_eq!(r.status, 400);
        let auth = format!("Bearer {TOKEN}");
        let r = send(
            &addr(&fake),
            "GET",
            "/crm/v3/properties/p_accounts",
            &[("Authorization", &auth)],
            "",
        );
        let names: Vec<Value> = r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].clone())
            .collect();
        assert_eq!(names.len(), 8);
        assert!(fake.objects("p_other").is_empty() && fake.archived("p_other").is_empty());
    }

    #[test]
    fn a_unique_value_held_by_another_record_is_a_conflict() {
        let fake = FakeHubSpot::start(TOKEN);
        let prop = |name: &str| PropertySpec {
            name: name.into(),
            kind: "string".into(),
            read_only: false,
            unique: true,
        };
        fake.add_object("2-123456", vec![prop("key"), prop("code")]);
        upsert(
            &fake,
            "2-123456",
            json!([{"id": "a", "idProperty": "key", "properties": {"code": "C1"}}]),
        );
        let r = upsert(
            &fake,
            "2-123456",
            json!([
                {"id": "b", "idProperty": "key", "properties": {"code": "C1"}},
                {"id": "a", "idProperty": "key", "properties": {"code": "C1"}},
            ]),
        );
        assert_eq!(r.status, 207, "{}", r.body);
        assert_eq!(r.json()["errors"][0]["category"], "CONFLICT");
        assert_eq!(fake.objects("2-123456").len(), 1);
    }

    fn read(fake: &FakeHubSpot, path: &str, body: Value) -> Reply {
        post_as(fake, TOKEN, path, &body)
    }

    const READ: &str = "/crm/v3/objects/contacts/batch/read";

    /// Ann (1001, with a first name) and Bob (1002, with a phone).
    fn two_contacts(fake: &FakeHubSpot) {
        let r = upsert(
            fake,
            "contacts",
            json!([
                contact("ann@x.io", "a", json!({"firstname": "Ann"})),
                contact("bob@x.io", "b", json!({"phone": "555"}))
            ]),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }

    fn result_ids(reply: &Reply) -> Vec<Value> {
        reply.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].clone())
            .collect()
    }

    #[test]
    fn batch_read_by_email_id_property() {
        let fake = FakeHubSpot::start(TOKEN);
        two_contacts(&fake);
        fake.clear_calls();
        let body = json!({
            "idProperty": "email",
            "inputs": [{"id": "bob@x.io"}, {"id": "ann@x.io"}],
            "properties": ["firstname", "phone", "no_such_property"],
            "propertiesWithHistory": [],
        });
        let r = read(&fake, &format!("{READ}?archived=false"), body.clone());
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.header("X-HubSpot-RateLimit-Remaining").is_some());
        let reply = r.json();
        assert_eq!(reply["status"], "COMPLETE");
        for stamp in ["requestedAt", "startedAt", "completedAt"] {
            assert!(reply[stamp].as_str().unwrap().ends_with('Z'), "{stamp}");
        }
        assert!(reply.get("errors").is_none() && reply.get("numErrors").is_none());
        // HubSpot id order, not input order.
        assert_eq!(result_ids(&r), [json!("1001"), json!("1002")]);
        let ann = &reply["results"][0];
        assert_eq!(ann["archived"], false);
        assert!(ann["createdAt"].is_string() && ann["updatedAt"].is_string());
        // Only requested properties that have values, plus the ones HubSpot always adds: not
        // `email` (not requested), not Ann's `phone` (no value), not the unknown name.
        let mut names: Vec<&str> = ann["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "createdate",
                "firstname",
                "hs_object_id",
                "lastmodifieddate"
            ]
        );
        assert_eq!(ann["properties"]["firstname"], "Ann");
        assert_eq!(ann["properties"]["hs_object_id"], "1001");
        assert_eq!(reply["results"][1]["properties"]["phone"], "555");
        assert!(reply["results"][1]["properties"].get("firstname").is_none());
        // The object type id works too; the call is journaled with its query string.
        let r = read(&fake, "/crm/v3/objects/0-1/batch/read", body);
        assert_eq!(r.status, 200, "{}", r.body);
        let calls = fake.calls();
        assert_eq!(
            (calls[0].path.as_str(), calls[0].status),
            ("/crm/v3/objects/contacts/batch/read?archived=false", 200)
        );
        assert_eq!(
            calls[0].body.as_ref().unwrap()["inputs"][0]["id"],
            "bob@x.io"
        );
        // Companies say hs_lastmodifieddate.
        upsert(
            &fake,
            "companies",
            json!([{"id": "x.io", "idProperty": "domain", "properties": {"name": "X"}}]),
        );
        let r = read(
            &fake,
            "/crm/v3/objects/companies/batch/read",
            json!({"idProperty": "domain", "inputs": [{"id": "x.io"}], "properties": [], "propertiesWithHistory": []}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let props = r.json()["results"][0]["properties"].clone();
        assert_eq!(
            props.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["createdate", "hs_lastmodifieddate", "hs_object_id"]
        );
    }

    #[test]
    fn batch_read_by_hubspot_id() {
        let fake = FakeHubSpot::start(TOKEN);
        two_contacts(&fake);
        let r = read(
            &fake,
            READ,
            json!({"inputs": [{"id": "1002"}, {"id": "1002"}], "properties": ["email"], "propertiesWithHistory": []}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        // A repeated id gives the record once.
        assert_eq!(result_ids(&r), [json!("1002")]);
        assert_eq!(r.json()["results"][0]["properties"]["email"], "bob@x.io");
        // Without idProperty an email is looked up as a record id: not found.
        let r = read(
            &fake,
            READ,
            json!({"inputs": [{"id": "ann@x.io"}], "properties": [], "propertiesWithHistory": []}),
        );
        assert_eq!(r.status, 207, "{}", r.body);
        assert_eq!(r.json()["errors"][0]["context"]["ids"], json!(["ann@x.io"]));
    }

    #[test]
    fn batch_read_partial_is_207_with_the_missing_ids() {
        let fake = FakeHubSpot::start(TOKEN);
        two_contacts(&fake);
        let r = read(
            &fake,
            READ,
            json!({
                "idProperty": "email",
                "inputs": [{"id": "nobody@x.io"}, {"id": "ann@x.io"}, {"id": "ghost@x.io"}, {"id": "nobody@x.io"}],
                "properties": ["firstname"],
                "propertiesWithHistory": [],
            }),
        );
        assert_eq!(r.status, 207, "{}", r.body);
        let reply = r.json();
        assert_eq!(reply["status"], "COMPLETE");
        assert_eq!(result_ids(&r), [json!("1001")]);
        assert_eq!(reply["numErrors"], 1);
        assert_eq!(
            reply["errors"],
            json!([{
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": "Could not get some CONTACT objects, they may be deleted or not exist. Check that ids are valid.",
                "context": {"ids": ["nobody@x.io", "ghost@x.io"]},
                "errors": [],
                "links": {},
            }])
        );
        // Nothing found at all: still 207, with no results.
        let r = read(
            &fake,
            READ,
            json!({"inputs": [{"id": "9999"}], "properties": [], "propertiesWithHistory": []}),
        );
        assert_eq!(r.status, 207, "{}", r.body);
        assert_eq!(r.json()["results"], json!([]));
        assert_eq!(r.json()["errors"][0]["context"]["ids"], json!(["9999"]));
    }

    #[test]
    fn batch_read_does_not_find_archived_records() {
        let fake = FakeHubSpot::start(TOKEN);
        two_contacts(&fake);
        let r = post_as(
            &fake,
            TOKEN,
            "/crm/v3/objects/contacts/batch/archive",
            &json!({"inputs": [{"id": "1001"}]}),
        );
        assert_eq!(r.status, 204);
        let by_id = json!({"inputs": [{"id": "1001"}, {"id": "1002"}], "properties": [], "propertiesWithHistory": []});
        let r = read(&fake, READ, by_id.clone());
        assert_eq!(r.status, 207, "{}", r.body);
        assert_eq!(result_ids(&r), [json!("1002")]);
        assert_eq!(r.json()["errors"][0]["context"]["ids"], json!(["1001"]));
        let r = read(
            &fake,
            &format!("{READ}?archived=false"),
            json!({"idProperty": "email", "inputs": [{"id": "ann@x.io"}], "properties": [], "propertiesWithHistory": []}),
        );
        assert_eq!(r.status, 207, "{}", r.body);
        assert_eq!(r.json()["errors"][0]["context"]["ids"], json!(["ann@x.io"]));
        // Reading archived records is not modelled: refused, not answered wrongly.
        for query in ["archived=true", "archived=maybe"] {
            let r = read(&fake, &format!("{READ}?{query}"), by_id.clone());
            assert_eq!(r.status, 400, "{query}: {}", r.body);
            assert_eq!(r.json()["category"], "VALIDATION_ERROR");
        }
    }

    #[test]
    fn batch_read_more_than_100_inputs_is_400() {
        let fake = FakeHubSpot::start(TOKEN);
        let inputs =
            |n: usize| -> Vec<Value> { (0..n).map(|i| json!({"id": i.to_string()})).collect() };
        let r = read(
            &fake,
            READ,
            json!({"inputs": inputs(101), "properties": [], "propertiesWithHistory": []}),
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json()["category"], "VALIDATION_ERROR");
        let r = read(
            &fake,
            READ,
            json!({"inputs": inputs(100), "properties": [], "propertiesWithHistory": []}),
        );
        assert_eq!(r.status, 207, "{}", r.body);
        assert_eq!(
            r.json()["errors"][0]["context"]["ids"]
                .as_array()
                .unwrap()
                .len(),
            100
        );
    }

    #[test]
    fn batch_read_schema_violations_are_400() {
        let fake = FakeHubSpot::start(TOKEN);
        two_contacts(&fake);
        let ok = json!({"idProperty": "email", "inputs": [{"id": "ann@x.io"}], "properties": ["firstname"], "propertiesWithHistory": []});
        assert_eq!(read(&fake, READ, ok.clone()).status, 200);
        let without = |member: &str| {
            let mut body = ok.clone();
            body.as_object_mut().unwrap().remove(member);
            body
        };
        let with = |member: &str, value: Value| {
            let mut body = ok.clone();
            body[member] = value;
            body
        };
        let cases = [
            ("missing properties", without("properties")),
            (
                "missing propertiesWithHistory",
                without("propertiesWithHistory"),
            ),
            ("missing inputs", without("inputs")),
            ("unknown member", with("archived", json!(false))),
            (
                "unknown input member",
                with("inputs", json!([{"id": "ann@x.io", "idProperty": "email"}])),
            ),
            ("input without id", with("inputs", json!([{}]))),
            ("non-string id", with("inputs", json!([{"id": 1001}]))),
            (
                "properties not an array",
                with("properties", json!("firstname")),
            ),
            (
                "non-string property name",
                with("properties", json!(["firstname", 7])),
            ),
            ("non-string idProperty", with("idProperty", json!(null))),
            (
                "non-unique idProperty",
                with("idProperty", json!("firstname")),
            ),
            (
                "unknown idProperty",
                with("idProperty", json!("no_such_property")),
            ),
            (
                "property history",
                with("propertiesWithHistory", json!(["firstname"])),
            ),
            ("body not an object", json!([])),
        ];
        for (case, body) in &cases {
            let r = read(&fake, READ, body.clone());
            assert_eq!(r.status, 400, "{case}: {}", r.body);
            assert_eq!(r.json()["category"], "VALIDATION_ERROR", "{case}");
        }
        // Auth, media type, method, object type and rate limiting as for the other endpoints.
        assert_eq!(post_as(&fake, "wrong", READ, &ok).status, 401);
        let auth = format!("Bearer {TOKEN}");
        let r = send(
            &addr(&fake),
            "POST",
            READ,
            &[("Authorization", &auth), ("Content-Type", "text/plain")],
            &ok.to_string(),
        );
        assert_eq!(r.status, 415);
        assert_eq!(
            send(&addr(&fake), "GET", READ, &[("Authorization", &auth)], "").status,
            405
        );
        assert_eq!(
            read(&fake, "/crm/v3/objects/nope/batch/read", ok.clone()).status,
            404
        );
        fake.throttle_next(1);
        assert_eq!(read(&fake, READ, ok.clone()).status, 429);
        assert_eq!(read(&fake, READ, ok).status, 200);
        assert_eq!(fake.calls().len(), cases.len() + 8);
    }

    #[test]
    fn form_decoding() {
        assert_eq!(percent_decode("a+b%20c%2B%zz%4", true), "a b c+%zz%4");
        assert_eq!(
            parse_form("a=1&&b=&a=2&c"),
            [
                ("a".into(), "1".into()),
                ("b".into(), String::new()),
                ("c".into(), String::new())
            ]
        );
    }
}
