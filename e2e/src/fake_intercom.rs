//! A strict fake of Intercom's REST API (version 2.14), the parts a contacts/companies
//! destination uses:
//!
//! * `POST /contacts` creates a user or lead; `GET`/`PUT`/`DELETE /contacts/{id}` read,
//!   partially update (custom attributes merged, a `null` one removed) and delete one;
//!   `POST /contacts/{id}/archive` and `/unarchive` soft-delete and restore one;
//!   `POST /contacts/search` finds live contacts by `id`, `external_id`, `email`, `name`,
//!   `phone` or `role` (single filters and nested `AND`/`OR` groups, cursor pagination);
//!   `GET /contacts/find_by_external_id/{external_id}` finds a live user.
//! * `POST /tags` creates (or, with `id`, renames) a tag and tags or untags contacts
//!   (`users: [{"id", "untag"?}]`) or companies (`companies: [{"id"|"company_id", "untag"?}]`).
//! * `POST /companies` creates or updates a company by `company_id`;
//!   `DELETE /companies/{id}` (Intercom's id) deletes one.
//!
//! Every request needs `Authorization: Bearer <token>` (401 `unauthorized` otherwise), an
//! `Accept` header admitting `application/json` (406 `media_type_not_acceptable`, as Intercom
//! answers clients that send none) and, when present, a known `Intercom-Version` (2.11–2.14;
//! 400 `intercom_version_invalid` otherwise). A request with a JSON body needs
//! `Content-Type: application/json` (415) and a JSON object (400 `parameter_invalid`).
//! Errors are Intercom's `{"type": "error.list", "request_id", "errors": [{"code",
//! "message"}]}`. Every response carries `X-RateLimit-Limit: 10000`, `X-RateLimit-Remaining`
//! (counted per minute; past 10000 the fake answers 429) and `X-RateLimit-Reset` (unix seconds
//! of the next minute); `throttle_next(n)` answers the next `n` authenticated requests with
//! 429 `rate_limit_exceeded`, `X-RateLimit-Remaining: 0` and a reset one second ahead.
//!
//! Custom attributes must be declared first with [`FakeIntercom::define_custom_attribute`]
//! (400 `parameter_not_found` for an undeclared one, 400 `parameter_invalid` for a value of
//! the wrong type or a text longer than 255 characters).

use crate::http_util::{percent_decode, request_header, FakeServer};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use crate::http_server::{Header, Response};

/// `Intercom-Version` values the fake serves (2.14 and its recent predecessors).
const KNOWN_VERSIONS: [&str; 4] = ["2.11", "2.12", "2.13", "2.14"];
/// Requests per minute per app.
const RATE_LIMIT: u64 = 10_000;
const DEFAULT_PER_PAGE: u64 = 50;
const MAX_PER_PAGE: u64 = 150;
/// Intercom's search limits: 15 filters in an `AND`/`OR` group (an `IN`/`NIN` being a
/// shortcut for such a group, its values count the same way) and 2 levels of nesting.
const MAX_GROUP_FILTERS: usize = 15;
const MAX_NESTING: usize = 2;
/// Longest text custom attribute value, in characters.
const MAX_CUSTOM_TEXT: usize = 255;
/// `monthly_spend` is stored as a 32-bit signed integer.
const MAX_MONTHLY_SPEND: f64 = 2_147_483_647.0;
const WORKSPACE_ID: &str = "fake_intercom_workspace";

const CONTACT_MEMBERS: [&str; 11] = [
    "role",
    "external_id",
    "email",
    "phone",
    "name",
    "avatar",
    "signed_up_at",
    "last_seen_at",
    "owner_id",
    "unsubscribed_from_emails",
    "custom_attributes",
];

const COMPANY_MEMBERS: [&str; 9] = [
    "company_id",
    "name",
    "plan",
    "size",
    "website",
    "industry",
    "remote_created_at",
    "monthly_spend",
    "custom_attributes",
];

/// Sequence shared by all fakes in the process, so ids never repeat across instances.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: Option<Value>,
    /// The `Intercom-Version` request header, when sent.
    pub version: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    String,
    Integer,
    Float,
    Boolean,
    Date,
}

impl Kind {
    fn parse(kind: &str) -> Option<Kind> {
        Some(match kind {
            "string" => Kind::String,
            "integer" => Kind::Integer,
            "float" => Kind::Float,
            "boolean" => Kind::Boolean,
            "date" => Kind::Date,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Integer => "integer",
            Kind::Float => "float",
            Kind::Boolean => "boolean",
            Kind::Date => "date",
        }
    }

    fn admits(self, value: &Value) -> bool {
        match self {
            Kind::String => value.is_string(),
            Kind::Integer | Kind::Date => value.is_i64() || value.is_u64(),
            Kind::Float => value.is_number(),
            Kind::Boolean => value.is_boolean(),
        }
    }
}

#[derive(Clone, Debug)]
struct Contact {
    id: String,
    role: String,
    external_id: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    name: Option<String>,
    avatar: Option<String>,
    signed_up_at: Option<i64>,
    last_seen_at: Option<i64>,
    owner_id: Option<i64>,
    unsubscribed_from_emails: bool,
    custom_attributes: Map<String, Value>,
    archived: bool,
    /// Tag ids.
    tags: BTreeSet<String>,
    created_at: u64,
    updated_at: u64,
}

impl Contact {
    fn new(id: String, role: &str) -> Contact {
        let now = now_secs();
        Contact {
            id,
            role: role.to_string(),
            external_id: None,
            email: None,
            phone: None,
            name: None,
            avatar: None,
            signed_up_at: None,
            last_seen_at: None,
            owner_id: None,
            unsubscribed_from_emails: false,
            custom_attributes: Map::new(),
            archived: false,
            tags: BTreeSet::new(),
            created_at: now,
            updated_at: now,
        }
    }

    fn is_user(&self) -> bool {
        self.role == "user"
    }

    fn has_email(&self, email: &str) -> bool {
        self.email
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case(email))
    }

    /// The value of a searchable string field.
    fn field(&self, field: &str) -> Option<&str> {
        match field {
            "id" => Some(&self.id),
            "role" => Some(&self.role),
            "external_id" => self.external_id.as_deref(),
            "email" => self.email.as_deref(),
            "name" => self.name.as_deref(),
            "phone" => self.phone.as_deref(),
            _ => None,
        }
    }

    /// The contact as Intercom answers it.
    fn to_json(&self) -> Value {
        let list = |what: &str, data: Vec<Value>| {
            json!({
                "type": "list",
                "total_count": data.len(),
                "data": data,
                "url": format!("/contacts/{}/{what}", self.id),
                "has_more": false,
            })
        };
        let tags = self
            .tags
            .iter()
            .map(|id| json!({"type": "tag", "id": id, "url": format!("/tags/{id}")}))
            .collect();
        json!({
            "type": "contact",
            "id": self.id,
            "workspace_id": WORKSPACE_ID,
            "external_id": self.external_id,
            "role": self.role,
            "email": self.email,
            "email_domain": self.email.as_deref().and_then(|e| e.split_once('@')).map(|(_, d)| d),
            "phone": self.phone,
            "name": self.name,
            "avatar": self.avatar.as_ref().map(|url| json!({"type": "avatar", "image_url": url})),
            "owner_id": self.owner_id,
            "social_profiles": {"type": "list", "data": []},
            "has_hard_bounced": false,
            "marked_email_as_spam": false,
            "unsubscribed_from_emails": self.unsubscribed_from_emails,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "signed_up_at": self.signed_up_at,
            "last_seen_at": self.last_seen_at,
            "custom_attributes": self.custom_attributes,
            "tags": list("tags", tags),
            "notes": list("notes", Vec::new()),
            "companies": list("companies", Vec::new()),
            "location": {"type": "location", "country": null, "region": null, "city": null,
                         "country_code": null, "continent_code": null},
        })
    }
}

#[derive(Clone, Debug)]
struct Company {
    id: String,
    company_id: String,
    name: Option<String>,
    /// (plan id, plan name)
    plan: Option<(String, String)>,
    size: Option<i64>,
    website: Option<String>,
    industry: Option<String>,
    remote_created_at: Option<i64>,
    monthly_spend: i64,
    custom_attributes: Map<String, Value>,
    /// Tag ids.
    tags: BTreeSet<String>,
    created_at: u64,
    updated_at: u64,
}

impl Company {
    fn to_json(&self, tag_names: &BTreeMap<String, String>) -> Value {
        let tags: Vec<Value> = self
            .tags
            .iter()
            .map(|id| json!({"type": "tag", "id": id, "name": tag_names.get(id)}))
            .collect();
        let plan = match &self.plan {
            Some((id, name)) => json!({"type": "plan", "id": id, "name": name}),
            None => json!({}),
        };
        json!({
            "type": "company",
            "company_id": self.company_id,
            "id": self.id,
            "app_id": WORKSPACE_ID,
            "name": self.name,
            "remote_created_at": self.remote_created_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "monthly_spend": self.monthly_spend,
            "session_count": 0,
            "user_count": 0,
            "size": self.size,
            "website": self.website,
            "industry": self.industry,
            "tags": {"type": "tag.list", "tags": tags},
            "segments": {"type": "segment.list", "segments": []},
            "plan": plan,
            "custom_attributes": self.custom_attributes,
        })
    }
}

#[derive(Default)]
struct State {
    /// By Intercom id (creation order).
    contacts: BTreeMap<String, Contact>,
    /// By Intercom id.
    companies: BTreeMap<String, Company>,
    /// Tag id → name.
    tags: BTreeMap<String, String>,
    /// (model, attribute name) → type.
    attributes: BTreeMap<(String, String), Kind>,
    calls: Vec<Call>,
    throttle_next: usize,
    /// The minute (unix seconds / 60) being counted, and the requests seen in it.
    window: (u64, u64),
}

impl State {
    fn tag_names(&self, ids: &BTreeSet<String>) -> Vec<String> {
        let mut names: Vec<String> = ids
            .iter()
            .filter_map(|id| self.tags.get(id).cloned())
            .collect();
        names.sort();
        names
    }

    fn live_contact(&self, id: &str) -> Option<&Contact> {
        self.contacts.get(id).filter(|c| !c.archived)
    }

    /// The id of the tag called `name` (case-insensitively), created when there is none.
    fn tag_named(&mut self, name: &str) -> String {
        if let Some((id, _)) = self
            .tags
            .iter()
            .find(|(_, n)| n.to_lowercase() == name.to_lowercase())
        {
            return id.clone();
        }
        let id = next_seq().to_string();
        self.tags.insert(id.clone(), name.to_string());
        id
    }
}

pub struct FakeIntercom {
    state: Arc<Mutex<State>>,
    server: FakeServer,
}

impl FakeIntercom {
    /// Starts the fake on 127.0.0.1 (a free port), accepting `Authorization: Bearer <token>`.
    pub fn start(token: &str) -> FakeIntercom {
        let state = Arc::new(Mutex::new(State::default()));
        let token = token.to_string();
        let handler_state = state.clone();
        let server = FakeServer::start("Intercom", move |request| {
            serve(request, &handler_state, &token)
        });
        FakeIntercom { state, server }
    }

    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Adds a live user directly (no HTTP call, no journal entry) and returns its Intercom id.
    /// An empty `external_id` or `email` means none. Panics when it would conflict with an
    /// existing contact, as `POST /contacts` would refuse it.
    pub fn add_contact(&self, external_id: &str, email: &str) -> String {
        let mut st = self.state.lock().unwrap();
        let external_id = Some(external_id).filter(|s| !s.is_empty());
        let email = Some(email).filter(|s| !s.is_empty());
        if let Some(existing) = st.contacts.values().find(|c| {
            external_id.is_some() && c.external_id.as_deref() == external_id
                || email.is_some_and(|e| c.is_user() && c.has_email(e))
        }) {
            panic!(
                "fake Intercom: add_contact conflicts with contact {}",
                existing.id
            );
        }
        let mut contact = Contact::new(new_object_id(), "user");
        contact.external_id = external_id.map(str::to_string);
        contact.email = email.map(str::to_string);
        let id = contact.id.clone();
        st.contacts.insert(id.clone(), contact);
        id
    }

    /// Every contact (archived ones included, deleted ones not) by external_id — or by
    /// Intercom id when it has none — as `{"id", "role", "email", "name", "phone", "avatar",
    /// "signed_up_at", "last_seen_at", "owner_id", "unsubscribed_from_emails",
    /// "custom_attributes", "archived", "tags": [tag names, sorted]}`.
    pub fn contacts(&self) -> BTreeMap<String, Value> {
        let st = self.state.lock().unwrap();
        st.contacts
            .values()
            .map(|c| {
                let key = c.external_id.clone().unwrap_or_else(|| c.id.clone());
                let value = json!({
                    "id": c.id,
                    "role": c.role,
                    "email": c.email,
                    "name": c.name,
                    "phone": c.phone,
                    "avatar": c.avatar,
                    "signed_up_at": c.signed_up_at,
                    "last_seen_at": c.last_seen_at,
                    "owner_id": c.owner_id,
                    "unsubscribed_from_emails": c.unsubscribed_from_emails,
                    "custom_attributes": c.custom_attributes,
                    "archived": c.archived,
                    "tags": st.tag_names(&c.tags),
                });
                (key, value)
            })
            .collect()
    }

    /// Every company (deleted ones not) by company_id, as `{"id", "name", "plan" (its name),
    /// "size", "website", "industry", "remote_created_at", "monthly_spend",
    /// "custom_attributes", "tags": [tag names, sorted]}`.
    pub fn companies(&self) -> BTreeMap<String, Value> {
        let st = self.state.lock().unwrap();
        st.companies
            .values()
            .map(|c| {
                let value = json!({
                    "id": c.id,
                    "name": c.name,
                    "plan": c.plan.as_ref().map(|(_, name)| name),
                    "size": c.size,
                    "website": c.website,
                    "industry": c.industry,
                    "remote_created_at": c.remote_created_at,
                    "monthly_spend": c.monthly_spend,
                    "custom_attributes": c.custom_attributes,
                    "tags": st.tag_names(&c.tags),
                });
                (c.company_id.clone(), value)
            })
            .collect()
    }

    /// Declares a custom attribute of `model` ("contact" or "company") with type `kind`
    /// ("string", "integer", "float", "boolean" or "date" — unix seconds); re-declaring one
    /// changes its type. Panics on another model or type.
    pub fn define_custom_attribute(&self, model: &str, name: &str, kind: &str) {
        assert!(
            matches!(model, "contact" | "company"),
            "fake Intercom: unknown model {model:?}"
        );
        let kind =
            Kind::parse(kind).unwrap_or_else(|| panic!("fake Intercom: unknown type {kind:?}"));
        self.state
            .lock()
            .unwrap()
            .attributes
            .insert((model.to_string(), name.to_string()), kind);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// The next `n` authenticated requests get 429 `rate_limit_exceeded`.
    pub fn throttle_next(&self, n: usize) {
        self.state.lock().unwrap().throttle_next = n;
    }
}

/// An Intercom error answer.
#[derive(Debug)]
struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
}

fn error(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    error(400, "parameter_invalid", message)
}

fn user_not_found() -> ApiError {
    error(404, "not_found", "User Not Found")
}

fn company_not_found() -> ApiError {
    error(404, "company_not_found", "Company Not Found")
}

fn conflict(existing: &Contact) -> ApiError {
    let what = if existing.archived {
        "An archived contact"
    } else {
        "A contact"
    };
    error(
        409,
        "conflict",
        format!(
            "{what} matching those details already exists with id={}",
            existing.id
        ),
    )
}

type Answer = Result<Value, ApiError>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn next_seq() -> u64 {
    NEXT_SEQ.fetch_add(1, Ordering::SeqCst) + 1
}

/// A 24-hex-digit id like Intercom's (seconds, then a sequence number).
fn new_object_id() -> String {
    format!("{:08x}{:016x}", now_secs() as u32, next_seq())
}

fn new_request_id() -> String {
    let seq = next_seq();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        now_secs() as u32,
        (seq >> 48) & 0xffff,
        (seq >> 36) & 0xfff,
        (seq >> 24) & 0xfff,
        seq & 0xffff_ffff_ffff
    )
}

fn as_int(value: &Value) -> Option<i64> {
    value.as_i64()
}

/// Checks `custom_attributes` members against the declarations for `model`.
fn check_custom_attributes(
    st: &State,
    model: &str,
    attributes: &Map<String, Value>,
) -> Result<(), ApiError> {
    for (name, value) in attributes {
        let kind = st
            .attributes
            .get(&(model.to_string(), name.clone()))
            .ok_or_else(|| {
                error(
                    400,
                    "parameter_not_found",
                    format!("Custom attribute '{name}' does not exist"),
                )
            })?;
        if value.is_null() {
            continue;
        }
        if !kind.admits(value) {
            return Err(invalid(format!(
                "Custom attribute '{name}' must be of type {}, got {value}",
                kind.name()
            )));
        }
        if let Value::String(text) = value {
            if text.chars().count() > MAX_CUSTOM_TEXT {
                return Err(invalid(format!(
                    "Custom attribute '{name}' is longer than {MAX_CUSTOM_TEXT} characters"
                )));
            }
        }
    }
    Ok(())
}

/// Merges custom attributes: a `null` value removes the attribute.
fn merge_custom_attributes(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (name, value) in from {
        if value.is_null() {
            into.remove(name);
        } else {
            into.insert(name.clone(), value.clone());
        }
    }
}

/// Validates a contact body (create or update): known members of the right types.
fn check_contact_body(st: &State, body: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(unknown) = body.keys().find(|k| !CONTACT_MEMBERS.contains(&k.as_str())) {
        return Err(invalid(format!("bad '{unknown}' parameter")));
    }
    for (member, value) in body {
        let ok = match member.as_str() {
            "role" => matches!(value.as_str(), Some("user" | "lead")),
            "external_id" => value.as_str().is_some_and(|s| !s.is_empty()),
            "email" => match value.as_str() {
                Some(email) if email.contains('@') => true,
                Some(_) => return Err(invalid("Invalid email")),
                None => false,
            },
            "phone" | "name" | "avatar" => value.is_string() || value.is_null(),
            "signed_up_at" | "last_seen_at" | "owner_id" => {
                as_int(value).is_some() || value.is_null()
            }
            "unsubscribed_from_emails" => value.is_boolean() || value.is_null(),
            "custom_attributes" => match value {
                Value::Object(attributes) => {
                    check_custom_attributes(st, "contact", attributes)?;
                    true
                }
                Value::Null => true,
                _ => false,
            },
            _ => true,
        };
        if !ok {
            return Err(invalid(format!("'{member}' has an invalid value: {value}")));
        }
    }
    Ok(())
}

/// Writes a checked contact body onto `contact`.
fn apply_contact(contact: &mut Contact, body: &Map<String, Value>) {
    let text = |v: &Value| v.as_str().map(str::to_string);
    for (member, value) in body {
        match member.as_str() {
            "role" => contact.role = value.as_str().unwrap_or("user").to_string(),
            "external_id" => contact.external_id = text(value),
            "email" => contact.email = text(value),
            "phone" => contact.phone = text(value),
            "name" => contact.name = text(value),
            "avatar" => contact.avatar = text(value),
            "signed_up_at" => contact.signed_up_at = as_int(value),
            "last_seen_at" => contact.last_seen_at = as_int(value),
            "owner_id" => contact.owner_id = as_int(value),
            "unsubscribed_from_emails" => {
                contact.unsubscribed_from_emails = value.as_bool().unwrap_or(false)
            }
            "custom_attributes" => {
                if let Some(attributes) = value.as_object() {
                    merge_custom_attributes(&mut contact.custom_attributes, attributes);
                }
            }
            _ => {}
        }
    }
    contact.updated_at = now_secs();
}

/// `POST /contacts`.
fn create_contact(st: &mut State, body: &Map<String, Value>) -> Answer {
    check_contact_body(st, body)?;
    let role = body.get("role").and_then(Value::as_str).unwrap_or("user");
    let external_id = body.get("external_id").and_then(Value::as_str);
    let email = body.get("email").and_then(Value::as_str);
    if role == "user" && external_id.is_none() && email.is_none() {
        return Err(error(
            400,
            "parameter_not_found",
            "An email or external_id is required to create a user",
        ));
    }
    if let Some(ext) = external_id {
        if let Some(existing) = st
            .contacts
            .values()
            .find(|c| c.external_id.as_deref() == Some(ext))
        {
            return Err(conflict(existing));
        }
    }
    if let (Some(email), "user") = (email, role) {
        if let Some(existing) = st
            .contacts
            .values()
            .find(|c| c.is_user() && c.has_email(email))
        {
            return Err(conflict(existing));
        }
    }
    let mut contact = Contact::new(new_object_id(), role);
    apply_contact(&mut contact, body);
    let answer = contact.to_json();
    st.contacts.insert(contact.id.clone(), contact);
    Ok(answer)
}

/// `PUT /contacts/{id}`.
fn update_contact(st: &mut State, id: &str, body: &Map<String, Value>) -> Answer {
    let current = st.live_contact(id).ok_or_else(user_not_found)?.clone();
    check_contact_body(st, body)?;
    let role = body
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or(&current.role);
    if current.is_user() && role == "lead" {
        return Err(invalid("A user cannot be converted to a lead"));
    }
    let external_id = body
        .get("external_id")
        .and_then(Value::as_str)
        .or(current.external_id.as_deref());
    let email = body
        .get("email")
        .and_then(Value::as_str)
        .or(current.email.as_deref());
    if role == "user" && external_id.is_none() && email.is_none() {
        return Err(error(
            400,
            "parameter_not_found",
            "A user needs an email or an external_id",
        ));
    }
    let others = || st.contacts.values().filter(|c| c.id != current.id);
    if let Some(ext) = external_id.filter(|e| current.external_id.as_deref() != Some(*e)) {
        if let Some(existing) = others().find(|c| c.external_id.as_deref() == Some(ext)) {
            return Err(conflict(existing));
        }
    }
    let email_changed = email.is_some_and(|e| !current.has_email(e));
    if let (Some(email), "user") = (email, role) {
        if email_changed || !current.is_user() {
            if let Some(existing) = others().find(|c| c.is_user() && c.has_email(email)) {
                return Err(conflict(existing));
            }
        }
    }
    let contact = st.contacts.get_mut(id).expect("checked above");
    apply_contact(contact, body);
    Ok(contact.to_json())
}

/// `POST /contacts/{id}/archive` and `/unarchive`.
fn set_archived(st: &mut State, id: &str, archived: bool) -> Answer {
    let contact = st.contacts.get_mut(id).ok_or_else(user_not_found)?;
    contact.archived = archived;
    contact.updated_at = now_secs();
    Ok(json!({
        "type": "contact",
        "object": "contact",
        "id": contact.id,
        "external_id": contact.external_id,
        "archived": archived,
    }))
}

/// `DELETE /contacts/{id}` (archived contacts too).
fn delete_contact(st: &mut State, id: &str) -> Answer {
    let contact = st.contacts.remove(id).ok_or_else(user_not_found)?;
    Ok(json!({
        "type": "contact",
        "object": "contact",
        "id": contact.id,
        "external_id": contact.external_id,
        "deleted": true,
    }))
}

/// One parsed search filter.
enum Filter {
    Single {
        field: String,
        operator: String,
        value: Value,
    },
    Group {
        all: bool,
        filters: Vec<Filter>,
    },
}

const SEARCH_FIELDS: [&str; 6] = ["id", "external_id", "email", "name", "phone", "role"];

fn parse_filter(query: &Value, depth: usize) -> Result<Filter, ApiError> {
    let object = query
        .as_object()
        .ok_or_else(|| invalid("query must be an object"))?;
    if let Some(unknown) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "field" | "operator" | "value"))
    {
        return Err(invalid(format!("bad '{unknown}' parameter in query")));
    }
    let operator = object
        .get("operator")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("query operator is required"))?;
    let value = object
        .get("value")
        .ok_or_else(|| invalid("query value is required"))?;
    if matches!(operator, "AND" | "OR") {
        if object.contains_key("field") {
            return Err(invalid("a field cannot be given with operator AND/OR"));
        }
        if depth >= MAX_NESTING {
            return Err(invalid(format!(
                "queries may nest at most {MAX_NESTING} levels of AND/OR"
            )));
        }
        let items = value
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| invalid("AND/OR value must be a non-empty array of filters"))?;
        if items.len() > MAX_GROUP_FILTERS {
            return Err(invalid(format!(
                "at most {MAX_GROUP_FILTERS} filters are allowed in an AND/OR group"
            )));
        }
        let filters = items
            .iter()
            .map(|item| parse_filter(item, depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Filter::Group {
            all: operator == "AND",
            filters,
        });
    }
    let field = object
        .get("field")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("query field is required"))?;
    if !SEARCH_FIELDS.contains(&field) {
        return Err(invalid(format!(
            "field '{field}' is not searchable in this fake (supported: {})",
            SEARCH_FIELDS.join(", ")
        )));
    }
    match operator {
        "=" | "!=" => {
            if !(value.is_string() || value.is_null()) {
                return Err(invalid(format!(
                    "value for '{field}' must be a string, got {value}"
                )));
            }
        }
        "~" | "!~" | "^" | "$" => {
            if !value.is_string() {
                return Err(invalid(format!(
                    "value for '{field}' must be a string, got {value}"
                )));
            }
        }
        "IN" | "NIN" => {
            let values = value
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| invalid(format!("{operator} needs a non-empty array value")))?;
            if values.len() > MAX_GROUP_FILTERS {
                return Err(invalid(format!(
                    "{operator} accepts at most {MAX_GROUP_FILTERS} values"
                )));
            }
            if let Some(bad) = values.iter().find(|v| !v.is_string()) {
                return Err(invalid(format!(
                    "values for '{field}' must be strings, got {bad}"
                )));
            }
        }
        "<" | ">" | "<=" | ">=" => {
            return Err(invalid(format!(
                "operator '{operator}' is not valid for string field '{field}'"
            )))
        }
        _ => return Err(invalid(format!("unknown operator '{operator}'"))),
    }
    Ok(Filter::Single {
        field: field.to_string(),
        operator: operator.to_string(),
        value: value.clone(),
    })
}

fn matches_filter(contact: &Contact, filter: &Filter) -> bool {
    match filter {
        Filter::Group { all: true, filters } => filters.iter().all(|f| matches_filter(contact, f)),
        Filter::Group {
            all: false,
            filters,
        } => filters.iter().any(|f| matches_filter(contact, f)),
        Filter::Single {
            field,
            operator,
            value,
        } => {
            let actual = contact.field(field);
            // Emails compare case-insensitively, other fields exactly.
            let fold = |s: &str| {
                if field == "email" {
                    s.to_lowercase()
                } else {
                    s.to_string()
                }
            };
            let actual = actual.map(fold);
            let wanted = value.as_str().map(fold);
            let in_list = || {
                value.as_array().is_some_and(|vs| {
                    vs.iter()
                        .filter_map(Value::as_str)
                        .any(|v| Some(fold(v)) == actual)
                })
            };
            match operator.as_str() {
                "=" => actual == wanted,
                "!=" => actual != wanted,
                "IN" => in_list(),
                "NIN" => !in_list(),
                "~" => actual.zip(wanted).is_some_and(|(a, w)| a.contains(&w)),
                "!~" => !actual.zip(wanted).is_some_and(|(a, w)| a.contains(&w)),
                "^" => actual.zip(wanted).is_some_and(|(a, w)| a.starts_with(&w)),
                "$" => actual.zip(wanted).is_some_and(|(a, w)| a.ends_with(&w)),
                _ => false,
            }
        }
    }
}

/// `POST /contacts/search`.
fn search_contacts(st: &State, body: &Map<String, Value>) -> Answer {
    if let Some(unknown) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "query" | "pagination" | "sort"))
    {
        return Err(invalid(format!("bad '{unknown}' parameter")));
    }
    let filter = parse_filter(
        body.get("query")
            .ok_or_else(|| error(400, "parameter_not_found", "query is required"))?,
        0,
    )?;
    let mut per_page = DEFAULT_PER_PAGE;
    let mut offset = 0usize;
    match body.get("pagination") {
        None | Some(Value::Null) => {}
        Some(Value::Object(pagination)) => {
            for (member, value) in pagination {
                match member.as_str() {
                    "per_page" => {
                        per_page = value
                            .as_u64()
                            .filter(|n| (1..=MAX_PER_PAGE).contains(n))
                            .ok_or_else(|| {
                                invalid(format!(
                                    "per_page must be an integer from 1 to {MAX_PER_PAGE}"
                                ))
                            })?
                    }
                    "starting_after" => match value {
                        Value::Null => {}
                        Value::String(cursor) => {
                            offset = cursor
                                .strip_prefix("fake-cursor-")
                                .and_then(|n| n.parse().ok())
                                .ok_or_else(|| invalid("starting_after is not a valid cursor"))?
                        }
                        _ => return Err(invalid("starting_after must be a string")),
                    },
                    other => return Err(invalid(format!("bad '{other}' parameter in pagination"))),
                }
            }
        }
        Some(_) => return Err(invalid("pagination must be an object")),
    }
    let mut found: Vec<&Contact> = st
        .contacts
        .values()
        .filter(|c| !c.archived && matches_filter(c, &filter))
        .collect();
    match body.get("sort") {
        None | Some(Value::Null) => {}
        Some(Value::Object(sort)) => {
            let field = sort
                .get("field")
                .and_then(Value::as_str)
                .filter(|f| SEARCH_FIELDS.contains(f))
                .ok_or_else(|| invalid("sort field must be one of the searchable fields"))?;
            let descending = match sort.get("order").and_then(Value::as_str) {
                None | Some("ascending") => false,
                Some("descending") => true,
                Some(other) => return Err(invalid(format!("unknown sort order '{other}'"))),
            };
            found.sort_by(|a, b| a.field(field).cmp(&b.field(field)));
            if descending {
                found.reverse();
            }
        }
        Some(_) => return Err(invalid("sort must be an object")),
    }
    let total = found.len();
    let per_page_usize = per_page as usize;
    let data: Vec<Value> = found
        .iter()
        .skip(offset)
        .take(per_page_usize)
        .map(|c| c.to_json())
        .collect();
    let total_pages = total.div_ceil(per_page_usize);
    let page = offset / per_page_usize + 1;
    let mut pages = json!({
        "type": "pages",
        "page": page,
        "per_page": per_page,
        "total_pages": total_pages,
    });
    if offset + per_page_usize < total {
        pages["next"] = json!({
            "page": page + 1,
            "starting_after": format!("fake-cursor-{}", offset + per_page_usize),
        });
    }
    Ok(json!({
        "type": "list",
        "data": data,
        "total_count": total,
        "pages": pages,
    }))
}

/// One `users`/`companies` item of a tagging request, and whether it untags.
type TagTarget = (Map<String, Value>, bool);

/// `POST /tags`.
fn post_tags(st: &mut State, body: &Map<String, Value>) -> Answer {
    let bad = || invalid("invalid tag parameters");
    if body
        .keys()
        .any(|k| !matches!(k.as_str(), "name" | "id" | "users" | "companies"))
    {
        return Err(bad());
    }
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(bad)?;
    let (users, companies) = (body.get("users"), body.get("companies"));
    if users.is_some() && companies.is_some() {
        return Err(bad());
    }
    if let Some(id) = body.get("id") {
        // Rename an existing tag.
        let id = id.as_str().ok_or_else(bad)?;
        if users.is_some() || companies.is_some() {
            return Err(bad());
        }
        if !st.tags.contains_key(id) {
            return Err(error(404, "tag_not_found", "Resource Not Found"));
        }
        if st
            .tags
            .iter()
            .any(|(other, n)| other != id && n.to_lowercase() == name.to_lowercase())
        {
            return Err(invalid(format!("A tag named '{name}' already exists")));
        }
        st.tags.insert(id.to_string(), name.to_string());
        return Ok(json!({"type": "tag", "id": id, "name": name}));
    }
    // (target id, untag) for every listed contact or company, all resolved before any change.
    let targets = |list: &Value, keys: &[&str]| -> Result<Vec<TagTarget>, ApiError> {
        let items = list.as_array().ok_or_else(bad)?;
        items
            .iter()
            .map(|item| {
                let item = item.as_object().ok_or_else(bad)?;
                if item
                    .keys()
                    .any(|k| !keys.contains(&k.as_str()) && k != "untag")
                {
                    return Err(bad());
                }
                let untag = match item.get("untag") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(bad()),
                };
                Ok((item.clone(), untag))
            })
            .collect()
    };
    let mut contact_changes = Vec::new();
    let mut company_changes = Vec::new();
    if let Some(users) = users {
        for (item, untag) in targets(users, &["id"])? {
            let id = item.get("id").and_then(Value::as_str).ok_or_else(bad)?;
            st.live_contact(id).ok_or_else(user_not_found)?;
            contact_changes.push((id.to_string(), untag));
        }
    }
    if let Some(companies) = companies {
        for (item, untag) in targets(companies, &["id", "company_id"])? {
            let by_id = item
                .get("id")
                .map(|v| v.as_str().ok_or_else(bad))
                .transpose()?;
            let by_company_id = item
                .get("company_id")
                .map(|v| v.as_str().ok_or_else(bad))
                .transpose()?;
            let company = match (by_id, by_company_id) {
                (Some(id), company_id) => st
                    .companies
                    .get(id)
                    .filter(|c| company_id.is_none_or(|cid| cid == c.company_id)),
                (None, Some(company_id)) => {
                    st.companies.values().find(|c| c.company_id == company_id)
                }
                (None, None) => return Err(bad()),
            };
            let company = company.ok_or_else(company_not_found)?;
            company_changes.push((company.id.clone(), untag));
        }
    }
    let tag_id = st.tag_named(name);
    let now = now_secs();
    for (id, untag) in contact_changes {
        let contact = st.contacts.get_mut(&id).expect("resolved above");
        set_tagged(&mut contact.tags, &tag_id, !untag);
        contact.updated_at = now;
    }
    for (id, untag) in company_changes {
        let company = st.companies.get_mut(&id).expect("resolved above");
        set_tagged(&mut company.tags, &tag_id, !untag);
        company.updated_at = now;
    }
    Ok(json!({"type": "tag", "id": tag_id, "name": st.tags[&tag_id]}))
}

/// Puts `tag_id` in `tags`, or takes it out.
fn set_tagged(tags: &mut BTreeSet<String>, tag_id: &str, tagged: bool) {
    if tagged {
        tags.insert(tag_id.to_string());
    } else {
        tags.remove(tag_id);
    }
}

/// `POST /companies`: create or update by `company_id`.
fn upsert_company(st: &mut State, body: &Map<String, Value>) -> Answer {
    if let Some(unknown) = body.keys().find(|k| !COMPANY_MEMBERS.contains(&k.as_str())) {
        return Err(error(
            400,
            "bad_request",
            format!("bad '{unknown}' parameter"),
        ));
    }
    for (member, value) in body {
        let ok = match member.as_str() {
            "company_id" => value.as_str().is_some_and(|s| !s.is_empty()),
            "name" | "plan" | "website" | "industry" => value.is_string(),
            "size" | "remote_created_at" => as_int(value).is_some(),
            "monthly_spend" => value
                .as_f64()
                .is_some_and(|n| (0.0..=MAX_MONTHLY_SPEND).contains(&n.trunc())),
            "custom_attributes" => match value {
                Value::Object(attributes) => {
                    check_custom_attributes(st, "company", attributes)?;
                    true
                }
                _ => false,
            },
            _ => true,
        };
        if !ok {
            return Err(invalid(format!("'{member}' has an invalid value: {value}")));
        }
    }
    let company_id = body
        .get("company_id")
        .and_then(Value::as_str)
        .ok_or_else(|| error(400, "parameter_not_found", "company_id is required"))?;
    let now = now_secs();
    let id = match st.companies.values().find(|c| c.company_id == company_id) {
        Some(existing) => existing.id.clone(),
        None => {
            let id = new_object_id();
            st.companies.insert(
                id.clone(),
                Company {
                    id: id.clone(),
                    company_id: company_id.to_string(),
                    name: None,
                    plan: None,
                    size: None,
                    website: None,
                    industry: None,
                    remote_created_at: None,
                    monthly_spend: 0,
                    custom_attributes: Map::new(),
                    tags: BTreeSet::new(),
                    created_at: now,
                    updated_at: now,
                },
            );
            id
        }
    };
    let company = st.companies.get_mut(&id).expect("present");
    let text = |v: &Value| v.as_str().map(str::to_string);
    for (member, value) in body {
        match member.as_str() {
            "name" => company.name = text(value),
            "plan" => {
                let name = value.as_str().unwrap_or_default().to_string();
                if company.plan.as_ref().map(|(_, n)| n) != Some(&name) {
                    company.plan = Some((next_seq().to_string(), name));
                }
            }
            "size" => company.size = as_int(value),
            "website" => company.website = text(value),
            "industry" => company.industry = text(value),
            "remote_created_at" => company.remote_created_at = as_int(value),
            "monthly_spend" => company.monthly_spend = value.as_f64().unwrap_or(0.0).trunc() as i64,
            "custom_attributes" => {
                if let Some(attributes) = value.as_object() {
                    merge_custom_attributes(&mut company.custom_attributes, attributes);
                }
            }
            _ => {}
        }
    }
    company.updated_at = now;
    let company = company.clone();
    Ok(company.to_json(&st.tags))
}

/// `DELETE /companies/{id}`.
fn delete_company(st: &mut State, id: &str) -> Answer {
    st.companies.remove(id).ok_or_else(company_not_found)?;
    Ok(json!({"id": id, "object": "company", "deleted": true}))
}

/// The request body as a JSON object, refused unless it is sent as `application/json`.
fn json_object(request: &crate::http_server::Request, text: &str) -> Result<Map<String, Value>, ApiError> {
    let content_type = request_header(request, "Content-Type").unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return Err(error(
            415,
            "unsupported_media_type",
            "The Content-Type header should send a media type of application/json",
        ));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(invalid("The request body must be a JSON object")),
        Err(_) => Err(invalid("The request body is not valid JSON")),
    }
}

/// Whether an `Accept` header admits a JSON answer.
fn accepts_json(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let media = range.split(';').next().unwrap_or_default().trim();
        ["application/json", "application/*", "*/*"]
            .iter()
            .any(|m| media.eq_ignore_ascii_case(m))
    })
}

/// Routes an authenticated, admitted request.
fn route(
    st: &mut State,
    request: &crate::http_server::Request,
    method: &str,
    path: &str,
    text: &str,
) -> Answer {
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| percent_decode(s, false))
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method, segments.as_slice()) {
        ("POST", ["contacts"]) => create_contact(st, &json_object(request, text)?),
        ("POST", ["contacts", "search"]) => search_contacts(st, &json_object(request, text)?),
        ("GET", ["contacts", "find_by_external_id", external_id]) => st
            .contacts
            .values()
            .find(|c| !c.archived && c.is_user() && c.external_id.as_deref() == Some(*external_id))
            .map(Contact::to_json)
            .ok_or_else(user_not_found),
        ("GET", ["contacts", id]) => st
            .live_contact(id)
            .map(Contact::to_json)
            .ok_or_else(user_not_found),
        ("PUT", ["contacts", id]) => update_contact(st, id, &json_object(request, text)?),
        ("DELETE", ["contacts", id]) => delete_contact(st, id),
        ("POST", ["contacts", id, "archive"]) => set_archived(st, id, true),
        ("POST", ["contacts", id, "unarchive"]) => set_archived(st, id, false),
        ("POST", ["tags"]) => post_tags(st, &json_object(request, text)?),
        ("POST", ["companies"]) => upsert_company(st, &json_object(request, text)?),
        ("DELETE", ["companies", id]) => delete_company(st, id),
        _ => Err(error(404, "not_found", "Resource Not Found")),
    }
}

fn serve(mut request: crate::http_server::Request, state: &Mutex<State>, token: &str) {
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let path = url.split('?').next().unwrap_or_default().to_string();
    let mut text = String::new();
    let _ = request.as_reader().read_to_string(&mut text);
    let body: Option<Value> = serde_json::from_str(&text).ok();
    let version = request_header(&request, "Intercom-Version");
    let now = now_secs();

    let mut st = state.lock().unwrap();
    let minute = now / 60;
    if st.window.0 != minute {
        st.window = (minute, 0);
    }
    st.window.1 += 1;
    let mut remaining = RATE_LIMIT.saturating_sub(st.window.1);
    let mut reset = (minute + 1) * 60;

    let authorized = request_header(&request, "Authorization")
        .and_then(|a| {
            a.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
                .map(|(_, t)| t.trim() == token)
        })
        .unwrap_or(false);
    let answer: Answer = if !authorized {
        Err(error(401, "unauthorized", "Access Token Invalid"))
    } else if !request_header(&request, "Accept").is_some_and(|a| accepts_json(&a)) {
        Err(error(
            406,
            "media_type_not_acceptable",
            "The Accept header should send a media type of application/json",
        ))
    } else if version
        .as_deref()
        .is_some_and(|v| !KNOWN_VERSIONS.contains(&v.trim()))
    {
        Err(error(
            400,
            "intercom_version_invalid",
            "The requested version could not be found",
        ))
    } else if st.throttle_next > 0 || st.window.1 > RATE_LIMIT {
        st.throttle_next = st.throttle_next.saturating_sub(1);
        remaining = 0;
        reset = now + 1;
        Err(error(
            429,
            "rate_limit_exceeded",
            format!("Exceeded rate limit of {RATE_LIMIT} in 60 seconds"),
        ))
    } else {
        route(&mut st, &request, &method, &path, &text)
    };
    let (status, reply) = match answer {
        Ok(value) => (200, value),
        Err(e) => (
            e.status,
            json!({
                "type": "error.list",
                "request_id": new_request_id(),
                "errors": [{"code": e.code, "message": e.message}],
            }),
        ),
    };
    st.calls.push(Call {
        method,
        path: url,
        status,
        body,
        version,
    });
    drop(st);
    let header = |name: &str, value: &str| Header::from_bytes(name, value).expect("a valid header");
    let response = Response::from_string(reply.to_string())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json; charset=utf-8"))
        .with_header(header("X-RateLimit-Limit", &RATE_LIMIT.to_string()))
        .with_header(header("X-RateLimit-Remaining", &remaining.to_string()))
        .with_header(header("X-RateLimit-Reset", &reset.to_string()));
    let _ = request.respond(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::{send, Reply};

    const TOKEN: &str = "tok-intercom";

    fn addr(fake: &FakeIntercom) -> String {
        fake.base_url().trim_start_matches("http://").to_string()
    }

    /// A well-formed request: bearer token, JSON Accept, version 2.14, JSON body if any.
    fn call(fake: &FakeIntercom, method: &str, path: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("Accept", "application/json"),
            ("Intercom-Version", "2.14"),
        ];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let text = body.map(|b| b.to_string()).unwrap_or_default();
        send(&addr(fake), method, path, &headers, &text)
    }

    fn code(reply: &Reply) -> String {
        let body = reply.json();
        assert_eq!(body["type"], "error.list", "{}", reply.body);
        assert!(body["request_id"].is_string());
        body["errors"][0]["code"].as_str().unwrap().to_string()
    }

    fn message(reply: &Reply) -> String {
        reply.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn search(fake: &FakeIntercom, query: Value) -> Reply {
        call(
            fake,
            "POST",
            "/contacts/search",
            Some(json!({"query": query})),
        )
    }

    fn search_ids(fake: &FakeIntercom, query: Value) -> Vec<String> {
        let reply = search(fake, query);
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn create_then_conflict_names_the_existing_contact() {
        let fake = FakeIntercom::start(TOKEN);
        fake.define_custom_attribute("contact", "plan", "string");
        let created = call(
            &fake,
            "POST",
            "/contacts",
            Some(
                json!({"role": "user", "external_id": "u1", "email": "a@x.io", "name": "Ann",
                        "custom_attributes": {"plan": "pro"}}),
            ),
        );
        assert_eq!(created.status, 200, "{}", created.body);
        let contact = created.json();
        let id = contact["id"].as_str().unwrap().to_string();
        assert_eq!(id.len(), 24);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(contact["type"], "contact");
        assert_eq!(contact["external_id"], "u1");
        assert_eq!(contact["email"], "a@x.io");
        assert_eq!(contact["custom_attributes"], json!({"plan": "pro"}));

        let same_external = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1", "email": "other@x.io"})),
        );
        assert_eq!(same_external.status, 409);
        assert_eq!(code(&same_external), "conflict");
        assert_eq!(
            message(&same_external),
            format!("A contact matching those details already exists with id={id}")
        );
        let same_email = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u2", "email": "A@X.io"})),
        );
        assert_eq!(same_email.status, 409);
        assert!(message(&same_email).ends_with(&id));
        // A lead may share a user's email.
        let lead = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"role": "lead", "email": "a@x.io"})),
        );
        assert_eq!(lead.status, 200, "{}", lead.body);
        // A user needs an email or an external_id.
        let nameless = call(&fake, "POST", "/contacts", Some(json!({"name": "Nobody"})));
        assert_eq!(nameless.status, 400);

        let contacts = fake.contacts();
        assert_eq!(contacts["u1"]["id"], id.as_str());
        assert_eq!(contacts["u1"]["name"], "Ann");
        assert_eq!(contacts["u1"]["archived"], false);
        assert_eq!(contacts["u1"]["tags"], json!([]));
        assert_eq!(contacts.len(), 2);
    }

    #[test]
    fn update_merges_and_refuses_colliding_external_ids() {
        let fake = FakeIntercom::start(TOKEN);
        fake.define_custom_attribute("contact", "score", "integer");
        fake.define_custom_attribute("contact", "vip", "boolean");
        let id = fake.add_contact("u1", "a@x.io");
        let other = fake.add_contact("u2", "b@x.io");
        let path = format!("/contacts/{id}");
        let first = call(
            &fake,
            "PUT",
            &path,
            Some(json!({"name": "Ann", "custom_attributes": {"score": 3, "vip": true}})),
        );
        assert_eq!(first.status, 200, "{}", first.body);
        let second = call(
            &fake,
            "PUT",
            &path,
            Some(json!({"phone": "+33 1", "custom_attributes": {"score": 4, "vip": null}})),
        );
        assert_eq!(second.status, 200, "{}", second.body);
        assert_eq!(second.json()["name"], "Ann");
        let contact = &fake.contacts()["u1"];
        assert_eq!(contact["phone"], "+33 1");
        assert_eq!(contact["custom_attributes"], json!({"score": 4}));

        let collide = call(&fake, "PUT", &path, Some(json!({"external_id": "u2"})));
        assert_eq!(collide.status, 409);
        assert!(message(&collide).ends_with(&other));
        let collide_email = call(&fake, "PUT", &path, Some(json!({"email": "b@x.io"})));
        assert_eq!(collide_email.status, 409);
        let renamed = call(&fake, "PUT", &path, Some(json!({"external_id": "u9"})));
        assert_eq!(renamed.status, 200);
        assert!(fake.contacts().contains_key("u9"));

        let wrong_type = call(
            &fake,
            "PUT",
            &path,
            Some(json!({"custom_attributes": {"score": "high"}})),
        );
        assert_eq!(wrong_type.status, 400);
        assert_eq!(code(&wrong_type), "parameter_invalid");
        let float_for_int = call(
            &fake,
            "PUT",
            &path,
            Some(json!({"custom_attributes": {"score": 1.5}})),
        );
        assert_eq!(float_for_int.status, 400);
        let unknown = call(
            &fake,
            "PUT",
            "/contacts/000000000000000000000000",
            Some(json!({})),
        );
        assert_eq!(unknown.status, 404);
        assert_eq!(code(&unknown), "not_found");
        assert_eq!(message(&unknown), "User Not Found");
        let to_lead = call(&fake, "PUT", &path, Some(json!({"role": "lead"})));
        assert_eq!(to_lead.status, 400);
        let null_email = call(&fake, "PUT", &path, Some(json!({"email": null})));
        assert_eq!(null_email.status, 400);
    }

    #[test]
    fn unknown_custom_attributes_and_members_are_refused() {
        let fake = FakeIntercom::start(TOKEN);
        let reply = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1", "custom_attributes": {"x": 1}})),
        );
        assert_eq!(reply.status, 400);
        assert_eq!(code(&reply), "parameter_not_found");
        assert_eq!(message(&reply), "Custom attribute 'x' does not exist");
        // Declared for companies only: still unknown for contacts.
        fake.define_custom_attribute("company", "x", "integer");
        let reply = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1", "custom_attributes": {"x": 1}})),
        );
        assert_eq!(code(&reply), "parameter_not_found");
        let reply = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1", "nickname": "A"})),
        );
        assert_eq!(reply.status, 400);
        assert_eq!(code(&reply), "parameter_invalid");
        fake.define_custom_attribute("contact", "note", "string");
        let long = "é".repeat(MAX_CUSTOM_TEXT + 1);
        let reply = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1", "custom_attributes": {"note": long}})),
        );
        assert_eq!(reply.status, 400);
        let reply = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1", "signed_up_at": "yesterday"})),
        );
        assert_eq!(reply.status, 400);
        assert!(fake.contacts().is_empty());
    }

    #[test]
    fn bad_email_and_bad_bodies_are_refused() {
        let fake = FakeIntercom::start(TOKEN);
        let reply = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1", "email": "not-an-email"})),
        );
        assert_eq!(reply.status, 400);
        assert_eq!(code(&reply), "parameter_invalid");
        assert_eq!(message(&reply), "Invalid email");

        let auth = format!("Bearer {TOKEN}");
        let base = [
            ("Authorization", auth.as_str()),
            ("Accept", "application/json"),
        ];
        let plain = [base[0], base[1], ("Content-Type", "text/plain")];
        let reply = send(
            &addr(&fake),
            "POST",
            "/contacts",
            &plain,
            r#"{"external_id":"u1"}"#,
        );
        assert_eq!(reply.status, 415);
        let json_ct = [
            base[0],
            base[1],
            ("Content-Type", "application/json; charset=utf-8"),
        ];
        let reply = send(&addr(&fake), "POST", "/contacts", &json_ct, "{not json");
        assert_eq!(reply.status, 400);
        assert_eq!(code(&reply), "parameter_invalid");
        let reply = send(&addr(&fake), "POST", "/contacts", &json_ct, "[1]");
        assert_eq!(reply.status, 400);
        let reply = send(
            &addr(&fake),
            "POST",
            "/contacts",
            &json_ct,
            r#"{"external_id":"u1"}"#,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let reply = call(&fake, "PATCH", "/contacts/x", Some(json!({})));
        assert_eq!(reply.status, 404);
    }

    #[test]
    fn search_by_external_id_in_and_limits() {
        let fake = FakeIntercom::start(TOKEN);
        let a = fake.add_contact("a", "a@x.io");
        let b = fake.add_contact("b", "b@x.io");
        let _c = fake.add_contact("c", "c@x.io");
        let mut found = search_ids(
            &fake,
            json!({"field": "external_id", "operator": "IN", "value": ["a", "b", "zz"]}),
        );
        found.sort();
        let mut expected = vec![a.clone(), b.clone()];
        expected.sort();
        assert_eq!(found, expected);

        let reply = search(
            &fake,
            json!({"field": "external_id", "operator": "=", "value": "b"}),
        );
        let list = reply.json();
        assert_eq!(list["type"], "list");
        assert_eq!(list["total_count"], 1);
        assert_eq!(list["data"][0]["id"], b.as_str());
        assert_eq!(list["pages"]["type"], "pages");
        assert_eq!(list["pages"]["page"], 1);
        assert_eq!(list["pages"]["per_page"], 50);
        assert_eq!(list["pages"]["total_pages"], 1);

        assert_eq!(
            search_ids(
                &fake,
                json!({"field": "email", "operator": "=", "value": "A@X.IO"})
            ),
            vec![a.clone()]
        );
        assert_eq!(
            search_ids(&fake, json!({"field": "id", "operator": "=", "value": a})),
            vec![a.clone()]
        );
        assert_eq!(
            search_ids(
                &fake,
                json!({"operator": "AND", "value": [
                    {"field": "external_id", "operator": "IN", "value": ["a", "b"]},
                    {"field": "email", "operator": "$", "value": "b@x.io"}]})
            ),
            vec![b.clone()]
        );

        // Pagination with a cursor.
        let reply = call(
            &fake,
            "POST",
            "/contacts/search",
            Some(
                json!({"query": {"field": "email", "operator": "~", "value": "@x.io"},
                        "pagination": {"per_page": 2}}),
            ),
        );
        let page = reply.json();
        assert_eq!(page["data"].as_array().unwrap().len(), 2);
        assert_eq!(page["total_count"], 3);
        assert_eq!(page["pages"]["total_pages"], 2);
        let cursor = page["pages"]["next"]["starting_after"].clone();
        let reply = call(
            &fake,
            "POST",
            "/contacts/search",
            Some(
                json!({"query": {"field": "email", "operator": "~", "value": "@x.io"},
                        "pagination": {"per_page": 2, "starting_after": cursor}}),
            ),
        );
        assert_eq!(reply.json()["data"].as_array().unwrap().len(), 1);
        assert!(reply.json()["pages"].get("next").is_none());

        let too_many: Vec<String> = (0..16).map(|i| format!("e{i}")).collect();
        let reply = search(
            &fake,
            json!({"field": "external_id", "operator": "IN", "value": too_many}),
        );
        assert_eq!(reply.status, 400);
        let fifteen: Vec<String> = (0..15).map(|i| format!("e{i}")).collect();
        let reply = search(
            &fake,
            json!({"field": "external_id", "operator": "IN", "value": fifteen}),
        );
        assert_eq!(reply.status, 200);
        let reply = call(
            &fake,
            "POST",
            "/contacts/search",
            Some(
                json!({"query": {"field": "external_id", "operator": "=", "value": "a"},
                        "pagination": {"per_page": 151}}),
            ),
        );
        assert_eq!(reply.status, 400);
        let reply = search(
            &fake,
            json!({"field": "external_id", "operator": "IN", "value": "a"}),
        );
        assert_eq!(reply.status, 400);
        let reply = search(
            &fake,
            json!({"field": "shoe_size", "operator": "=", "value": "9"}),
        );
        assert_eq!(reply.status, 400);
        let reply = call(&fake, "POST", "/contacts/search", Some(json!({})));
        assert_eq!(reply.status, 400);
    }

    #[test]
    fn find_by_external_id() {
        let fake = FakeIntercom::start(TOKEN);
        let id = fake.add_contact("ext/1", "a@x.io");
        let reply = call(&fake, "GET", "/contacts/find_by_external_id/ext%2F1", None);
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["id"], id.as_str());
        assert_eq!(reply.json()["external_id"], "ext/1");
        let reply = call(&fake, "GET", "/contacts/find_by_external_id/nope", None);
        assert_eq!(reply.status, 404);
        assert_eq!(code(&reply), "not_found");
        let reply = call(&fake, "GET", &format!("/contacts/{id}"), None);
        assert_eq!(reply.status, 200);
    }

    #[test]
    fn archived_contacts_leave_search_and_conflict_as_archived() {
        let fake = FakeIntercom::start(TOKEN);
        let id = fake.add_contact("u1", "a@x.io");
        let reply = call(&fake, "POST", &format!("/contacts/{id}/archive"), None);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let archived = reply.json();
        assert_eq!(archived["id"], id.as_str());
        assert_eq!(archived["object"], "contact");
        assert_eq!(archived["archived"], true);
        assert!(search_ids(
            &fake,
            json!({"field": "external_id", "operator": "=", "value": "u1"})
        )
        .is_empty());
        let reply = call(&fake, "GET", "/contacts/find_by_external_id/u1", None);
        assert_eq!(reply.status, 404);
        assert_eq!(fake.contacts()["u1"]["archived"], true);
        let reply = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1"})),
        );
        assert_eq!(reply.status, 409);
        assert_eq!(
            message(&reply),
            format!("An archived contact matching those details already exists with id={id}")
        );
        let reply = call(
            &fake,
            "PUT",
            &format!("/contacts/{id}"),
            Some(json!({"name": "A"})),
        );
        assert_eq!(reply.status, 404);
        let reply = call(
            &fake,
            "POST",
            "/contacts/000000000000000000000000/archive",
            None,
        );
        assert_eq!(reply.status, 404);
        let reply = call(&fake, "POST", &format!("/contacts/{id}/unarchive"), None);
        assert_eq!(reply.status, 200);
        assert_eq!(
            search_ids(
                &fake,
                json!({"field": "external_id", "operator": "=", "value": "u1"})
            ),
            vec![id.clone()]
        );
        let reply = call(&fake, "DELETE", &format!("/contacts/{id}"), None);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["deleted"], true);
        assert!(fake.contacts().is_empty());
        let reply = call(&fake, "DELETE", &format!("/contacts/{id}"), None);
        assert_eq!(reply.status, 404);
    }

    #[test]
    fn tag_and_untag_contacts_by_name() {
        let fake = FakeIntercom::start(TOKEN);
        let a = fake.add_contact("a", "a@x.io");
        let b = fake.add_contact("b", "b@x.io");
        let reply = call(&fake, "POST", "/tags", Some(json!({"name": "VIP"})));
        assert_eq!(reply.status, 200, "{}", reply.body);
        let tag = reply.json();
        assert_eq!(tag["type"], "tag");
        assert_eq!(tag["name"], "VIP");
        let tag_id = tag["id"].as_str().unwrap().to_string();

        let reply = call(
            &fake,
            "POST",
            "/tags",
            Some(json!({"name": "vip", "users": [{"id": a}, {"id": b}]})),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["id"], tag_id.as_str());
        assert_eq!(reply.json()["name"], "VIP");
        assert_eq!(fake.contacts()["a"]["tags"], json!(["VIP"]));
        assert_eq!(fake.contacts()["b"]["tags"], json!(["VIP"]));
        let contact = call(&fake, "GET", &format!("/contacts/{a}"), None).json();
        assert_eq!(contact["tags"]["data"][0]["id"], tag_id.as_str());

        let reply = call(
            &fake,
            "POST",
            "/tags",
            Some(json!({"name": "VIP", "users": [{"id": a, "untag": true}]})),
        );
        assert_eq!(reply.status, 200);
        assert_eq!(fake.contacts()["a"]["tags"], json!([]));
        assert_eq!(fake.contacts()["b"]["tags"], json!(["VIP"]));

        // One unknown contact: 404 and nobody tagged.
        let reply = call(
            &fake,
            "POST",
            "/tags",
            Some(
                json!({"name": "Churned", "users": [{"id": a}, {"id": "000000000000000000000000"}]}),
            ),
        );
        assert_eq!(reply.status, 404);
        assert_eq!(code(&reply), "not_found");
        assert_eq!(fake.contacts()["a"]["tags"], json!([]));

        for bad in [
            json!({"name": ""}),
            json!({"test": "invalid"}),
            json!({"name": 3}),
            json!({"name": "x", "users": [{"email": "a@x.io"}]}),
        ] {
            let reply = call(&fake, "POST", "/tags", Some(bad));
            assert_eq!(reply.status, 400, "{}", reply.body);
            assert_eq!(code(&reply), "parameter_invalid");
        }
    }

    #[test]
    fn companies_upsert_tag_and_delete() {
        let fake = FakeIntercom::start(TOKEN);
        fake.define_custom_attribute("company", "seats", "integer");
        let reply = call(
            &fake,
            "POST",
            "/companies",
            Some(json!({"company_id": "c1", "name": "Acme", "plan": "pro",
                        "custom_attributes": {"seats": 5}})),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let company = reply.json();
        assert_eq!(company["type"], "company");
        assert_eq!(company["company_id"], "c1");
        assert_eq!(company["plan"]["name"], "pro");
        let id = company["id"].as_str().unwrap().to_string();

        let reply = call(
            &fake,
            "POST",
            "/companies",
            Some(
                json!({"company_id": "c1", "monthly_spend": 155.98, "custom_attributes": {"seats": 6}}),
            ),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["id"], id.as_str());
        let companies = fake.companies();
        assert_eq!(companies.len(), 1);
        assert_eq!(companies["c1"]["id"], id.as_str());
        assert_eq!(companies["c1"]["name"], "Acme");
        assert_eq!(companies["c1"]["plan"], "pro");
        assert_eq!(companies["c1"]["monthly_spend"], 155);
        assert_eq!(companies["c1"]["custom_attributes"], json!({"seats": 6}));

        let reply = call(
            &fake,
            "POST",
            "/companies",
            Some(json!({"company_id": "c2",
            "custom_attributes": {"tier": "gold"}})),
        );
        assert_eq!(reply.status, 400);
        assert_eq!(code(&reply), "parameter_not_found");
        let reply = call(&fake, "POST", "/companies", Some(json!({"name": "NoId"})));
        assert_eq!(reply.status, 400);
        let reply = call(
            &fake,
            "POST",
            "/companies",
            Some(json!({"company_id": "c2", "test": 1})),
        );
        assert_eq!(reply.status, 400);
        let reply = call(
            &fake,
            "POST",
            "/companies",
            Some(json!({"company_id": "c2", "size": "big"})),
        );
        assert_eq!(reply.status, 400);

        let reply = call(
            &fake,
            "POST",
            "/tags",
            Some(json!({"name": "Enterprise", "companies": [{"company_id": "c1"}]})),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(fake.companies()["c1"]["tags"], json!(["Enterprise"]));
        let reply = call(
            &fake,
            "POST",
            "/tags",
            Some(json!({"name": "Enterprise", "companies": [{"id": id, "untag": true}]})),
        );
        assert_eq!(reply.status, 200);
        assert_eq!(fake.companies()["c1"]["tags"], json!([]));
        let reply = call(
            &fake,
            "POST",
            "/tags",
            Some(json!({"name": "Enterprise", "companies": [{"company_id": "nope"}]})),
        );
        assert_eq!(reply.status, 404);
        assert_eq!(code(&reply), "company_not_found");

        let reply = call(&fake, "DELETE", &format!("/companies/{id}"), None);
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.json(),
            json!({"id": id, "object": "company", "deleted": true})
        );
        assert!(fake.companies().is_empty());
        let reply = call(&fake, "DELETE", &format!("/companies/{id}"), None);
        assert_eq!(reply.status, 404);
        assert_eq!(code(&reply), "company_not_found");
    }

    #[test]
    fn unauthorized_requests_get_401() {
        let fake = FakeIntercom::start(TOKEN);
        let accept = ("Accept", "application/json");
        for auth in [None, Some("Bearer wrong"), Some("Basic dG9rOg==")] {
            let mut headers = vec![accept];
            if let Some(auth) = auth {
                headers.push(("Authorization", auth));
            }
            let reply = send(
                &addr(&fake),
                "GET",
                "/contacts/find_by_external_id/a",
                &headers,
                "",
            );
            assert_eq!(reply.status, 401);
            assert_eq!(code(&reply), "unauthorized");
            assert_eq!(message(&reply), "Access Token Invalid");
            assert_eq!(reply.header("X-RateLimit-Limit"), Some("10000"));
        }
        assert!(fake.calls().iter().all(|c| c.status == 401));
    }

    #[test]
    fn versions_and_accept_are_checked() {
        let fake = FakeIntercom::start(TOKEN);
        let auth = format!("Bearer {TOKEN}");
        let path = "/contacts/find_by_external_id/a";
        let with = |extra: &[(&str, &str)]| {
            let mut headers = vec![("Authorization", auth.as_str())];
            headers.extend_from_slice(extra);
            send(&addr(&fake), "GET", path, &headers, "")
        };
        let reply = with(&[("Accept", "application/json"), ("Intercom-Version", "9.9")]);
        assert_eq!(reply.status, 400);
        assert_eq!(code(&reply), "intercom_version_invalid");
        for ok in ["2.14", "2.11"] {
            let reply = with(&[("Accept", "application/json"), ("Intercom-Version", ok)]);
            assert_eq!(reply.status, 404, "version {ok}: {}", reply.body);
        }
        // No version header: the app's default.
        assert_eq!(with(&[("Accept", "*/*")]).status, 404);
        let reply = with(&[]);
        assert_eq!(reply.status, 406);
        assert_eq!(code(&reply), "media_type_not_acceptable");
        assert_eq!(with(&[("Accept", "text/html")]).status, 406);

        let versions: Vec<Option<String>> = fake.calls().into_iter().map(|c| c.version).collect();
        assert_eq!(versions[0].as_deref(), Some("9.9"));
        assert_eq!(versions[1].as_deref(), Some("2.14"));
        assert_eq!(versions[3], None);
    }

    #[test]
    fn throttling_answers_429_with_rate_limit_headers() {
        let fake = FakeIntercom::start(TOKEN);
        let reply = call(&fake, "GET", "/contacts/find_by_external_id/a", None);
        let remaining: u64 = reply
            .header("X-RateLimit-Remaining")
            .unwrap()
            .parse()
            .unwrap();
        assert!(remaining < 10_000);
        let reset: u64 = reply.header("X-RateLimit-Reset").unwrap().parse().unwrap();
        assert_eq!(reset % 60, 0);
        assert!(reset > now_secs() - 1);

        fake.throttle_next(2);
        for _ in 0..2 {
            let reply = call(
                &fake,
                "POST",
                "/contacts",
                Some(json!({"external_id": "u1"})),
            );
            assert_eq!(reply.status, 429);
            assert_eq!(code(&reply), "rate_limit_exceeded");
            assert_eq!(
                message(&reply),
                "Exceeded rate limit of 10000 in 60 seconds"
            );
            assert_eq!(reply.header("X-RateLimit-Limit"), Some("10000"));
            assert_eq!(reply.header("X-RateLimit-Remaining"), Some("0"));
            let reset: u64 = reply.header("X-RateLimit-Reset").unwrap().parse().unwrap();
            let now = now_secs();
            assert!(reset >= now && reset <= now + 2, "reset {reset}, now {now}");
        }
        let reply = call(
            &fake,
            "POST",
            "/contacts",
            Some(json!({"external_id": "u1"})),
        );
        assert_eq!(reply.status, 200);
        let calls = fake.calls();
        let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
        assert_eq!(statuses, vec![404, 429, 429, 200]);
        assert_eq!(calls[3].method, "POST");
        assert_eq!(calls[3].path, "/contacts");
        assert_eq!(calls[3].body, Some(json!({"external_id": "u1"})));
        assert_eq!(calls[3].version.as_deref(), Some("2.14"));
        fake.clear_calls();
        assert!(fake.calls().is_empty());
    }
}
