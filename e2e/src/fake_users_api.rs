//! A strict fake of a small third-party REST API, the kind the generic HTTP connector
//! (`type 'http'`) is for: `PUT /v1/users/{id}` with a JSON body `{"email", "name", "score"}`
//! creates or replaces a user, `POST /v1/users` creates one under an id of the API's choosing
//! (`u1`, `u2`, ...; answered as `{"user": {"id": ...}}`), `DELETE /v1/users/{id}` removes one
//! (404 if unknown). Every
//! request needs `X-Api-Key` (401 otherwise) and `Content-Type: application/json` on PUT (415);
//! a body with unknown members, a non-string name or a non-number score is refused with 400,
//! an email without "@" with 422 `{"error": "invalid email"}`. A scripted 429 answers the
//! next request with `Retry-After: 1`. `POST /oauth/token` (OAuth 2.0 client-credentials grant,
//! form-encoded, RFC 6749 §4.4) issues a new API key when OAuth is configured; `expire_keys`
//! makes every key issued so far answer 401.

use crate::http_util::{percent_decode, request_header, FakeServer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use crate::http_server::{Header, Response};

#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: Option<Value>,
}

#[derive(Default)]
struct State {
    users: BTreeMap<String, Value>,
    calls: Vec<Call>,
    throttle_next: usize,
    created: usize,
    /// Keys that are accepted; the one given to `start` first.
    keys: Vec<String>,
    /// (client_id, client_secret) for the token endpoint.
    oauth: Option<(String, String)>,
    token_calls: usize,
}

pub struct FakeUsersApi {
    api_key: String,
    state: Arc<Mutex<State>>,
    server: FakeServer,
}

impl FakeUsersApi {
    pub fn start(api_key: &str) -> FakeUsersApi {
        let state = Arc::new(Mutex::new(State { keys: vec![api_key.to_string()], ..State::default() }));
        let handler_state = state.clone();
        let server = FakeServer::start("users API", move |request| serve(request, &handler_state));
        FakeUsersApi { api_key: api_key.to_string(), state, server }
    }

    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// The users held, by id.
    pub fn users(&self) -> BTreeMap<String, Value> {
        self.state.lock().unwrap().users.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// Accept client-credentials token requests from this client.
    pub fn configure_oauth(&self, client_id: &str, client_secret: &str) {
        self.state.lock().unwrap().oauth = Some((client_id.to_string(), client_secret.to_string()));
    }

    /// Every key issued so far is refused from now on.
    pub fn expire_keys(&self) {
        self.state.lock().unwrap().keys.clear();
    }

    pub fn token_calls(&self) -> usize {
        self.state.lock().unwrap().token_calls
    }

    /// The next `n` requests get 429 with Retry-After: 1.
    pub fn throttle_next(&self, n: usize) {
        self.state.lock().unwrap().throttle_next = n;
    }
}

fn check_user(body: &Value) -> Result<(), (u16, String)> {
    let object = body.as_object().ok_or((400, "body must be a JSON object".to_string()))?;
    if let Some(unknown) = object.keys().find(|k| !matches!(k.as_str(), "email" | "name" | "score")) {
        return Err((400, format!("unknown member {unknown:?}")));
    }
    match object.get("email") {
        Some(Value::String(email)) if email.contains('@') => {}
        Some(Value::String(_)) => return Err((422, "invalid email".into())),
        _ => return Err((400, "email must be a string".into())),
    }
    if !matches!(object.get("name"), None | Some(Value::String(_)) | Some(Value::Null)) {
        return Err((400, "name must be a string or null".into()));
    }
    if !matches!(object.get("score"), None | Some(Value::Number(_)) | Some(Value::Null)) {
        return Err((400, "score must be a number or null".into()));
    }
    Ok(())
}

/// The request body as a user, or the status and message refusing it.
fn valid_user(body: Option<&Value>) -> Result<&Value, (u16, String)> {
    let body = body.ok_or((400, "body is not JSON".to_string()))?;
    check_user(body)?;
    Ok(body)
}

/// `POST /oauth/token`: a new key for the configured client (client-credentials grant only).
fn token(request: &crate::http_server::Request, form: &str, st: &mut State) -> (u16, Value) {
    st.token_calls += 1;
    if !request_header(request, "Content-Type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")) {
        return (400, json!({"error": "invalid_request", "error_description": "form-encoded body required"}));
    }
    let fields: BTreeMap<String, String> = url_decode_pairs(form);
    let field = |name: &str| fields.get(name).map(String::as_str);
    if field("grant_type") != Some("client_credentials") {
        return (400, json!({"error": "unsupported_grant_type"}));
    }
    match &st.oauth {
        Some((id, secret)) if field("client_id") == Some(id.as_str()) && field("client_secret") == Some(secret.as_str()) => {
            let key = format!("key-{}", st.token_calls);
            st.keys.push(key.clone());
            (200, json!({"access_token": key, "token_type": "Bearer", "expires_in": 3600}))
        }
        _ => (401, json!({"error": "invalid_client"})),
    }
}

/// `a=1&b=x%20y` -> {a: 1, b: "x y"} ('+' is a space; a pair without '=' is ignored, the last
/// of a repeated name wins).
fn url_decode_pairs(form: &str) -> BTreeMap<String, String> {
    let decode = |s: &str| percent_decode(s, true);
    form.split('&').filter_map(|p| p.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
}

fn serve(mut request: crate::http_server::Request, state: &Mutex<State>) {
    let method = request.method().as_str().to_string();
    let path = request.url().to_string();
    let mut text = String::new();
    let _ = request.as_reader().read_to_string(&mut text);
    let body: Option<Value> = serde_json::from_str(&text).ok();
    let mut st = state.lock().unwrap();
    let id = path.strip_prefix("/v1/users/").filter(|id| !id.is_empty() && !id.contains('/')).map(str::to_string);
    let (status, reply): (u16, Value) = if method == "POST" && path == "/oauth/token" {
        token(&request, &text, &mut st)
    } else if st.throttle_next > 0 {
        st.throttle_next -= 1;
        (429, json!({"error": "slow down"}))
    } else if !request_header(&request, "X-Api-Key").is_some_and(|k| st.keys.contains(&k)) {
        (401, json!({"error": "missing or wrong X-Api-Key"}))
    } else {
        match (method.as_str(), id) {
            ("POST", None) if path == "/v1/users" => {
                match valid_user(body.as_ref()) {
                    Ok(user) => {
                        st.created += 1;
                        let id = format!("u{}", st.created);
                        st.users.insert(id.clone(), user.clone());
                        (201, json!({"user": {"id": id}}))
                    }
                    Err((status, message)) => (status, json!({"error": message})),
                }
            }
            ("PUT", Some(id)) => {
                if !request_header(&request, "Content-Type").is_some_and(|c| c.starts_with("application/json")) {
                    (415, json!({"error": "Content-Type must be application/json"}))
                } else {
                    match valid_user(body.as_ref()) {
                        Ok(user) => {
                            let created = st.users.insert(id, user.clone()).is_none();
                            (if created { 201 } else { 200 }, user.clone())
                        }
                        Err((status, message)) => (status, json!({"error": message})),
                    }
                }
            }
            ("DELETE", Some(id)) => match st.users.remove(&id) {
                Some(_) => (204, Value::Null),
                None => (404, json!({"error": "no such user"})),
            },
            _ => (404, json!({"error": format!("no route {method} {path}")})),
        }
    };
    st.calls.push(Call { method, path, status, body });
    drop(st);
    let mut response = Response::from_string(if reply.is_null() { String::new() } else { reply.to_string() })
        .with_status_code(status)
        .with_header(Header::from_bytes("Content-Type", "application/json").unwrap());
    if status == 429 {
        response = response.with_header(Header::from_bytes("Retry-After", "1").unwrap());
    }
    let _ = request.respond(response);
}
