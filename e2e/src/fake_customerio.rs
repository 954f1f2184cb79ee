//! A strict fake of Customer.io's Track API (v1), the customers part:
//! `PUT /api/v1/customers/{identifier}` adds or updates a person (the JSON object body's
//! attributes are merged into theirs; a `null` or `""` value removes that attribute) and
//! `DELETE /api/v1/customers/{identifier}` removes one (200 even when unknown, as Customer.io
//! answers). Both answer 200 with `{}`.
//!
//! Every request needs HTTP Basic auth `site_id:api_key` (401
//! `{"meta":{"error":"Unauthorized request"}}` otherwise). A PUT is refused with 400 and
//! `{"meta":{"error": "...", "errors": ["..."]}}` (the message both as Customer.io's usual
//! `error` string and as the `errors` array its published schema documents) when its
//! Content-Type is not `application/json`, its body is not a JSON object, the identifier is
//! longer than 150 bytes, an attribute name is empty or longer than 150 bytes, an attribute
//! value is longer than 1000 bytes (a string's own bytes, any other value's JSON text), the
//! call or the merged person has more than 300 attributes, `created_at` or `_timestamp` is not
//! an integer, `_update` is not a boolean, or `email` is neither a text with "@" nor empty.
//! `_update: true` for an unknown identifier creates no one (Customer.io only logs a failed
//! attribute change). `_update`, `_timestamp` and `cio_relationships` steer the call and are
//! not stored as attributes. A scripted 429 (`throttle_next`) answers the next requests,
//! before auth, with `Retry-After: 1`.

use crate::http_util::{percent_decode, request_header, FakeServer};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use crate::http_server::{Header, Response};

/// Customer.io's documented limits for people.
const MAX_ID_BYTES: usize = 150;
const MAX_NAME_BYTES: usize = 150;
const MAX_VALUE_BYTES: usize = 1000;
const MAX_ATTRIBUTES: usize = 300;

/// Body members that steer an identify call rather than being attributes of the person.
const CONTROL_MEMBERS: [&str; 3] = ["_update", "_timestamp", "cio_relationships"];

const CUSTOMERS_PREFIX: &str = "/api/v1/customers/";

#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: Option<Value>,
}

#[derive(Default)]
struct State {
    customers: BTreeMap<String, Value>,
    deleted: Vec<String>,
    calls: Vec<Call>,
    throttle_next: usize,
}

pub struct FakeCustomerIo {
    state: Arc<Mutex<State>>,
    server: FakeServer,
}

impl FakeCustomerIo {
    /// Starts the fake on 127.0.0.1 (a free port), accepting Basic auth `site_id:api_key`.
    pub fn start(site_id: &str, api_key: &str) -> FakeCustomerIo {
        let state = Arc::new(Mutex::new(State::default()));
        let credentials = (site_id.to_string(), api_key.to_string());
        let handler_state = state.clone();
        let server = FakeServer::start("Customer.io", move |request| {
            serve(request, &handler_state, &credentials)
        });
        FakeCustomerIo { state, server }
    }

    /// The Track API root (stands for `https://track.customer.io`).
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// The people held: identifier → attributes object (as merged).
    pub fn customers(&self) -> BTreeMap<String, Value> {
        self.state.lock().unwrap().customers.clone()
    }

    /// The identifiers of the successful DELETE calls, in order (unknown ones included).
    pub fn deleted(&self) -> Vec<String> {
        self.state.lock().unwrap().deleted.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// The next `n` requests get 429 with Retry-After: 1.
    pub fn throttle_next(&self, n: usize) {
        self.state.lock().unwrap().throttle_next = n;
    }
}

/// Standard base64 (RFC 4648 §4, padding optional) decoded; `None` on any other character or
/// an impossible length.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let sextet = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let data = text.trim_end_matches('=').as_bytes();
    if text.len() - data.len() > 2 || data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in data {
        acc = acc << 6 | u32::from(sextet(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Whether the Authorization header is Basic with exactly `site_id:api_key`.
fn authorized(request: &crate::http_server::Request, (site_id, api_key): &(String, String)) -> bool {
    let Some(header) = request_header(request, "Authorization") else {
        return false;
    };
    let Some((scheme, encoded)) = header.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Some(decoded) = base64_decode(encoded.trim()) else {
        return false;
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return false;
    };
    decoded.split_once(':') == Some((site_id.as_str(), api_key.as_str()))
}

/// A value's size as Customer.io measures it: a string's bytes, anything else's JSON text.
fn value_bytes(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        other => other.to_string().len(),
    }
}

/// A value that clears the attribute instead of setting it.
fn clears(value: &Value) -> bool {
    matches!(value, Value::Null) || value.as_str() == Some("")
}

/// The identify body checked: its object, or the message refusing it.
fn check_identify(body: Option<&Value>) -> Result<&Map<String, Value>, String> {
    let object = body
        .and_then(Value::as_object)
        .ok_or("request body must be a JSON object")?;
    if object.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "too many attributes: {} (at most {MAX_ATTRIBUTES} per call)",
            object.len()
        ));
    }
    for (name, value) in object {
        if name.is_empty() {
            return Err("attribute names must not be empty".into());
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "attribute name {name:?} is longer than {MAX_NAME_BYTES} bytes"
            ));
        }
        if value_bytes(value) > MAX_VALUE_BYTES {
            return Err(format!(
                "attribute {name:?}: value is longer than {MAX_VALUE_BYTES} bytes"
            ));
        }
    }
    match object.get("created_at") {
        None | Some(Value::Null) => {}
        Some(v) if v.is_i64() || v.is_u64() => {}
        Some(v) => {
            return Err(format!(
                "created_at must be a unix timestamp (integer), got {v}"
            ))
        }
    }
    match object.get("_timestamp") {
        None => {}
        Some(v) if v.is_i64() || v.is_u64() => {}
        Some(v) => {
            return Err(format!(
                "_timestamp must be a unix timestamp (integer), got {v}"
            ))
        }
    }
    if !matches!(object.get("_update"), None | Some(Value::Bool(_))) {
        return Err("_update must be a boolean".into());
    }
    match object.get("email") {
        None | Some(Value::Null) => {}
        Some(Value::String(email)) if email.is_empty() || email.contains('@') => {}
        Some(v) => return Err(format!("email is not a valid email address: {v}")),
    }
    Ok(object)
}

/// `PUT /api/v1/customers/{id}`: the attributes merged into the person, or the 400 message.
fn identify(
    request: &crate::http_server::Request,
    id: String,
    body: Option<&Value>,
    st: &mut State,
) -> Result<(), String> {
    if !request_header(request, "Content-Type").is_some_and(|c| {
        c.split(';')
            .next()
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
    }) {
        return Err("Content-Type must be application/json".into());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!("identifier is longer than {MAX_ID_BYTES} bytes"));
    }
    let object = check_identify(body)?;
    let known = st.customers.contains_key(&id);
    if object.get("_update") == Some(&Value::Bool(true)) && !known {
        // Customer.io answers 200 and only records a failed attribute change.
        return Ok(());
    }
    let mut merged = match st.customers.get(&id) {
        Some(Value::Object(attributes)) => attributes.clone(),
        _ => Map::new(),
    };
    for (name, value) in object
        .iter()
        .filter(|(name, _)| !CONTROL_MEMBERS.contains(&name.as_str()))
    {
        if clears(value) {
            merged.remove(name);
        } else {
            merged.insert(name.clone(), value.clone());
        }
    }
    if merged.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "too many attributes: the person would have {} (at most {MAX_ATTRIBUTES})",
            merged.len()
        ));
    }
    st.customers.insert(id, Value::Object(merged));
    Ok(())
}

fn error_body(message: &str) -> Value {
    json!({"meta": {"error": message, "errors": [message]}})
}

fn serve(mut request: crate::http_server::Request, state: &Mutex<State>, credentials: &(String, String)) {
    let method = request.method().as_str().to_string();
    let path = request.url().to_string();
    let mut raw = Vec::new();
    let _ = request.as_reader().read_to_end(&mut raw);
    let body: Option<Value> = serde_json::from_slice(&raw).ok();
    let route = path.split('?').next().unwrap_or_default();
    let id = route
        .strip_prefix(CUSTOMERS_PREFIX)
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .map(|id| percent_decode(id, false));
    let mut st = state.lock().unwrap();
    let (status, reply): (u16, Value) = if st.throttle_next > 0 {
        st.throttle_next -= 1;
        (
            429,
            json!({"meta": {"error": "Too many requests: over the Track API rate limit"}}),
        )
    } else if !authorized(&request, credentials) {
        (401, json!({"meta": {"error": "Unauthorized request"}}))
    } else {
        match (method.as_str(), id) {
            ("PUT", Some(id)) => match identify(&request, id, body.as_ref(), &mut st) {
                Ok(()) => (200, json!({})),
                Err(message) => (400, error_body(&message)),
            },
            ("DELETE", Some(id)) if id.len() > MAX_ID_BYTES => (
                400,
                error_body(&format!("identifier is longer than {MAX_ID_BYTES} bytes")),
            ),
            ("DELETE", Some(id)) => {
                st.customers.remove(&id);
                st.deleted.push(id);
                (200, json!({}))
            }
            _ => (
                404,
                json!({"meta": {"error": format!("no route {method} {route}")}}),
            ),
        }
    };
    st.calls.push(Call {
        method,
        path,
        status,
        body,
    });
    drop(st);
    let mut response = Response::from_string(reply.to_string())
        .with_status_code(status)
        .with_header(Header::from_bytes("Content-Type", "application/json").unwrap());
    if status == 429 {
        response = response.with_header(Header::from_bytes("Retry-After", "1").unwrap());
    }
    let _ = request.respond(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::{send, Reply};

    const SITE: &str = "site-1";
    const KEY: &str = "key-1";

    /// Standard base64 with padding, for building Authorization headers.
    fn base64_encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64_encode(format!("{user}:{password}").as_bytes())
        )
    }

    fn addr(fake: &FakeCustomerIo) -> String {
        fake.base_url().trim_start_matches("http://").to_string()
    }

    fn put(fake: &FakeCustomerIo, id: &str, body: &str) -> Reply {
        let auth = basic(SITE, KEY);
        send(
            &addr(fake),
            "PUT",
            &format!("/api/v1/customers/{id}"),
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    }

    fn delete(fake: &FakeCustomerIo, id: &str) -> Reply {
        let auth = basic(SITE, KEY);
        send(
            &addr(fake),
            "DELETE",
            &format!("/api/v1/customers/{id}"),
            &[("Authorization", &auth)],
            "",
        )
    }

    fn assert_400(reply: &Reply, needle: &str) {
        assert_eq!(reply.status, 400, "{}", reply.body);
        let body = reply.json();
        let error = body["meta"]["error"].as_str().unwrap();
        assert!(error.contains(needle), "{error:?} lacks {needle:?}");
        assert_eq!(body["meta"]["errors"], json!([error]));
    }

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        for text in ["", "a", "ab", "abc", "site-1:key-1", "ü:ß"] {
            assert_eq!(
                base64_decode(&base64_encode(text.as_bytes())).unwrap(),
                text.as_bytes()
            );
        }
        assert_eq!(base64_decode("c2l0ZQ").unwrap(), b"site");
        assert_eq!(base64_decode("a"), None);
        assert_eq!(base64_decode("ab!c"), None);
        assert_eq!(base64_decode("ab==="), None);
    }

    #[test]
    fn identify_creates_then_merges() {
        let fake = FakeCustomerIo::start(SITE, KEY);
        let reply = put(
            &fake,
            "42",
            r#"{"email":"a@example.com","created_at":1361205308,"plan":"basic","age":30}"#,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json(), json!({}));
        assert_eq!(reply.header("Content-Type"), Some("application/json"));
        assert_eq!(
            fake.customers()["42"],
            json!({"email": "a@example.com", "created_at": 1361205308, "plan": "basic", "age": 30})
        );

        let reply = put(
            &fake,
            "42",
            r#"{"plan":"pro","age":null,"email":"","vip":true,"_update":true}"#,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            fake.customers()["42"],
            json!({"created_at": 1361205308, "plan": "pro", "vip": true})
        );

        // `_update: true` never creates anyone.
        assert_eq!(
            put(&fake, "43", r#"{"_update":true,"plan":"x"}"#).status,
            200
        );
        assert!(!fake.customers().contains_key("43"));

        let calls = fake.calls();
        assert_eq!(calls.len(), 3);
        assert_eq!(
            (
                calls[0].method.as_str(),
                calls[0].path.as_str(),
                calls[0].status
            ),
            ("PUT", "/api/v1/customers/42", 200)
        );
        assert_eq!(calls[1].body.as_ref().unwrap()["plan"], "pro");
        fake.clear_calls();
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn delete_removes_and_unknown_is_ok() {
        let fake = FakeCustomerIo::start(SITE, KEY);
        assert_eq!(put(&fake, "1", r#"{"plan":"basic"}"#).status, 200);
        assert_eq!(put(&fake, "2", r#"{"plan":"basic"}"#).status, 200);
        let reply = delete(&fake, "1");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json(), json!({}));
        assert_eq!(delete(&fake, "nobody").status, 200);
        assert_eq!(fake.customers().keys().collect::<Vec<_>>(), ["2"]);
        assert_eq!(fake.deleted(), ["1", "nobody"]);
        assert_eq!(
            fake.calls().last().map(|c| (c.method.clone(), c.status)),
            Some(("DELETE".into(), 200))
        );
    }

    #[test]
    fn unauthorized_without_or_with_wrong_credentials() {
        let fake = FakeCustomerIo::start(SITE, KEY);
        let body = r#"{"plan":"basic"}"#;
        let path = "/api/v1/customers/1";
        let json_type = ("Content-Type", "application/json");
        let replies = [
            send(&addr(&fake), "PUT", path, &[json_type], body),
            send(
                &addr(&fake),
                "PUT",
                path,
                &[("Authorization", &basic(SITE, "wrong")), json_type],
                body,
            ),
            send(
                &addr(&fake),
                "PUT",
                path,
                &[("Authorization", &basic("other", KEY)), json_type],
                body,
            ),
            send(
                &addr(&fake),
                "PUT",
                path,
                &[("Authorization", "Bearer key-1"), json_type],
                body,
            ),
            send(
                &addr(&fake),
                "PUT",
                path,
                &[("Authorization", "Basic !!!"), json_type],
                body,
            ),
            send(
                &addr(&fake),
                "DELETE",
                path,
                &[("Authorization", &basic(SITE, "wrong"))],
                "",
            ),
        ];
        for reply in &replies {
            assert_eq!(reply.status, 401, "{}", reply.body);
            assert_eq!(
                reply.json(),
                json!({"meta": {"error": "Unauthorized request"}})
            );
        }
        assert!(fake.customers().is_empty());
        assert!(fake.deleted().is_empty());
        assert!(fake.calls().iter().all(|c| c.status == 401));
        assert_eq!(fake.calls().len(), replies.len());
    }

    #[test]
    fn invalid_identify_bodies_are_400() {
        let fake = FakeCustomerIo::start(SITE, KEY);
        assert_400(
            &put(&fake, "1", r#"{"created_at":"2024-01-01"}"#),
            "created_at",
        );
        assert_400(&put(&fake, "1", r#"{"created_at":1.5}"#), "created_at");
        assert_400(&put(&fake, "1", r#"{"email":"not-an-email"}"#), "email");
        assert_400(&put(&fake, "1", r#"{"email":42}"#), "email");
        let long = "x".repeat(MAX_VALUE_BYTES + 1);
        assert_400(
            &put(&fake, "1", &json!({ "bio": long }).to_string()),
            "longer than 1000 bytes",
        );
        assert_400(
            &put(&fake, "1", &json!({ "n".repeat(151): 1 }).to_string()),
            "longer than 150 bytes",
        );
        assert_400(&put(&fake, "1", r#"["a"]"#), "JSON object");
        assert_400(&put(&fake, "1", "not json"), "JSON object");
        assert_400(&put(&fake, "1", ""), "JSON object");
        assert_400(&put(&fake, "1", r#"{"_update":"yes"}"#), "_update");
        assert_400(&put(&fake, &"i".repeat(151), "{}"), "identifier");
        let many: Map<String, Value> = (0..=MAX_ATTRIBUTES)
            .map(|i| (format!("a{i}"), json!(i)))
            .collect();
        assert_400(
            &put(&fake, "1", &Value::Object(many).to_string()),
            "too many attributes",
        );
        let auth = basic(SITE, KEY);
        let form = send(
            &addr(&fake),
            "PUT",
            "/api/v1/customers/1",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            "plan=basic",
        );
        assert_400(&form, "Content-Type");
        assert!(fake.customers().is_empty());
        assert!(fake.calls().iter().all(|c| c.status == 400));

        // At the limits exactly: accepted.
        let at_limit =
            json!({ "n".repeat(150): "v".repeat(1000), "email": "a@b", "created_at": 0 });
        assert_eq!(
            put(&fake, &"i".repeat(150), &at_limit.to_string()).status,
            200
        );
    }

    #[test]
    fn throttled_requests_get_429_with_retry_after() {
        let fake = FakeCustomerIo::start(SITE, KEY);
        fake.throttle_next(2);
        for _ in 0..2 {
            let reply = put(&fake, "1", r#"{"plan":"basic"}"#);
            assert_eq!(reply.status, 429, "{}", reply.body);
            assert_eq!(reply.header("Retry-After"), Some("1"));
            assert!(reply.json()["meta"]["error"].is_string());
        }
        assert!(fake.customers().is_empty());
        assert_eq!(put(&fake, "1", r#"{"plan":"basic"}"#).status, 200);
        assert_eq!(
            fake.calls().iter().map(|c| c.status).collect::<Vec<_>>(),
            [429, 429, 200]
        );
    }

    #[test]
    fn percent_encoded_identifiers_are_decoded() {
        let fake = FakeCustomerIo::start(SITE, KEY);
        assert_eq!(
            put(&fake, "a%2Bb%40example.com", r#"{"plan":"basic"}"#).status,
            200
        );
        assert_eq!(put(&fake, "J%C3%BCrgen%20K", "{}").status, 200);
        assert_eq!(put(&fake, "x%2Fy", "{}").status, 200);
        let customers = fake.customers();
        assert_eq!(customers["a+b@example.com"], json!({"plan": "basic"}));
        assert_eq!(customers["Jürgen K"], json!({}));
        assert!(customers.contains_key("x/y"));
        assert_eq!(delete(&fake, "a%2Bb%40example.com").status, 200);
        assert_eq!(fake.deleted(), ["a+b@example.com"]);
        assert_eq!(
            fake.calls()[0].path,
            "/api/v1/customers/a%2Bb%40example.com"
        );
    }

    #[test]
    fn unknown_routes_are_404() {
        let fake = FakeCustomerIo::start(SITE, KEY);
        let auth = basic(SITE, KEY);
        for (method, path) in [
            ("GET", "/api/v1/customers/1"),
            ("PUT", "/api/v1/customers/"),
            ("PUT", "/api/v1/people/1"),
        ] {
            let reply = send(
                &addr(&fake),
                method,
                path,
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                "{}",
            );
            assert_eq!(reply.status, 404, "{method} {path}: {}", reply.body);
        }
        assert!(fake.customers().is_empty());
    }
}
