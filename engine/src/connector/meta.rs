//! Meta custom audiences (`type 'meta_audience'`): mirrors an audience's membership. Rows
//! entering are added (`POST /v{version}/{audience_id}/users`), rows leaving are removed
//! (`DELETE` on the same path), up to 10,000 per request. The identifiers are the fields
//! `email` and `phone`, normalised as Meta requires (email trimmed and lower-cased, phone
//! digits only without leading zeros) and SHA-256 hashed in the worker: raw PII never leaves
//! the database. The hashes of an added row are kept in the identity map, so its removal
//! sends exactly what was added, and a member whose email or phone changed is first removed by
//! its old hashes, then added by its new ones.

use super::{classify_failure, BatchContext, Destination, HttpRequest, HttpResponse, RecordResult, ResponseOutcome};
use crate::options::MetaOptions;
use crate::record::{Op, OutboxRecord};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Meta's limit of users per request.
const MAX_BATCH: usize = 10_000;
const EXCERPT: usize = 300;
const ADD: u8 = 0;
const REMOVE: u8 = 1;
/// Members whose identifiers changed: removed by their old hashes, then added again.
const REPLACE: u8 = 2;
/// The identifiers, in the order of the payload's schema.
const FIELDS: [&str; 2] = ["email", "phone"];
const SCHEMA: [&str; 2] = ["EMAIL", "PHONE"];
/// Graph API error codes that mean "too many calls, wait".
const RATE_LIMIT_CODES: [i64; 6] = [4, 17, 32, 613, 80003, 80004];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetaError {
    #[error("the row has no email or phone to match a Meta user by (after normalising)")]
    NoIdentifier,
    #[error("Meta custom audiences match users by the fields email and phone only; not by {0}")]
    UnknownField(String),
}

pub struct MetaAudience {
    url: String,
}

impl MetaAudience {
    pub fn new(url: &str, opts: &MetaOptions) -> Self {
        MetaAudience { url: format!("{url}/v{}/{}/users", opts.api_version, opts.audience_id) }
    }

    /// The row's hashed identifiers in schema order ("" where it has none): for a removal the
    /// ones that were added (identity map), else its current ones.
    fn hashed_row(record: &OutboxRecord) -> Option<Vec<String>> {
        match record.op {
            Op::Delete => Self::added_row(record).or_else(|| Self::current_row(record)),
            _ => Self::current_row(record),
        }
    }

    /// The hashes this sync added for the row, from the identity map.
    fn added_row(record: &OutboxRecord) -> Option<Vec<String>> {
        let row: Vec<String> = record.destination_id.as_ref()?.split(',').map(str::to_string).collect();
        (row.len() == FIELDS.len()).then_some(row)
    }

    /// The hashes of the row's email and phone now (fields, or key).
    fn current_row(record: &OutboxRecord) -> Option<Vec<String>> {
        let value = |name: &str| {
            record.fields.as_ref().and_then(|f| f.get(name)).or_else(|| record.key.get(name)).and_then(Value::as_str).map(str::to_string)
        };
        let row = vec![
            value("email").map(|e| normalise_email(&e)).map(|e| sha256(&e)).unwrap_or_default(),
            value("phone").map(|p| normalise_phone(&p)).map(|p| sha256(&p)).unwrap_or_default(),
        ];
        row.iter().any(|h| !h.is_empty()).then_some(row)
    }
}

/// Trimmed and lower-cased; "" stays "" (no identifier).
pub fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Digits only, without leading zeros (the country code must be part of the number).
pub fn normalise_phone(phone: &str) -> String {
    phone.chars().filter(char::is_ascii_digit).collect::<String>().trim_start_matches('0').to_string()
}

/// Lower-case hex SHA-256; "" for an empty identifier.
fn sha256(text: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Destination for MetaAudience {
    fn kind(&self) -> &'static str {
        "meta_audience"
    }

    fn max_batch_size(&self) -> usize {
        MAX_BATCH
    }

    fn precheck(&self, record: &OutboxRecord) -> Result<(), String> {
        Self::hashed_row(record).map(|_| ()).ok_or_else(|| MetaError::NoIdentifier.to_string())
    }

    fn request_group(&self, record: &OutboxRecord) -> u8 {
        match (record.op, Self::added_row(record)) {
            (Op::Delete, _) => REMOVE,
            (_, Some(added)) if Some(&added) != Self::current_row(record).as_ref() => REPLACE,
            _ => ADD,
        }
    }

    fn check_fields_locally(&self, _key_columns: &[String], fields: &[String]) -> Result<(), String> {
        match fields.iter().find(|f| !FIELDS.contains(&f.as_str())) {
            Some(other) => Err(MetaError::UnknownField(format!("\"{other}\"")).to_string()),
            None => Ok(()),
        }
    }

    fn build_request(&self, _: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        let group = records.first().map_or(ADD, |r| self.request_group(r));
        let remove = group != ADD;
        let data: Vec<Vec<String>> = match group {
            REPLACE => records.iter().filter_map(Self::added_row).collect(),
            _ => records.iter().filter_map(Self::hashed_row).collect(),
        };
        let body = json!({"payload": {"schema": SCHEMA, "data": data}});
        let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        if let Some(token) = token {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        let method = if remove { reqwest::Method::DELETE } else { reqwest::Method::POST };
        Ok(HttpRequest { method, url: self.url.clone(), headers, body: body.to_string().into_bytes() })
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        if resp.status == 200 && json["error"].is_null() {
            // Rows Meta found invalid are named (by entry) in its samples.
            let invalid = json["invalid_entry_samples"].as_object().cloned().unwrap_or_default();
            if records.first().is_some_and(|r| self.request_group(r) == REPLACE) {
                // The old hashes are gone: now add the new ones (the request is sent at once).
                return ResponseOutcome::PerRecord(
                    records.iter().map(|r| RecordResult::Resolved(Self::current_row(r).unwrap_or_default().join(","))).collect(),
                );
            }
            return ResponseOutcome::PerRecord(
                records
                    .iter()
                    .map(|r| {
                        let row = Self::hashed_row(r).unwrap_or_default();
                        match row.iter().find_map(|h| invalid.get(h).map(|why| (h, why))) {
                            Some((_, why)) => RecordResult::Rejected {
                                status: Some(200),
                                message: format!("Meta: invalid entry: {}", why.as_str().unwrap_or("rejected")),
                            },
                            None if r.op == Op::Delete => RecordResult::Ack,
                            None => RecordResult::AckWithId(row.join(",")),
                        }
                    })
                    .collect(),
            );
        }
        let error = &json["error"];
        let code = error["code"].as_i64().unwrap_or_default();
        let message = format!(
            "Meta error {code}{}: {}",
            error["error_subcode"].as_i64().map(|s| format!("/{s}")).unwrap_or_default(),
            error["message"].as_str().unwrap_or("no message")
        );
        match code {
            190 => ResponseOutcome::Fatal {
                status: Some(resp.status),
                message: format!("Meta rejected the access token ({message}): check the token in the user mapping"),
            },
            c if RATE_LIMIT_CODES.contains(&c) => ResponseOutcome::Transient { status: Some(resp.status), retry_after: None, message },
            _ if error.is_null() => classify_failure(resp, EXCERPT).unwrap_or_else(|| {
                ResponseOutcome::PerRecord(vec![
                    RecordResult::Rejected { status: Some(resp.status), message: super::describe(resp, EXCERPT) };
                    records.len()
                ])
            }),
            _ if resp.status >= 500 => ResponseOutcome::Transient { status: Some(resp.status), retry_after: None, message },
            _ => ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(resp.status), message }; records.len()]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> MetaAudience {
        MetaAudience::new("http://graph", &MetaOptions { audience_id: "2385".into(), api_version: "21.0".into() })
    }

    fn rec(id: i64, op: Op, email: Option<&str>, phone: Option<&str>, known: Option<&str>) -> OutboxRecord {
        OutboxRecord {
            id,
            op,
            key: json!({"user_id": id}),
            fields: (op != Op::Delete).then(|| json!({"email": email, "phone": phone})),
            destination_id: known.map(str::to_string),
        }
    }

    fn ctx() -> BatchContext<'static> {
        BatchContext { sync_name: "s", run_id: 1, idempotency_key: "k".into() }
    }

    #[test]
    fn identifiers_are_normalised_and_hashed() {
        assert_eq!(normalise_email("  Ann.Lee@Example.COM "), "ann.lee@example.com");
        assert_eq!(normalise_phone("+1 (650) 555-0100"), "16505550100");
        assert_eq!(normalise_phone("0044 20 7946 0000"), "442079460000");
        // SHA-256 of "test@example.com".
        let row = MetaAudience::hashed_row(&rec(1, Op::Upsert, Some(" Test@Example.com"), None, None)).unwrap();
        assert_eq!(row, vec!["973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b".to_string(), String::new()]);
        let req = meta().build_request(&ctx(), &[rec(1, Op::Upsert, Some("test@example.com"), Some("+1 650 555 0100"), None)], Some("tok")).unwrap();
        assert_eq!((req.method.as_str(), req.url.as_str()), ("POST", "http://graph/v21.0/2385/users"));
        let body = String::from_utf8(req.body).unwrap();
        assert!(!body.contains("example.com") && !body.contains("650"), "no raw PII: {body}");
        assert_eq!(meta().precheck(&rec(2, Op::Upsert, Some(" "), Some("n/a"), None)).unwrap_err(), "the row has no email or phone to match a Meta user by (after normalising)");
    }

    #[test]
    fn removals_send_the_hashes_that_were_added() {
        let m = meta();
        let answer = HttpResponse { status: 200, headers: vec![], body: br#"{"num_received":1,"num_invalid_entries":0}"#.to_vec() };
        let added = [rec(1, Op::Upsert, Some("a@x.io"), None, None)];
        let ResponseOutcome::PerRecord(results) = m.classify(&added, &answer) else { panic!() };
        let RecordResult::AckWithId(known) = &results[0] else { panic!("{results:?}") };
        let gone = rec(1, Op::Delete, None, None, Some(known));
        assert_eq!(m.request_group(&gone), REMOVE);
        let req = m.build_request(&ctx(), &[gone], None).unwrap();
        assert_eq!(req.method.as_str(), "DELETE");
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["payload"]["data"][0][0].as_str(), known.split(',').next());
    }

    #[test]
    fn a_changed_identifier_is_removed_then_added() {
        let m = meta();
        let old = MetaAudience::current_row(&rec(1, Op::Upsert, Some("a@x.io"), None, None)).unwrap().join(",");
        let changed = rec(1, Op::Upsert, Some("b@x.io"), None, Some(&old));
        assert_eq!(m.request_group(&changed), REPLACE);
        let req = m.build_request(&ctx(), std::slice::from_ref(&changed), None).unwrap();
        assert_eq!(req.method.as_str(), "DELETE");
        assert_eq!(serde_json::from_slice::<Value>(&req.body).unwrap()["payload"]["data"][0][0].as_str(), old.split(',').next());
        let ok = HttpResponse { status: 200, headers: vec![], body: br#"{"num_received":1}"#.to_vec() };
        let new = MetaAudience::current_row(&changed).unwrap().join(",");
        assert_eq!(m.classify(std::slice::from_ref(&changed), &ok), ResponseOutcome::PerRecord(vec![RecordResult::Resolved(new.clone())]));
        // Sent again with the new hashes as its destination id: an add.
        let resolved = OutboxRecord { destination_id: Some(new), ..changed };
        assert_eq!(m.request_group(&resolved), ADD);
        let unchanged = rec(2, Op::Upsert, Some("a@x.io"), None, Some(&old));
        assert_eq!(m.request_group(&unchanged), ADD);
    }

    #[test]
    fn errors() {
        let m = meta();
        let one = [rec(1, Op::Upsert, Some("a@x.io"), None, None)];
        let answer = |status, body: Value| HttpResponse { status, headers: vec![], body: body.to_string().into_bytes() };
        assert!(matches!(m.classify(&one, &answer(400, json!({"error": {"code": 80003, "message": "too many calls"}}))), ResponseOutcome::Transient { .. }));
        assert!(matches!(m.classify(&one, &answer(401, json!({"error": {"code": 190, "message": "Error validating access token"}}))), ResponseOutcome::Fatal { .. }));
        assert_eq!(
            m.classify(&one, &answer(400, json!({"error": {"code": 100, "message": "(#100) Invalid parameter"}}))),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(400), message: "Meta error 100: (#100) Invalid parameter".into() }])
        );
        assert_eq!(m.check_fields_locally(&[], &["email".into(), "name".into()]).unwrap_err(), "Meta custom audiences match users by the fields email and phone only; not by \"name\"");
    }
}
