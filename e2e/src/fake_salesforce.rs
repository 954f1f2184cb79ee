//! A strict local fake of the parts of Salesforce's REST API the Salesforce connector uses:
//! sObject describe, sObject Rows by External ID (GET and DELETE of one record by an
//! external-id value), sObject Collections (upsert by external id, update by Id, create,
//! delete), the OAuth 2.0 token endpoint (refresh-token and client-credentials flows) and
//! Bulk API 2.0 ingest jobs (CSV).
//!
//! Salesforce publishes no OpenAPI for these, so the shapes follow the REST API and Bulk API
//! 2.0 developer guides. The fake is strict on purpose: a request the real API would refuse is
//! refused here too, with Salesforce's error shape (`[{"message", "errorCode"}]` for a whole
//! request, `{"statusCode", "message", "fields"}` per record), so a connector bug cannot pass
//! the end-to-end tests by luck. It checks the bearer token, the API version segment, the
//! Content-Type, unknown fields, read-only fields, required fields, e-mail syntax, string
//! lengths, field types, id syntax and checksum, external-id uniqueness, the 200-record
//! collection limit, and the Bulk job state machine. It also models the operational side: the
//! `Sforce-Limit-Info` usage header, the daily request limit (403 REQUEST_LIMIT_EXCEEDED),
//! injected outages, expiring sessions and slow Bulk jobs.
//!
//! Records live in memory, keyed by 18-character Ids (key prefix + counter + the real
//! case-checksum suffix). Deleted records stay as tombstones so that a second delete or an
//! update reports ENTITY_IS_DELETED as Salesforce does. Every request, refused ones included,
//! is journaled with its final status.

use crate::http_util::{form_fields, percent_decode, request_header, FakeServer};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use crate::http_server::{Header, Response};

/// Collections (and the delete `ids` list) take at most this many records.
const MAX_COLLECTION: usize = 200;
/// The daily API request allocation reported until `set_api_limit` changes it.
const DEFAULT_API_LIMIT: u64 = 15_000;
const ORG_ID: &str = "00D000000000001AAA";
const USER_ID: &str = "005000000000001AAA";
const ROLLED_BACK: &str =
    "Record rolled back because not all records were valid and the request was using AllOrNone header";

/// One request as the fake saw and answered it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The request target as sent, query string included.
    pub path: String,
    pub status: u16,
    /// JSON bodies as parsed; form bodies as an object of their fields (secrets as "***");
    /// CSV bodies as `{"csv": "<text>"}`.
    pub body: Option<Value>,
}

/// One field of an sObject, as describe reports it and as writes are checked against it.
#[derive(Clone, Debug)]
pub struct FieldSpec {
    pub name: String,
    /// "id", "string", "email", "double", "boolean", "date", "datetime" or "reference"
    /// (also "phone", "url", "textarea", "picklist" as text and "int", "currency",
    /// "percent" as numbers).
    pub kind: String,
    pub createable: bool,
    pub updateable: bool,
    pub nillable: bool,
    /// External-id fields are also unique (case-insensitive), like Salesforce's usual
    /// "External ID + Unique" custom fields.
    pub external_id: bool,
    pub defaulted_on_create: bool,
}

impl FieldSpec {
    /// A plain read/write, nillable field.
    pub fn new(name: &str, kind: &str) -> FieldSpec {
        FieldSpec {
            name: name.to_string(),
            kind: kind.to_string(),
            createable: true,
            updateable: true,
            nillable: true,
            external_id: false,
            defaulted_on_create: false,
        }
    }

    /// Not nillable: a create must set it, and no write may null it.
    pub fn required(self) -> FieldSpec {
        FieldSpec {
            nillable: false,
            ..self
        }
    }

    /// Neither createable nor updateable (system fields).
    pub fn read_only(self) -> FieldSpec {
        FieldSpec {
            createable: false,
            updateable: false,
            ..self
        }
    }

    pub fn external_id(self) -> FieldSpec {
        FieldSpec {
            external_id: true,
            ..self
        }
    }

    pub fn defaulted(self) -> FieldSpec {
        FieldSpec {
            defaulted_on_create: true,
            ..self
        }
    }

    /// What Salesforce reports as required on create: not nillable, createable, no default.
    fn is_required(&self) -> bool {
        !self.nillable && self.createable && !self.defaulted_on_create
    }

    fn label(&self) -> String {
        label_of(&self.name)
    }

    fn length(&self) -> usize {
        match self.kind.as_str() {
            "id" | "reference" => 18,
            "email" => 80,
            "phone" => 40,
            _ if kind_class(&self.kind) == Kind::Text => 255,
            _ => 0,
        }
    }
}

/// A fake Salesforce org on 127.0.0.1 (instance URL = `base_url()`).
pub struct FakeSalesforce {
    state: Arc<Mutex<State>>,
    server: FakeServer,
}

impl FakeSalesforce {
    /// Starts the fake with `token` as the one valid access token, and the built-in
    /// `Contact` and `Account` objects.
    pub fn start(token: &str) -> FakeSalesforce {
        let state = Arc::new(Mutex::new(State::new(token)));
        // Held until the instance URL is set, so that no request is answered without it.
        let mut st = state.lock().unwrap();
        let handler_state = state.clone();
        let server = FakeServer::start("Salesforce", move |request| serve(request, &handler_state));
        st.base_url = server.base_url();
        drop(st);
        FakeSalesforce { state, server }
    }

    /// The instance URL, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Adds (or replaces) an object such as `Churn_Risk__c`. An `Id` field is added when
    /// `fields` has none.
    pub fn add_object(&self, name: &str, key_prefix: &str, fields: Vec<FieldSpec>) {
        assert!(
            key_prefix.len() == 3 && key_prefix.bytes().all(|b| b.is_ascii_alphanumeric()),
            "a key prefix is 3 alphanumeric characters, not {key_prefix:?}"
        );
        let mut st = self.state.lock().unwrap();
        st.objects.retain(|o| !o.name.eq_ignore_ascii_case(name));
        st.objects.push(Object::new(name, key_prefix, fields));
    }

    /// The live (not deleted) records of `object`, by Id; each value holds `Id` and every
    /// field written so far (system fields such as CreatedDate are not materialized).
    pub fn records(&self, object: &str) -> BTreeMap<String, Value> {
        let st = self.state.lock().unwrap();
        st.records
            .iter()
            .filter(|(_, r)| !r.deleted && r.object.eq_ignore_ascii_case(object))
            .map(|(id, r)| (id.clone(), Value::Object(r.values.clone())))
            .collect()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// (used, limit) as reported in `Sforce-Limit-Info`.
    pub fn api_usage(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap();
        (st.api_used, st.api_limit)
    }

    /// Once the usage reaches `limit`, API requests get 403 REQUEST_LIMIT_EXCEEDED.
    pub fn set_api_limit(&self, limit: u64) {
        self.state.lock().unwrap().api_limit = limit;
    }

    /// The next `n` API requests (not token requests) are answered with `status` and a
    /// Salesforce-shaped error, before anything else is checked; they do not count as usage.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut st = self.state.lock().unwrap();
        st.fail_next = n;
        st.fail_status = status;
    }

    /// Accepts these client credentials at the token endpoint; with `refresh_token` None only
    /// the client-credentials flow can succeed.
    pub fn configure_oauth(
        &self,
        client_id: &str,
        client_secret: &str,
        refresh_token: Option<&str>,
    ) {
        self.state.lock().unwrap().oauth = Some(OAuth {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            refresh_token: refresh_token.map(str::to_string),
        });
    }

    /// Every access token issued so far becomes invalid (401 INVALID_SESSION_ID).
    pub fn expire_token(&self) {
        self.state.lock().unwrap().tokens.clear();
    }

    /// Requests made to the token endpoint, refused ones included.
    pub fn token_calls(&self) -> usize {
        self.state.lock().unwrap().token_calls
    }

    /// After UploadComplete, a Bulk job reports InProgress to this many GETs before it
    /// reports its final state (default 1).
    pub fn set_bulk_polls_until_complete(&self, n: usize) {
        self.state.lock().unwrap().bulk_polls = n;
    }
}

// ---------------------------------------------------------------------------------------
// State

struct OAuth {
    client_id: String,
    client_secret: String,
    refresh_token: Option<String>,
}

#[derive(Clone)]
struct Object {
    name: String,
    key_prefix: String,
    fields: Vec<FieldSpec>,
}

impl Object {
    fn new(name: &str, key_prefix: &str, mut fields: Vec<FieldSpec>) -> Object {
        if !fields.iter().any(|f| f.name == "Id") {
            fields.insert(
                0,
                FieldSpec::new("Id", "id")
                    .read_only()
                    .required()
                    .defaulted(),
            );
        }
        Object {
            name: name.to_string(),
            key_prefix: key_prefix.to_string(),
            fields,
        }
    }

    /// Field names are case-insensitive in Salesforce; this answers the canonical spec.
    fn field(&self, name: &str) -> Option<&FieldSpec> {
        self.fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
    }

    fn label(&self) -> String {
        label_of(&self.name)
    }
}

#[derive(Clone)]
struct Record {
    object: String,
    values: Map<String, Value>,
    deleted: bool,
}

struct Job {
    id: String,
    object: String,
    operation: String,
    external_id: Option<String>,
    line_ending: String,
    delimiter: String,
    api_version: u32,
    created: String,
    state: String,
    data: Option<String>,
    polls_left: usize,
    outcome: Option<Outcome>,
}

/// What processing a Bulk job produced (computed at UploadComplete, revealed after polling).
#[derive(Default)]
struct Outcome {
    /// The job-level errorMessage when the whole job failed (nothing was applied).
    failed: Option<String>,
    header: Vec<String>,
    successes: Vec<(String, bool, Vec<String>)>,
    failures: Vec<(String, String, Vec<String>)>,
}

struct State {
    base_url: String,
    objects: Vec<Object>,
    records: BTreeMap<String, Record>,
    /// Shared by records and jobs, so every Id in the org is distinct.
    next_id: u64,
    calls: Vec<Call>,
    tokens: Vec<String>,
    tokens_issued: u64,
    oauth: Option<OAuth>,
    token_calls: usize,
    api_used: u64,
    api_limit: u64,
    fail_next: usize,
    fail_status: u16,
    bulk_polls: usize,
    jobs: BTreeMap<String, Job>,
}

/// A per-record failure: `{"statusCode", "message", "fields"}` in collections, and
/// `CODE:message:fields --` in Bulk failedResults.
#[derive(Clone, Debug)]
struct RecErr {
    code: &'static str,
    message: String,
    fields: Vec<String>,
}

impl RecErr {
    fn new(code: &'static str, message: impl Into<String>, fields: &[&str]) -> RecErr {
        RecErr {
            code,
            message: message.into(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
        }
    }

    fn json(&self) -> Value {
        json!({ "statusCode": self.code, "message": self.message, "fields": self.fields })
    }

    fn bulk(&self) -> String {
        let fields = if self.fields.is_empty() {
            String::new()
        } else {
            self.fields.join(",") + " "
        };
        format!("{}:{}:{}--", self.code, self.message, fields)
    }
}

/// How a record is keyed in a write.
enum Target<'a> {
    Create,
    /// By the value of this external-id field in the record.
    Upsert(&'a str),
    /// By this Id as sent (None: the record carried no Id).
    Update(Option<&'a str>),
}

impl State {
    /// A new org; `base_url` is set once the server has its port.
    fn new(token: &str) -> State {
        let contact = Object::new(
            "Contact",
            "003",
            vec![
                FieldSpec::new("Id", "id")
                    .read_only()
                    .required()
                    .defaulted(),
                FieldSpec::new("LastName", "string").required(),
                FieldSpec::new("FirstName", "string"),
                FieldSpec::new("Email", "email"),
                FieldSpec::new("Phone", "string"),
                FieldSpec::new("External_Id__c", "string").external_id(),
                FieldSpec::new("Health_Score__c", "double"),
                FieldSpec::new("CreatedDate", "datetime")
                    .read_only()
                    .required()
                    .defaulted(),
                FieldSpec::new("Name", "string").read_only(),
                FieldSpec::new("IsDeleted", "boolean")
                    .read_only()
                    .required()
                    .defaulted(),
            ],
        );
        let account = Object::new(
            "Account",
            "001",
            vec![
                FieldSpec::new("Id", "id")
                    .read_only()
                    .required()
                    .defaulted(),
                FieldSpec::new("Name", "string").required(),
                FieldSpec::new("Account_Key__c", "string").external_id(),
                FieldSpec::new("AnnualRevenue", "double"),
                FieldSpec::new("Industry", "string"),
                FieldSpec::new("CreatedDate", "datetime")
                    .read_only()
                    .required()
                    .defaulted(),
            ],
        );
        State {
            base_url: String::new(),
            objects: vec![contact, account],
            records: BTreeMap::new(),
            next_id: 0,
            calls: Vec::new(),
            tokens: vec![token.to_string()],
            tokens_issued: 0,
            oauth: None,
            token_calls: 0,
            api_used: 0,
            api_limit: DEFAULT_API_LIMIT,
            fail_next: 0,
            fail_status: 503,
            bulk_polls: 1,
            jobs: BTreeMap::new(),
        }
    }

    fn object(&self, name: &str) -> Option<Object> {
        self.objects
            .iter()
            .find(|o| o.name.eq_ignore_ascii_case(name))
            .cloned()
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        let base = format!("{prefix}{:012}", self.next_id);
        let suffix = id_suffix(&base);
        base + &suffix
    }

    /// The live record of `object` whose external-id `field` equals `value`
    /// (case-insensitively, as Salesforce's unique external ids compare by default).
    fn find_by_external_id(&self, object: &Object, field: &str, value: &Value) -> Option<String> {
        let key = ext_key(value);
        self.records
            .iter()
            .find(|(_, r)| {
                !r.deleted
                    && r.object == object.name
                    && r.values.get(field).is_some_and(|v| ext_key(v) == key)
            })
            .map(|(id, _)| id.clone())
    }

    /// The canonical Id of a live record of `object` (update), or why not.
    fn live_id(&self, raw: &str, object: &Object) -> Result<String, RecErr> {
        let wrong_type = || {
            RecErr::new(
                "MALFORMED_ID",
                format!("{} ID: id value of incorrect type: {raw}", object.label()),
                &["Id"],
            )
        };
        let id = canonical_id(raw).ok_or_else(wrong_type)?;
        if !id.starts_with(&object.key_prefix) {
            return Err(wrong_type());
        }
        match self.records.get(&id) {
            None => Err(RecErr::new(
                "INVALID_CROSS_REFERENCE_KEY",
                "invalid cross reference id",
                &[],
            )),
            Some(r) if r.deleted => Err(RecErr::new("ENTITY_IS_DELETED", "entity is deleted", &[])),
            Some(_) => Ok(id),
        }
    }

    /// Checks that need the org: e-mail syntax, length, references. `value` is already typed.
    fn check_value(&self, spec: &FieldSpec, value: Value) -> Result<Value, RecErr> {
        let Value::String(text) = &value else {
            return Ok(value);
        };
        let name = spec.name.as_str();
        if spec.kind == "email" && !valid_email(text) {
            let message = format!("{}: invalid email address: {text}", spec.label());
            return Err(RecErr::new("INVALID_EMAIL_ADDRESS", message, &[name]));
        }
        if spec.length() > 0 && text.chars().count() > spec.length() {
            let message = format!(
                "{}: data value too large: {text} (max length={})",
                spec.label(),
                spec.length()
            );
            return Err(RecErr::new("STRING_TOO_LONG", message, &[name]));
        }
        if spec.kind == "reference" {
            let id = canonical_id(text).ok_or_else(|| {
                let message = format!("{}: id value of incorrect type: {text}", spec.label());
                RecErr::new("MALFORMED_ID", message, &[name])
            })?;
            if self.records.get(&id).is_none_or(|r| r.deleted) {
                return Err(RecErr::new(
                    "INVALID_CROSS_REFERENCE_KEY",
                    "invalid cross reference id",
                    &[],
                ));
            }
            return Ok(Value::String(id));
        }
        Ok(value)
    }

    /// Creates or updates one record after the per-record checks. `values` are canonical
    /// field names with typed values (Null = set to null); absent fields are left unchanged.
    /// Answers the Id and whether the record was created.
    fn write(
        &mut self,
        object: &Object,
        target: Target,
        values: &[(String, Value)],
    ) -> Result<(String, bool), RecErr> {
        let given = |name: &str| values.iter().find(|(f, _)| f == name).map(|(_, v)| v);
        let existing = match target {
            Target::Create => None,
            Target::Upsert(field) => {
                let key = given(field).filter(|v| !v.is_null()).ok_or_else(|| {
                    RecErr::new("MISSING_ARGUMENT", format!("{field} not specified"), &[])
                })?;
                self.find_by_external_id(object, field, key)
            }
            Target::Update(None) => {
                return Err(RecErr::new(
                    "MISSING_ARGUMENT",
                    "Id not specified in an update call",
                    &[],
                ))
            }
            Target::Update(Some(raw)) => Some(self.live_id(raw, object)?),
        };
        let creating = existing.is_none();

        let refused: Vec<&str> = values
            .iter()
            .map(|(f, _)| object.field(f).expect("fields resolved by the caller"))
            .filter(|s| {
                if creating {
                    !s.createable
                } else {
                    !s.updateable
                }
            })
            .map(|s| s.name.as_str())
            .collect();
        if !refused.is_empty() {
            let message = format!(
                "Unable to create/update fields: {}. Please check the security settings of this field and verify that it is read/write for your profile or permission set.",
                refused.join(", ")
            );
            return Err(RecErr::new(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                message,
                &refused,
            ));
        }

        let mut checked = Vec::with_capacity(values.len());
        for (f, v) in values {
            checked.push((
                f.clone(),
                self.check_value(object.field(f).unwrap(), v.clone())?,
            ));
        }

        // A create must give every required field a value; an update may only not null one.
        let missing: Vec<&str> = object
            .fields
            .iter()
            .filter(|s| s.is_required())
            .filter(|s| match given(&s.name) {
                None => creating,
                Some(v) => v.is_null(),
            })
            .map(|s| s.name.as_str())
            .collect();
        if !missing.is_empty() {
            let message = format!("Required fields are missing: [{}]", missing.join(", "));
            return Err(RecErr::new("REQUIRED_FIELD_MISSING", message, &missing));
        }

        for (f, v) in &checked {
            if v.is_null() || !object.field(f).unwrap().external_id {
                continue;
            }
            if let Some(other) = self.find_by_external_id(object, f, v) {
                if Some(&other) != existing.as_ref() {
                    let message = format!(
                        "duplicate value found: {f} duplicates value on record with id: {other}"
                    );
                    return Err(RecErr::new("DUPLICATE_VALUE", message, &[]));
                }
            }
        }

        let id = match existing {
            Some(id) => id,
            None => self.new_id(&object.key_prefix),
        };
        let record = self.records.entry(id.clone()).or_insert_with(|| Record {
            object: object.name.clone(),
            values: Map::from_iter([("Id".to_string(), Value::String(id.clone()))]),
            deleted: false,
        });
        for (f, v) in checked {
            record.values.insert(f, v);
        }
        Ok((id, creating))
    }

    /// Deletes one record (a tombstone, or gone entirely for a Bulk hardDelete).
    fn delete(&mut self, raw: &str, object: Option<&Object>, hard: bool) -> Result<String, RecErr> {
        let id = canonical_id(raw)
            .ok_or_else(|| RecErr::new("MALFORMED_ID", format!("malformed id {raw}"), &[]))?;
        if let Some(object) = object {
            if !id.starts_with(&object.key_prefix) {
                let message = format!("{} ID: id value of incorrect type: {raw}", object.label());
                return Err(RecErr::new("MALFORMED_ID", message, &["Id"]));
            }
        }
        match self.records.get_mut(&id) {
            None => Err(RecErr::new(
                "INVALID_CROSS_REFERENCE_KEY",
                "invalid cross reference id",
                &[],
            )),
            Some(r) if r.deleted => Err(RecErr::new("ENTITY_IS_DELETED", "entity is deleted", &[])),
            Some(r) => {
                if hard {
                    self.records.remove(&id);
                } else {
                    r.deleted = true;
                }
                Ok(id)
            }
        }
    }

    /// Runs `each` for records 0..n. With allOrNone, any failure restores the records as they
    /// were and turns every success into ALL_OR_NONE_OPERATION_ROLLED_BACK.
    fn all_or_none<T>(
        &mut self,
        all_or_none: bool,
        n: usize,
        mut each: impl FnMut(&mut State, usize) -> Result<T, RecErr>,
    ) -> Vec<Result<T, RecErr>> {
        let snapshot = all_or_none.then(|| self.records.clone());
        let results: Vec<Result<T, RecErr>> = (0..n).map(|i| each(self, i)).collect();
        match snapshot {
            Some(before) if results.iter().any(Result::is_err) => {
                self.records = before;
                results
                    .into_iter()
                    .map(|r| match r {
                        Ok(_) => Err(RecErr::new(
                            "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                            ROLLED_BACK,
                            &[],
                        )),
                        Err(e) => Err(e),
                    })
                    .collect()
            }
            _ => results,
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP plumbing

struct Req {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    authorization: Option<String>,
    body: String,
}

impl Req {
    /// The media type, lower-cased and without parameters such as charset.
    fn media_type(&self) -> String {
        let ct = self.content_type.as_deref().unwrap_or("");
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    }

    /// The body of a JSON request, or the 415/400 Salesforce gives.
    fn json(&self) -> Result<Value, Reply> {
        if self.media_type() != "application/json" {
            let message = format!(
                "Content-Type header specified in HTTP request is not supported: {}",
                self.content_type.as_deref().unwrap_or("(none)")
            );
            return Err(Reply::error(415, "UNSUPPORTED_MEDIA_TYPE", message));
        }
        serde_json::from_str(&self.body).map_err(|e| {
            Reply::error(
                400,
                "JSON_PARSER_ERROR",
                format!("Unexpected character: {e}"),
            )
        })
    }
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    limit_info: Option<String>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            content_type: "application/json;charset=UTF-8",
            body: body.to_string(),
            limit_info: None,
        }
    }

    /// Salesforce's whole-request error: a one-element array.
    fn error(status: u16, code: &str, message: impl Into<String>) -> Reply {
        Reply::json(
            status,
            json!([{ "message": message.into(), "errorCode": code }]),
        )
    }

    fn not_found() -> Reply {
        Reply::error(404, "NOT_FOUND", "The requested resource does not exist")
    }

    fn method_not_allowed(method: &str, allowed: &str) -> Reply {
        Reply::error(
            405,
            "METHOD_NOT_ALLOWED",
            format!("HTTP Method '{method}' not allowed. Allowed are {allowed}"),
        )
    }

    fn csv(text: String) -> Reply {
        Reply {
            status: 200,
            content_type: "text/csv",
            body: text,
            limit_info: None,
        }
    }

    fn empty(status: u16) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            body: String::new(),
            limit_info: None,
        }
    }
}

fn serve(mut request: crate::http_server::Request, state: &Mutex<State>) {
    let url = request.url().to_string();
    let mut raw = Vec::new();
    let _ = request.as_reader().read_to_end(&mut raw);
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let req = Req {
        method: request.method().as_str().to_string(),
        path: path.to_string(),
        query: form_fields(query),
        content_type: request_header(&request, "Content-Type"),
        authorization: request_header(&request, "Authorization"),
        body: String::from_utf8_lossy(&raw).into_owned(),
    };
    let mut st = state.lock().unwrap();
    let reply = if req.path == "/services/oauth2/token" {
        st.token(&req)
    } else if let Some(rest) = req.path.strip_prefix("/services/data/") {
        let mut reply = st.api(&req, rest);
        reply.limit_info = Some(format!("api-usage={}/{}", st.api_used, st.api_limit));
        reply
    } else {
        Reply::not_found()
    };
    st.calls.push(Call {
        method: req.method.clone(),
        path: url.clone(),
        status: reply.status,
        body: journal_body(&req),
    });
    drop(st);
    let mut response = Response::from_string(reply.body)
        .with_status_code(reply.status)
        .with_header(Header::from_bytes("Content-Type", reply.content_type).unwrap());
    if let Some(info) = reply.limit_info {
        response = response.with_header(Header::from_bytes("Sforce-Limit-Info", info).unwrap());
    }
    let _ = request.respond(response);
}

/// The body as the journal keeps it (see [`Call::body`]).
fn journal_body(req: &Req) -> Option<Value> {
    match req.media_type().as_str() {
        "application/x-www-form-urlencoded" => {
            let fields = form_fields(&req.body).into_iter().map(|(k, v)| {
                let secret = matches!(k.as_str(), "client_secret" | "refresh_token" | "password");
                (k, Value::String(if secret { "***".to_string() } else { v }))
            });
            Some(Value::Object(fields.collect()))
        }
        "text/csv" => Some(json!({ "csv": req.body })),
        _ if req.body.is_empty() => None,
        _ => serde_json::from_str(&req.body).ok(),
    }
}

// ---------------------------------------------------------------------------------------
// OAuth token endpoint

impl State {
    fn token(&mut self, req: &Req) -> Reply {
        self.token_calls += 1;
        let oauth_error = |error: &str, description: &str| {
            Reply::json(
                400,
                json!({ "error": error, "error_description": description }),
            )
        };
        if req.method != "POST" {
            return oauth_error("invalid_request", "must use HTTP POST");
        }
        // Salesforce only reads the grant from a form body; anything else has no grant type.
        if req.media_type() != "application/x-www-form-urlencoded" {
            return oauth_error("unsupported_grant_type", "grant type not supported");
        }
        let form = form_fields(&req.body);
        let get = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let grant = get("grant_type").unwrap_or("");
        if grant != "refresh_token" && grant != "client_credentials" {
            return oauth_error("unsupported_grant_type", "grant type not supported");
        }
        let Some(oauth) = &self.oauth else {
            return oauth_error("invalid_client_id", "client identifier invalid");
        };
        if get("client_id") != Some(oauth.client_id.as_str()) {
            return oauth_error("invalid_client_id", "client identifier invalid");
        }
        if get("client_secret") != Some(oauth.client_secret.as_str()) {
            return oauth_error("invalid_client", "invalid client credentials");
        }
        if grant == "refresh_token"
            && (oauth.refresh_token.is_none()
                || get("refresh_token") != oauth.refresh_token.as_deref())
        {
            return oauth_error("invalid_grant", "expired access/refresh token");
        }
        self.tokens_issued += 1;
        let token = format!("{ORG_ID}!AQ.fake.{}.{}", self.tokens_issued, now_ms());
        self.tokens.push(token.clone());
        Reply::json(
            200,
            json!({
                "access_token": token,
                "instance_url": self.base_url,
                "id": format!("{}/id/{ORG_ID}/{USER_ID}", self.base_url),
                "token_type": "Bearer",
                "issued_at": now_ms().to_string(),
                "signature": format!("ZmFrZS1zaWduYXR1cmUt{}", self.tokens_issued),
                "scope": "api",
            }),
        )
    }
}

// ---------------------------------------------------------------------------------------
// REST API: /services/data/vXX.X/...

/// `v62.0` → 62. Salesforce versions are always `NN.0`; anything else is a 404.
fn api_version(segment: &str) -> Option<u32> {
    let digits = segment.strip_prefix('v')?.strip_suffix(".0")?;
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|v| *v >= 20)
}

fn injected_failure(status: u16) -> Reply {
    let (code, message) = match status {
        401 => ("INVALID_SESSION_ID", "Session expired or invalid"),
        403 => ("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
        404 => ("NOT_FOUND", "The requested resource does not exist"),
        429 => ("REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded."),
        500 => ("UNKNOWN_EXCEPTION", "An unexpected error occurred. Please include this ErrorId if you contact support: 1234567890-1234 (-1234567890)"),
        502..=504 => ("SERVER_UNAVAILABLE", "Server temporarily unavailable"),
        _ => ("UNKNOWN_EXCEPTION", "Injected failure"),
    };
    Reply::error(status, code, message)
}

impl State {
    fn api(&mut self, req: &Req, rest: &str) -> Reply {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return injected_failure(self.fail_status);
        }
        let token = req.authorization.as_deref().and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("OAuth "))
        });
        if !token.is_some_and(|t| self.tokens.iter().any(|valid| valid == t.trim())) {
            return Reply::json(
                401,
                json!([{ "message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID" }]),
            );
        }
        if self.api_used >= self.api_limit {
            return Reply::error(
                403,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            );
        }
        self.api_used += 1;

        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = rest.split('/');
        let Some(version) = segments.next().and_then(api_version) else {
            return Reply::not_found();
        };
        let segments: Vec<&str> = segments.collect();
        let method = req.method.as_str();
        // Each resource exists from the API version that introduced it.
        match segments.as_slice() {
            ["sobjects", object, "describe"] => match method {
                "GET" => self.describe(object),
                _ => Reply::method_not_allowed(method, "GET,HEAD"),
            },
            // sObject Rows by External ID; its PATCH (upsert) and HEAD are not modelled.
            ["sobjects", object, field, value] => match method {
                "GET" | "DELETE" => self.row_by_external_id(method, version, object, field, value),
                _ => Reply::method_not_allowed(method, "GET,DELETE"),
            },
            ["composite", "sobjects"] if version >= 42 => match method {
                "PATCH" => self.update_collection(req),
                "POST" => self.create_collection(req),
                "DELETE" => self.delete_collection(req),
                _ => Reply::method_not_allowed(method, "PATCH,POST,DELETE"),
            },
            ["composite", "sobjects", object, field] if version >= 46 => match method {
                "PATCH" => self.upsert_collection(req, object, field),
                _ => Reply::method_not_allowed(method, "PATCH"),
            },
            ["jobs", "ingest"] if version >= 41 => match method {
                "POST" => self.create_job(req, version),
                "GET" => self.list_jobs(),
                _ => Reply::method_not_allowed(method, "GET,POST"),
            },
            ["jobs", "ingest", id] if version >= 41 => match method {
                "GET" => self.job_info(id),
                "PATCH" => self.change_job_state(req, id),
                "DELETE" => self.delete_job(id),
                _ => Reply::method_not_allowed(method, "GET,PATCH,DELETE"),
            },
            ["jobs", "ingest", id, "batches"] if version >= 41 => match method {
                "PUT" => self.upload_job_data(req, id),
                _ => Reply::method_not_allowed(method, "PUT"),
            },
            ["jobs", "ingest", id, which @ ("successfulResults" | "failedResults" | "unprocessedrecords")]
                if version >= 41 =>
            {
                match method {
                    "GET" => self.job_results(id, which),
                    _ => Reply::method_not_allowed(method, "GET"),
                }
            }
            _ => Reply::not_found(),
        }
    }

    fn describe(&self, name: &str) -> Reply {
        let Some(object) = self.object(name) else {
            return Reply::not_found();
        };
        let fields: Vec<Value> = object
            .fields
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "label": f.label(),
                    "type": f.kind,
                    "soapType": soap_type(&f.kind),
                    "length": f.length(),
                    "createable": f.createable,
                    "updateable": f.updateable,
                    "nillable": f.nillable,
                    "externalId": f.external_id,
                    "idLookup": f.external_id || f.kind == "id",
                    "unique": f.external_id,
                    "caseSensitive": false,
                    "defaultedOnCreate": f.defaulted_on_create,
                    "custom": f.name.ends_with("__c"),
                    "calculated": false,
                    "precision": if kind_class(&f.kind) == Kind::Number { 18 } else { 0 },
                    "scale": if kind_class(&f.kind) == Kind::Number { 2 } else { 0 },
                    "referenceTo": [],
                })
            })
            .collect();
        Reply::json(
            200,
            json!({
                "name": object.name,
                "label": object.label(),
                "labelPlural": format!("{}s", object.label()),
                "keyPrefix": object.key_prefix,
                "custom": object.name.ends_with("__c"),
                "createable": true,
                "updateable": true,
                "deletable": true,
                "queryable": true,
                "fields": fields,
            }),
        )
    }
}

// ---------------------------------------------------------------------------------------
// sObject Rows by External ID

impl State {
    /// `GET` or `DELETE /sobjects/{object}/{field}/{value}`: `field` must be an external-id
    /// field of `object` (any case) and `value` is percent-decoded from the path, then
    /// compared as upserts compare keys (case-insensitively; numerically for number fields)
    /// with the live records only. One match: GET answers the record, DELETE tombstones it
    /// (204, empty body). None: 404 NOT_FOUND. Several (possible only when duplicate values
    /// predate the field becoming an external id via `add_object`): 300 with the matches'
    /// record URLs, and nothing is deleted.
    fn row_by_external_id(
        &mut self,
        method: &str,
        version: u32,
        object: &str,
        field: &str,
        value: &str,
    ) -> Reply {
        let Some(object) = self.object(object) else {
            return Reply::not_found();
        };
        let Some(spec) = object.field(field).filter(|f| f.external_id).cloned() else {
            return Reply::error(
                404,
                "NOT_FOUND",
                format!("Provided external ID field does not exist or is not accessible: {field}"),
            );
        };
        let value = percent_decode(value, false);
        let url = |id: &str| format!("/services/data/v{version}.0/sobjects/{}/{id}", object.name);
        let matches: Vec<String> = self
            .records
            .iter()
            .filter(|(_, r)| {
                !r.deleted
                    && r.object.eq_ignore_ascii_case(&object.name)
                    && r.values
                        .get(&spec.name)
                        .is_some_and(|stored| ext_matches(&spec, stored, &value))
            })
            .map(|(id, _)| id.clone())
            .collect();
        let id = match matches.as_slice() {
            [] => return Reply::not_found(),
            [id] => id.clone(),
            _ => {
                let urls = matches.iter().map(|id| Value::String(url(id))).collect();
                return Reply::json(300, Value::Array(urls));
            }
        };
        if method == "DELETE" {
            self.records.get_mut(&id).expect("a matched record").deleted = true;
            return Reply::empty(204);
        }
        // Every field of the object: as written, null when never written; system fields the
        // fake does not materialize (not nillable, never written, e.g. CreatedDate) are left out.
        let stored = &self.records[&id].values;
        let mut body = Map::new();
        body.insert(
            "attributes".to_string(),
            json!({ "type": object.name, "url": url(&id) }),
        );
        for f in &object.fields {
            match stored.get(&f.name) {
                Some(v) => {
                    body.insert(f.name.clone(), v.clone());
                }
                None if f.nillable => {
                    body.insert(f.name.clone(), Value::Null);
                }
                None => {}
            }
        }
        Reply::json(200, Value::Object(body))
    }
}

/// Whether a stored external-id value matches `text` from a URL: numbers by value, anything
/// else case-insensitively, like upsert keys (see [`ext_key`]).
fn ext_matches(spec: &FieldSpec, stored: &Value, text: &str) -> bool {
    match (kind_class(&spec.kind), stored) {
        (Kind::Number, Value::Number(n)) => parse_number(text)
            .as_ref()
            .and_then(Value::as_f64)
            .is_some_and(|x| Some(x) == n.as_f64()),
        _ => ext_key(stored) == ext_key(&Value::String(text.to_string())),
    }
}

// ---------------------------------------------------------------------------------------
// sObject Collections

/// One record of a collection request after the whole-request checks.
struct Incoming {
    object: Object,
    /// The `id` member (update only).
    id: Option<String>,
    values: Vec<(String, Value)>,
}

impl State {
    /// The whole-request checks shared by create, update and upsert: body shape, the
    /// 200-record limit, `attributes.type`, unknown fields and JSON value types. `url_object`
    /// is the upsert URL's object, which every record must match; `take_id` lifts `id` out of
    /// the fields (update).
    fn parse_collection(
        &self,
        req: &Req,
        url_object: Option<&Object>,
        take_id: bool,
    ) -> Result<(bool, Vec<Incoming>), Reply> {
        let body = req.json()?;
        let Some(body) = body.as_object() else {
            return Err(Reply::error(
                400,
                "JSON_PARSER_ERROR",
                "Cannot deserialize the request body: expected an object",
            ));
        };
        if let Some(unknown) = body
            .keys()
            .find(|k| !matches!(k.as_str(), "allOrNone" | "records"))
        {
            return Err(Reply::error(
                400,
                "JSON_PARSER_ERROR",
                format!("Unrecognized field \"{unknown}\""),
            ));
        }
        let all_or_none = match body.get("allOrNone") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Reply::error(
                    400,
                    "JSON_PARSER_ERROR",
                    format!("Cannot deserialize value of type boolean from {other}"),
                ))
            }
        };
        let records = match body.get("records") {
            Some(Value::Array(records)) if !records.is_empty() => records,
            Some(Value::Array(_)) | None | Some(Value::Null) => {
                return Err(Reply::error(
                    400,
                    "MISSING_ARGUMENT",
                    "records: the request must contain at least one record",
                ))
            }
            Some(_) => {
                return Err(Reply::error(
                    400,
                    "JSON_PARSER_ERROR",
                    "records must be an array of sObjects",
                ))
            }
        };
        if records.len() > MAX_COLLECTION {
            return Err(Reply::error(
                400,
                "EXCEEDED_ID_LIMIT",
                format!("Record limit reached. Cannot submit more than {MAX_COLLECTION} records into this call"),
            ));
        }
        let mut incoming = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let Some(record) = record.as_object() else {
                return Err(Reply::error(
                    400,
                    "JSON_PARSER_ERROR",
                    format!("records[{i}] is not an sObject"),
                ));
            };
            let Some(type_name) = record
                .get("attributes")
                .and_then(|a| a.get("type"))
                .and_then(Value::as_str)
            else {
                return Err(Reply::error(
                    400,
                    "INVALID_TYPE",
                    format!("records[{i}]: each record needs attributes with a type"),
                ));
            };
            let Some(object) = self.object(type_name) else {
                return Err(Reply::error(
                    400,
                    "INVALID_TYPE",
                    format!("sObject type '{type_name}' is not supported. If you are attempting to use a custom object, be sure to append the '__c' after the entity name. Please reference your WSDL or the describe call for the appropriate names."),
                ));
            };
            if let Some(url_object) = url_object {
                if url_object.name != object.name {
                    return Err(Reply::error(
                        400,
                        "INVALID_TYPE",
                        format!(
                            "records[{i}] is of type {} but this request is for {}",
                            object.name, url_object.name
                        ),
                    ));
                }
            }
            let mut item = Incoming {
                object: object.clone(),
                id: None,
                values: Vec::new(),
            };
            for (key, value) in record {
                if key == "attributes" {
                    continue;
                }
                if take_id && key.eq_ignore_ascii_case("id") {
                    item.id = match value {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        other => Some(other.to_string()),
                    };
                    continue;
                }
                let Some(spec) = object.field(key) else {
                    return Err(Reply::error(
                        400,
                        "INVALID_FIELD",
                        format!("No such column '{key}' on sobject of type {}", object.name),
                    ));
                };
                let typed = json_value(spec, value)
                    .map_err(|m| Reply::error(400, "JSON_PARSER_ERROR", m))?;
                item.values.push((spec.name.clone(), typed));
            }
            incoming.push(item);
        }
        Ok((all_or_none, incoming))
    }

    fn upsert_collection(&mut self, req: &Req, object: &str, field: &str) -> Reply {
        let Some(object) = self.object(object) else {
            return Reply::not_found();
        };
        let external = match object.field(field) {
            Some(spec) if spec.external_id => spec.name.clone(),
            Some(spec) => {
                return Reply::error(
                    400,
                    "INVALID_FIELD",
                    format!("Field {} is not an external id field", spec.name),
                )
            }
            None => {
                return Reply::error(
                    400,
                    "INVALID_FIELD",
                    format!(
                        "Provided external ID field does not exist or is not accessible: {field}"
                    ),
                )
            }
        };
        let (all_or_none, incoming) = match self.parse_collection(req, Some(&object), false) {
            Ok(parsed) => parsed,
            Err(reply) => return reply,
        };
        let keys: Vec<Option<String>> = incoming
            .iter()
            .map(|r| {
                r.values
                    .iter()
                    .find(|(f, v)| *f == external && !v.is_null())
                    .map(|(_, v)| ext_key(v))
            })
            .collect();
        let duplicated = duplicated_keys(&keys);
        let results = self.all_or_none(all_or_none, incoming.len(), |st, i| {
            if let Some(key) = keys[i].as_ref().filter(|k| duplicated.contains(*k)) {
                return Err(RecErr::new(
                    "DUPLICATE_EXTERNAL_ID",
                    format!("Duplicate external id specified: {key}"),
                    &[external.as_str()],
                ));
            }
            st.write(&object, Target::Upsert(&external), &incoming[i].values)
        });
        let answer: Vec<Value> = results
            .iter()
            .map(|r| match r {
                Ok((id, created)) => {
                    json!({ "id": id, "success": true, "errors": [], "created": created })
                }
                Err(e) => json!({ "success": false, "errors": [e.json()] }),
            })
            .collect();
        Reply::json(200, Value::Array(answer))
    }

    fn update_collection(&mut self, req: &Req) -> Reply {
        let (all_or_none, incoming) = match self.parse_collection(req, None, true) {
            Ok(parsed) => parsed,
            Err(reply) => return reply,
        };
        let results = self.all_or_none(all_or_none, incoming.len(), |st, i| {
            let r = &incoming[i];
            st.write(&r.object, Target::Update(r.id.as_deref()), &r.values)
        });
        Reply::json(200, Value::Array(results.iter().map(save_result).collect()))
    }

    fn create_collection(&mut self, req: &Req) -> Reply {
        let (all_or_none, incoming) = match self.parse_collection(req, None, false) {
            Ok(parsed) => parsed,
            Err(reply) => return reply,
        };
        let results = self.all_or_none(all_or_none, incoming.len(), |st, i| {
            let r = &incoming[i];
            st.write(&r.object, Target::Create, &r.values)
        });
        Reply::json(200, Value::Array(results.iter().map(save_result).collect()))
    }

    fn delete_collection(&mut self, req: &Req) -> Reply {
        let param = |name: &str| {
            req.query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let ids: Vec<&str> = match param("ids") {
            Some(list) if !list.trim().is_empty() => list.split(',').map(str::trim).collect(),
            _ => return Reply::error(400, "MISSING_ARGUMENT", "The ids parameter is required"),
        };
        if ids.len() > MAX_COLLECTION {
            return Reply::error(
                400,
                "EXCEEDED_ID_LIMIT",
                format!("Record limit reached. Cannot submit more than {MAX_COLLECTION} records into this call"),
            );
        }
        let all_or_none = match param("allOrNone") {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Reply::error(
                    400,
                    "INVALID_QUERY_FILTER_OPERATOR",
                    format!("allOrNone must be true or false, not {other}"),
                )
            }
        };
        let results = self.all_or_none(all_or_none, ids.len(), |st, i| {
            st.delete(ids[i], None, false)
        });
        let answer: Vec<Value> = results
            .iter()
            .zip(&ids)
            .map(|(r, raw)| match r {
                Ok(id) => json!({ "id": id, "success": true, "errors": [] }),
                Err(e) => json!({ "id": canonical_id(raw).unwrap_or_else(|| raw.to_string()), "success": false, "errors": [e.json()] }),
            })
            .collect();
        Reply::json(200, Value::Array(answer))
    }
}

/// The SaveResult of create and update: failures carry no id.
fn save_result(r: &Result<(String, bool), RecErr>) -> Value {
    match r {
        Ok((id, _)) => json!({ "id": id, "success": true, "errors": [] }),
        Err(e) => json!({ "success": false, "errors": [e.json()] }),
    }
}

/// The keys present more than once (an upsert may not name one record twice).
fn duplicated_keys(keys: &[Option<String>]) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    keys.iter()
        .flatten()
        .filter(|k| !seen.insert(k.as_str()))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------
// Bulk API 2.0 ingest

const OPERATIONS: [&str; 5] = ["insert", "update", "upsert", "delete", "hardDelete"];

fn delimiter_char(name: &str) -> Option<char> {
    Some(match name {
        "COMMA" => ',',
        "TAB" => '\t',
        "PIPE" => '|',
        "SEMICOLON" => ';',
        "CARET" => '^',
        "BACKQUOTE" => '`',
        _ => return None,
    })
}

impl State {
    fn create_job(&mut self, req: &Req, version: u32) -> Reply {
        let body = match req.json() {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let invalid = |message: String| Reply::error(400, "INVALIDJOB", message);
        let Some(body) = body.as_object() else {
            return invalid("The job definition must be a JSON object".into());
        };
        let known = [
            "object",
            "operation",
            "externalIdFieldName",
            "contentType",
            "lineEnding",
            "columnDelimiter",
            "assignmentRuleId",
        ];
        if let Some(unknown) = body.keys().find(|k| !known.contains(&k.as_str())) {
            return Reply::error(
                400,
                "JSON_PARSER_ERROR",
                format!("Unrecognized field \"{unknown}\""),
            );
        }
        let text = |name: &str| body.get(name).and_then(Value::as_str);
        let Some(object_name) = text("object") else {
            return invalid("InvalidJob : object is required".into());
        };
        let Some(object) = self.object(object_name) else {
            return Reply::error(
                400,
                "INVALIDENTITY",
                format!("sObject type '{object_name}' is not supported by the Bulk API"),
            );
        };
        let operation = match text("operation") {
            Some(op) if OPERATIONS.contains(&op) => op.to_string(),
            Some(op) => return invalid(format!("InvalidJob : Invalid operation: {op}")),
            None => return invalid("InvalidJob : operation is required".into()),
        };
        let external_id = match (operation.as_str(), text("externalIdFieldName")) {
            ("upsert", None) => {
                return invalid(format!(
                    "External ID was blank for {}. An External ID must be specified for upsert.",
                    object.name
                ))
            }
            ("upsert", Some(field)) => match object.field(field) {
                Some(spec) if spec.external_id => Some(spec.name.clone()),
                Some(spec) => {
                    return invalid(format!(
                        "The field {} is not an external id field",
                        spec.name
                    ))
                }
                None => return invalid(format!("InvalidJob : Field name not found : {field}")),
            },
            _ => None,
        };
        if text("contentType").is_some_and(|c| c != "CSV") {
            return invalid(
                "InvalidJob : Only contentType CSV is supported for ingest jobs".into(),
            );
        }
        let line_ending = text("lineEnding").unwrap_or("LF").to_string();
        if line_ending != "LF" && line_ending != "CRLF" {
            return invalid(format!("InvalidJob : Invalid lineEnding: {line_ending}"));
        }
        let delimiter = text("columnDelimiter").unwrap_or("COMMA").to_string();
        if delimiter_char(&delimiter).is_none() {
            return invalid(format!("InvalidJob : Invalid columnDelimiter: {delimiter}"));
        }
        let id = self.new_id("750");
        let job = Job {
            id: id.clone(),
            object: object.name.clone(),
            operation,
            external_id,
            line_ending,
            delimiter,
            api_version: version,
            created: iso_now(),
            state: "Open".into(),
            data: None,
            polls_left: 0,
            outcome: None,
        };
        let info = job_json(&job, false);
        self.jobs.insert(id, job);
        Reply::json(200, info)
    }

    fn list_jobs(&self) -> Reply {
        let records: Vec<Value> = self.jobs.values().map(|j| job_json(j, false)).collect();
        Reply::json(
            200,
            json!({ "done": true, "records": records, "nextRecordsUrl": null }),
        )
    }

    fn upload_job_data(&mut self, req: &Req, id: &str) -> Reply {
        let Some(job) = self.jobs.get_mut(id) else {
            return Reply::not_found();
        };
        if req.media_type() != "text/csv" {
            let message = format!(
                "Content-Type header specified in HTTP request is not supported: {}",
                req.content_type.as_deref().unwrap_or("(none)")
            );
            return Reply::error(415, "UNSUPPORTED_MEDIA_TYPE", message);
        }
        if job.state != "Open" {
            return Reply::error(
                400,
                "INVALIDJOBSTATE",
                format!("Job {id} is not Open (state: {})", job.state),
            );
        }
        if job.data.is_some() {
            return Reply::error(
                400,
                "BULK_API_ERROR",
                format!("Found multiple contents for job: <{id}>, please 'Close' / 'Abort' / 'Delete' the current Job then create a new Job and make sure you only do 'PUT' once on a given Job."),
            );
        }
        job.data = Some(req.body.clone());
        Reply::empty(201)
    }

    fn change_job_state(&mut self, req: &Req, id: &str) -> Reply {
        if !self.jobs.contains_key(id) {
            return Reply::not_found();
        }
        let body = match req.json() {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let requested = body.get("state").and_then(Value::as_str).unwrap_or("");
        if let Some(unknown) = body
            .as_object()
            .and_then(|o| o.keys().find(|k| *k != "state"))
        {
            return Reply::error(
                400,
                "JSON_PARSER_ERROR",
                format!("Unrecognized field \"{unknown}\""),
            );
        }
        let current = self.jobs[id].state.clone();
        match (requested, current.as_str()) {
            ("UploadComplete", "Open") => {
                let mut job = self.jobs.remove(id).unwrap();
                let outcome = self.run_job(&job);
                job.outcome = Some(outcome);
                job.state = "UploadComplete".into();
                job.polls_left = self.bulk_polls;
                self.jobs.insert(id.to_string(), job);
            }
            ("Aborted", "Open" | "UploadComplete" | "InProgress") => {
                self.jobs.get_mut(id).unwrap().state = "Aborted".into();
            }
            _ => {
                return Reply::error(
                    400,
                    "INVALIDJOBSTATE",
                    format!("Invalid job state transition from {current} to {requested:?}"),
                )
            }
        }
        Reply::json(200, job_json(&self.jobs[id], false))
    }

    fn job_info(&mut self, id: &str) -> Reply {
        let Some(job) = self.jobs.get_mut(id) else {
            return Reply::not_found();
        };
        // A closed job is "processing" for the configured number of polls, then final.
        if job.state == "UploadComplete" || job.state == "InProgress" {
            if job.polls_left > 0 {
                job.polls_left -= 1;
                job.state = "InProgress".into();
            } else {
                let failed = job.outcome.as_ref().is_some_and(|o| o.failed.is_some());
                job.state = if failed { "Failed" } else { "JobComplete" }.into();
            }
        }
        Reply::json(200, job_json(job, true))
    }

    fn delete_job(&mut self, id: &str) -> Reply {
        let Some(job) = self.jobs.get(id) else {
            return Reply::not_found();
        };
        if !matches!(
            job.state.as_str(),
            "UploadComplete" | "JobComplete" | "Aborted" | "Failed"
        ) {
            return Reply::error(
                400,
                "INVALIDJOBSTATE",
                format!("Job {id} cannot be deleted in state {}", job.state),
            );
        }
        self.jobs.remove(id);
        Reply::empty(204)
    }

    fn job_results(&self, id: &str, which: &str) -> Reply {
        let Some(job) = self.jobs.get(id) else {
            return Reply::not_found();
        };
        let delimiter = delimiter_char(&job.delimiter).unwrap();
        let eol = if job.line_ending == "CRLF" {
            "\r\n"
        } else {
            "\n"
        };
        if which == "unprocessedrecords" {
            return match job.state.as_str() {
                "JobComplete" => Reply::csv(String::new()),
                "Failed" | "Aborted" => Reply::csv(job.data.clone().unwrap_or_default()),
                _ => Reply::error(
                    400,
                    "INVALIDJOBSTATE",
                    format!("Job {id} is not finished (state: {})", job.state),
                ),
            };
        }
        let (Some(outcome), "JobComplete") = (&job.outcome, job.state.as_str()) else {
            return Reply::error(
                400,
                "INVALIDJOBSTATE",
                format!(
                    "Results are only available once job {id} is JobComplete (state: {})",
                    job.state
                ),
            );
        };
        let second = if which == "successfulResults" {
            "sf__Created"
        } else {
            "sf__Error"
        };
        // Salesforce quotes its own columns and every value; the original header is echoed.
        let mut head = vec![
            csv_cell("sf__Id", delimiter, true),
            csv_cell(second, delimiter, true),
        ];
        head.extend(outcome.header.iter().map(|h| csv_cell(h, delimiter, false)));
        let mut out = head.join(&delimiter.to_string()) + eol;
        let rows: Vec<(&str, String, &Vec<String>)> = if which == "successfulResults" {
            outcome
                .successes
                .iter()
                .map(|(id, created, row)| (id.as_str(), created.to_string(), row))
                .collect()
        } else {
            outcome
                .failures
                .iter()
                .map(|(id, error, row)| (id.as_str(), error.clone(), row))
                .collect()
        };
        for (id, second, row) in rows {
            let mut cells = vec![
                csv_cell(id, delimiter, true),
                csv_cell(&second, delimiter, true),
            ];
            cells.extend(row.iter().map(|c| csv_cell(c, delimiter, true)));
            out.push_str(&cells.join(&delimiter.to_string()));
            out.push_str(eol);
        }
        Reply::csv(out)
    }

    /// Processes an uploaded job: the same per-record rules as collections, with Bulk's CSV
    /// conventions (empty cell = leave unchanged, `#N/A` = null). A malformed file or an
    /// unknown column fails the whole job and applies nothing.
    fn run_job(&mut self, job: &Job) -> Outcome {
        let fail = |message: String| Outcome {
            failed: Some(message),
            ..Outcome::default()
        };
        let Some(data) = &job.data else {
            return fail("InvalidBatch : No data was uploaded for this job".into());
        };
        let Some(object) = self.object(&job.object) else {
            return fail("InvalidJob : object no longer exists".into());
        };
        let crlf = job.line_ending == "CRLF";
        let rows = match parse_csv(data, delimiter_char(&job.delimiter).unwrap(), crlf) {
            Ok(rows) => rows,
            Err(message) => return fail(format!("ClientInputError : {message}")),
        };
        let Some((header, rows)) = rows.split_first() else {
            return fail("InvalidBatch : Empty CSV file".into());
        };
        let mut columns: Vec<FieldSpec> = Vec::new();
        for name in header {
            let Some(spec) = object.field(name) else {
                return fail(format!("InvalidBatch : Field name not found : {name}"));
            };
            if columns.iter().any(|c| c.name == spec.name) {
                return fail(format!("InvalidBatch : Duplicate field name: {name}"));
            }
            columns.push(spec.clone());
        }
        let deleting = job.operation == "delete" || job.operation == "hardDelete";
        if deleting && (columns.len() != 1 || columns[0].name != "Id") {
            return fail(
                "InvalidBatch : A delete or hardDelete job takes only an Id column".into(),
            );
        }
        if let Some(n) = rows.iter().position(|r| r.len() != header.len()) {
            return fail(format!(
                "InvalidBatch : row {} has {} columns, the header has {}",
                n + 2,
                rows[n].len(),
                header.len()
            ));
        }
        let id_column = columns.iter().position(|c| c.name == "Id");
        let keys: Vec<Option<String>> = rows
            .iter()
            .map(|row| {
                let ext = job.external_id.as_ref()?;
                let col = columns.iter().position(|c| &c.name == ext)?;
                Some(row[col].to_lowercase()).filter(|k| !k.is_empty() && k != "#n/a")
            })
            .collect();
        let duplicated = duplicated_keys(&keys);

        let mut outcome = Outcome {
            header: header.clone(),
            ..Outcome::default()
        };
        for (n, row) in rows.iter().enumerate() {
            let given_id = id_column.map(|c| row[c].as_str()).filter(|s| !s.is_empty());
            let result = if deleting {
                self.delete(
                    given_id.unwrap_or(""),
                    Some(&object),
                    job.operation == "hardDelete",
                )
                .map(|id| (id, false))
            } else {
                self.bulk_write(
                    job,
                    &object,
                    &columns,
                    row,
                    keys[n].as_ref().filter(|k| duplicated.contains(*k)),
                )
            };
            match result {
                Ok((id, created)) => outcome.successes.push((id, created, row.clone())),
                Err(e) => {
                    let id = if job.operation == "insert" || job.operation == "upsert" {
                        ""
                    } else {
                        given_id.unwrap_or("")
                    };
                    outcome
                        .failures
                        .push((id.to_string(), e.bulk(), row.clone()));
                }
            }
        }
        outcome
    }

    /// One insert/update/upsert row of a Bulk job.
    fn bulk_write(
        &mut self,
        job: &Job,
        object: &Object,
        columns: &[FieldSpec],
        row: &[String],
        duplicate_key: Option<&String>,
    ) -> Result<(String, bool), RecErr> {
        let mut values = Vec::new();
        let mut id = None;
        for (col, (spec, cell)) in columns.iter().zip(row).enumerate() {
            if job.operation == "update" && spec.name == "Id" {
                id = Some(cell.as_str()).filter(|s| !s.is_empty());
                continue;
            }
            match csv_value(spec, cell) {
                Ok(Some(value)) => values.push((spec.name.clone(), value)),
                Ok(None) => {}
                Err(soap) => {
                    let message = format!("Failed to deserialize field at col {}. Due to, '{cell}' is not a valid value for the type {soap}", col + 1);
                    return Err(RecErr::new("INVALID_FIELD", message, &[]));
                }
            }
        }
        if let (Some(key), Some(field)) = (duplicate_key, &job.external_id) {
            return Err(RecErr::new(
                "DUPLICATE_EXTERNAL_ID",
                format!("Duplicate external id specified: {key}"),
                &[field],
            ));
        }
        let target = match (job.operation.as_str(), &job.external_id) {
            ("insert", _) => Target::Create,
            ("upsert", Some(field)) => Target::Upsert(field),
            _ => Target::Update(id),
        };
        self.write(object, target, &values)
    }
}

fn job_json(job: &Job, full: bool) -> Value {
    let mut info = json!({
        "id": job.id,
        "operation": job.operation,
        "object": job.object,
        "createdById": USER_ID,
        "createdDate": job.created,
        "systemModstamp": job.created,
        "state": job.state,
        "concurrencyMode": "Parallel",
        "contentType": "CSV",
        "apiVersion": f64::from(job.api_version),
        "contentUrl": format!("services/data/v{}.0/jobs/ingest/{}/batches", job.api_version, job.id),
        "lineEnding": job.line_ending,
        "columnDelimiter": job.delimiter,
    });
    if let Some(field) = &job.external_id {
        info["externalIdFieldName"] = json!(field);
    }
    if full {
        // Counts are known once the job reached a final state (Aborted keeps what was done).
        let done = matches!(job.state.as_str(), "JobComplete" | "Failed" | "Aborted");
        let (processed, failed) = match (&job.outcome, done) {
            (Some(o), true) => (o.successes.len() + o.failures.len(), o.failures.len()),
            _ => (0, 0),
        };
        info["jobType"] = json!("V2Ingest");
        info["numberRecordsProcessed"] = json!(processed);
        info["numberRecordsFailed"] = json!(failed);
        info["retries"] = json!(0);
        info["totalProcessingTime"] = json!(0);
        info["apiActiveProcessingTime"] = json!(0);
        info["apexProcessingTime"] = json!(0);
        if let (
            Some(Outcome {
                failed: Some(message),
                ..
            }),
            "Failed",
        ) = (&job.outcome, job.state.as_str())
        {
            info["errorMessage"] = json!(message);
        }
    }
    info
}

// ---------------------------------------------------------------------------------------
// Field values

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Text,
    Number,
    Bool,
    Date,
    DateTime,
}

fn kind_class(kind: &str) -> Kind {
    match kind {
        "double" | "int" | "currency" | "percent" => Kind::Number,
        "boolean" => Kind::Bool,
        "date" => Kind::Date,
        "datetime" => Kind::DateTime,
        _ => Kind::Text,
    }
}

fn soap_type(kind: &str) -> &'static str {
    match (kind, kind_class(kind)) {
        ("id" | "reference", _) => "tns:ID",
        ("int", _) => "xsd:int",
        (_, Kind::Number) => "xsd:double",
        (_, Kind::Bool) => "xsd:boolean",
        (_, Kind::Date) => "xsd:date",
        (_, Kind::DateTime) => "xsd:dateTime",
        (_, Kind::Text) => "xsd:string",
    }
}

/// A JSON value as Salesforce's deserializer takes it for this field: numbers and booleans
/// may come as strings, scalars become text, "" is null. The error text is the parser's.
fn json_value(spec: &FieldSpec, value: &Value) -> Result<Value, String> {
    let refuse = |token: &str, shown: String| {
        let target = soap_type(&spec.kind)
            .trim_start_matches("xsd:")
            .trim_start_matches("tns:")
            .to_string();
        format!("Cannot deserialize instance of {target} from {token} value {shown} or request may be missing a required field")
    };
    let token = match value {
        Value::Null => return Ok(Value::Null),
        Value::String(_) => "VALUE_STRING",
        Value::Number(_) => "VALUE_NUMBER",
        Value::Bool(_) => "VALUE_BOOLEAN",
        Value::Array(_) => "START_ARRAY",
        Value::Object(_) => "START_OBJECT",
    };
    let fail = || Err(refuse(token, value.to_string()));
    match (kind_class(&spec.kind), value) {
        (_, Value::Array(_) | Value::Object(_)) => fail(),
        (Kind::Text, Value::String(s)) if s.is_empty() => Ok(Value::Null),
        (Kind::Text, Value::String(s)) => Ok(Value::String(s.clone())),
        (Kind::Text, other) => Ok(Value::String(other.to_string())),
        (Kind::Number, Value::Number(_)) => Ok(value.clone()),
        (Kind::Number, Value::String(s)) => parse_number(s).map_or_else(fail, Ok),
        (Kind::Bool, Value::Bool(_)) => Ok(value.clone()),
        (Kind::Bool, Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => fail(),
        },
        (Kind::Date, Value::String(s)) if valid_date(s) => Ok(value.clone()),
        (Kind::DateTime, Value::String(s)) if valid_datetime(s) => Ok(value.clone()),
        _ => fail(),
    }
}

/// A Bulk CSV cell for this field: None = leave unchanged (empty cell), Null for `#N/A`;
/// Err carries the xsd type the cell failed to parse as.
fn csv_value(spec: &FieldSpec, cell: &str) -> Result<Option<Value>, &'static str> {
    if cell.is_empty() {
        return Ok(None);
    }
    if cell == "#N/A" {
        return Ok(Some(Value::Null));
    }
    let soap = soap_type(&spec.kind);
    let value = match kind_class(&spec.kind) {
        Kind::Text => Value::String(cell.to_string()),
        Kind::Number => parse_number(cell).ok_or(soap)?,
        Kind::Bool => match cell.to_ascii_lowercase().as_str() {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(soap),
        },
        Kind::Date if valid_date(cell) => Value::String(cell.to_string()),
        Kind::DateTime if valid_datetime(cell) => Value::String(cell.to_string()),
        Kind::Date | Kind::DateTime => return Err(soap),
    };
    Ok(Some(value))
}

/// A finite JSON-grammar number ("12", "-0.5", "1e3"); kept as written (integer or float).
fn parse_number(s: &str) -> Option<Value> {
    if s.is_empty() || s.trim() != s {
        return None;
    }
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Number(_)) => Some(v),
        _ => None,
    }
}

fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.chars().any(char::is_whitespace)
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `YYYY-MM-DD`, a real calendar day.
fn valid_date(s: &str) -> bool {
    let b = s.as_bytes();
    if !s.is_ascii() || b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let (Some(y), Some(m), Some(d)) = (digits(&s[..4]), digits(&s[5..7]), digits(&s[8..])) else {
        return false;
    };
    if !(1..=12).contains(&m) {
        return false;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ][m as usize - 1];
    (1..=days).contains(&d)
}

/// `YYYY-MM-DDThh:mm:ss[.fff](Z|±hh:mm|±hhmm)`: Salesforce needs the zone.
fn valid_datetime(s: &str) -> bool {
    let Some((date, time)) = s.split_once('T') else {
        return false;
    };
    if !s.is_ascii() || !valid_date(date) || time.len() < 9 {
        return false;
    }
    let (clock, rest) = time.split_at(8);
    let hms: Vec<Option<u32>> = clock
        .split(':')
        .map(|p| digits(p).filter(|_| p.len() == 2))
        .collect();
    let [Some(h), Some(mi), Some(sec)] = hms.as_slice() else {
        return false;
    };
    if *h > 23 || *mi > 59 || *sec > 59 {
        return false;
    }
    let zone = match rest.strip_prefix('.') {
        Some(frac) => {
            let n = frac.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 {
                return false;
            }
            &frac[n..]
        }
        None => rest,
    };
    match zone.as_bytes() {
        b"Z" => true,
        [b'+' | b'-', ..] => {
            let offset = zone[1..].replace(':', "");
            offset.len() == 4 && digits(&offset).is_some_and(|o| o / 100 <= 14 && o % 100 < 60)
        }
        _ => false,
    }
}

/// Upsert keys compare case-insensitively, like a default unique external id.
fn ext_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_lowercase(),
        other => other.to_string().to_lowercase(),
    }
}

/// "LastName" → "Last Name", "Health_Score__c" → "Health Score".
fn label_of(name: &str) -> String {
    let base = name.strip_suffix("__c").unwrap_or(name).replace('_', " ");
    let mut label = String::new();
    let mut prev_lower = false;
    for c in base.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            label.push(' ');
        }
        prev_lower = c.is_ascii_lowercase();
        label.push(c);
    }
    label
}

// ---------------------------------------------------------------------------------------
// Ids

/// Salesforce's 3-character suffix of an 18-character Id: for each 5-character chunk of the
/// 15-character Id, a bit per uppercase letter, mapped into A-Z0-5.
fn id_suffix(id15: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    id15.as_bytes()
        .chunks(5)
        .map(|chunk| {
            let bits = chunk
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_ascii_uppercase())
                .fold(0, |acc, (i, _)| acc | (1 << i));
            ALPHABET[bits] as char
        })
        .collect()
}

/// The 18-character form of a 15- or 18-character Id, if it is one (right checksum).
fn canonical_id(raw: &str) -> Option<String> {
    if !raw.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    match raw.len() {
        15 => Some(format!("{raw}{}", id_suffix(raw))),
        18 if raw[15..].eq_ignore_ascii_case(&id_suffix(&raw[..15])) => {
            Some(format!("{}{}", &raw[..15], id_suffix(&raw[..15])))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Small codecs: form-urlencoded, CSV, time

/// RFC 4180 CSV with the job's delimiter. Rows end with LF, or CRLF when `crlf`; a line
/// ending of the other kind outside quotes is refused the way Bulk API 2.0 refuses it.
fn parse_csv(text: &str, delimiter: char, crlf: bool) -> Result<Vec<Vec<String>>, String> {
    let setting = if crlf { "CRLF" } else { "LF" };
    let wrong_ending =
        || format!("LineEnding is invalid on user data. Current LineEnding setting is {setting}");
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut was_quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    in_quotes = false;
                    was_quoted = true;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        let end_of_row = match c {
            '\r' if chars.peek() == Some(&'\n') => {
                if !crlf {
                    return Err(wrong_ending());
                }
                chars.next();
                true
            }
            '\n' if crlf => return Err(wrong_ending()),
            '\n' => true,
            _ => false,
        };
        if end_of_row || c == delimiter {
            row.push(std::mem::take(&mut field));
            was_quoted = false;
            if end_of_row {
                rows.push(std::mem::take(&mut row));
            }
        } else if c == '"' && field.is_empty() && !was_quoted {
            in_quotes = true;
        } else if c == '"' {
            return Err(format!(
                "Unescaped quote in an unquoted field on row {}",
                rows.len() + 1
            ));
        } else if was_quoted {
            return Err(format!(
                "Characters after a closing quote on row {}",
                rows.len() + 1
            ));
        } else {
            field.push(c);
        }
    }
    if in_quotes {
        return Err("Unterminated quoted field at end of data".into());
    }
    if !field.is_empty() || was_quoted || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

/// One CSV cell: quoted when `always` or when the text needs it.
fn csv_cell(text: &str, delimiter: char, always: bool) -> String {
    if always || text.contains(delimiter) || text.contains(['"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Now as Salesforce writes timestamps: `2026-01-31T12:34:56.000+0000`.
fn iso_now() -> String {
    let secs = (now_ms() / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000+0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::{send, Reply};

    const TOKEN: &str = "00Dtest!token";
    const V: &str = "/services/data/v62.0";

    /// `127.0.0.1:PORT`, where [`send`] reaches the fake.
    fn addr(fake: &FakeSalesforce) -> String {
        fake.base_url().trim_start_matches("http://").to_string()
    }

    /// An authenticated API request, with a JSON body when given.
    fn api(fake: &FakeSalesforce, method: &str, path: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {TOKEN}");
        match body {
            Some(body) => send(
                &addr(fake),
                method,
                path,
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                &body.to_string(),
            ),
            None => send(&addr(fake), method, path, &[("Authorization", &auth)], ""),
        }
    }

    fn contact(ext: &str, fields: Value) -> Value {
        let mut record = json!({ "attributes": { "type": "Contact" }, "External_Id__c": ext });
        record
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        record
    }

    fn upsert(fake: &FakeSalesforce, records: Vec<Value>, all_or_none: bool) -> Reply {
        let path = format!("{V}/composite/sobjects/Contact/External_Id__c");
        api(
            fake,
            "PATCH",
            &path,
            Some(json!({ "allOrNone": all_or_none, "records": records })),
        )
    }

    fn error(status: &str, message: &str, fields: &[&str]) -> Value {
        json!({ "success": false, "errors": [{ "statusCode": status, "message": message, "fields": fields }] })
    }

    #[test]
    fn upsert_creates_then_updates_the_same_record() {
        let fake = FakeSalesforce::start(TOKEN);
        let r = upsert(
            &fake,
            vec![contact(
                "k1",
                json!({ "LastName": "Ada", "Email": "ada@example.com" }),
            )],
            false,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json(),
            json!([{ "id": "003000000000001AAA", "success": true, "errors": [], "created": true }])
        );

        // Matching is by external id, case-insensitively; absent fields stay as they were.
        let r = upsert(
            &fake,
            vec![contact(
                "K1",
                json!({ "LastName": "Lovelace", "Health_Score__c": 0.5 }),
            )],
            false,
        );
        assert_eq!(
            r.json(),
            json!([{ "id": "003000000000001AAA", "success": true, "errors": [], "created": false }])
        );
        let records = fake.records("Contact");
        assert_eq!(records.len(), 1);
        assert_eq!(
            records["003000000000001AAA"],
            json!({ "Id": "003000000000001AAA", "External_Id__c": "K1", "LastName": "Lovelace",
                    "Email": "ada@example.com", "Health_Score__c": 0.5 })
        );
        let calls = fake.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].method.as_str(), calls[0].status), ("PATCH", 200));
        assert_eq!(
            calls[0].path,
            format!("{V}/composite/sobjects/Contact/External_Id__c")
        );
        assert_eq!(
            calls[0].body.as_ref().unwrap()["records"][0]["LastName"],
            "Ada"
        );
    }

    #[test]
    fn per_record_failures_leave_the_other_records_applied() {
        let fake = FakeSalesforce::start(TOKEN);
        let r = upsert(
            &fake,
            vec![
                contact("ok", json!({ "LastName": "Fine" })),
                contact("k2", json!({ "FirstName": "No last name" })),
                contact("k3", json!({ "LastName": "X", "Email": "foo" })),
                contact(
                    "k4",
                    json!({ "LastName": "X", "CreatedDate": "2024-01-01T00:00:00Z" }),
                ),
                json!({ "attributes": { "type": "Contact" }, "LastName": "No key" }),
                contact("twice", json!({ "LastName": "A" })),
                contact("TWICE", json!({ "LastName": "B" })),
                contact("k5", json!({ "LastName": "" })),
                contact("k6", json!({ "LastName": "x".repeat(256) })),
            ],
            false,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let read_only = "Unable to create/update fields: CreatedDate. Please check the security settings of this field and verify that it is read/write for your profile or permission set.";
        assert_eq!(
            r.json(),
            json!([
                { "id": "003000000000001AAA", "success": true, "errors": [], "created": true },
                error("REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]", &["LastName"]),
                error("INVALID_EMAIL_ADDRESS", "Email: invalid email address: foo", &["Email"]),
                error("INVALID_FIELD_FOR_INSERT_UPDATE", read_only, &["CreatedDate"]),
                error("MISSING_ARGUMENT", "External_Id__c not specified", &[]),
                error("DUPLICATE_EXTERNAL_ID", "Duplicate external id specified: twice", &["External_Id__c"]),
                error("DUPLICATE_EXTERNAL_ID", "Duplicate external id specified: twice", &["External_Id__c"]),
                error("REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]", &["LastName"]),
                error(
                    "STRING_TOO_LONG",
                    &format!("Last Name: data value too large: {} (max length=255)", "x".repeat(256)),
                    &["LastName"]
                ),
            ])
        );
        let records = fake.records("Contact");
        assert_eq!(records.keys().collect::<Vec<_>>(), ["003000000000001AAA"]);
    }

    #[test]
    fn malformed_requests_are_refused_whole_and_change_nothing() {
        let fake = FakeSalesforce::start(TOKEN);
        let up = format!("{V}/composite/sobjects/Contact/External_Id__c");
        let r = upsert(
            &fake,
            vec![contact("k1", json!({ "LastName": "A", "Foo__c": 1 }))],
            false,
        );
        assert_eq!(r.status, 400);
        assert_eq!(
            r.json(),
            json!([{ "message": "No such column 'Foo__c' on sobject of type Contact", "errorCode": "INVALID_FIELD" }])
        );

        let many: Vec<Value> = (0..201)
            .map(|i| contact(&format!("k{i}"), json!({ "LastName": "A" })))
            .collect();
        let r = upsert(&fake, many, false);
        assert_eq!(r.status, 400);
        assert_eq!(r.json()[0]["errorCode"], "EXCEEDED_ID_LIMIT");

        let body = json!({ "records": [contact("k1", json!({ "LastName": "A" }))] });
        let r = api(
            &fake,
            "PATCH",
            &format!("{V}/composite/sobjects/Contact/LastName"),
            Some(body.clone()),
        );
        assert_eq!(
            (r.status, r.json()[0]["errorCode"].as_str()),
            (400, Some("INVALID_FIELD"))
        );
        assert_eq!(
            r.json()[0]["message"],
            "Field LastName is not an external id field"
        );

        let account =
            json!({ "records": [{ "attributes": { "type": "Account" }, "External_Id__c": "k1" }] });
        assert_eq!(api(&fake, "PATCH", &up, Some(account)).status, 400);
        let untyped = json!({ "records": [{ "External_Id__c": "k1", "LastName": "A" }] });
        assert_eq!(api(&fake, "PATCH", &up, Some(untyped)).status, 400);
        assert_eq!(
            api(&fake, "PATCH", &up, Some(json!({ "allOrNone": false }))).status,
            400
        );
        assert_eq!(
            api(
                &fake,
                "PATCH",
                &up,
                Some(json!({ "records": [], "allOrNone": "yes" }))
            )
            .status,
            400
        );

        let r = upsert(
            &fake,
            vec![contact(
                "k1",
                json!({ "LastName": "A", "Health_Score__c": "high" }),
            )],
            false,
        );
        assert_eq!(
            (r.status, r.json()[0]["errorCode"].as_str()),
            (400, Some("JSON_PARSER_ERROR"))
        );

        let auth = format!("Bearer {TOKEN}");
        let r = send(
            &addr(&fake),
            "PATCH",
            &up,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            "{\"records\":",
        );
        assert_eq!(
            (r.status, r.json()[0]["errorCode"].as_str()),
            (400, Some("JSON_PARSER_ERROR"))
        );
        let r = send(
            &addr(&fake),
            "PATCH",
            &up,
            &[("Authorization", &auth), ("Content-Type", "text/plain")],
            &body.to_string(),
        );
        assert_eq!(
            (r.status, r.json()[0]["errorCode"].as_str()),
            (415, Some("UNSUPPORTED_MEDIA_TYPE"))
        );

        // The version segment is vNN.0, and collection upsert exists from v46.0.
        let not_found = json!([{ "errorCode": "NOT_FOUND", "message": "The requested resource does not exist" }]);
        for path in [
            "/services/data/62.0/composite/sobjects/Contact/External_Id__c",
            "/services/data/v62/composite/sobjects/Contact/External_Id__c",
            "/services/data/v45.0/composite/sobjects/Contact/External_Id__c",
            "/services/data/v62.0/composite/sobjects/Nope__c/External_Id__c",
        ] {
            let r = api(&fake, "PATCH", path, Some(body.clone()));
            assert_eq!((r.status, r.json()), (404, not_found.clone()), "{path}");
        }
        assert!(fake.records("Contact").is_empty());
        assert!(fake.calls().iter().all(|c| c.status >= 400));
    }

    #[test]
    fn all_or_none_rolls_everything_back() {
        let fake = FakeSalesforce::start(TOKEN);
        let r = upsert(
            &fake,
            vec![
                contact("k1", json!({ "LastName": "A" })),
                contact("k2", json!({ "Email": "b@example.com" })),
            ],
            true,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json(),
            json!([
                error("ALL_OR_NONE_OPERATION_ROLLED_BACK", ROLLED_BACK, &[]),
                error(
                    "REQUIRED_FIELD_MISSING",
                    "Required fields are missing: [LastName]",
                    &["LastName"]
                ),
            ])
        );
        assert!(fake.records("Contact").is_empty());
    }

    #[test]
    fn update_by_id_checks_ids_and_required_fields() {
        let fake = FakeSalesforce::start(TOKEN);
        upsert(
            &fake,
            vec![contact("k1", json!({ "LastName": "A" }))],
            false,
        );
        let record = |id: &str, fields: Value| {
            let mut r = json!({ "attributes": { "type": "Contact" }, "id": id });
            r.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            r
        };
        let body = json!({ "allOrNone": false, "records": [
            record("003000000000001AAA", json!({ "Phone": "555" })),
            record("003000000000001", json!({ "FirstName": "Ada" })),
            record("003000000000099AAA", json!({ "Phone": "1" })),
            record("001000000000001AAA", json!({ "Phone": "1" })),
            record("003000000000001AAA", json!({ "LastName": null })),
            json!({ "attributes": { "type": "Contact" }, "Phone": "1" }),
        ]});
        let r = api(
            &fake,
            "PATCH",
            &format!("{V}/composite/sobjects"),
            Some(body),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json(),
            json!([
                { "id": "003000000000001AAA", "success": true, "errors": [] },
                { "id": "003000000000001AAA", "success": true, "errors": [] },
                error("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", &[]),
                error("MALFORMED_ID", "Contact ID: id value of incorrect type: 001000000000001AAA", &["Id"]),
                error("REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]", &["LastName"]),
                error("MISSING_ARGUMENT", "Id not specified in an update call", &[]),
            ])
        );
        assert_eq!(
            fake.records("Contact")["003000000000001AAA"],
            json!({ "Id": "003000000000001AAA", "External_Id__c": "k1", "LastName": "A", "Phone": "555", "FirstName": "Ada" })
        );
    }

    #[test]
    fn delete_then_delete_again_reports_entity_is_deleted() {
        let fake = FakeSalesforce::start(TOKEN);
        upsert(
            &fake,
            vec![
                contact("k1", json!({ "LastName": "A" })),
                contact("k2", json!({ "LastName": "B" })),
            ],
            false,
        );
        let path = format!(
            "{V}/composite/sobjects?ids=003000000000001AAA,003000000000002AAA&allOrNone=false"
        );
        let r = api(&fake, "DELETE", &path, None);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json(),
            json!([
                { "id": "003000000000001AAA", "success": true, "errors": [] },
                { "id": "003000000000002AAA", "success": true, "errors": [] },
            ])
        );
        assert!(fake.records("Contact").is_empty());

        let path = format!("{V}/composite/sobjects?ids=003000000000001AAA%2C003000000000077AAA");
        let r = api(&fake, "DELETE", &path, None);
        assert_eq!(
            r.json(),
            json!([
                { "id": "003000000000001AAA", "success": false,
                  "errors": [{ "statusCode": "ENTITY_IS_DELETED", "message": "entity is deleted", "fields": [] }] },
                { "id": "003000000000077AAA", "success": false,
                  "errors": [{ "statusCode": "INVALID_CROSS_REFERENCE_KEY", "message": "invalid cross reference id", "fields": [] }] },
            ])
        );
        let many = vec!["003000000000001AAA"; 201].join(",");
        assert_eq!(
            api(
                &fake,
                "DELETE",
                &format!("{V}/composite/sobjects?ids={many}"),
                None
            )
            .status,
            400
        );
        assert_eq!(
            api(&fake, "DELETE", &format!("{V}/composite/sobjects"), None).status,
            400
        );

        // A deleted record no longer matches its external id: upserting it creates anew.
        let r = upsert(
            &fake,
            vec![contact("k1", json!({ "LastName": "A" }))],
            false,
        );
        assert_eq!(r.json()[0]["created"], true);
        assert_eq!(r.json()[0]["id"], "003000000000003AAA");
    }

    #[test]
    fn rows_by_external_id_get_and_delete() {
        let fake = FakeSalesforce::start(TOKEN);
        upsert(
            &fake,
            vec![
                contact("k1", json!({ "LastName": "A", "Email": "a@example.com" })),
                contact("a b", json!({ "LastName": "B" })),
            ],
            false,
        );
        let row = |field: &str, value: &str| format!("{V}/sobjects/Contact/{field}/{value}");
        let not_found = json!([{ "errorCode": "NOT_FOUND", "message": "The requested resource does not exist" }]);

        // GET: every field of the object, nulls for unwritten ones, no unmaterialized system
        // fields; field name and value both case-insensitive.
        let r = api(&fake, "GET", &row("external_id__c", "K1"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json(),
            json!({
                "attributes": { "type": "Contact", "url": "/services/data/v62.0/sobjects/Contact/003000000000001AAA" },
                "Id": "003000000000001AAA", "LastName": "A", "FirstName": null, "Email": "a@example.com",
                "Phone": null, "External_Id__c": "k1", "Health_Score__c": null, "Name": null,
            })
        );

        // DELETE: 204 with an empty body, the record is gone; a second delete is a 404.
        let r = api(&fake, "DELETE", &row("External_Id__c", "k1"), None);
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        assert!(r.header("Sforce-Limit-Info").is_some());
        assert!(!fake.records("Contact").contains_key("003000000000001AAA"));
        assert_eq!(fake.records("Contact").len(), 1);
        for method in ["DELETE", "GET"] {
            let r = api(&fake, method, &row("External_Id__c", "k1"), None);
            assert_eq!((r.status, r.json()), (404, not_found.clone()), "{method}");
        }
        let r = api(&fake, "DELETE", &row("External_Id__c", "never"), None);
        assert_eq!((r.status, r.json()), (404, not_found.clone()));

        // Only external-id fields; unknown objects are 404 like describe.
        for field in ["Email", "Nope__c"] {
            let r = api(&fake, "DELETE", &row(field, "a@example.com"), None);
            assert_eq!(r.status, 404);
            assert_eq!(
                r.json(),
                json!([{ "errorCode": "NOT_FOUND", "message": format!("Provided external ID field does not exist or is not accessible: {field}") }])
            );
        }
        let r = api(
            &fake,
            "DELETE",
            &format!("{V}/sobjects/Opportunity/External_Id__c/x"),
            None,
        );
        assert_eq!((r.status, r.json()), (404, not_found.clone()));
        assert_eq!(
            api(
                &fake,
                "PATCH",
                &row("External_Id__c", "a%20b"),
                Some(json!({}))
            )
            .status,
            405
        );

        // The value is percent-decoded; `+` is not a space in a path.
        assert_eq!(
            api(&fake, "GET", &row("External_Id__c", "a+b"), None).status,
            404
        );
        assert_eq!(
            api(&fake, "GET", &row("External_Id__c", "a%20b"), None).json()["LastName"],
            "B"
        );
        fake.fail_next(1, 503);
        assert_eq!(
            api(&fake, "DELETE", &row("External_Id__c", "a%20b"), None).status,
            503
        );
        assert_eq!(
            send(
                &addr(&fake),
                "DELETE",
                &row("External_Id__c", "a%20b"),
                &[],
                ""
            )
            .status,
            401
        );
        assert_eq!(fake.records("Contact").len(), 1);
        let r = api(&fake, "DELETE", &row("External_Id__c", "a%20b"), None);
        assert_eq!(r.status, 204);
        assert!(fake.records("Contact").is_empty());
        let journal: Vec<(String, u16)> = fake
            .calls()
            .iter()
            .rev()
            .take(4)
            .map(|c| (c.path.clone(), c.status))
            .collect();
        assert_eq!(
            journal,
            [204, 401, 503, 200].map(|s| (row("External_Id__c", "a%20b"), s))
        );
    }

    #[test]
    fn rows_by_external_id_with_several_matches_is_300() {
        let fake = FakeSalesforce::start(TOKEN);
        let fields = |external: bool| {
            let key = FieldSpec::new("Key__c", "string");
            let num = FieldSpec::new("Num__c", "double");
            if external {
                vec![key.external_id(), num.external_id()]
            } else {
                vec![key, num]
            }
        };
        // Duplicate values written before the fields became external ids.
        fake.add_object("Lead__c", "a02", fields(false));
        let lead = |key: &str, num: f64| json!({ "attributes": { "type": "Lead__c" }, "Key__c": key, "Num__c": num });
        let body = json!({ "records": [lead("dup", 7.0), lead("DUP", 8.5)] });
        let r = api(
            &fake,
            "POST",
            &format!("{V}/composite/sobjects"),
            Some(body),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        fake.add_object("Lead__c", "a02", fields(true));

        let path = format!("{V}/sobjects/Lead__c/Key__c/Dup");
        for method in ["DELETE", "GET"] {
            let r = api(&fake, method, &path, None);
            assert_eq!(r.status, 300, "{method}");
            assert_eq!(
                r.json(),
                json!([
                    "/services/data/v62.0/sobjects/Lead__c/a02000000000001AAA",
                    "/services/data/v62.0/sobjects/Lead__c/a02000000000002AAA",
                ])
            );
        }
        assert_eq!(fake.records("Lead__c").len(), 2);

        // Number fields compare by value.
        let r = api(
            &fake,
            "GET",
            &format!("{V}/sobjects/Lead__c/Num__c/7"),
            None,
        );
        assert_eq!(
            (r.status, r.json()["Id"].as_str()),
            (200, Some("a02000000000001AAA"))
        );
        let r = api(
            &fake,
            "DELETE",
            &format!("{V}/sobjects/Lead__c/Num__c/8.50"),
            None,
        );
        assert_eq!(r.status, 204);
        assert_eq!(
            fake.records("Lead__c").keys().collect::<Vec<_>>(),
            ["a02000000000001AAA"]
        );
        assert_eq!(api(&fake, "DELETE", &path, None).status, 204);
        assert!(fake.records("Lead__c").is_empty());
    }

    #[test]
    fn expired_sessions_and_both_oauth_flows() {
        let fake = FakeSalesforce::start(TOKEN);
        let describe = format!("{V}/sobjects/Contact/describe");
        assert_eq!(api(&fake, "GET", &describe, None).status, 200);
        fake.expire_token();
        let r = api(&fake, "GET", &describe, None);
        assert_eq!(r.status, 401);
        assert_eq!(
            r.json(),
            json!([{ "message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID" }])
        );
        assert_eq!(send(&addr(&fake), "GET", &describe, &[], "").status, 401);

        let form = [("Content-Type", "application/x-www-form-urlencoded")];
        let token = |body: &str| send(&addr(&fake), "POST", "/services/oauth2/token", &form, body);
        let r = token("grant_type=client_credentials&client_id=cid&client_secret=s3cret");
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (400, Some("invalid_client_id"))
        );

        fake.configure_oauth("cid", "s3cret", Some("rt-1"));
        let r =
            token("grant_type=refresh_token&client_id=cid&client_secret=s3cret&refresh_token=rt-2");
        assert_eq!(r.status, 400);
        assert_eq!(
            r.json(),
            json!({ "error": "invalid_grant", "error_description": "expired access/refresh token" })
        );
        let r =
            token("grant_type=refresh_token&client_id=cid&client_secret=wrong&refresh_token=rt-1");
        assert_eq!(
            r.json(),
            json!({ "error": "invalid_client", "error_description": "invalid client credentials" })
        );
        let r = token("grant_type=password&client_id=cid&client_secret=s3cret");
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (400, Some("unsupported_grant_type"))
        );
        let r = send(
            &addr(&fake),
            "POST",
            "/services/oauth2/token",
            &[("Content-Type", "application/json")],
            "{}",
        );
        assert_eq!(r.status, 400);
        assert!(r.header("Sforce-Limit-Info").is_none());

        let r =
            token("grant_type=refresh_token&client_id=cid&client_secret=s3cret&refresh_token=rt-1");
        assert_eq!(r.status, 200, "{}", r.body);
        let answer = r.json();
        assert_eq!(answer["instance_url"], fake.base_url());
        assert_eq!(answer["token_type"], "Bearer");
        assert!(answer["id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/id/00D", fake.base_url())));
        assert!(answer["issued_at"].as_str().unwrap().parse::<u64>().is_ok());
        let fresh = format!("Bearer {}", answer["access_token"].as_str().unwrap());
        assert_eq!(
            send(
                &addr(&fake),
                "GET",
                &describe,
                &[("Authorization", &fresh)],
                ""
            )
            .status,
            200
        );

        let r = token("grant_type=client_credentials&client_id=cid&client_secret=s3cret");
        assert_eq!(r.status, 200, "{}", r.body);
        let other = format!("Bearer {}", r.json()["access_token"].as_str().unwrap());
        assert_ne!(other, fresh);
        assert_eq!(
            send(
                &addr(&fake),
                "GET",
                &describe,
                &[("Authorization", &other)],
                ""
            )
            .status,
            200
        );

        assert_eq!(fake.token_calls(), 7);
        let journaled = fake
            .calls()
            .into_iter()
            .find(|c| c.path == "/services/oauth2/token" && c.status == 200)
            .unwrap();
        assert_eq!(
            journaled.body,
            Some(
                json!({ "grant_type": "refresh_token", "client_id": "cid", "client_secret": "***", "refresh_token": "***" })
            )
        );
        // Token requests are not API requests: 3 successful describes were counted.
        assert_eq!(fake.api_usage(), (3, 15000));
    }

    #[test]
    fn usage_is_reported_and_limited() {
        let fake = FakeSalesforce::start(TOKEN);
        let describe = format!("{V}/sobjects/Account/describe");
        let r = api(&fake, "GET", &describe, None);
        assert_eq!(r.header("Sforce-Limit-Info"), Some("api-usage=1/15000"));
        let r = api(&fake, "GET", &describe, None);
        assert_eq!(r.header("Sforce-Limit-Info"), Some("api-usage=2/15000"));

        fake.fail_next(2, 503);
        for _ in 0..2 {
            let r = api(&fake, "GET", &describe, None);
            assert_eq!(r.status, 503);
            assert_eq!(
                r.json(),
                json!([{ "message": "Server temporarily unavailable", "errorCode": "SERVER_UNAVAILABLE" }])
            );
            assert_eq!(r.header("Sforce-Limit-Info"), Some("api-usage=2/15000"));
        }
        fake.fail_next(1, 500);
        assert_eq!(
            api(&fake, "GET", &describe, None).json()[0]["errorCode"],
            "UNKNOWN_EXCEPTION"
        );

        fake.set_api_limit(3);
        assert_eq!(api(&fake, "GET", &describe, None).status, 200);
        let r = api(&fake, "GET", &describe, None);
        assert_eq!(r.status, 403);
        assert_eq!(
            r.json(),
            json!([{ "message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED" }])
        );
        assert_eq!(r.header("Sforce-Limit-Info"), Some("api-usage=3/3"));
        assert_eq!(fake.api_usage(), (3, 3));
        let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [200, 200, 503, 503, 500, 200, 403]);
        fake.clear_calls();
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn describe_reports_fields_and_unknown_objects_are_404() {
        let fake = FakeSalesforce::start(TOKEN);
        let r = api(
            &fake,
            "GET",
            &format!("{V}/sobjects/Contact/describe"),
            None,
        );
        assert_eq!(r.status, 200);
        let d = r.json();
        assert_eq!(
            (d["name"].as_str(), d["keyPrefix"].as_str()),
            (Some("Contact"), Some("003"))
        );
        let field = |name: &str| {
            d["fields"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == name)
                .unwrap()
                .clone()
        };
        let last = field("LastName");
        assert_eq!(
            (
                &last["type"],
                &last["createable"],
                &last["updateable"],
                &last["nillable"],
                &last["defaultedOnCreate"]
            ),
            (
                &json!("string"),
                &json!(true),
                &json!(true),
                &json!(false),
                &json!(false)
            )
        );
        let ext = field("External_Id__c");
        assert_eq!(
            (&ext["externalId"], &ext["idLookup"], &ext["unique"]),
            (&json!(true), &json!(true), &json!(true))
        );
        assert_eq!(
            (
                &field("CreatedDate")["createable"],
                &field("CreatedDate")["type"]
            ),
            (&json!(false), &json!("datetime"))
        );
        assert_eq!(field("Health_Score__c")["type"], "double");
        assert_eq!(field("Email")["length"], 80);

        let r = api(
            &fake,
            "GET",
            &format!("{V}/sobjects/Opportunity/describe"),
            None,
        );
        assert_eq!(r.status, 404);
        assert_eq!(
            r.json(),
            json!([{ "errorCode": "NOT_FOUND", "message": "The requested resource does not exist" }])
        );
        assert_eq!(
            api(
                &fake,
                "POST",
                &format!("{V}/sobjects/Contact/describe"),
                Some(json!({}))
            )
            .status,
            405
        );
    }

    #[test]
    fn bulk_upsert_job_end_to_end_with_one_failing_row() {
        let fake = FakeSalesforce::start(TOKEN);
        upsert(
            &fake,
            vec![contact(
                "k1",
                json!({ "LastName": "Ada", "Email": "ada@example.com" }),
            )],
            false,
        );
        fake.set_bulk_polls_until_complete(2);

        let spec = json!({ "object": "Contact", "operation": "upsert", "externalIdFieldName": "External_Id__c",
                           "contentType": "CSV", "lineEnding": "LF" });
        let r = api(&fake, "POST", &format!("{V}/jobs/ingest"), Some(spec));
        assert_eq!(r.status, 200, "{}", r.body);
        let job = r.json();
        let id = job["id"].as_str().unwrap().to_string();
        assert_eq!(id, "750000000000002AAA");
        assert_eq!(job["state"], "Open");
        assert_eq!(job["apiVersion"], json!(62.0));
        assert_eq!(
            job["contentUrl"],
            format!("services/data/v62.0/jobs/ingest/{id}/batches")
        );
        assert_eq!(
            (
                job["columnDelimiter"].as_str(),
                job["externalIdFieldName"].as_str()
            ),
            (Some("COMMA"), Some("External_Id__c"))
        );

        let csv = "External_Id__c,LastName,Email,Health_Score__c\n\
                   k1,Lovelace,,0.9\n\
                   k2,\"Hopper, \"\"Amazing\"\" Grace\",grace@example.com,#N/A\n\
                   k3,,bad@example.com,\n";
        let auth = format!("Bearer {TOKEN}");
        let batches = format!("{V}/jobs/ingest/{id}/batches");
        let put = |body: &str| {
            send(
                &addr(&fake),
                "PUT",
                &batches,
                &[("Authorization", &auth), ("Content-Type", "text/csv")],
                body,
            )
        };
        let r = put(csv);
        assert_eq!((r.status, r.body.as_str()), (201, ""));
        let r = put(csv);
        assert_eq!(
            (r.status, r.json()[0]["errorCode"].as_str()),
            (400, Some("BULK_API_ERROR"))
        );
        let results = format!("{V}/jobs/ingest/{id}/successfulResults/");
        assert_eq!(api(&fake, "GET", &results, None).status, 400);

        let r = api(
            &fake,
            "PATCH",
            &format!("{V}/jobs/ingest/{id}"),
            Some(json!({ "state": "UploadComplete" })),
        );
        assert_eq!(
            (r.status, r.json()["state"].as_str()),
            (200, Some("UploadComplete"))
        );
        let states: Vec<(String, u64, u64)> = (0..3)
            .map(|_| {
                let info = api(&fake, "GET", &format!("{V}/jobs/ingest/{id}"), None).json();
                let n = |k: &str| info[k].as_u64().unwrap();
                (
                    info["state"].as_str().unwrap().to_string(),
                    n("numberRecordsProcessed"),
                    n("numberRecordsFailed"),
                )
            })
            .collect();
        assert_eq!(
            states,
            [
                ("InProgress".into(), 0, 0),
                ("InProgress".into(), 0, 0),
                ("JobComplete".into(), 3, 1)
            ]
        );

        let r = api(&fake, "GET", &results, None);
        assert_eq!(
            (r.status, r.header("Content-Type")),
            (200, Some("text/csv"))
        );
        assert_eq!(
            r.body,
            "\"sf__Id\",\"sf__Created\",External_Id__c,LastName,Email,Health_Score__c\n\
             \"003000000000001AAA\",\"false\",\"k1\",\"Lovelace\",\"\",\"0.9\"\n\
             \"003000000000003AAA\",\"true\",\"k2\",\"Hopper, \"\"Amazing\"\" Grace\",\"grace@example.com\",\"#N/A\"\n"
        );
        let r = api(
            &fake,
            "GET",
            &format!("{V}/jobs/ingest/{id}/failedResults"),
            None,
        );
        assert_eq!(
            r.body,
            "\"sf__Id\",\"sf__Error\",External_Id__c,LastName,Email,Health_Score__c\n\
             \"\",\"REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --\",\"k3\",\"\",\"bad@example.com\",\"\"\n"
        );

        let records = fake.records("Contact");
        assert_eq!(
            records["003000000000001AAA"],
            json!({ "Id": "003000000000001AAA", "External_Id__c": "k1", "LastName": "Lovelace",
                    "Email": "ada@example.com", "Health_Score__c": 0.9 })
        );
        assert_eq!(
            records["003000000000003AAA"],
            json!({ "Id": "003000000000003AAA", "External_Id__c": "k2", "LastName": "Hopper, \"Amazing\" Grace",
                    "Email": "grace@example.com", "Health_Score__c": null })
        );
        assert_eq!(records.len(), 2);
        let upload = fake
            .calls()
            .into_iter()
            .find(|c| c.method == "PUT" && c.status == 201)
            .unwrap();
        assert_eq!(upload.body, Some(json!({ "csv": csv })));
        // 1 upsert + create + 2 uploads + 1 early results + close + 3 polls + 2 results.
        assert_eq!(fake.api_usage().0, 11);
    }

    #[test]
    fn bulk_refusals_and_failed_jobs() {
        let fake = FakeSalesforce::start(TOKEN);
        let jobs = format!("{V}/jobs/ingest");
        let create = |spec: Value| api(&fake, "POST", &jobs, Some(spec));
        let refused = [
            json!({ "object": "Contact", "operation": "upsert" }),
            json!({ "object": "Contact", "operation": "upsert", "externalIdFieldName": "LastName" }),
            json!({ "object": "Contact", "operation": "merge" }),
            json!({ "object": "Contact", "operation": "insert", "contentType": "JSON" }),
            json!({ "object": "Contact", "operation": "insert", "lineEnding": "CR" }),
            json!({ "object": "Contact", "operation": "insert", "bogus": 1 }),
            json!({ "object": "Nope__c", "operation": "insert" }),
        ];
        for spec in refused {
            assert_eq!(create(spec.clone()).status, 400, "{spec}");
        }
        assert_eq!(
            api(&fake, "GET", &format!("{jobs}/750000000000099AAA"), None).status,
            404
        );

        let auth = format!("Bearer {TOKEN}");
        // Runs a job over `csv` (after polling past InProgress) and answers its final info.
        let run = |spec: Value, csv: &str, content_type: &str| -> (u16, Value, String) {
            let id = create(spec).json()["id"].as_str().unwrap().to_string();
            let batches = format!("{jobs}/{id}/batches");
            let put = send(
                &addr(&fake),
                "PUT",
                &batches,
                &[("Authorization", &auth), ("Content-Type", content_type)],
                csv,
            );
            api(
                &fake,
                "PATCH",
                &format!("{jobs}/{id}"),
                Some(json!({ "state": "UploadComplete" })),
            );
            let first = api(&fake, "GET", &format!("{jobs}/{id}"), None).json();
            assert_eq!(first["state"], "InProgress");
            (
                put.status,
                api(&fake, "GET", &format!("{jobs}/{id}"), None).json(),
                id,
            )
        };
        let insert = json!({ "object": "Contact", "operation": "insert" });
        let (_, info, id) = run(insert.clone(), "LastName,Foo__c\nA,1\n", "text/csv");
        assert_eq!(
            (info["state"].as_str(), info["errorMessage"].as_str()),
            (
                Some("Failed"),
                Some("InvalidBatch : Field name not found : Foo__c")
            )
        );
        assert_eq!(
            api(&fake, "GET", &format!("{jobs}/{id}/failedResults/"), None).status,
            400
        );
        let (_, info, _) = run(insert.clone(), "LastName\r\nA\r\n", "text/csv");
        assert_eq!(
            info["errorMessage"],
            "ClientInputError : LineEnding is invalid on user data. Current LineEnding setting is LF"
        );
        let (status, info, _) = run(insert.clone(), "LastName\nA\n", "text/plain");
        assert_eq!(
            (status, info["errorMessage"].as_str()),
            (
                415,
                Some("InvalidBatch : No data was uploaded for this job")
            )
        );
        assert!(fake.records("Contact").is_empty());

        // CRLF and another delimiter, inserting then deleting.
        let crlf = json!({ "object": "Contact", "operation": "insert", "lineEnding": "CRLF", "columnDelimiter": "SEMICOLON" });
        let (_, info, _) = run(
            crlf,
            "LastName;Health_Score__c\r\n\"Semi;colon\";1.5\r\nB;lots\r\n",
            "text/csv",
        );
        assert_eq!(
            (info["state"].as_str(), info["numberRecordsFailed"].as_u64()),
            (Some("JobComplete"), Some(1))
        );
        let created: Vec<String> = fake.records("Contact").into_keys().collect();
        assert_eq!(
            fake.records("Contact")[&created[0]]["LastName"],
            "Semi;colon"
        );
        let delete = json!({ "object": "Contact", "operation": "delete" });
        let (_, info, id) = run(
            delete,
            &format!("Id\n{}\n003000000000042AAA\n", created[0]),
            "text/csv",
        );
        assert_eq!(
            (
                info["numberRecordsProcessed"].as_u64(),
                info["numberRecordsFailed"].as_u64()
            ),
            (Some(2), Some(1))
        );
        let r = api(&fake, "GET", &format!("{jobs}/{id}/failedResults/"), None);
        assert_eq!(
            r.body,
            "\"sf__Id\",\"sf__Error\",Id\n\"003000000000042AAA\",\"INVALID_CROSS_REFERENCE_KEY:invalid cross reference id:--\",\"003000000000042AAA\"\n"
        );
        assert!(fake.records("Contact").is_empty());

        // Only Open jobs take data or UploadComplete.
        let id = create(insert).json()["id"].as_str().unwrap().to_string();
        let r = api(
            &fake,
            "PATCH",
            &format!("{jobs}/{id}"),
            Some(json!({ "state": "Aborted" })),
        );
        assert_eq!(r.json()["state"], "Aborted");
        let r = api(
            &fake,
            "PATCH",
            &format!("{jobs}/{id}"),
            Some(json!({ "state": "UploadComplete" })),
        );
        assert_eq!(
            (r.status, r.json()[0]["errorCode"].as_str()),
            (400, Some("INVALIDJOBSTATE"))
        );
        let batches = format!("{jobs}/{id}/batches");
        let r = send(
            &addr(&fake),
            "PUT",
            &batches,
            &[("Authorization", &auth), ("Content-Type", "text/csv")],
            "LastName\nA\n",
        );
        assert_eq!(
            (r.status, r.json()[0]["errorCode"].as_str()),
            (400, Some("INVALIDJOBSTATE"))
        );
    }

    #[test]
    fn custom_objects_via_add_object() {
        let fake = FakeSalesforce::start(TOKEN);
        fake.add_object(
            "Churn_Risk__c",
            "a01",
            vec![
                FieldSpec::new("Risk_Key__c", "string").external_id(),
                FieldSpec::new("Score__c", "double").required(),
                FieldSpec::new("Flagged__c", "boolean"),
                FieldSpec::new("Due__c", "date"),
                FieldSpec::new("Contact__c", "reference"),
            ],
        );
        upsert(
            &fake,
            vec![contact("c1", json!({ "LastName": "A" }))],
            false,
        );
        let path = format!("{V}/composite/sobjects/Churn_Risk__c/Risk_Key__c");
        let risk = |key: &str, fields: Value| {
            let mut r = json!({ "attributes": { "type": "Churn_Risk__c" }, "Risk_Key__c": key });
            r.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            r
        };
        let body = json!({ "records": [
            risk("r1", json!({ "Score__c": 0.7, "Flagged__c": true, "Due__c": "2026-02-28", "Contact__c": "003000000000001" })),
            risk("r2", json!({ "Score__c": 1, "Contact__c": "003000000000009AAA" })),
            risk("r3", json!({ "Score__c": 1, "Contact__c": "not-an-id" })),
        ]});
        let r = api(&fake, "PATCH", &path, Some(body));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json(),
            json!([
                { "id": "a01000000000002AAA", "success": true, "errors": [], "created": true },
                error("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", &[]),
                error("MALFORMED_ID", "Contact: id value of incorrect type: not-an-id", &["Contact__c"]),
            ])
        );
        assert_eq!(
            fake.records("Churn_Risk__c")["a01000000000002AAA"],
            json!({ "Id": "a01000000000002AAA", "Risk_Key__c": "r1", "Score__c": 0.7, "Flagged__c": true,
                    "Due__c": "2026-02-28", "Contact__c": "003000000000001AAA" })
        );
        let bad_date =
            json!({ "records": [risk("r4", json!({ "Score__c": 1, "Due__c": "2026-02-30" }))] });
        assert_eq!(api(&fake, "PATCH", &path, Some(bad_date)).status, 400);

        let d = api(
            &fake,
            "GET",
            &format!("{V}/sobjects/churn_risk__c/describe"),
            None,
        )
        .json();
        assert_eq!(
            (
                d["name"].as_str(),
                d["label"].as_str(),
                d["custom"].as_bool()
            ),
            (Some("Churn_Risk__c"), Some("Churn Risk"), Some(true))
        );
        let names: Vec<&str> = d["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Id",
                "Risk_Key__c",
                "Score__c",
                "Flagged__c",
                "Due__c",
                "Contact__c"
            ]
        );
        assert!(fake.records("Contact").len() == 1 && fake.records("Nope").is_empty());
    }

    #[test]
    fn codecs() {
        assert_eq!(
            parse_csv("a,\"b,\"\"c\"\"\",\n\"multi\nline\",,x\n", ',', false).unwrap(),
            [vec!["a", "b,\"c\"", ""], vec!["multi\nline", "", "x"]]
        );
        assert_eq!(
            parse_csv("a\tb\r\n1\t2", '\t', true).unwrap(),
            [vec!["a", "b"], vec!["1", "2"]]
        );
        assert!(parse_csv("a\n1\n", ',', true).is_err());
        assert!(parse_csv("a,b\"c\n", ',', false).is_err());
        assert!(parse_csv("\"open\n", ',', false).is_err());
        assert_eq!(csv_cell("plain", ',', false), "plain");
        assert_eq!(csv_cell("a,\"b\"", ',', false), "\"a,\"\"b\"\"\"");

        assert_eq!(id_suffix("003000000000001"), "AAA");
        assert_eq!(id_suffix("001A00000000000"), "IAA");
        assert_eq!(
            canonical_id("001A00000000000").as_deref(),
            Some("001A00000000000IAA")
        );
        assert_eq!(
            canonical_id("001A00000000000iaa").as_deref(),
            Some("001A00000000000IAA")
        );
        assert_eq!(canonical_id("001A00000000000AAA"), None);
        assert_eq!(canonical_id("003-0000"), None);

        assert_eq!(
            form_fields("a=1&b=x%20y+z&c=%2C&d"),
            [("a", "1"), ("b", "x y z"), ("c", ","), ("d", "")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(
            percent_decode("a+b%20%C3%A9%FF%4", false),
            "a+b \u{e9}\u{FFFD}%4"
        );
        for ok in [
            "2026-01-31T12:00:00Z",
            "2026-01-31T12:00:00.123+01:00",
            "2024-02-29T00:00:00-0530",
        ] {
            assert!(valid_datetime(ok), "{ok}");
        }
        for bad in [
            "2026-01-31 12:00:00Z",
            "2026-01-31T12:00:00",
            "2023-02-29T00:00:00Z",
            "2026-01-31T24:00:00Z",
        ] {
            assert!(!valid_datetime(bad), "{bad}");
        }
        assert_eq!(label_of("LastName"), "Last Name");
        assert_eq!(label_of("Health_Score__c"), "Health Score");
        assert!(iso_now().ends_with(".000+0000") && iso_now().len() == 28);
    }
}
