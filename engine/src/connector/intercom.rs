//! Intercom (`type 'intercom'`, API version 2.14 by default in `Intercom-Version`).
//!
//! - Contacts (`object 'contacts'`): created by `external_id` (`POST /contacts`, role user), then
//!   updated by the Intercom id the identity map learned (`PUT /contacts/{id}`); a 409 (the
//!   contact exists already) names its id, and the row is sent again as an update. Standard
//!   attributes go top-level, every other field into `custom_attributes`. A row leaving a
//!   mirror sync archives the contact (reversible, unlike a delete); when it comes back, the
//!   409 names the archived contact, which is unarchived and then updated.
//! - Audience membership as a tag (`tag 'name'`): rows entering tag the existing contact with
//!   that external id, rows leaving untag it (`POST /tags` with `users`, in batches); a contact
//!   whose id is not known yet is looked up with `POST /contacts/search` first.
//! - Companies (`object 'companies'`): `POST /companies` creates or updates by `company_id`;
//!   a row leaving deletes the company by its Intercom id.
//!
//! Rate limits: a 429 waits until `X-RateLimit-Reset`; the remaining calls are shown as the
//! sync's API usage.

use super::{classify_failure, ApiUsage, describe, BatchContext, Destination, HttpRequest, HttpResponse, RecordResult, ResponseOutcome};
use crate::options::{IntercomObject, IntercomOptions};
use crate::record::{Op, OutboxRecord};
use serde_json::{json, Map, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const EXCERPT: usize = 300;
/// Contact attributes Intercom keeps top-level; everything else is a custom attribute.
const CONTACT_ATTRIBUTES: [&str; 9] =
    ["email", "phone", "name", "avatar", "signed_up_at", "last_seen_at", "owner_id", "unsubscribed_from_emails", "role"];
const COMPANY_ATTRIBUTES: [&str; 7] = ["name", "plan", "size", "website", "industry", "remote_created_at", "monthly_spend"];
/// Contacts tagged or untagged in one request.
const TAG_BATCH: usize = 50;
/// External ids looked up in one search (Intercom caps the values of an `IN` query).
const LOOKUP_BATCH: usize = 15;

// Request groups.
const CREATE: u8 = 0;
const UPDATE: u8 = 1;
const ARCHIVE: u8 = 2;
const LOOKUP_ENTRY: u8 = 3;
const LOOKUP_EXIT: u8 = 4;
const TAG: u8 = 5;
const UNTAG: u8 = 6;
const COMPANY: u8 = 7;
const DELETE_COMPANY: u8 = 8;
const UNARCHIVE: u8 = 9;
/// Marks a destination id (only while a row is being sent) whose contact must be unarchived
/// before it can be updated.
const ARCHIVED: &str = "archived:";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IntercomError {
    #[error("the record has no {0}: map a column to the destination field of that name (or use a one-column key)")]
    NoIdentity(&'static str),
    #[error("no Intercom company id is known for this key: it was not written by this sync")]
    UnknownCompany,
    #[error("Intercom has no contact with this external_id: tagging needs an existing contact")]
    NoSuchContact,
}

pub struct Intercom {
    url: String,
    opts: IntercomOptions,
}

impl Intercom {
    pub fn new(url: &str, opts: &IntercomOptions) -> Self {
        Intercom { url: url.to_string(), opts: opts.clone() }
    }

    /// The record's own identity at Intercom: `external_id` (contacts) or `company_id`.
    fn identity(&self, record: &OutboxRecord) -> Option<String> {
        let name = self.identity_field();
        let from_fields = record.fields.as_ref().and_then(|f| f.get(name));
        let single = record.key.as_object().filter(|k| k.len() == 1).and_then(|k| k.values().next());
        match from_fields.or_else(|| record.key.get(name)).or(single)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    fn identity_field(&self) -> &'static str {
        match self.opts.object {
            IntercomObject::Contacts => "external_id",
            IntercomObject::Companies => "company_id",
        }
    }

    /// `{"external_id": .., "email": .., "custom_attributes": {..}}` from the record's fields.
    fn attributes(&self, record: &OutboxRecord) -> Value {
        let standard: &[&str] = match self.opts.object {
            IntercomObject::Contacts => &CONTACT_ATTRIBUTES,
            IntercomObject::Companies => &COMPANY_ATTRIBUTES,
        };
        let mut object = Map::new();
        let mut custom = Map::new();
        for (name, value) in record.fields.as_ref().and_then(Value::as_object).into_iter().flatten() {
            if name == self.identity_field() {
                continue;
            } else if standard.contains(&name.as_str()) {
                object.insert(name.clone(), value.clone());
            } else {
                custom.insert(name.clone(), value.clone());
            }
        }
        object.insert(self.identity_field().into(), json!(self.identity(record)));
        if self.opts.object == IntercomObject::Contacts && !object.contains_key("role") {
            object.insert("role".into(), json!("user"));
        }
        if !custom.is_empty() {
            object.insert("custom_attributes".into(), Value::Object(custom));
        }
        Value::Object(object)
    }

    fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>, token: Option<&str>) -> HttpRequest {
        let mut headers = vec![
            ("Accept".to_string(), "application/json".to_string()),
            ("Intercom-Version".to_string(), self.opts.version.clone()),
        ];
        if body.is_some() {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        if let Some(token) = token {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        HttpRequest { method, url: format!("{}{path}", self.url), headers, body: body.map(|b| b.to_string().into_bytes()).unwrap_or_default() }
    }

    /// An Intercom id from a path segment's point of view (they are hex or digits; anything
    /// else is escaped).
    fn segment(id: &str) -> String {
        url::form_urlencoded::byte_serialize(id.as_bytes()).collect()
    }

    fn lookup_results(&self, records: &[OutboxRecord], resp: &HttpResponse, entering: bool) -> ResponseOutcome {
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        let found: Vec<(String, String)> = json["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["external_id"].as_str()?.to_string(), c["id"].as_str()?.to_string())))
            .collect();
        ResponseOutcome::PerRecord(
            records
                .iter()
                .map(|r| {
                    let external_id = self.identity(r).unwrap_or_default();
                    match found.iter().find(|(e, _)| *e == external_id) {
                        Some((_, id)) => RecordResult::Resolved(id.clone()),
                        None if entering => RecordResult::Rejected { status: Some(200), message: IntercomError::NoSuchContact.to_string() },
                        // Leaving, and not there: nothing to untag or archive.
                        None => RecordResult::Ack,
                    }
                })
                .collect(),
        )
    }

    fn error_text(json: &Value, resp: &HttpResponse) -> String {
        match json["errors"].as_array().and_then(|e| e.first()) {
            Some(e) => format!("Intercom {}: {}", e["code"].as_str().unwrap_or("error"), e["message"].as_str().unwrap_or("no message")),
            None => describe(resp, EXCERPT),
        }
    }
}

impl Destination for Intercom {
    fn kind(&self) -> &'static str {
        "intercom"
    }

    fn max_batch_size(&self) -> usize {
        TAG_BATCH
    }

    fn group_batch_size(&self, group: u8) -> usize {
        match group {
            TAG | UNTAG => TAG_BATCH,
            LOOKUP_ENTRY | LOOKUP_EXIT => LOOKUP_BATCH,
            _ => 1,
        }
    }

    fn precheck(&self, record: &OutboxRecord) -> Result<(), String> {
        match (self.opts.object, record.op, &record.destination_id) {
            (IntercomObject::Companies, Op::Delete, None) => Err(IntercomError::UnknownCompany.to_string()),
            (_, _, Some(_)) => Ok(()),
            _ if self.identity(record).is_none() => Err(IntercomError::NoIdentity(self.identity_field()).to_string()),
            _ => Ok(()),
        }
    }

    fn request_group(&self, record: &OutboxRecord) -> u8 {
        if record.destination_id.as_deref().is_some_and(|id| id.starts_with(ARCHIVED)) {
            return UNARCHIVE;
        }
        let leaving = record.op == Op::Delete;
        let known = record.destination_id.is_some();
        match (self.opts.object, &self.opts.tag, leaving, known) {
            (IntercomObject::Companies, _, false, _) => COMPANY,
            (IntercomObject::Companies, _, true, _) => DELETE_COMPANY,
            (_, Some(_), false, true) => TAG,
            (_, Some(_), true, true) => UNTAG,
            (_, Some(_), false, false) => LOOKUP_ENTRY,
            (_, _, true, false) => LOOKUP_EXIT,
            (_, None, false, false) => CREATE,
            (_, None, false, true) => UPDATE,
            (_, None, true, true) => ARCHIVE,
        }
    }

    fn build_request(&self, _: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        use reqwest::Method;
        let first = records.first().ok_or("no record")?;
        let id = first.destination_id.as_deref().map(|id| Self::segment(id.trim_start_matches(ARCHIVED))).unwrap_or_default();
        Ok(match self.request_group(first) {
            CREATE => self.request(Method::POST, "/contacts", Some(self.attributes(first)), token),
            UPDATE => self.request(Method::PUT, &format!("/contacts/{id}"), Some(self.attributes(first)), token),
            ARCHIVE => self.request(Method::POST, &format!("/contacts/{id}/archive"), None, token),
            UNARCHIVE => self.request(Method::POST, &format!("/contacts/{id}/unarchive"), None, token),
            LOOKUP_ENTRY | LOOKUP_EXIT => {
                let ids: Vec<String> = records.iter().filter_map(|r| self.identity(r)).collect();
                let query = json!({"query": {"field": "external_id", "operator": "IN", "value": ids}, "pagination": {"per_page": 50}});
                self.request(Method::POST, "/contacts/search", Some(query), token)
            }
            group @ (TAG | UNTAG) => {
                let users: Vec<Value> = records
                    .iter()
                    .map(|r| if group == UNTAG { json!({"id": r.destination_id, "untag": true}) } else { json!({"id": r.destination_id}) })
                    .collect();
                self.request(Method::POST, "/tags", Some(json!({"name": self.opts.tag, "users": users})), token)
            }
            COMPANY => self.request(Method::POST, "/companies", Some(self.attributes(first)), token),
            _ => self.request(Method::DELETE, &format!("/companies/{id}"), None, token),
        })
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let group = records.first().map_or(CREATE, |r| self.request_group(r));
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        match (resp.status, group) {
            (200, LOOKUP_ENTRY) => self.lookup_results(records, resp, true),
            (200, LOOKUP_EXIT) => self.lookup_results(records, resp, false),
            (200, CREATE | UPDATE | COMPANY) => match json["id"].as_str() {
                Some(id) => ResponseOutcome::PerRecord(vec![RecordResult::AckWithId(id.to_string()); records.len()]),
                None => ResponseOutcome::Transient {
                    status: Some(200),
                    retry_after: None,
                    message: format!("malformed Intercom answer: {}", describe(resp, EXCERPT)),
                },
            },
            (200, TAG) => ResponseOutcome::PerRecord(
                records.iter().map(|r| RecordResult::AckWithId(r.destination_id.clone().unwrap_or_default())).collect(),
            ),
            // Unarchived: now update it.
            (200, UNARCHIVE) => ResponseOutcome::PerRecord(
                records
                    .iter()
                    .map(|r| RecordResult::Resolved(r.destination_id.as_deref().unwrap_or_default().trim_start_matches(ARCHIVED).to_string()))
                    .collect(),
            ),
            (200..=299, _) => ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]),
            // Created meanwhile (or by someone else, or archived when it left): the answer
            // names it; update it instead, unarchiving it first if need be.
            (409, CREATE) => {
                let message = Self::error_text(&json, resp);
                let archived = message.contains("archived contact");
                match message.rsplit_once("id=").map(|(_, id)| id.trim().trim_end_matches('.').to_string()) {
                    Some(id) if !id.is_empty() && archived => {
                        ResponseOutcome::PerRecord(vec![RecordResult::Resolved(format!("{ARCHIVED}{id}")); records.len()])
                    }
                    Some(id) if !id.is_empty() => ResponseOutcome::PerRecord(vec![RecordResult::Resolved(id); records.len()]),
                    _ => ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(409), message }; records.len()]),
                }
            }
            // Already gone: nothing left to archive or delete.
            (404, ARCHIVE | DELETE_COMPANY) => ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]),
            (401, _) => ResponseOutcome::Fatal {
                status: Some(401),
                message: format!("Intercom rejected the access token ({}): check the token in the user mapping", Self::error_text(&json, resp)),
            },
            (429, _) => {
                // Wait until the window resets (X-RateLimit-Reset is a unix time in seconds).
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let reset = resp.header("X-RateLimit-Reset").and_then(|v| v.trim().parse::<u64>().ok());
                ResponseOutcome::Transient {
                    status: Some(429),
                    retry_after: reset.map(|r| Duration::from_secs(r.saturating_sub(now).max(1))),
                    message: Self::error_text(&json, resp),
                }
            }
            (status, _) => classify_failure(resp, EXCERPT).unwrap_or_else(|| {
                ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(status), message: Self::error_text(&json, resp) }; records.len()])
            }),
        }
    }

    fn usage(&self, resp: &HttpResponse) -> Option<ApiUsage> {
        let limit: u64 = resp.header("X-RateLimit-Limit")?.trim().parse().ok()?;
        let remaining: u64 = resp.header("X-RateLimit-Remaining")?.trim().parse().ok()?;
        // The limit is per window (X-RateLimit-Reset ends it): a later window is a later reading.
        let window = resp.header("X-RateLimit-Reset").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        Some(ApiUsage { order: (window, limit.saturating_sub(remaining)), shown: format!("rate-limit remaining {remaining}/{limit}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intercom(object: IntercomObject, tag: Option<&str>) -> Intercom {
        Intercom::new("http://ic", &IntercomOptions { object, tag: tag.map(str::to_string), version: "2.14".into() })
    }

    fn rec(op: Op, fields: Option<Value>, known: Option<&str>) -> OutboxRecord {
        OutboxRecord { id: 1, op, key: json!({"external_id": "u1"}), fields, destination_id: known.map(str::to_string) }
    }

    fn ctx() -> BatchContext<'static> {
        BatchContext { sync_name: "s", run_id: 1, idempotency_key: "k".into() }
    }

    fn resp(status: u16, body: Value) -> HttpResponse {
        HttpResponse { status, headers: vec![], body: body.to_string().into_bytes() }
    }

    #[test]
    fn contacts_are_created_then_updated_by_id_with_custom_attributes() {
        let ic = intercom(IntercomObject::Contacts, None);
        let new = rec(Op::Upsert, Some(json!({"email": "a@x.io", "plan": "pro"})), None);
        let req = ic.build_request(&ctx(), std::slice::from_ref(&new), Some("tok")).unwrap();
        assert_eq!((req.method.as_str(), req.url.as_str()), ("POST", "http://ic/contacts"));
        assert!(req.headers.contains(&("Intercom-Version".into(), "2.14".into())));
        assert_eq!(
            serde_json::from_slice::<Value>(&req.body).unwrap(),
            json!({"role": "user", "external_id": "u1", "email": "a@x.io", "custom_attributes": {"plan": "pro"}})
        );
        // The contact exists already: its id comes back, and the row goes again as an update.
        let conflict = resp(409, json!({"type": "error.list", "errors": [{"code": "conflict", "message": "A contact matching those details already exists with id=abc123"}]}));
        assert_eq!(ic.classify(std::slice::from_ref(&new), &conflict), ResponseOutcome::PerRecord(vec![RecordResult::Resolved("abc123".into())]));
        let known = rec(Op::Upsert, Some(json!({"email": "a@x.io"})), Some("abc123"));
        assert_eq!(ic.request_group(&known), UPDATE);
        assert_eq!(ic.build_request(&ctx(), &[known], None).unwrap().url, "http://ic/contacts/abc123");
        let gone = rec(Op::Delete, None, Some("abc123"));
        assert_eq!(ic.build_request(&ctx(), &[gone], None).unwrap().url, "http://ic/contacts/abc123/archive");
        // Back after it left: the archived contact is unarchived, then updated.
        let archived = resp(409, json!({"errors": [{"code": "conflict", "message": "An archived contact matching those details already exists with id=abc123"}]}));
        let back = [rec(Op::Upsert, Some(json!({"email": "a@x.io"})), None)];
        assert_eq!(ic.classify(&back, &archived), ResponseOutcome::PerRecord(vec![RecordResult::Resolved("archived:abc123".into())]));
        let unarchive = rec(Op::Upsert, Some(json!({"email": "a@x.io"})), Some("archived:abc123"));
        assert_eq!(ic.build_request(&ctx(), std::slice::from_ref(&unarchive), None).unwrap().url, "http://ic/contacts/abc123/unarchive");
        assert_eq!(ic.classify(&[unarchive], &resp(200, json!({"id": "abc123", "archived": false}))), ResponseOutcome::PerRecord(vec![RecordResult::Resolved("abc123".into())]));
    }

    #[test]
    fn membership_as_a_tag() {
        let ic = intercom(IntercomObject::Contacts, Some("churn_risk"));
        let entering = rec(Op::Upsert, Some(json!({})), None);
        assert_eq!(ic.request_group(&entering), LOOKUP_ENTRY);
        let search = ic.build_request(&ctx(), std::slice::from_ref(&entering), None).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&search.body).unwrap()["query"], json!({"field": "external_id", "operator": "IN", "value": ["u1"]}));
        let found = resp(200, json!({"type": "list", "data": [{"id": "c1", "external_id": "u1"}]}));
        assert_eq!(ic.classify(std::slice::from_ref(&entering), &found), ResponseOutcome::PerRecord(vec![RecordResult::Resolved("c1".into())]));
        let none = resp(200, json!({"type": "list", "data": []}));
        assert!(matches!(&ic.classify(std::slice::from_ref(&entering), &none), ResponseOutcome::PerRecord(r) if matches!(r[0], RecordResult::Rejected { .. })));
        let tag = ic.build_request(&ctx(), &[rec(Op::Upsert, None, Some("c1"))], None).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&tag.body).unwrap(), json!({"name": "churn_risk", "users": [{"id": "c1"}]}));
        let untag = ic.build_request(&ctx(), &[rec(Op::Delete, None, Some("c1"))], None).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&untag.body).unwrap(), json!({"name": "churn_risk", "users": [{"id": "c1", "untag": true}]}));
        let leaving = rec(Op::Delete, None, None);
        assert_eq!(ic.classify(std::slice::from_ref(&leaving), &none), ResponseOutcome::PerRecord(vec![RecordResult::Ack]));
    }

    #[test]
    fn answers() {
        let ic = intercom(IntercomObject::Companies, None);
        let one = [OutboxRecord { key: json!({"company_id": "acme"}), ..rec(Op::Upsert, Some(json!({"name": "Acme", "tier": "gold"})), None) }];
        let req = ic.build_request(&ctx(), &one, None).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&req.body).unwrap(), json!({"company_id": "acme", "name": "Acme", "custom_attributes": {"tier": "gold"}}));
        assert_eq!(ic.classify(&one, &resp(200, json!({"id": "co1"}))), ResponseOutcome::PerRecord(vec![RecordResult::AckWithId("co1".into())]));
        assert_eq!(
            ic.classify(&one, &resp(400, json!({"type": "error.list", "errors": [{"code": "parameter_not_found", "message": "Custom attribute 'tier' does not exist"}]}))),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected {
                status: Some(400),
                message: "Intercom parameter_not_found: Custom attribute 'tier' does not exist".into()
            }])
        );
        let mut throttled = resp(429, json!({"errors": [{"code": "rate_limit_exceeded", "message": "slow down"}]}));
        let reset = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3;
        throttled.headers = vec![("X-RateLimit-Reset".into(), reset.to_string())];
        assert!(matches!(ic.classify(&one, &throttled), ResponseOutcome::Transient { retry_after: Some(d), .. } if d >= Duration::from_secs(2)));
        assert!(matches!(ic.classify(&one, &resp(401, json!({"errors": [{"code": "unauthorized"}]}))), ResponseOutcome::Fatal { .. }));
    }
}
