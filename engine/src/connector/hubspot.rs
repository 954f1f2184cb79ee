//! HubSpot CRM v3 (`type 'hubspot'`): contacts, companies and custom objects. Inserts and
//! updates go to `batch/upsert` matched by a unique property (`id_property`), at most 100
//! inputs; mirror deletes go to `batch/archive` by HubSpot record id, which the identity map
//! learned from earlier upserts. A 207 multi-status answer refuses single records; each input
//! carries its outbox id as `objectWriteTraceId`, so results and errors are matched to records
//! exactly, whatever order HubSpot answers in. A delete of a key whose HubSpot id is unknown
//! (a delete sync, or a key delivered before the identity map existed) first looks the id up
//! with `batch/read` by the same unique property.

use super::{
    ApiUsage, classify_failure, describe, quoted_list, BatchContext, Destination, FieldProblem, HttpRequest, HttpResponse, RecordResult,
    ResponseOutcome,
};
use crate::options::HubSpotOptions;
use crate::record::{Op, OutboxRecord};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::Duration;

/// HubSpot's batch endpoints take at most 100 inputs.
const MAX_BATCH: usize = 100;
const EXCERPT: usize = 300;
const UPSERT: u8 = 0;
const ARCHIVE: u8 = 1;
/// Deletes whose HubSpot id must be looked up first.
const LOOKUP: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HubSpotError {
    #[error("the record has no value for \"{0}\", the property HubSpot matches records by (the server's id_property): map a column of that name")]
    MissingIdValue(String),
    #[error("no HubSpot record id is known for this key and it has no \"{0}\" value to look it up by: make the model's key that property")]
    UnknownRecordId(String),
}

pub struct HubSpot {
    base: String,
    properties: String,
    opts: HubSpotOptions,
}

impl HubSpot {
    pub fn new(url: &str, opts: &HubSpotOptions) -> Self {
        HubSpot {
            base: format!("{url}/crm/v3/objects/{}", opts.object),
            properties: format!("{url}/crm/v3/properties/{}", opts.object),
            opts: opts.clone(),
        }
    }

    /// The value HubSpot matches the record by: the `id_property` column (in the fields or the
    /// key), else a one-column key.
    fn id_value(&self, record: &OutboxRecord) -> Option<String> {
        let property = &self.opts.id_property;
        let from_fields = record.fields.as_ref().and_then(|f| f.get(property)).filter(|v| !v.is_null());
        let from_key = match record.key.as_object() {
            Some(key) if key.contains_key(property) => key.get(property),
            Some(key) if key.len() == 1 => key.values().next(),
            _ => None,
        };
        from_fields.or(from_key.filter(|v| !v.is_null())).map(property_value).filter(|v| !v.is_empty())
    }

    fn lookup_body(&self, records: &[OutboxRecord]) -> Value {
        let inputs: Vec<Value> = records.iter().map(|r| json!({ "id": self.id_value(r).unwrap_or_default() })).collect();
        json!({
            "idProperty": self.opts.id_property,
            "inputs": inputs,
            "properties": [self.opts.id_property],
            "propertiesWithHistory": [],
        })
    }

    /// The ids `batch/read` found; keys it did not find have nothing to archive.
    fn lookup_results(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        let mut found: HashMap<String, String> = HashMap::new();
        for result in json["results"].as_array().into_iter().flatten() {
            if let (Some(value), Some(id)) = (result["properties"][&self.opts.id_property].as_str(), result["id"].as_str()) {
                found.insert(value.to_lowercase(), id.to_string());
            }
        }
        let missing: Vec<String> = json["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["category"] == "OBJECT_NOT_FOUND")
            .flat_map(|e| e["context"]["ids"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(str::to_lowercase))
            .collect();
        ResponseOutcome::PerRecord(
            records
                .iter()
                .map(|r| {
                    let value = self.id_value(r).unwrap_or_default().to_lowercase();
                    match found.get(&value) {
                        Some(id) => RecordResult::Resolved(id.clone()),
                        None if missing.contains(&value) => RecordResult::Ack,
                        None => RecordResult::Retry { message: format!("HubSpot's lookup (HTTP {}) did not mention this record", resp.status) },
                    }
                })
                .collect(),
        )
    }

    fn upsert_body(&self, records: &[OutboxRecord]) -> Value {
        let inputs: Vec<Value> = records
            .iter()
            .map(|record| {
                let properties: Map<String, Value> = record
                    .fields
                    .as_ref()
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    // The match property is set through `id`.
                    .filter(|(name, _)| **name != self.opts.id_property)
                    .map(|(name, value)| (name.clone(), Value::String(property_value(value))))
                    .collect();
                json!({
                    "id": self.id_value(record).unwrap_or_default(),
                    "idProperty": self.opts.id_property,
                    "objectWriteTraceId": record.id.to_string(),
                    "properties": properties,
                })
            })
            .collect();
        json!({ "inputs": inputs })
    }

    fn batch_results(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let Ok(json) = serde_json::from_slice::<Value>(&resp.body) else {
            return ResponseOutcome::Transient {
                status: Some(resp.status),
                retry_after: None,
                message: format!("malformed HubSpot response: {}", describe(resp, EXCERPT)),
            };
        };
        // Records by trace id, and by match value for answers without one.
        let by_trace: HashMap<String, usize> = records.iter().enumerate().map(|(i, r)| (r.id.to_string(), i)).collect();
        let by_value: HashMap<String, usize> =
            records.iter().enumerate().filter_map(|(i, r)| Some((self.id_value(r)?, i))).collect();
        let find = |trace: Option<&str>, value: Option<&str>| {
            trace.and_then(|t| by_trace.get(t)).or_else(|| value.and_then(|v| by_value.get(v))).copied()
        };
        let mut outcome: Vec<Option<RecordResult>> = vec![None; records.len()];
        for result in json["results"].as_array().into_iter().flatten() {
            let value = result["properties"][&self.opts.id_property].as_str();
            if let Some(i) = find(result["objectWriteTraceId"].as_str(), value) {
                outcome[i] = Some(match result["id"].as_str() {
                    Some(id) if !id.is_empty() => RecordResult::AckWithId(id.to_string()),
                    _ => RecordResult::Ack,
                });
            }
        }
        for error in json["errors"].as_array().into_iter().flatten() {
            let context = &error["context"];
            let traces = context["objectWriteTraceId"].as_array().into_iter().flatten().filter_map(Value::as_str);
            let values = context["id"].as_array().into_iter().flatten().filter_map(Value::as_str);
            let hits: Vec<usize> =
                traces.filter_map(|t| find(Some(t), None)).chain(values.filter_map(|v| find(None, Some(v)))).collect();
            for i in hits {
                outcome[i] = Some(RecordResult::Rejected { status: Some(resp.status), message: error_text(error) });
            }
        }
        ResponseOutcome::PerRecord(
            outcome
                .into_iter()
                .map(|o| {
                    o.unwrap_or_else(|| RecordResult::Retry {
                        message: format!("HubSpot's answer (HTTP {}) did not mention this record", resp.status),
                    })
                })
                .collect(),
        )
    }
}

/// HubSpot property values are strings: numbers and booleans in their JSON spelling, null as
/// "" (which clears the property), objects and arrays as JSON text.
fn property_value(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// "VALIDATION_ERROR: Email address foo is invalid (INVALID_EMAIL)".
fn error_text(error: &Value) -> String {
    let category = error["category"].as_str().unwrap_or("ERROR");
    let message = error["message"].as_str().unwrap_or("no message");
    let codes: Vec<&str> = error["errors"].as_array().into_iter().flatten().filter_map(|d| d["code"].as_str()).collect();
    if codes.is_empty() {
        format!("{category}: {message}")
    } else {
        format!("{category}: {message} ({})", codes.join(", "))
    }
}

impl Destination for HubSpot {
    fn kind(&self) -> &'static str {
        "hubspot"
    }

    fn max_batch_size(&self) -> usize {
        MAX_BATCH
    }

    fn precheck(&self, record: &OutboxRecord) -> Result<(), String> {
        match record.op {
            Op::Delete if record.destination_id.is_none() && self.id_value(record).is_none() => {
                Err(HubSpotError::UnknownRecordId(self.opts.id_property.clone()).to_string())
            }
            Op::Delete => Ok(()),
            _ if self.id_value(record).is_none() => Err(HubSpotError::MissingIdValue(self.opts.id_property.clone()).to_string()),
            _ => Ok(()),
        }
    }

    fn request_group(&self, record: &OutboxRecord) -> u8 {
        match (record.op, &record.destination_id) {
            (Op::Delete, Some(_)) => ARCHIVE,
            (Op::Delete, None) => LOOKUP,
            _ => UPSERT,
        }
    }

    fn build_request(&self, _: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        let group = records.first().map_or(UPSERT, |r| self.request_group(r));
        let (endpoint, body) = match group {
            ARCHIVE => {
                let inputs: Vec<Value> = records.iter().map(|r| json!({ "id": r.destination_id })).collect();
                ("archive", json!({ "inputs": inputs }))
            }
            LOOKUP => ("read", self.lookup_body(records)),
            _ => ("upsert", self.upsert_body(records)),
        };
        let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        if let Some(token) = token {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        Ok(HttpRequest {
            method: reqwest::Method::POST,
            url: format!("{}/batch/{endpoint}", self.base),
            headers,
            body: body.to_string().into_bytes(),
        })
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        match resp.status {
            204 => ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]),
            200 | 207 if records.first().is_some_and(|r| self.request_group(r) == LOOKUP) => self.lookup_results(records, resp),
            200 | 201 | 207 => self.batch_results(records, resp),
            // Any 401 may be an expired OAuth token (HubSpot says EXPIRED_AUTHENTICATION, but not
            // always): worth one refresh when there is a way to refresh.
            401 => ResponseOutcome::Expired {
                message: format!(
                    "HubSpot rejected the access token (HTTP 401 {}): check the token in the user mapping",
                    json["category"].as_str().unwrap_or("UNAUTHORIZED")
                ),
            },
            404 if json["category"] == "OBJECT_NOT_FOUND" => ResponseOutcome::Fatal {
                status: Some(404),
                message: format!("HubSpot has no object type \"{}\": check the server's object option", self.opts.object),
            },
            429 => {
                let mut outcome = classify_failure(resp, EXCERPT).expect("429 is classified");
                // The rolling window empties within 10 s; HubSpot sends no Retry-After, so wait at
                // least a second rather than hammering it with the shortest backoff.
                if let ResponseOutcome::Transient { retry_after: retry_after @ None, .. } = &mut outcome {
                    *retry_after = Some(Duration::from_secs(1));
                }
                outcome
            }
            status => classify_failure(resp, EXCERPT).unwrap_or_else(|| {
                // A whole-request refusal (e.g. an unknown or read-only property): every record
                // gets HubSpot's reason.
                let message = if json["message"].is_string() { error_text(&json) } else { describe(resp, EXCERPT) };
                ResponseOutcome::PerRecord(vec![
                    RecordResult::Rejected { status: Some(status), message: format!("HTTP {status}: {message}") };
                    records.len()
                ])
            }),
        }
    }

    fn describe_request(&self, token: Option<&str>) -> Option<HttpRequest> {
        let mut headers = vec![("Accept".to_string(), "application/json".to_string())];
        if let Some(token) = token {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        Some(HttpRequest { method: reqwest::Method::GET, url: self.properties.clone(), headers, body: Vec::new() })
    }

    fn check_fields(&self, resp: &HttpResponse, fields: &[String]) -> Result<(), FieldProblem> {
        let object = &self.opts.object;
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        if resp.status == 404 {
            return Err(FieldProblem::Refused(format!("HubSpot has no object type \"{object}\": check the server's object option")));
        }
        let Some(properties) = json["results"].as_array().filter(|_| resp.status == 200) else {
            return Err(FieldProblem::Unavailable(format!("HubSpot properties of {object}: {}", describe(resp, EXCERPT))));
        };
        let read_only: HashMap<&str, bool> = properties
            .iter()
            .filter_map(|p| Some((p["name"].as_str()?, p["modificationMetadata"]["readOnlyValue"] == true)))
            .collect();
        let wanted = fields.iter().map(String::as_str).chain([self.opts.id_property.as_str()]);
        let unknown: Vec<&str> = wanted.clone().filter(|f| !read_only.contains_key(f)).collect();
        let locked: Vec<&str> = wanted.filter(|f| read_only.get(f) == Some(&true)).collect();
        let mut problems = Vec::new();
        if !unknown.is_empty() {
            problems.push(format!("HubSpot {object} have no property {}", quoted_list(&unknown)));
        }
        if !locked.is_empty() {
            problems.push(format!("HubSpot {object} property {} cannot be written (read-only)", quoted_list(&locked)));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FieldProblem::Refused(problems.join("; ")))
        }
    }

    fn usage(&self, resp: &HttpResponse) -> Option<ApiUsage> {
        let max: u64 = resp.header("X-HubSpot-RateLimit-Daily")?.trim().parse().ok()?;
        let left: u64 = resp.header("X-HubSpot-RateLimit-Daily-Remaining")?.trim().parse().ok()?;
        let spent = max.saturating_sub(left);
        Some(ApiUsage { order: (0, spent), shown: format!("daily {spent}/{max}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubspot() -> HubSpot {
        HubSpot::new("http://hs", &HubSpotOptions { object: "contacts".into(), id_property: "email".into() })
    }

    fn rec(id: i64, op: Op, email: Option<&str>, destination_id: Option<&str>) -> OutboxRecord {
        OutboxRecord {
            id,
            op,
            key: json!({"user_id": id}),
            fields: (op != Op::Delete).then(|| json!({"email": email, "firstname": "Ann", "health_score": 0.5, "vip": true, "note": null})),
            destination_id: destination_id.map(str::to_string),
        }
    }

    fn ctx() -> BatchContext<'static> {
        BatchContext { sync_name: "s", run_id: 1, idempotency_key: "k".into() }
    }

    fn resp(status: u16, body: Value) -> HttpResponse {
        HttpResponse { status, headers: vec![], body: body.to_string().into_bytes() }
    }

    #[test]
    fn upserts_carry_string_properties_and_trace_ids() {
        let req = hubspot().build_request(&ctx(), &[rec(7, Op::Upsert, Some("a@x.io"), None)], Some("tok")).unwrap();
        assert_eq!(req.url, "http://hs/crm/v3/objects/contacts/batch/upsert");
        assert!(req.headers.contains(&("Authorization".into(), "Bearer tok".into())));
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            body,
            json!({"inputs": [{"id": "a@x.io", "idProperty": "email", "objectWriteTraceId": "7",
                   "properties": {"firstname": "Ann", "health_score": "0.5", "vip": "true", "note": ""}}]})
        );
    }

    #[test]
    fn deletes_archive_by_known_id_and_are_grouped_apart() {
        let h = hubspot();
        let del = rec(8, Op::Delete, None, Some("1001"));
        assert_eq!(h.request_group(&del), ARCHIVE);
        assert_eq!(h.request_group(&rec(1, Op::Update, Some("a@x.io"), None)), UPSERT);
        let req = h.build_request(&ctx(), &[del], None).unwrap();
        assert_eq!(req.url, "http://hs/crm/v3/objects/contacts/batch/archive");
        assert_eq!(serde_json::from_slice::<Value>(&req.body).unwrap(), json!({"inputs": [{"id": "1001"}]}));
        let mut composite = rec(9, Op::Delete, None, None);
        composite.key = json!({"a": 1, "b": 2});
        assert_eq!(
            h.precheck(&composite).unwrap_err(),
            "no HubSpot record id is known for this key and it has no \"email\" value to look it up by: make the \
             model's key that property"
        );
        let mut no_email = rec(10, Op::Upsert, None, None);
        no_email.key = json!({"a": 1, "b": 2});
        assert!(h.precheck(&no_email).unwrap_err().starts_with("the record has no value for \"email\""));
    }

    #[test]
    fn deletes_of_unknown_ids_are_looked_up_by_the_unique_property() {
        let h = hubspot();
        let mut del = rec(3, Op::Delete, None, None);
        del.key = json!({"email": "A@x.io"});
        let mut gone = rec(4, Op::Delete, None, None);
        gone.key = json!({"email": "b@x.io"});
        assert_eq!(h.request_group(&del), LOOKUP);
        let req = h.build_request(&ctx(), &[del.clone(), gone.clone()], None).unwrap();
        assert_eq!(req.url, "http://hs/crm/v3/objects/contacts/batch/read");
        assert_eq!(
            serde_json::from_slice::<Value>(&req.body).unwrap(),
            json!({"idProperty": "email", "inputs": [{"id": "A@x.io"}, {"id": "b@x.io"}], "properties": ["email"], "propertiesWithHistory": []})
        );
        let answer = resp(
            207,
            json!({"results": [{"id": "1001", "properties": {"email": "a@x.io"}}],
                   "errors": [{"category": "OBJECT_NOT_FOUND", "context": {"ids": ["b@x.io"]}}]}),
        );
        assert_eq!(
            h.classify(&[del, gone], &answer),
            ResponseOutcome::PerRecord(vec![RecordResult::Resolved("1001".into()), RecordResult::Ack])
        );
    }

    #[test]
    fn multi_status_is_matched_by_trace_id() {
        let records = [rec(1, Op::Upsert, Some("a@x.io"), None), rec(2, Op::Upsert, Some("bad"), None), rec(3, Op::Upsert, Some("c@x.io"), None)];
        let answer = resp(
            207,
            json!({"status": "COMPLETE", "numErrors": 1,
                "results": [{"id": "1003", "objectWriteTraceId": "3", "properties": {"email": "c@x.io"}},
                            {"id": "1001", "properties": {"email": "a@x.io"}}],
                "errors": [{"status": "error", "category": "VALIDATION_ERROR", "message": "Email address bad is invalid",
                            "context": {"objectWriteTraceId": ["2"]}, "errors": [{"code": "INVALID_EMAIL", "message": "x"}]}]}),
        );
        assert_eq!(
            hubspot().classify(&records, &answer),
            ResponseOutcome::PerRecord(vec![
                RecordResult::AckWithId("1001".into()),
                RecordResult::Rejected {
                    status: Some(207),
                    message: "VALIDATION_ERROR: Email address bad is invalid (INVALID_EMAIL)".into()
                },
                RecordResult::AckWithId("1003".into()),
            ])
        );
    }

    #[test]
    fn fields_are_checked_against_properties() {
        let answer = resp(
            200,
            json!({"results": [{"name": "email", "modificationMetadata": {"readOnlyValue": false}},
                               {"name": "firstname", "modificationMetadata": {"readOnlyValue": false}},
                               {"name": "hs_object_id", "modificationMetadata": {"readOnlyValue": true}}]}),
        );
        let h = hubspot();
        assert_eq!(h.describe_request(None).unwrap().url, "http://hs/crm/v3/properties/contacts");
        assert_eq!(h.check_fields(&answer, &["firstname".into()]), Ok(()));
        assert_eq!(
            h.check_fields(&answer, &["firstname".into(), "user_id".into(), "score".into(), "hs_object_id".into()]),
            Err(FieldProblem::Refused(
                "HubSpot contacts have no property \"user_id\" and \"score\"; HubSpot contacts property \"hs_object_id\" \
                 cannot be written (read-only)"
                    .into()
            ))
        );
        assert!(matches!(h.check_fields(&resp(404, json!({})), &[]), Err(FieldProblem::Refused(_))));
        assert!(matches!(h.check_fields(&resp(500, json!({})), &[]), Err(FieldProblem::Unavailable(_))));
    }

    #[test]
    fn statuses() {
        let records = [rec(1, Op::Upsert, Some("a@x.io"), None)];
        let h = hubspot();
        assert!(matches!(h.classify(&records, &resp(401, json!({"category": "EXPIRED_AUTHENTICATION"}))), ResponseOutcome::Expired { .. }));
        assert_eq!(
            h.classify(&records, &resp(429, json!({"policyName": "TEN_SECONDLY_ROLLING"}))),
            ResponseOutcome::Transient {
                status: Some(429),
                retry_after: Some(Duration::from_secs(1)),
                message: "HTTP 429: {\"policyName\":\"TEN_SECONDLY_ROLLING\"}".into()
            }
        );
        assert_eq!(
            h.classify(&records, &resp(400, json!({"category": "VALIDATION_ERROR", "message": "Property \"xyz\" does not exist"}))),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected {
                status: Some(400),
                message: "HTTP 400: VALIDATION_ERROR: Property \"xyz\" does not exist".into()
            }])
        );
        assert_eq!(h.classify(&records, &resp(204, Value::Null)), ResponseOutcome::PerRecord(vec![RecordResult::Ack]));
        assert!(matches!(
            h.classify(&records, &resp(200, json!({"results": []}))),
            ResponseOutcome::PerRecord(ref r) if matches!(r[0], RecordResult::Retry { .. })
        ));
    }
}
