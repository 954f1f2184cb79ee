//! A strict fake of Meta's Marketing API custom-audience users edge, for the `meta_audience`
//! destination: `POST /v{major}.{minor}/{audience_id}/users` adds people to a customer-file
//! custom audience and `DELETE` on the same path removes them ("Custom Audiences: Adding
//! Users"; reference "Custom Audience Users").
//!
//! Parameters are read the way the Graph API reads them: from the query string and from the
//! body, which is either JSON (`Content-Type: application/json`, parameters as top-level
//! members) or a form (`application/x-www-form-urlencoded`, `payload=<json>`). The
//! `payload` is `{"schema": ..., "data": [...]}`: `schema` is one key as a string
//! (`EMAIL_SHA256`, `PHONE_SHA256`, `MOBILE_ADVERTISER_ID` or one of the multi-key names) with
//! `data` a flat array of strings (or one-element arrays), or an array of the documented
//! multi-key names (`EXTERN_ID`, `EMAIL`, `PHONE`, `GEN`, `DOBY`, `DOBM`, `DOBD`, `LN`, `FN`,
//! `FI`, `CT`, `ST`, `ZIP`, `MADID`, `COUNTRY`) with `data` rows aligned with it, "" for an
//! unknown value. At most 10,000 rows a request.
//!
//! Every identifier must arrive hashed: a lowercase 64-hex SHA-256 digest (`EXTERN_ID` and
//! `MADID`, which Meta does not require hashed, may be sent as they are). A row with an
//! unhashed identifier, a non-string or nothing at all is counted in `num_invalid_entries`
//! (with a sample and a reason in `invalid_entry_samples`) and not applied; the other rows
//! are. A member is the set of its non-empty identifiers: adding it again is a no-op, and a
//! DELETE removes the member with exactly those identifiers (removing a non-member is fine).
//!
//! Errors have Meta's shape `{"error": {"message", "type", "code", "error_subcode"?,
//! "fbtrace_id"}}`:
//! * 400 code 80003 subcode 2446079 (custom-audience business-use-case rate limit, the code
//!   the users edge documents) for the next `throttle_next(n)` requests, whatever they are,
//!   with `X-Business-Use-Case-Usage` saying `estimated_time_to_regain_access: 0` (minutes);
//! * 400 code 2500 for a path that is not `/v{major}.{minor}/{id}/users`;
//! * 400 code 104 without an access token (`Authorization: Bearer|OAuth <token>` or an
//!   `access_token` parameter), 401 code 190 (`OAuthException`, "Error validating access
//!   token: ...", subcode 467) for a wrong one and 401 code 190 subcode 463 once
//!   `expire_token` was called — with `WWW-Authenticate: OAuth "Facebook Platform"
//!   "invalid_token" ...` as Graph sends it;
//! * 400 code 100 subcode 33 (`GraphMethodException`, "Unsupported post request. Object with
//!   ID ... does not exist ...") for an audience not made known with `add_audience`, and for
//!   a method other than POST and DELETE;
//! * 400 code 100 (`OAuthException`, "(#100) ...") for a body that is not what the edge
//!   takes: no/invalid payload, schema or data, an unknown or repeated schema key, an empty
//!   `data`, a row whose length differs from the schema's, more than 10,000 rows, an invalid
//!   `session` parameter.
//!
//! Success is 200 `{"audience_id", "session_id", "num_received", "num_invalid_entries",
//! "invalid_entry_samples"}` (the `session_id` of a `session` parameter is echoed, otherwise
//! one is made up). Every request goes into [`FakeMeta::calls`] with its final status.

use crate::http_util::{form_fields, request_header, FakeServer};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use crate::http_server::{Header, Response};

/// Most rows Meta takes in one request.
const MAX_USERS_PER_REQUEST: usize = 10_000;

/// The ad account owning the audiences, as the business object of `X-Business-Use-Case-Usage`.
const AD_ACCOUNT_ID: &str = "100000000000001";

/// The multi-key schema names of the users edge.
const SCHEMA_KEYS: &[&str] = &[
    "EXTERN_ID",
    "EMAIL",
    "PHONE",
    "GEN",
    "DOBY",
    "DOBM",
    "DOBD",
    "LN",
    "FN",
    "FI",
    "CT",
    "ST",
    "ZIP",
    "MADID",
    "COUNTRY",
];

/// Keys Meta takes unhashed (hashing them is allowed too).
const UNHASHED_KEYS: &[&str] = &["EXTERN_ID", "MADID"];

/// At most this many entries in `invalid_entry_samples`.
const MAX_SAMPLES: usize = 100;

#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: Option<Value>,
}

/// A member: its non-empty identifiers by schema key (`EMAIL`, `PHONE`, ...).
type Member = BTreeMap<String, String>;

#[derive(Default)]
struct State {
    token: String,
    token_expired: bool,
    audiences: BTreeMap<String, BTreeSet<Member>>,
    calls: Vec<Call>,
    throttle_next: usize,
    requests: u64,
}

pub struct FakeMeta {
    state: Arc<Mutex<State>>,
    server: FakeServer,
}

impl FakeMeta {
    pub fn start(access_token: &str) -> FakeMeta {
        let state = Arc::new(Mutex::new(State {
            token: access_token.to_string(),
            ..State::default()
        }));
        let handler_state = state.clone();
        let server = FakeServer::start("Meta", move |request| serve(request, &handler_state));
        FakeMeta { state, server }
    }

    /// `http://127.0.0.1:PORT`, standing for `https://graph.facebook.com`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Makes a (customer-file) custom audience known; one already known keeps its members.
    pub fn add_audience(&self, audience_id: &str) {
        self.state
            .lock()
            .unwrap()
            .audiences
            .entry(audience_id.to_string())
            .or_default();
    }

    /// The members of the audience, each as its `[EMAIL, PHONE]` hashes ("" for a missing
    /// one); empty for an unknown audience.
    pub fn members(&self, audience_id: &str) -> BTreeSet<Vec<String>> {
        let st = self.state.lock().unwrap();
        let Some(members) = st.audiences.get(audience_id) else {
            return BTreeSet::new();
        };
        members
            .iter()
            .map(|m| {
                ["EMAIL", "PHONE"]
                    .iter()
                    .map(|k| m.get(*k).cloned().unwrap_or_default())
                    .collect()
            })
            .collect()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// The next `n` requests are answered with the custom-audience rate-limit error (400,
    /// code 80003, subcode 2446079).
    pub fn throttle_next(&self, n: usize) {
        self.state.lock().unwrap().throttle_next = n;
    }

    /// The access token given to `start` is refused from now on (401, code 190, subcode 463).
    pub fn expire_token(&self) {
        self.state.lock().unwrap().token_expired = true;
    }
}

/// A Graph API error, before its `fbtrace_id` is added.
struct GraphError {
    status: u16,
    kind: &'static str,
    code: u32,
    subcode: Option<u32>,
    message: String,
}

impl GraphError {
    fn new(
        status: u16,
        kind: &'static str,
        code: u32,
        subcode: Option<u32>,
        message: String,
    ) -> Self {
        GraphError {
            status,
            kind,
            code,
            subcode,
            message,
        }
    }

    /// 400, code 100: a parameter the edge does not take.
    fn invalid(message: impl std::fmt::Display) -> Self {
        GraphError::new(
            400,
            "OAuthException",
            100,
            None,
            format!("(#100) {message}"),
        )
    }

    fn body(&self, fbtrace_id: &str) -> Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "code": self.code,
            "fbtrace_id": fbtrace_id,
        });
        if let Some(subcode) = self.subcode {
            error["error_subcode"] = json!(subcode);
        }
        json!({ "error": error })
    }
}

/// The request body as the Graph API reads it.
enum Body {
    /// No body, or one of a content type that carries no parameters.
    Empty,
    /// A JSON object: its members are parameters.
    Json(Map<String, Value>),
    /// Form fields.
    Form(Vec<(String, String)>),
    /// `application/json` that is not a JSON object.
    BadJson,
}

fn read_body(content_type: &str, text: &str) -> Body {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if text.trim().is_empty() {
        return Body::Empty;
    }
    match mime.as_str() {
        "application/json" => match serde_json::from_str(text) {
            Ok(Value::Object(members)) => Body::Json(members),
            _ => Body::BadJson,
        },
        "application/x-www-form-urlencoded" => Body::Form(form_fields(text)),
        _ => Body::Empty,
    }
}

/// A string parameter holding JSON (as forms and query strings carry objects) read as JSON.
fn json_param(value: &str) -> Value {
    serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()))
}

/// What the journal keeps of a body: the JSON, or the form fields as an object (JSON-valued
/// fields such as `payload` parsed).
fn journal_body(body: &Body) -> Option<Value> {
    match body {
        Body::Json(members) => Some(Value::Object(members.clone())),
        Body::Form(fields) => Some(Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), json_param(v)))
                .collect(),
        )),
        Body::Empty | Body::BadJson => None,
    }
}

/// `/v21.0/{audience_id}/users` -> the audience id.
fn audience_of(path: &str) -> Option<&str> {
    let mut parts = path.strip_prefix('/')?.split('/');
    let (version, id, edge) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || edge != "users" || id.is_empty() {
        return None;
    }
    let (major, minor) = version.strip_prefix('v')?.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(major) && digits(minor)).then_some(id)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The schema keys of `payload.schema`, and whether it was a single string.
fn schema_keys(schema: &Value) -> Result<(Vec<String>, bool), GraphError> {
    match schema {
        Value::String(name) => {
            let key = match name.as_str() {
                "EMAIL_SHA256" => "EMAIL",
                "PHONE_SHA256" => "PHONE",
                "MOBILE_ADVERTISER_ID" => "MADID",
                other if SCHEMA_KEYS.contains(&other) => other,
                other => {
                    return Err(GraphError::invalid(format!(
                        "Invalid schema {other:?}: use EMAIL_SHA256, PHONE_SHA256, MOBILE_ADVERTISER_ID or an array of {}",
                        SCHEMA_KEYS.join(", ")
                    )))
                }
            };
            Ok((vec![key.to_string()], true))
        }
        Value::Array(items) if !items.is_empty() => {
            let mut keys: Vec<String> = Vec::with_capacity(items.len());
            for item in items {
                let key = item.as_str().ok_or_else(|| {
                    GraphError::invalid("payload.schema must be an array of strings")
                })?;
                if !SCHEMA_KEYS.contains(&key) {
                    return Err(GraphError::invalid(format!(
                        "Invalid schema field {key:?}: supported keys are {}",
                        SCHEMA_KEYS.join(", ")
                    )));
                }
                if keys.iter().any(|k| k == key) {
                    return Err(GraphError::invalid(format!(
                        "Schema field {key:?} appears more than once"
                    )));
                }
                keys.push(key.to_string());
            }
            Ok((keys, false))
        }
        Value::Array(_) => Err(GraphError::invalid("payload.schema must not be empty")),
        _ => Err(GraphError::invalid(
            "payload.schema must be a string or an array of strings",
        )),
    }
}

/// The rows of `payload.data`, each as long as the schema.
fn data_rows(data: &Value, width: usize, single: bool) -> Result<Vec<Vec<Value>>, GraphError> {
    let data = data
        .as_array()
        .ok_or_else(|| GraphError::invalid("payload.data must be an array"))?;
    if data.is_empty() {
        return Err(GraphError::invalid("payload.data must not be empty"));
    }
    if data.len() > MAX_USERS_PER_REQUEST {
        return Err(GraphError::invalid(format!(
            "Maximum number of users per request is {MAX_USERS_PER_REQUEST}: this request has {}",
            data.len()
        )));
    }
    data.iter()
        .enumerate()
        .map(|(i, row)| match row {
            Value::Array(cells) if cells.len() == width => Ok(cells.clone()),
            Value::Array(cells) => Err(GraphError::invalid(format!(
                "payload.data[{i}] has {} values but the schema has {width} fields",
                cells.len()
            ))),
            // A single-key schema takes a flat array; the value is checked as an entry.
            cell if single => Ok(vec![cell.clone()]),
            _ => Err(GraphError::invalid(format!(
                "payload.data[{i}] must be an array of {width} values (one per schema field)"
            ))),
        })
        .collect()
}

/// Why an identifier is refused, or None when it is acceptable.
fn refusal(key: &str, value: &str) -> Option<String> {
    if UNHASHED_KEYS.contains(&key) || is_sha256_hex(value) {
        return None;
    }
    let hint = if value.contains('@') {
        " (it looks like a raw email address)"
    } else if value.starts_with('+') {
        " (it looks like a raw phone number)"
    } else if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        " (hex digits must be lowercase)"
    } else {
        ""
    };
    Some(format!(
        "Invalid {key}: expected the SHA-256 of the normalized value as 64 lowercase hex characters{hint}"
    ))
}

/// A row as a member, or the sample and reason it is invalid.
fn member_of(keys: &[String], row: &[Value]) -> Result<Member, (String, String)> {
    let mut member = Member::new();
    for (key, cell) in keys.iter().zip(row) {
        match cell {
            Value::String(v) if v.is_empty() => {}
            Value::String(v) => match refusal(key, v) {
                Some(reason) => return Err((v.clone(), reason)),
                None => {
                    member.insert(key.clone(), v.clone());
                }
            },
            other => {
                return Err((
                    other.to_string(),
                    format!("Invalid {key}: values must be strings"),
                ))
            }
        }
    }
    if member.is_empty() {
        return Err((
            Value::Array(row.to_vec()).to_string(),
            "Entry has no identifier".to_string(),
        ));
    }
    Ok(member)
}

/// The `session_id` of the optional `session` parameter.
fn session_id(session: Option<&Value>) -> Result<Option<String>, GraphError> {
    let Some(session) = session else {
        return Ok(None);
    };
    let session = match session {
        Value::String(s) => json_param(s),
        v => v.clone(),
    };
    let session = session
        .as_object()
        .ok_or_else(|| GraphError::invalid("param session must be a JSON object"))?;
    let integer = |name: &str| match session.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => Ok(Some(n.to_string())),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(Some(s.clone()))
        }
        Some(_) => Err(GraphError::invalid(format!(
            "param session[{name}] must be a positive integer"
        ))),
    };
    let id = integer("session_id")?;
    integer("batch_seq")?;
    integer("estimated_num_total")?;
    if session
        .get("last_batch_flag")
        .is_some_and(|f| !f.is_boolean())
    {
        return Err(GraphError::invalid(
            "param session[last_batch_flag] must be a boolean",
        ));
    }
    Ok(id)
}

/// Validates and applies one request to `/{audience_id}/users`: the answer's body.
fn apply_users(
    st: &mut State,
    add: bool,
    audience_id: &str,
    params: &BTreeMap<String, Value>,
) -> Result<Value, GraphError> {
    let payload = params
        .get("payload")
        .ok_or_else(|| GraphError::invalid("The parameter payload is required"))?;
    let payload = match payload {
        Value::String(s) => json_param(s),
        v => v.clone(),
    };
    let payload = payload
        .as_object()
        .ok_or_else(|| GraphError::invalid("param payload must be a JSON object"))?;
    let schema = payload
        .get("schema")
        .ok_or_else(|| GraphError::invalid("The parameter payload.schema is required"))?;
    let (keys, single) = schema_keys(schema)?;
    let data = payload
        .get("data")
        .ok_or_else(|| GraphError::invalid("The parameter payload.data is required"))?;
    let rows = data_rows(data, keys.len(), single)?;
    let session = session_id(params.get("session"))?;

    let mut samples = Map::new();
    let mut invalid = 0usize;
    let mut valid = Vec::with_capacity(rows.len());
    for row in &rows {
        match member_of(&keys, row) {
            Ok(member) => valid.push(member),
            Err((sample, reason)) => {
                invalid += 1;
                if samples.len() < MAX_SAMPLES {
                    samples.insert(sample, Value::String(reason));
                }
            }
        }
    }
    let members = st
        .audiences
        .get_mut(audience_id)
        .expect("audience checked by the caller");
    for member in valid {
        if add {
            members.insert(member);
        } else {
            members.remove(&member);
        }
    }
    let session_id =
        session.unwrap_or_else(|| (6_000_000_000_000_000_000u64 + st.requests).to_string());
    Ok(json!({
        "audience_id": audience_id,
        "session_id": session_id,
        "num_received": rows.len(),
        "num_invalid_entries": invalid,
        "invalid_entry_samples": samples,
    }))
}

/// The outcome of one request: status, body and extra headers.
type Outcome = (u16, Value, Vec<(&'static str, String)>);

fn usage_header(call_count: u32, regain_minutes: u32) -> (&'static str, String) {
    let usage = json!({
        AD_ACCOUNT_ID: [{
            "type": "custom_audience",
            "call_count": call_count,
            "total_cputime": call_count,
            "total_time": call_count,
            "estimated_time_to_regain_access": regain_minutes,
            "ads_api_access_tier": "standard_access",
        }]
    });
    ("X-Business-Use-Case-Usage", usage.to_string())
}

/// A request as read off the wire.
struct Incoming {
    /// Upper-case method.
    method: String,
    /// The path, without the query string.
    path: String,
    authorization: Option<String>,
    /// Query and body parameters but `access_token`.
    params: BTreeMap<String, Value>,
    /// Every `access_token` parameter.
    tokens: Vec<String>,
    body: Body,
}

fn handle(st: &mut State, req: &Incoming, fbtrace_id: &str) -> Outcome {
    let (method, path, params) = (req.method.as_str(), req.path.as_str(), &req.params);
    let fail = |e: GraphError, headers: Vec<(&'static str, String)>| {
        (e.status, e.body(fbtrace_id), headers)
    };
    if st.throttle_next > 0 {
        st.throttle_next -= 1;
        let e = GraphError::new(
            400,
            "OAuthException",
            80003,
            Some(2446079),
            "(#80003) There have been too many calls to this ad-account. Wait a bit and try again. For more info, please refer to https://developers.facebook.com/docs/graph-api/overview/rate-limiting#custom-audience.".to_string(),
        );
        return fail(e, vec![usage_header(100, 0)]);
    }
    let Some(audience_id) = audience_of(path) else {
        let e = GraphError::new(
            400,
            "OAuthException",
            2500,
            None,
            format!("Unknown path components: {path} (expected /v{{major}}.{{minor}}/{{audience_id}}/users)"),
        );
        return fail(e, Vec::new());
    };

    // The access token: `Authorization: Bearer|OAuth <token>` and/or `access_token`.
    let mut tokens = req.tokens.clone();
    if let Some(auth) = &req.authorization {
        let mut words = auth.split_whitespace();
        if let (Some(scheme), Some(token), None) = (words.next(), words.next(), words.next()) {
            if scheme.eq_ignore_ascii_case("Bearer") || scheme.eq_ignore_ascii_case("OAuth") {
                tokens.push(token.to_string());
            }
        }
    }
    if tokens.is_empty() {
        let e = GraphError::new(
            400,
            "OAuthException",
            104,
            None,
            "An access token is required to request this resource.".to_string(),
        );
        return fail(e, Vec::new());
    }
    let token_error = if tokens.iter().any(|t| *t != st.token) {
        Some((
            467,
            "Error validating access token: The access token is invalid or has been revoked.",
        ))
    } else if st.token_expired {
        Some((
            463,
            "Error validating access token: Session has expired. The current time is after the token's expiry time.",
        ))
    } else {
        None
    };
    if let Some((subcode, message)) = token_error {
        let e = GraphError::new(
            401,
            "OAuthException",
            190,
            Some(subcode),
            message.to_string(),
        );
        let challenge = format!("OAuth \"Facebook Platform\" \"invalid_token\" \"{message}\"");
        return fail(e, vec![("WWW-Authenticate", challenge)]);
    }

    let unsupported = |verb: &str| {
        GraphError::new(
            400,
            "GraphMethodException",
            100,
            Some(33),
            format!(
                "Unsupported {verb} request. Object with ID '{audience_id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation. Please read the Graph API documentation at https://developers.facebook.com/docs/graph-api"
            ),
        )
    };
    let add = match method {
        "POST" => true,
        "DELETE" => false,
        other => return fail(unsupported(&other.to_ascii_lowercase()), Vec::new()),
    };
    if !st.audiences.contains_key(audience_id) {
        return fail(unsupported(&method.to_ascii_lowercase()), Vec::new());
    }
    if matches!(req.body, Body::BadJson) {
        return fail(
            GraphError::invalid("The request body must be a JSON object"),
            Vec::new(),
        );
    }
    match apply_users(st, add, audience_id, params) {
        Ok(reply) => (200, reply, vec![usage_header(1, 0)]),
        Err(e) => fail(e, vec![usage_header(1, 0)]),
    }
}

fn serve(mut request: crate::http_server::Request, state: &Mutex<State>) {
    let method = request.method().as_str().to_ascii_uppercase();
    let url = request.url().to_string();
    let mut raw = Vec::new();
    let _ = request.as_reader().read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let body = read_body(
        &request_header(&request, "Content-Type").unwrap_or_default(),
        &text,
    );
    let authorization = request_header(&request, "Authorization");
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));

    // Parameters: the query string, then the body's (which win on a clash).
    let mut params: BTreeMap<String, Value> = BTreeMap::new();
    let mut tokens = Vec::new();
    let mut add_param = |name: String, value: Value| {
        if name == "access_token" {
            tokens.push(match &value {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            });
        } else {
            params.insert(name, value);
        }
    };
    for (name, value) in form_fields(query) {
        add_param(name, Value::String(value));
    }
    match &body {
        Body::Json(members) => {
            for (name, value) in members {
                add_param(name.clone(), value.clone());
            }
        }
        Body::Form(fields) => {
            for (name, value) in fields {
                add_param(name.clone(), Value::String(value.clone()));
            }
        }
        Body::Empty | Body::BadJson => {}
    }

    let incoming = Incoming {
        method,
        path: path.to_string(),
        authorization,
        params,
        tokens,
        body,
    };
    let mut st = state.lock().unwrap();
    st.requests += 1;
    let fbtrace_id = format!("AFakeTrace{:012x}", st.requests);
    let (status, reply, headers) = handle(&mut st, &incoming, &fbtrace_id);
    st.calls.push(Call {
        method: incoming.method,
        path: url.clone(),
        status,
        body: journal_body(&incoming.body),
    });
    drop(st);
    let mut response = Response::from_string(reply.to_string())
        .with_status_code(status)
        .with_header(Header::from_bytes("Content-Type", "application/json; charset=UTF-8").unwrap())
        .with_header(Header::from_bytes("x-fb-trace-id", fbtrace_id.as_bytes()).unwrap());
    for (name, value) in headers {
        response = response.with_header(Header::from_bytes(name, value.as_bytes()).unwrap());
    }
    let _ = request.respond(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::{send, Reply};

    const TOKEN: &str = "EAAB-test-token";
    const AUDIENCE: &str = "23850000000000";
    const USERS: &str = "/v21.0/23850000000000/users";

    /// A made-up SHA-256-shaped digest (64 lowercase hex characters).
    fn h(n: u64) -> String {
        format!("{n:064x}")
    }

    fn started() -> FakeMeta {
        let fake = FakeMeta::start(TOKEN);
        fake.add_audience(AUDIENCE);
        fake
    }

    fn addr(fake: &FakeMeta) -> String {
        fake.base_url().trim_start_matches("http://").to_string()
    }

    fn json_as(fake: &FakeMeta, method: &str, path: &str, token: &str, body: &Value) -> Reply {
        let auth = format!("Bearer {token}");
        send(
            &addr(fake),
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            &body.to_string(),
        )
    }

    fn users(fake: &FakeMeta, method: &str, payload: Value) -> Reply {
        json_as(fake, method, USERS, TOKEN, &json!({ "payload": payload }))
    }

    fn email_phone(rows: Value) -> Value {
        json!({"schema": ["EMAIL", "PHONE"], "data": rows})
    }

    fn member(email: &str, phone: &str) -> Vec<String> {
        vec![email.to_string(), phone.to_string()]
    }

    /// The error object of a Meta error reply, after checking its shape.
    fn error_of(reply: &Reply) -> Value {
        let body = reply.json();
        let error = body["error"].clone();
        assert!(error["message"].is_string(), "{body}");
        assert!(error["type"].is_string(), "{body}");
        assert!(error["code"].is_u64(), "{body}");
        assert!(error["fbtrace_id"].is_string(), "{body}");
        error
    }

    #[test]
    fn adds_re_adds_and_removes_members() {
        let fake = started();
        let r = users(
            &fake,
            "POST",
            email_phone(json!([[h(1), h(2)], [h(3), ""]])),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let body = r.json();
        assert_eq!(body["audience_id"], AUDIENCE);
        assert!(body["session_id"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(body["num_received"], 2);
        assert_eq!(body["num_invalid_entries"], 0);
        assert_eq!(body["invalid_entry_samples"], json!({}));
        let usage: Value =
            serde_json::from_str(r.header("X-Business-Use-Case-Usage").unwrap()).unwrap();
        assert_eq!(usage[AD_ACCOUNT_ID][0]["type"], "custom_audience");
        let both = BTreeSet::from([member(&h(1), &h(2)), member(&h(3), "")]);
        assert_eq!(fake.members(AUDIENCE), both);

        // Adding again changes nothing.
        let r = users(&fake, "POST", email_phone(json!([[h(1), h(2)]])));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(fake.members(AUDIENCE), both);

        // Removal, of a member and of a non-member (not an error).
        let r = users(
            &fake,
            "DELETE",
            email_phone(json!([[h(1), h(2)], [h(9), h(9)]])),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["num_received"], 2);
        assert_eq!(fake.members(AUDIENCE), BTreeSet::from([member(&h(3), "")]));

        let calls = fake.calls();
        assert_eq!(calls.len(), 3);
        assert_eq!(
            (
                calls[2].method.as_str(),
                calls[2].path.as_str(),
                calls[2].status
            ),
            ("DELETE", USERS, 200)
        );
        assert_eq!(
            calls[2].body.as_ref().unwrap()["payload"]["data"][0][0],
            h(1)
        );
        fake.clear_calls();
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn single_key_schema_takes_a_flat_array() {
        let fake = started();
        let r = users(
            &fake,
            "POST",
            json!({"schema": "EMAIL_SHA256", "data": [h(5), [h(6)]]}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            fake.members(AUDIENCE),
            BTreeSet::from([member(&h(5), ""), member(&h(6), "")])
        );
        // A flat row with a multi-key schema is malformed.
        let r = users(&fake, "POST", email_phone(json!([h(7)])));
        assert_eq!(r.status, 400);
        assert_eq!(error_of(&r)["code"], 100);
    }

    #[test]
    fn unhashed_entries_are_counted_with_samples_and_not_applied() {
        let fake = started();
        let r = users(
            &fake,
            "POST",
            email_phone(json!([
                ["alice@example.com", h(2)],
                [h(3), "+15551234567"],
                [h(4), h(5)],
                [h(0xabcdef).to_uppercase(), ""],
                ["", ""],
                [42, ""],
            ])),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let body = r.json();
        assert_eq!(body["num_received"], 6);
        assert_eq!(body["num_invalid_entries"], 5);
        let samples = body["invalid_entry_samples"].as_object().unwrap();
        assert!(samples["alice@example.com"]
            .as_str()
            .unwrap()
            .contains("EMAIL"));
        assert!(samples["+15551234567"].as_str().unwrap().contains("PHONE"));
        assert!(samples.contains_key(&h(0xabcdef).to_uppercase()));
        assert_eq!(samples.len(), 5, "{body}");
        assert_eq!(
            fake.members(AUDIENCE),
            BTreeSet::from([member(&h(4), &h(5))])
        );
    }

    #[test]
    fn more_than_10000_rows_are_refused() {
        let fake = started();
        let rows: Vec<Value> = (0..10_001).map(|i| json!([h(i), ""])).collect();
        let r = users(&fake, "POST", email_phone(Value::Array(rows)));
        assert_eq!(r.status, 400, "{}", r.body);
        let error = error_of(&r);
        assert_eq!(error["code"], 100);
        assert_eq!(error["type"], "OAuthException");
        assert!(error["message"]
            .as_str()
            .unwrap()
            .contains("Maximum number of users per request is 10000"));
        assert!(fake.members(AUDIENCE).is_empty());

        let rows: Vec<Value> = (0..10_000).map(|i| json!([h(i), ""])).collect();
        let r = users(&fake, "POST", email_phone(Value::Array(rows)));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(fake.members(AUDIENCE).len(), 10_000);
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let fake = started();
        let cases = [
            json!({"schema": ["EMAIL", "PHONE"], "data": [[h(1)]]}),
            json!({"schema": ["EMAIL", "PHONE"], "data": [[h(1), h(2), h(3)]]}),
            json!({"schema": ["EMAIL", "SSN"], "data": [[h(1), h(2)]]}),
            json!({"schema": "EMAIL_MD5", "data": [h(1)]}),
            json!({"schema": ["EMAIL", "EMAIL"], "data": [[h(1), h(2)]]}),
            json!({"schema": [], "data": [[h(1)]]}),
            json!({"schema": ["EMAIL"]}),
            json!({"data": [[h(1)]]}),
            json!({"schema": ["EMAIL"], "data": []}),
            json!({"schema": ["EMAIL"], "data": h(1)}),
            json!("not an object"),
        ];
        for payload in cases {
            let r = users(&fake, "POST", payload.clone());
            assert_eq!(r.status, 400, "{payload}: {}", r.body);
            assert_eq!(error_of(&r)["code"], 100, "{payload}");
        }
        // No payload at all, and a JSON body that is not an object.
        let r = json_as(&fake, "POST", USERS, TOKEN, &json!({}));
        assert_eq!((r.status, error_of(&r)["code"].clone()), (400, json!(100)));
        let r = json_as(&fake, "POST", USERS, TOKEN, &json!([1]));
        assert_eq!((r.status, error_of(&r)["code"].clone()), (400, json!(100)));
        // A body that is not JSON or a form carries no payload.
        let auth = format!("Bearer {TOKEN}");
        let body = json!({"payload": email_phone(json!([[h(1), h(2)]]))}).to_string();
        let r = send(
            &addr(&fake),
            "POST",
            USERS,
            &[("Authorization", &auth), ("Content-Type", "text/plain")],
            &body,
        );
        assert_eq!((r.status, error_of(&r)["code"].clone()), (400, json!(100)));
        assert!(fake.members(AUDIENCE).is_empty());
        assert!(fake.calls().iter().all(|c| c.status == 400));
    }

    #[test]
    fn unknown_audience_and_bad_paths() {
        let fake = started();
        let payload = json!({"payload": email_phone(json!([[h(1), h(2)]]))});
        let r = json_as(&fake, "POST", "/v21.0/999/users", TOKEN, &payload);
        assert_eq!(r.status, 400);
        let error = error_of(&r);
        assert_eq!(
            (error["code"].clone(), error["error_subcode"].clone()),
            (json!(100), json!(33))
        );
        assert!(error["message"]
            .as_str()
            .unwrap()
            .contains("'999' does not exist"));

        for path in [
            "/23850000000000/users",
            "/v21/23850000000000/users",
            "/v21.0/23850000000000",
        ] {
            let r = json_as(&fake, "POST", path, TOKEN, &payload);
            assert_eq!(r.status, 400, "{path}");
            assert_eq!(error_of(&r)["code"], 2500, "{path}");
        }
        let r = json_as(&fake, "GET", USERS, TOKEN, &json!({}));
        assert_eq!(
            (r.status, error_of(&r)["error_subcode"].clone()),
            (400, json!(33))
        );
        assert_eq!(fake.calls().len(), 5);
    }

    #[test]
    fn missing_invalid_and_expired_tokens() {
        let fake = started();
        let payload = json!({"payload": email_phone(json!([[h(1), h(2)]]))});
        let r = send(
            &addr(&fake),
            "POST",
            USERS,
            &[("Content-Type", "application/json")],
            &payload.to_string(),
        );
        assert_eq!(r.status, 400);
        let error = error_of(&r);
        assert_eq!(
            (error["code"].clone(), error["type"].clone()),
            (json!(104), json!("OAuthException"))
        );

        let r = json_as(&fake, "POST", USERS, "wrong", &payload);
        assert_eq!(r.status, 401);
        let error = error_of(&r);
        assert_eq!(error["code"], 190);
        assert_eq!(error["type"], "OAuthException");
        assert!(error["message"]
            .as_str()
            .unwrap()
            .starts_with("Error validating access token: "));
        assert!(r
            .header("WWW-Authenticate")
            .unwrap()
            .contains("invalid_token"));
        // A right header does not excuse a wrong parameter.
        let r = json_as(
            &fake,
            "POST",
            &format!("{USERS}?access_token=wrong"),
            TOKEN,
            &payload,
        );
        assert_eq!(r.status, 401);

        fake.expire_token();
        let r = json_as(&fake, "POST", USERS, TOKEN, &payload);
        assert_eq!(r.status, 401);
        let error = error_of(&r);
        assert_eq!(
            (error["code"].clone(), error["error_subcode"].clone()),
            (json!(190), json!(463))
        );
        assert!(fake.members(AUDIENCE).is_empty());
        let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [400, 401, 401, 401]);
    }

    #[test]
    fn token_in_query_string_form_and_header() {
        let fake = started();
        // Query string, JSON body.
        let r = send(
            &addr(&fake),
            "POST",
            &format!("{USERS}?access_token={TOKEN}"),
            &[("Content-Type", "application/json")],
            &json!({"payload": email_phone(json!([[h(1), ""]]))}).to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        // Form body with the payload as JSON text and the token as a field.
        let payload = email_phone(json!([["", h(2)]])).to_string();
        let form = format!(
            "payload={}&access_token={TOKEN}&session=%7B%22session_id%22%3A9876%7D",
            payload
                .replace('"', "%22")
                .replace('[', "%5B")
                .replace(']', "%5D")
        );
        let r = send(
            &addr(&fake),
            "POST",
            USERS,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            &form,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["session_id"], "9876");
        // Header (OAuth scheme too), DELETE with a JSON body.
        let r = send(
            &addr(&fake),
            "DELETE",
            USERS,
            &[
                ("Authorization", &format!("OAuth {TOKEN}")),
                ("Content-Type", "application/json"),
            ],
            &json!({"payload": email_phone(json!([[h(1), ""]]))}).to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(fake.members(AUDIENCE), BTreeSet::from([member("", &h(2))]));
        let calls = fake.calls();
        assert_eq!(
            calls[1].body.as_ref().unwrap()["payload"]["data"][0][1],
            h(2)
        );
    }

    #[test]
    fn throttled_requests_get_the_custom_audience_rate_limit_error() {
        let fake = started();
        fake.throttle_next(2);
        for _ in 0..2 {
            let r = users(&fake, "POST", email_phone(json!([[h(1), h(2)]])));
            assert_eq!(r.status, 400, "{}", r.body);
            let error = error_of(&r);
            assert_eq!(error["code"], 80003);
            assert_eq!(error["error_subcode"], 2446079);
            assert_eq!(error["type"], "OAuthException");
            assert!(error["message"].as_str().unwrap().starts_with("(#80003) "));
            let usage: Value =
                serde_json::from_str(r.header("X-Business-Use-Case-Usage").unwrap()).unwrap();
            let usage = &usage[AD_ACCOUNT_ID][0];
            assert_eq!(usage["type"], "custom_audience");
            assert_eq!(usage["estimated_time_to_regain_access"], 0);
        }
        assert!(fake.members(AUDIENCE).is_empty());
        let r = users(&fake, "POST", email_phone(json!([[h(1), h(2)]])));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(fake.members(AUDIENCE).len(), 1);
        let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [400, 400, 200]);
    }
}
