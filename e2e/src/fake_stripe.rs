//! A strict local fake of the part of Stripe's Customers API that a Stripe destination
//! connector uses:
//!
//! * `POST /v1/customers/{id}` — update a customer: `email`, `name`, `description`, `phone`
//!   (`""` unsets one), `metadata[KEY]` (merged into the customer's metadata; `""` unsets that
//!   key; `metadata=` clears them all), `address[line1|line2|city|state|postal_code|country]`
//!   (replaces the address; `address=` unsets it) and `preferred_locales[]` /
//!   `preferred_locales[N]` (replaces the list; `preferred_locales=` empties it);
//! * `GET /v1/customers/{id}` — retrieve a customer.
//!
//! Both answer 200 with the customer object. Strictness: a request the real API would refuse is
//! refused here too, with Stripe's statuses and `{"error": {"type", "code", "param",
//! "message", "doc_url"}}` bodies:
//!
//! * no `Authorization` (or an empty key) → 401 "You did not provide an API key..."; a wrong
//!   key → 401 "Invalid API Key provided: sk_test_****...abcd", masked as Stripe masks it — the
//!   key sent is never echoed in full, the fake's own key never at all. `Bearer <key>` and
//!   HTTP Basic `<key>:` are both accepted, as Stripe accepts both;
//! * a POST whose body is not `application/x-www-form-urlencoded` → 400;
//! * any parameter but the ones above → 400 `parameter_unknown` (this includes parameters the
//!   real endpoint has but the fake does not model, such as `balance`, `shipping` or
//!   `expand[]`, so that a connector sending them is noticed); a hash or array parameter
//!   given a non-empty scalar (or a scalar given a hash) → 400 "Invalid hash" / "Invalid array"
//!   / "Invalid string";
//! * strings longer than the spec's `maxLength` (email 512, name 256, phone 20, description,
//!   address fields and locales 5000) → 400; an email that does not look like one → 400
//!   `email_invalid`;
//! * metadata: a key longer than 40 characters, or with square brackets, a value longer than 500
//!   characters, or more than 50 keys on the updated customer → 400 (param `metadata`); the
//!   update is then not applied at all;
//! * an unknown customer → 404 `resource_missing` (param `id`), after parameter validation;
//! * an unknown route → 404 "Unrecognized request URL (METHOD: /path)...".
//!
//! Idempotency (`Idempotency-Key`, POST only; ignored on GET as Stripe ignores it): the result
//! of a request that passed validation (200, or 404 for an unknown customer) is stored under its
//! key; a later request with the same key, endpoint and parameters (compared as decoded
//! name/value pairs, stable-sorted by name) gets it replayed — same status and body, headers
//! `Idempotent-Replayed: true` and `Original-Request: <first Request-Id>` — without being applied
//! again. The same key with other parameters or on another endpoint → 400 `idempotency_error`.
//! Requests refused by authentication, rate limiting or validation store nothing, as Stripe
//! saves results only once an endpoint began executing. Keys longer than 255 characters → 400.
//!
//! [`FakeStripe::throttle_next`] answers the next requests (before authentication) with 429
//! `rate_limit` and `Stripe-Should-Retry: true`. Every response carries `Request-Id: req_...`
//! and, when one was sent, the `Idempotency-Key` back. Every request, refused or not, is
//! journaled in [`FakeStripe::calls`].
//!
//! Not modelled: creating, deleting, listing or searching customers, `Stripe-Account`
//! (connected accounts), `Stripe-Version`, concurrent requests with the same idempotency key
//! (the fake serves one request at a time) and the 24-hour expiry of idempotency keys.

use crate::http_util::{form_fields, percent_decode, request_header, FakeServer};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use crate::http_server::{Header, Request, Response};

const CUSTOMERS_PREFIX: &str = "/v1/customers/";
/// Stripe's documented metadata limits.
const MAX_METADATA_KEYS: usize = 50;
const MAX_METADATA_KEY_CHARS: usize = 40;
const MAX_METADATA_VALUE_CHARS: usize = 500;
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;
/// The scalar parameters of `POST /v1/customers/{customer}` the fake accepts, with their
/// `maxLength` in Stripe's OpenAPI description.
const SCALARS: [(&str, usize); 4] = [
    ("email", 512),
    ("name", 256),
    ("description", 5000),
    ("phone", 20),
];
/// The members of `address`, all `maxLength: 5000`.
const ADDRESS_FIELDS: [&str; 6] = ["city", "country", "line1", "line2", "postal_code", "state"];
const MAX_ADDRESS_FIELD_CHARS: usize = 5000;
const MAX_LOCALE_CHARS: usize = 5000;
const SUPPORT: &str = "If you have any questions, we can help at https://support.stripe.com/.";

/// One request the fake received, with the status it answered.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The request target as sent (path, and the query string if any).
    pub path: String,
    pub status: u16,
    /// The decoded form pairs of the body, in order, repeats included.
    pub form: Vec<(String, String)>,
    pub idempotency_key: Option<String>,
    /// The response was an idempotent replay of a stored one; nothing was applied.
    pub replayed: bool,
}

#[derive(Clone, Debug, Default)]
struct Customer {
    email: Option<String>,
    name: Option<String>,
    description: Option<String>,
    phone: Option<String>,
    metadata: BTreeMap<String, String>,
    /// `address` member -> value (`None` when unset); `None` when there is no address at all.
    address: Option<BTreeMap<String, Option<String>>>,
    preferred_locales: Vec<String>,
    created: u64,
}

impl Customer {
    fn scalar_mut(&mut self, name: &str) -> &mut Option<String> {
        match name {
            "email" => &mut self.email,
            "name" => &mut self.name,
            "description" => &mut self.description,
            _ => &mut self.phone,
        }
    }
}

/// A response stored under an idempotency key.
struct Stored {
    method: String,
    path: String,
    params: Vec<(String, String)>,
    status: u16,
    body: String,
    request_id: String,
}

struct State {
    secret_key: String,
    customers: BTreeMap<String, Customer>,
    calls: Vec<Call>,
    throttle_next: usize,
    idempotency: HashMap<String, Stored>,
}

pub struct FakeStripe {
    state: Arc<Mutex<State>>,
    server: FakeServer,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not hide the journal from the other assertions.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeStripe {
    /// Starts the fake on 127.0.0.1 (a free port) with `secret_key` (e.g. `sk_test_abc`) as the
    /// one valid API key.
    pub fn start(secret_key: &str) -> FakeStripe {
        let state = Arc::new(Mutex::new(State {
            secret_key: secret_key.to_string(),
            customers: BTreeMap::new(),
            calls: Vec::new(),
            throttle_next: 0,
            idempotency: HashMap::new(),
        }));
        let handler_state = state.clone();
        let server = FakeServer::start("Stripe", move |request| serve(request, &handler_state));
        FakeStripe { state, server }
    }

    /// `http://127.0.0.1:PORT`, to be used in place of `https://api.stripe.com`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Adds (or resets) customer `id` with `email` and nothing else set.
    pub fn add_customer(&self, id: &str, email: &str) {
        let customer = Customer {
            email: Some(email.to_string()),
            created: now(),
            ..Customer::default()
        };
        lock(&self.state).customers.insert(id.to_string(), customer);
    }

    /// The customers, by id, as `{"email", "name", "description", "phone", "metadata": {...}}`
    /// (`null` for what is unset).
    pub fn customers(&self) -> BTreeMap<String, Value> {
        lock(&self.state)
            .customers
            .iter()
            .map(|(id, c)| {
                let view = json!({
                    "email": c.email,
                    "name": c.name,
                    "description": c.description,
                    "phone": c.phone,
                    "metadata": c.metadata,
                });
                (id.clone(), view)
            })
            .collect()
    }

    /// Every request received so far, in order, with its final status.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state).calls.clone()
    }

    pub fn clear_calls(&self) {
        lock(&self.state).calls.clear();
    }

    /// The next `n` requests get 429 `rate_limit` with `Stripe-Should-Retry: true`.
    pub fn throttle_next(&self, n: usize) {
        lock(&self.state).throttle_next = n;
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers: randomness, time, Stripe error bodies, authentication.

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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

/// `req_` and 14 letters or digits, like Stripe's request ids.
fn new_request_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let (mut a, mut b) = (random_u64(), random_u64());
    let mut id = String::from("req_");
    for i in 0..14 {
        let r = if i < 7 { &mut a } else { &mut b };
        id.push(ALPHABET[(*r % ALPHABET.len() as u64) as usize] as char);
        *r /= ALPHABET.len() as u64;
    }
    id
}

/// A Stripe error: status and the members of `{"error": {...}}`.
#[derive(Debug)]
struct ApiError {
    status: u16,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    message: String,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
        }
    }

    /// 400 `invalid_request_error`.
    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request_error", message)
    }

    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    fn body(&self) -> Value {
        let mut error = Map::new();
        if let Some(code) = self.code {
            error.insert("code".into(), json!(code));
            let doc = format!(
                "https://stripe.com/docs/error-codes/{}",
                code.replace('_', "-")
            );
            error.insert("doc_url".into(), json!(doc));
        }
        error.insert("message".into(), json!(self.message));
        if let Some(param) = &self.param {
            error.insert("param".into(), json!(param));
        }
        error.insert("type".into(), json!(self.kind));
        json!({ "error": error })
    }
}

fn unknown_parameter(name: &str) -> ApiError {
    ApiError::invalid(format!("Received unknown parameter: {name}"))
        .code("parameter_unknown")
        .param(name)
}

fn no_such_customer(id: &str) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        format!("No such customer: '{id}'"),
    )
    .code("resource_missing")
    .param("id")
}

/// `key` as Stripe shows a rejected key: its `sk_test_`-style prefix, then stars, then the last
/// four characters when at least eight follow the prefix (all stars otherwise), so that the key
/// is never shown in full.
fn mask_key(key: &str) -> String {
    let prefix = ["sk_", "rk_", "pk_"]
        .iter()
        .find(|p| key.starts_with(*p))
        .and_then(|_| {
            ["test_", "live_"]
                .iter()
                .find(|m| key[3..].starts_with(*m))
                .map(|m| &key[..3 + m.len()])
        })
        .unwrap_or("");
    let rest: Vec<char> = key[prefix.len()..].chars().collect();
    let shown = if rest.len() >= 8 { 4 } else { 0 };
    let tail: String = rest[rest.len() - shown..].iter().collect();
    format!("{prefix}{}{tail}", "*".repeat(rest.len() - shown))
}

/// Standard base64 (padding optional); `None` on anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text.trim_end_matches('=').as_bytes();
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Checks the API key: `Authorization: Bearer <key>` or Basic `<key>:`.
fn authenticate(request: &Request, secret_key: &str) -> Result<(), ApiError> {
    let missing = || {
        ApiError::new(
            401,
            "invalid_request_error",
            "You did not provide an API key. You need to provide your API key in the \
             Authorization header, using Bearer auth (e.g. 'Authorization: Bearer \
             YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or \
             we can help at https://support.stripe.com/.",
        )
    };
    let header = request_header(request, "Authorization").ok_or_else(missing)?;
    let header = header.trim();
    let (scheme, credentials) = header.split_once(' ').unwrap_or((header, ""));
    let invalid = |key: &str| {
        ApiError::new(
            401,
            "invalid_request_error",
            format!("Invalid API Key provided: {}", mask_key(key)),
        )
    };
    let key = if scheme.eq_ignore_ascii_case("Bearer") {
        credentials.trim().to_string()
    } else if scheme.eq_ignore_ascii_case("Basic") {
        let decoded = base64_decode(credentials.trim())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        decoded.split(':').next().unwrap_or("").to_string()
    } else {
        // No (known) scheme: refused even when it is the right key, shown masked.
        return Err(invalid(header));
    };
    if key.is_empty() {
        return Err(missing());
    }
    if key == secret_key {
        return Ok(());
    }
    Err(invalid(&key))
}

// ---------------------------------------------------------------------------------------------
// Serving.

/// What to answer.
struct Outcome {
    status: u16,
    body: String,
    headers: Vec<(&'static str, String)>,
    replayed: bool,
}

impl Outcome {
    fn json(status: u16, body: &Value) -> Outcome {
        Outcome {
            status,
            body: body.to_string(),
            headers: Vec::new(),
            replayed: false,
        }
    }
}

impl From<ApiError> for Outcome {
    fn from(e: ApiError) -> Outcome {
        let mut outcome = Outcome::json(e.status, &e.body());
        if e.status == 401 {
            outcome
                .headers
                .push(("WWW-Authenticate", "Bearer realm=\"Stripe\"".into()));
        }
        outcome
    }
}

fn serve(mut request: Request, state: &Mutex<State>) {
    let method = request.method().as_str().to_string();
    let target = request.url().to_string();
    let mut raw = Vec::new();
    let _ = request.as_reader().read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let form = form_fields(&text);
    let idempotency_key = request_header(&request, "Idempotency-Key");
    let request_id = new_request_id();
    let mut st = lock(state);
    let outcome = handle(
        &request,
        &method,
        &target,
        &text,
        &form,
        idempotency_key.as_deref(),
        &request_id,
        &mut st,
    );
    st.calls.push(Call {
        method,
        path: target,
        status: outcome.status,
        form,
        idempotency_key: idempotency_key.clone(),
        replayed: outcome.replayed,
    });
    drop(st);
    let header = |name: &str, value: &str| Header::from_bytes(name, value).expect("a valid header");
    let mut response = Response::from_string(outcome.body)
        .with_status_code(outcome.status)
        .with_header(header("Content-Type", "application/json"))
        .with_header(header("Request-Id", &request_id));
    if let Some(key) = &idempotency_key {
        if Header::from_bytes("Idempotency-Key", key.as_str()).is_ok() {
            response = response.with_header(header("Idempotency-Key", key));
        }
    }
    for (name, value) in &outcome.headers {
        response = response.with_header(header(name, value));
    }
    let _ = request.respond(response);
}

#[allow(clippy::too_many_arguments)]
fn handle(
    request: &Request,
    method: &str,
    target: &str,
    text: &str,
    form: &[(String, String)],
    idempotency_key: Option<&str>,
    request_id: &str,
    st: &mut State,
) -> Outcome {
    if st.throttle_next > 0 {
        st.throttle_next -= 1;
        let error = ApiError::new(
            429,
            "invalid_request_error",
            "Too many requests hit the API too quickly. We recommend an exponential backoff of \
             your requests. See https://stripe.com/docs/rate-limits.",
        )
        .code("rate_limit");
        let mut outcome = Outcome::from(error);
        outcome.headers.push(("Stripe-Should-Retry", "true".into()));
        return outcome;
    }
    if let Err(e) = authenticate(request, &st.secret_key) {
        return e.into();
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let id = path
        .strip_prefix(CUSTOMERS_PREFIX)
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .map(|id| percent_decode(id, false));
    let query = form_fields(query);
    match (method, id) {
        ("GET", Some(id)) => {
            if let Some((name, _)) = query.first() {
                return unknown_parameter(top_level(name)).into();
            }
            match st.customers.get(&id) {
                Some(c) => Outcome::json(200, &customer_json(&id, c, &st.secret_key)),
                None => no_such_customer(&id).into(),
            }
        }
        ("POST", Some(id)) => {
            let params: Vec<(String, String)> = query.into_iter().chain(form.to_vec()).collect();
            post_customer(
                request,
                path,
                &id,
                text,
                params,
                idempotency_key,
                request_id,
                st,
            )
        }
        _ => ApiError::new(
            404,
            "invalid_request_error",
            format!(
                "Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs \
                 or we can help at https://support.stripe.com/."
            ),
        )
        .into(),
    }
}

/// `POST /v1/customers/{id}`: content type, idempotency, validation, then the update.
#[allow(clippy::too_many_arguments)]
fn post_customer(
    request: &Request,
    path: &str,
    id: &str,
    text: &str,
    params: Vec<(String, String)>,
    idempotency_key: Option<&str>,
    request_id: &str,
    st: &mut State,
) -> Outcome {
    let idempotency_key = idempotency_key.filter(|k| !k.is_empty());
    if let Some(key) = idempotency_key {
        let chars = key.chars().count();
        if chars > MAX_IDEMPOTENCY_KEY_CHARS {
            return ApiError::invalid(format!(
                "Invalid idempotency key: it is {chars} characters long, but it can be at most \
                 {MAX_IDEMPOTENCY_KEY_CHARS} characters."
            ))
            .into();
        }
    }
    let content_type = request_header(request, "Content-Type");
    let is_form = content_type.as_deref().is_some_and(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    });
    // A bodiless POST without a Content-Type (`curl -X POST`) is fine; anything else must be a form.
    if !is_form && (content_type.is_some() || !text.is_empty()) {
        return ApiError::invalid(format!(
            "Invalid request (check that your POST content type is \
             application/x-www-form-urlencoded). {SUPPORT}"
        ))
        .into();
    }
    let mut normalized = params.clone();
    normalized.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(key) = idempotency_key {
        if let Some(stored) = st.idempotency.get(key) {
            let error = |message: String| -> Outcome {
                ApiError::new(400, "idempotency_error", message).into()
            };
            if stored.method != "POST" || stored.path != path {
                return error(format!(
                    "Keys for idempotent requests can only be used for the same endpoint they \
                     were first used for ('{}' vs '{path}'). Try using a key other than '{key}' \
                     if you meant to execute a different request.",
                    stored.path
                ));
            }
            if stored.params != normalized {
                return error(format!(
                    "Keys for idempotent requests can only be used with the same parameters they \
                     were first used with. Try using a key other than '{key}' if you meant to \
                     execute a different request."
                ));
            }
            return Outcome {
                status: stored.status,
                body: stored.body.clone(),
                headers: vec![
                    ("Idempotent-Replayed", "true".into()),
                    ("Original-Request", stored.request_id.clone()),
                ],
                replayed: true,
            };
        }
    }
    let outcome: Outcome = match update(st, id, &params) {
        Ok(customer) => Outcome::json(200, &customer),
        // Validation errors: the endpoint did not start, nothing is stored under the key.
        Err(e) if e.code != Some("resource_missing") => return e.into(),
        Err(e) => e.into(),
    };
    if let Some(key) = idempotency_key {
        st.idempotency.insert(
            key.to_string(),
            Stored {
                method: "POST".into(),
                path: path.to_string(),
                params: normalized,
                status: outcome.status,
                body: outcome.body.clone(),
                request_id: request_id.to_string(),
            },
        );
    }
    outcome
}

/// The top-level parameter a form name belongs to: `metadata[a]` → `metadata`.
fn top_level(name: &str) -> &str {
    name.split('[').next().unwrap_or(name)
}

/// `base[a][b]` → (`base`, [`a`, `b`]); `None` when what follows the base is not a sequence of
/// `[...]` segments without brackets inside.
fn split_name(name: &str) -> Option<(&str, Vec<&str>)> {
    let base = top_level(name);
    let mut rest = &name[base.len()..];
    let mut segments = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let segment = &inner[..end];
        if segment.contains('[') {
            return None;
        }
        segments.push(segment);
        rest = &inner[end + 1..];
    }
    Some((base, segments))
}

/// A parsed, validated update.
#[derive(Default)]
struct Update {
    /// (field, value); `None` unsets it. Later ones win, as in Stripe's parameter parsing.
    scalars: Vec<(&'static str, Option<String>)>,
    metadata_clear: bool,
    metadata: Vec<(String, String)>,
    /// `Some(None)`: unset the address; `Some(Some(fields))`: replace it.
    address: Option<Option<BTreeMap<String, Option<String>>>>,
    /// (index when given as `[N]`, locale).
    locales: Option<Vec<(Option<u64>, String)>>,
}

/// How a top-level parameter was given: as a scalar (`x=...`) or as a hash / array (`x[...]`).
/// Mixing the two is refused, as Stripe's parameter parser refuses it.
fn check_shape(
    shapes: &mut HashMap<String, bool>,
    base: &str,
    nested: bool,
    kind: &str,
) -> Result<(), ApiError> {
    match shapes.insert(base.to_string(), nested) {
        Some(previous) if previous != nested => Err(ApiError::invalid(kind).param(base)),
        _ => Ok(()),
    }
}

fn too_long(param: &str, value: &str, max: usize) -> Option<ApiError> {
    if value.chars().count() <= max {
        return None;
    }
    let shown: String = value.chars().take(30).collect();
    Some(
        ApiError::invalid(format!(
            "Invalid string: {shown}...; must be at most {max} characters"
        ))
        .param(param),
    )
}

/// An address Stripe would take as an email: one `@`, a non-empty local part without spaces,
/// and a domain of at least two dot-separated labels of letters, digits and inner hyphens.
fn looks_like_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"@()<>[]\\,;:\"".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
        && labels.last().is_some_and(|tld| tld.chars().count() >= 2);
    local_ok && domain_ok
}

fn parse_update(params: &[(String, String)]) -> Result<Update, ApiError> {
    let mut update = Update::default();
    let mut shapes = HashMap::new();
    for (name, value) in params {
        let Some((base, segments)) = split_name(name) else {
            return Err(match top_level(name) {
                "metadata" => ApiError::invalid(format!(
                    "Invalid metadata key in '{name}': metadata keys cannot contain square \
                     brackets ('[' or ']')."
                ))
                .param("metadata"),
                "address" | "preferred_locales" => unknown_parameter(name),
                base => unknown_parameter(base),
            });
        };
        if let Some((field, max)) = SCALARS.iter().find(|(f, _)| *f == base) {
            if !segments.is_empty() {
                return Err(ApiError::invalid("Invalid string").param(base));
            }
            if let Some(e) = too_long(field, value, *max) {
                return Err(e);
            }
            if *field == "email" && !value.is_empty() && !looks_like_email(value) {
                return Err(ApiError::invalid(format!("Invalid email address: {value}"))
                    .code("email_invalid")
                    .param("email"));
            }
            let value = (!value.is_empty()).then(|| value.clone());
            update.scalars.push((field, value));
            continue;
        }
        match (base, segments.as_slice()) {
            ("metadata", []) => {
                check_shape(&mut shapes, base, false, "Invalid hash")?;
                if !value.is_empty() {
                    return Err(ApiError::invalid("Invalid hash").param("metadata"));
                }
                update.metadata_clear = true;
            }
            ("metadata", [key]) => {
                check_shape(&mut shapes, base, true, "Invalid hash")?;
                if key.is_empty() {
                    return Err(ApiError::invalid("Invalid hash").param("metadata"));
                }
                let key_chars = key.chars().count();
                if key_chars > MAX_METADATA_KEY_CHARS {
                    return Err(ApiError::invalid(format!(
                        "Metadata keys can have up to {MAX_METADATA_KEY_CHARS} characters, but \
                         you passed in a key that is {key_chars} characters. Invalid key: {key}"
                    ))
                    .param("metadata"));
                }
                let value_chars = value.chars().count();
                if value_chars > MAX_METADATA_VALUE_CHARS {
                    return Err(ApiError::invalid(format!(
                        "Metadata values can have up to {MAX_METADATA_VALUE_CHARS} characters, \
                         but you passed in a value that is {value_chars} characters. Invalid \
                         value: {value}"
                    ))
                    .param("metadata"));
                }
                update.metadata.push((key.to_string(), value.clone()));
            }
            ("metadata", [key, ..]) => {
                return Err(ApiError::invalid(format!(
                    "Invalid value for metadata key '{key}': metadata values must be strings."
                ))
                .param("metadata"));
            }
            ("address", []) => {
                check_shape(&mut shapes, base, false, "Invalid hash")?;
                if !value.is_empty() {
                    return Err(ApiError::invalid("Invalid hash").param("address"));
                }
                update.address = Some(None);
            }
            ("address", [field]) if ADDRESS_FIELDS.contains(field) => {
                check_shape(&mut shapes, base, true, "Invalid hash")?;
                let param = format!("address[{field}]");
                if let Some(e) = too_long(&param, value, MAX_ADDRESS_FIELD_CHARS) {
                    return Err(e);
                }
                let fields = update
                    .address
                    .get_or_insert_with(|| Some(BTreeMap::new()))
                    .get_or_insert_with(BTreeMap::new);
                fields.insert(
                    field.to_string(),
                    (!value.is_empty()).then(|| value.clone()),
                );
            }
            ("address", [field, _, ..]) if ADDRESS_FIELDS.contains(field) => {
                return Err(ApiError::invalid("Invalid string").param(format!("address[{field}]")));
            }
            ("address", [field, ..]) => {
                return Err(unknown_parameter(&format!("address[{field}]")));
            }
            ("preferred_locales", []) => {
                check_shape(&mut shapes, base, false, "Invalid array")?;
                if !value.is_empty() {
                    return Err(ApiError::invalid("Invalid array").param("preferred_locales"));
                }
                update.locales = Some(Vec::new());
            }
            ("preferred_locales", [index]) => {
                check_shape(&mut shapes, base, true, "Invalid array")?;
                let index = match *index {
                    "" => None,
                    digits => Some(digits.parse::<u64>().map_err(|_| {
                        ApiError::invalid("Invalid array").param("preferred_locales")
                    })?),
                };
                if let Some(e) = too_long("preferred_locales", value, MAX_LOCALE_CHARS) {
                    return Err(e);
                }
                let locales = update.locales.get_or_insert_with(Vec::new);
                // `[]` and `[N]` elements in one array cannot be ordered: refuse the mix.
                if locales
                    .first()
                    .is_some_and(|(i, _)| i.is_some() != index.is_some())
                {
                    return Err(ApiError::invalid("Invalid array").param("preferred_locales"));
                }
                locales.push((index, value.clone()));
            }
            ("preferred_locales", [_, ..]) => {
                return Err(ApiError::invalid("Invalid string").param("preferred_locales"));
            }
            _ => return Err(unknown_parameter(base)),
        }
    }
    Ok(update)
}

/// Validates `params` and applies them to customer `id`, all or nothing; the updated customer
/// object, or the error.
fn update(st: &mut State, id: &str, params: &[(String, String)]) -> Result<Value, ApiError> {
    let update = parse_update(params)?;
    let customer = st.customers.get(id).ok_or_else(|| no_such_customer(id))?;
    let mut next = customer.clone();
    for (field, value) in update.scalars {
        *next.scalar_mut(field) = value;
    }
    if update.metadata_clear {
        next.metadata.clear();
    }
    for (key, value) in update.metadata {
        if value.is_empty() {
            next.metadata.remove(&key);
        } else {
            next.metadata.insert(key, value);
        }
    }
    if next.metadata.len() > MAX_METADATA_KEYS {
        return Err(ApiError::invalid(format!(
            "Metadata can have up to {MAX_METADATA_KEYS} keys, but you've set {}",
            next.metadata.len()
        ))
        .param("metadata"));
    }
    if let Some(address) = update.address {
        next.address = address.map(|given| {
            ADDRESS_FIELDS
                .iter()
                .map(|f| (f.to_string(), given.get(*f).cloned().flatten()))
                .collect()
        });
    }
    if let Some(mut locales) = update.locales {
        locales.sort_by_key(|(index, _)| *index); // stable: `[]` elements keep their order
        next.preferred_locales = locales.into_iter().map(|(_, l)| l).collect();
    }
    let body = customer_json(id, &next, &st.secret_key);
    st.customers.insert(id.to_string(), next);
    Ok(body)
}

/// The customer object as the API returns it.
fn customer_json(id: &str, c: &Customer, secret_key: &str) -> Value {
    // A stable invoice prefix derived from the id (FNV-1a), as Stripe assigns one per customer.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    json!({
        "id": id,
        "object": "customer",
        "address": c.address,
        "balance": 0,
        "created": c.created,
        "currency": null,
        "default_source": null,
        "delinquent": false,
        "description": c.description,
        "discount": null,
        "email": c.email,
        "invoice_prefix": format!("{:08X}", hash as u32),
        "invoice_settings": {
            "custom_fields": null,
            "default_payment_method": null,
            "footer": null,
            "rendering_options": null,
        },
        "livemode": secret_key.starts_with("sk_live_") || secret_key.starts_with("rk_live_"),
        "metadata": c.metadata,
        "name": c.name,
        "next_invoice_sequence": 1,
        "phone": c.phone,
        "preferred_locales": c.preferred_locales,
        "shipping": null,
        "tax_exempt": "none",
        "test_clock": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::{send, Reply};

    const KEY: &str = "sk_test_4eC39HqLyjWDarjtT1zdp7dc";
    const FORM: &str = "application/x-www-form-urlencoded";

    fn addr(fake: &FakeStripe) -> String {
        fake.base_url().trim_start_matches("http://").to_string()
    }

    fn fake() -> FakeStripe {
        let fake = FakeStripe::start(KEY);
        fake.add_customer("cus_A1", "a1@example.com");
        fake
    }

    /// POSTs `form` to `path` with the right key and content type, plus `extra` headers.
    fn post_with(fake: &FakeStripe, path: &str, form: &str, extra: &[(&str, &str)]) -> Reply {
        let auth = format!("Bearer {KEY}");
        let mut headers = vec![("Authorization", auth.as_str()), ("Content-Type", FORM)];
        headers.extend_from_slice(extra);
        send(&addr(fake), "POST", path, &headers, form)
    }

    fn post(fake: &FakeStripe, form: &str) -> Reply {
        post_with(fake, "/v1/customers/cus_A1", form, &[])
    }

    fn get(fake: &FakeStripe, path: &str) -> Reply {
        let auth = format!("Bearer {KEY}");
        send(&addr(fake), "GET", path, &[("Authorization", &auth)], "")
    }

    fn error(reply: &Reply) -> Value {
        reply.json()["error"].clone()
    }

    fn assert_request_id(reply: &Reply) {
        let id = reply.header("Request-Id").expect("a Request-Id header");
        assert!(id.starts_with("req_") && id.len() == 18, "{id}");
    }

    #[test]
    fn updates_email_name_and_metadata() {
        let fake = fake();
        let reply = post(
            &fake,
            "email=new%40example.com&name=Ada+Lovelace&description=VIP&phone=%2B4412345\
             &metadata[plan]=pro&metadata%5Bseats%5D=3",
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_request_id(&reply);
        let body = reply.json();
        assert_eq!(body["id"], "cus_A1");
        assert_eq!(body["object"], "customer");
        assert_eq!(body["email"], "new@example.com");
        assert_eq!(body["name"], "Ada Lovelace");
        assert_eq!(body["phone"], "+4412345");
        assert_eq!(body["metadata"], json!({"plan": "pro", "seats": "3"}));
        assert_eq!(body["livemode"], false);
        assert_eq!(
            fake.customers()["cus_A1"],
            json!({"email": "new@example.com", "name": "Ada Lovelace", "description": "VIP",
                   "phone": "+4412345", "metadata": {"plan": "pro", "seats": "3"}})
        );
        // A later update merges metadata and leaves what it does not mention alone.
        let reply = post(&fake, "metadata[region]=eu&name=");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let customer = &fake.customers()["cus_A1"];
        assert_eq!(customer["name"], Value::Null);
        assert_eq!(customer["email"], "new@example.com");
        assert_eq!(
            customer["metadata"],
            json!({"plan": "pro", "seats": "3", "region": "eu"})
        );
        // GET returns the same object.
        let reply = get(&fake, "/v1/customers/cus_A1");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["metadata"]["region"], "eu");
        let calls = fake.calls();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].method, "POST");
        assert_eq!(calls[0].path, "/v1/customers/cus_A1");
        assert_eq!(calls[0].status, 200);
        assert_eq!(calls[0].form[0], ("email".into(), "new@example.com".into()));
        assert_eq!(calls[0].form[5], ("metadata[seats]".into(), "3".into()));
        assert_eq!(calls[2].method, "GET");
        fake.clear_calls();
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn empty_metadata_value_unsets_the_key_and_empty_metadata_clears_all() {
        let fake = fake();
        assert_eq!(
            post(&fake, "metadata[a]=1&metadata[b]=2&metadata[c]=3").status,
            200
        );
        let reply = post(&fake, "metadata[a]=&metadata[zz]=");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["metadata"], json!({"b": "2", "c": "3"}));
        assert_eq!(
            fake.customers()["cus_A1"]["metadata"],
            json!({"b": "2", "c": "3"})
        );
        let reply = post(&fake, "metadata=");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(fake.customers()["cus_A1"]["metadata"], json!({}));
        // A non-empty scalar, or a scalar mixed with keys, is not a hash.
        let reply = post(&fake, "metadata=x");
        assert_eq!(
            (reply.status, error(&reply)["param"].clone()),
            (400, json!("metadata"))
        );
        assert_eq!(post(&fake, "metadata=&metadata[a]=1").status, 400);
    }

    #[test]
    fn address_and_preferred_locales() {
        let fake = fake();
        let reply = post(
            &fake,
            "address[line1]=1+Main+St&address[city]=Paris&address[country]=FR\
             &preferred_locales[1]=en&preferred_locales[0]=fr",
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let body = reply.json();
        assert_eq!(body["address"]["city"], "Paris");
        assert_eq!(body["address"]["line2"], Value::Null);
        assert_eq!(body["preferred_locales"], json!(["fr", "en"]));
        let reply = post(&fake, "address=&preferred_locales=");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["address"], Value::Null);
        assert_eq!(reply.json()["preferred_locales"], json!([]));
        let reply = post(&fake, "address[street]=x");
        assert_eq!(error(&reply)["param"], "address[street]");
        assert_eq!(error(&reply)["code"], "parameter_unknown");
    }

    #[test]
    fn unknown_parameter_is_refused_and_nothing_is_applied() {
        let fake = fake();
        for (form, param) in [
            ("name=X&nickname=Y", "nickname"),
            ("name=X&balance=100", "balance"),
            ("name=X&expand[]=tax", "expand"),
        ] {
            let reply = post(&fake, form);
            assert_eq!(reply.status, 400, "{form}: {}", reply.body);
            assert_request_id(&reply);
            let e = error(&reply);
            assert_eq!(e["type"], "invalid_request_error");
            assert_eq!(e["code"], "parameter_unknown");
            assert_eq!(e["param"], param);
            assert_eq!(e["message"], format!("Received unknown parameter: {param}"));
            assert_eq!(
                e["doc_url"],
                "https://stripe.com/docs/error-codes/parameter-unknown"
            );
        }
        assert_eq!(fake.customers()["cus_A1"]["name"], Value::Null);
        assert!(fake.calls().iter().all(|c| c.status == 400));
    }

    #[test]
    fn invalid_email_and_too_long_strings_are_refused() {
        let fake = fake();
        for bad in [
            "not-an-email",
            "a@b",
            "a b@example.com",
            "@example.com",
            "a@@example.com",
        ] {
            let reply = post(&fake, &format!("email={}", bad.replace(' ', "+")));
            assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
            let e = error(&reply);
            assert_eq!(e["code"], "email_invalid", "{bad}");
            assert_eq!(e["param"], "email");
            assert_eq!(e["message"], format!("Invalid email address: {bad}"));
        }
        assert_eq!(fake.customers()["cus_A1"]["email"], "a1@example.com");
        let reply = post(&fake, &format!("phone={}", "1".repeat(21)));
        assert_eq!(
            (reply.status, error(&reply)["param"].clone()),
            (400, json!("phone"))
        );
        // An empty email unsets it.
        assert_eq!(post(&fake, "email=").status, 200);
        assert_eq!(fake.customers()["cus_A1"]["email"], Value::Null);
    }

    #[test]
    fn unknown_customer_is_404_resource_missing() {
        let fake = fake();
        let reply = post_with(&fake, "/v1/customers/cus_x", "name=X", &[]);
        assert_eq!(reply.status, 404);
        let e = error(&reply);
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "resource_missing");
        assert_eq!(e["param"], "id");
        assert_eq!(e["message"], "No such customer: 'cus_x'");
        let reply = get(&fake, "/v1/customers/cus_x");
        assert_eq!(reply.status, 404);
        assert_eq!(error(&reply)["code"], "resource_missing");
        assert!(!fake.customers().contains_key("cus_x"));
        // Not a customers URL at all.
        let reply = get(&fake, "/v1/charges");
        assert_eq!(reply.status, 404);
        assert!(error(&reply)["message"]
            .as_str()
            .unwrap()
            .starts_with("Unrecognized request URL (GET: /v1/charges)"));
    }

    #[test]
    fn wrong_or_missing_key_is_401_with_the_key_masked() {
        let fake = fake();
        let wrong = "sk_test_wrongKey1234567890xyz";
        let reply = send(
            &addr(&fake),
            "POST",
            "/v1/customers/cus_A1",
            &[
                ("Authorization", &format!("Bearer {wrong}")),
                ("Content-Type", FORM),
            ],
            "name=X",
        );
        assert_eq!(reply.status, 401);
        assert_request_id(&reply);
        let e = error(&reply);
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(
            e["message"],
            "Invalid API Key provided: sk_test_*****************0xyz"
        );
        assert!(!reply.body.contains(wrong));
        assert!(!reply.body.contains(KEY));
        // No key at all; a short wrong key is masked entirely.
        let reply = send(&addr(&fake), "GET", "/v1/customers/cus_A1", &[], "");
        assert_eq!(reply.status, 401);
        assert!(error(&reply)["message"]
            .as_str()
            .unwrap()
            .starts_with("You did not provide an API key."));
        let reply = send(
            &addr(&fake),
            "GET",
            "/v1/customers/cus_A1",
            &[("Authorization", "Bearer sk_test_abc")],
            "",
        );
        assert_eq!(
            error(&reply)["message"],
            "Invalid API Key provided: sk_test_***"
        );
        assert_eq!(fake.customers()["cus_A1"]["name"], Value::Null);
        assert!(fake.calls().iter().all(|c| c.status == 401));
        // The right key without an auth scheme is refused, and not echoed.
        let reply = send(
            &addr(&fake),
            "GET",
            "/v1/customers/cus_A1",
            &[("Authorization", KEY)],
            "",
        );
        assert_eq!(reply.status, 401);
        assert!(!reply.body.contains(KEY));
        // HTTP Basic with the key as the user name is accepted, as Stripe accepts it.
        let basic = format!("Basic {}", "c2tfdGVzdF80ZUMzOUhxTHlqV0Rhcmp0VDF6ZHA3ZGM6");
        let reply = send(
            &addr(&fake),
            "GET",
            "/v1/customers/cus_A1",
            &[("Authorization", &basic)],
            "",
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    #[test]
    fn idempotent_replay_and_idempotency_error() {
        let fake = fake();
        let key = [("Idempotency-Key", "k-1")];
        let first = post_with(
            &fake,
            "/v1/customers/cus_A1",
            "name=First&metadata[n]=1",
            &key,
        );
        assert_eq!(first.status, 200, "{}", first.body);
        assert_eq!(first.header("Idempotent-Replayed"), None);
        // Someone else changes the customer; the replay must not apply "First" again.
        assert_eq!(post(&fake, "name=Other").status, 200);
        // Same parameters, other order: still the same request.
        let replay = post_with(
            &fake,
            "/v1/customers/cus_A1",
            "metadata[n]=1&name=First",
            &key,
        );
        assert_eq!(replay.status, 200);
        assert_eq!(replay.header("Idempotent-Replayed"), Some("true"));
        assert_eq!(replay.body, first.body);
        assert_eq!(
            replay.header("Original-Request"),
            first.header("Request-Id")
        );
        assert_ne!(replay.header("Request-Id"), first.header("Request-Id"));
        assert_eq!(fake.customers()["cus_A1"]["name"], "Other");
        let calls = fake.calls();
        assert_eq!(calls.len(), 3);
        assert!(!calls[0].replayed && calls[2].replayed);
        assert_eq!(calls[2].idempotency_key.as_deref(), Some("k-1"));
        assert_eq!(calls[2].status, 200);
        // Same key, other parameters.
        let reply = post_with(&fake, "/v1/customers/cus_A1", "name=Second", &key);
        assert_eq!(reply.status, 400);
        let e = error(&reply);
        assert_eq!(e["type"], "idempotency_error");
        assert!(e["message"].as_str().unwrap().starts_with(
            "Keys for idempotent requests can only be used with the same parameters they were \
             first used with."
        ));
        assert_eq!(fake.customers()["cus_A1"]["name"], "Other");
        // Same key, other endpoint.
        fake.add_customer("cus_B2", "b2@example.com");
        let reply = post_with(
            &fake,
            "/v1/customers/cus_B2",
            "name=First&metadata[n]=1",
            &key,
        );
        assert_eq!(error(&reply)["type"], "idempotency_error");
        assert_eq!(fake.customers()["cus_B2"]["name"], Value::Null);
        // A request refused by validation stores nothing: the key stays free.
        let key2 = [("Idempotency-Key", "k-2")];
        assert_eq!(
            post_with(&fake, "/v1/customers/cus_A1", "bogus=1", &key2).status,
            400
        );
        let reply = post_with(&fake, "/v1/customers/cus_A1", "name=Third", &key2);
        assert_eq!(
            (reply.status, reply.header("Idempotent-Replayed")),
            (200, None)
        );
        // A 404 is stored and replayed.
        let key3 = [("Idempotency-Key", "k-3")];
        assert_eq!(
            post_with(&fake, "/v1/customers/cus_Z", "name=Z", &key3).status,
            404
        );
        let reply = post_with(&fake, "/v1/customers/cus_Z", "name=Z", &key3);
        assert_eq!(
            (reply.status, reply.header("Idempotent-Replayed")),
            (404, Some("true"))
        );
        // Keys longer than 255 characters are refused.
        let long = "k".repeat(256);
        let reply = post_with(
            &fake,
            "/v1/customers/cus_A1",
            "name=L",
            &[("Idempotency-Key", &long)],
        );
        assert_eq!(reply.status, 400);
        assert_eq!(error(&reply)["type"], "invalid_request_error");
        let ok = "k".repeat(255);
        let reply = post_with(
            &fake,
            "/v1/customers/cus_A1",
            "name=L",
            &[("Idempotency-Key", &ok)],
        );
        assert_eq!(reply.status, 200);
    }

    #[test]
    fn metadata_limits() {
        let fake = fake();
        let key40 = "k".repeat(40);
        let value500 = "v".repeat(500);
        let reply = post(&fake, &format!("metadata[{key40}]={value500}"));
        assert_eq!(reply.status, 200, "{}", reply.body);

        let reply = post(&fake, &format!("metadata[{}]=v&name=X", "k".repeat(41)));
        assert_eq!(reply.status, 400);
        let e = error(&reply);
        assert_eq!(
            (e["type"].clone(), e["param"].clone()),
            (json!("invalid_request_error"), json!("metadata"))
        );
        assert!(e["message"]
            .as_str()
            .unwrap()
            .starts_with("Metadata keys can have up to 40 characters, but you passed in a key that is 41 characters."));

        let reply = post(&fake, &format!("metadata[a]={}", "v".repeat(501)));
        assert_eq!(reply.status, 400);
        let e = error(&reply);
        assert_eq!(e["param"], "metadata");
        assert!(e["message"]
            .as_str()
            .unwrap()
            .starts_with("Metadata values can have up to 500 characters, but you passed in a value that is 501 characters."));

        // 1 key held + 49 new = 50: fine; one more is refused and nothing is applied.
        let form: Vec<String> = (0..49).map(|i| format!("metadata[m{i}]=x")).collect();
        assert_eq!(post(&fake, &form.join("&")).status, 200);
        let reply = post(&fake, "metadata[one_too_many]=x&name=X");
        assert_eq!(reply.status, 400);
        let e = error(&reply);
        assert_eq!(e["param"], "metadata");
        assert_eq!(
            e["message"],
            "Metadata can have up to 50 keys, but you've set 51"
        );
        let customer = &fake.customers()["cus_A1"];
        assert_eq!(customer["metadata"].as_object().unwrap().len(), 50);
        assert_eq!(customer["name"], Value::Null);
        // Unsetting one in the same request keeps the total at 50.
        let reply = post(&fake, "metadata[m0]=&metadata[one_more]=x");
        assert_eq!(reply.status, 200, "{}", reply.body);
        // Square brackets in keys are refused.
        assert_eq!(post(&fake, "metadata[a[b]]=x").status, 400);
    }

    #[test]
    fn wrong_content_type_is_refused() {
        let fake = fake();
        let auth = format!("Bearer {KEY}");
        let reply = send(
            &addr(&fake),
            "POST",
            "/v1/customers/cus_A1",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            r#"{"name":"X"}"#,
        );
        assert_eq!(reply.status, 400);
        let e = error(&reply);
        assert_eq!(e["type"], "invalid_request_error");
        assert!(e["message"].as_str().unwrap().starts_with(
            "Invalid request (check that your POST content type is application/x-www-form-urlencoded)"
        ));
        assert_eq!(fake.customers()["cus_A1"]["name"], Value::Null);
        // A charset parameter is fine.
        let reply = send(
            &addr(&fake),
            "POST",
            "/v1/customers/cus_A1",
            &[
                ("Authorization", &auth),
                (
                    "Content-Type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
            ],
            "name=X",
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    #[test]
    fn throttle_answers_429_with_stripe_should_retry() {
        let fake = fake();
        fake.throttle_next(2);
        for _ in 0..2 {
            let reply = post_with(
                &fake,
                "/v1/customers/cus_A1",
                "name=X",
                &[("Idempotency-Key", "t-1")],
            );
            assert_eq!(reply.status, 429);
            assert_eq!(reply.header("Stripe-Should-Retry"), Some("true"));
            assert_request_id(&reply);
            let e = error(&reply);
            assert_eq!(e["type"], "invalid_request_error");
            assert_eq!(e["code"], "rate_limit");
            assert!(e["message"]
                .as_str()
                .unwrap()
                .starts_with("Too many requests hit the API too quickly."));
        }
        assert_eq!(fake.customers()["cus_A1"]["name"], Value::Null);
        // The throttled attempts stored nothing under the key: the retry is applied.
        let reply = post_with(
            &fake,
            "/v1/customers/cus_A1",
            "name=X",
            &[("Idempotency-Key", "t-1")],
        );
        assert_eq!(
            (reply.status, reply.header("Idempotent-Replayed")),
            (200, None)
        );
        assert_eq!(fake.customers()["cus_A1"]["name"], "X");
        let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [429, 429, 200]);
    }

    #[test]
    fn helpers() {
        assert_eq!(mask_key("sk_test_abcdefgh"), "sk_test_****efgh");
        assert_eq!(mask_key("sk_live_short"), "sk_live_*****");
        assert_eq!(mask_key("whatever123456"), "**********3456");
        assert_eq!(base64_decode("c2tfdGVzdDo=").unwrap(), b"sk_test:");
        assert_eq!(base64_decode("a"), None);
        assert_eq!(split_name("metadata[a]"), Some(("metadata", vec!["a"])));
        assert_eq!(split_name("metadata[a]x"), None);
        assert!(looks_like_email("first.last+tag@sub.example.co"));
        assert!(!looks_like_email("first..last@example.com"));
    }
}
