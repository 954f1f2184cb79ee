//! Salesforce (`type 'salesforce'`): any standard or custom sObject through sObject
//! Collections, at most 200 records per request with `allOrNone` false, so one bad record
//! never holds back the others. With `external_id`, inserts and updates are upserts by that
//! field; without it, records are created and later updated by the Id Salesforce assigned
//! (kept in the identity map) or by an `Id` column of the model. Deletes go through the
//! collections delete by Id, or, for a key whose Id was never learned (a delete sync), one by
//! one by external id. Large runs use Bulk API 2.0 (see `bulk`).

pub mod bulk;

use super::{
    ApiUsage, classify_failure, describe, quoted_list, BatchContext, Destination, FieldProblem, HttpRequest, HttpResponse, RecordResult,
    ResponseOutcome,
};
use std::collections::HashMap;
use crate::options::SalesforceOptions;
use crate::record::{Op, OutboxRecord};
use serde_json::{json, Map, Value};

/// The sObject Collections limit.
const MAX_BATCH: usize = 200;
const EXCERPT: usize = 300;
const UPSERT: u8 = 0;
const UPDATE: u8 = 1;
const CREATE: u8 = 2;
const DELETE: u8 = 3;
/// Deletes of keys without a known Id: one request each, by external id.
const DELETE_BY_EXTERNAL_ID: u8 = 4;
/// Per-record failures that say "try again", not "this record is wrong".
const TRANSIENT_CODES: [&str; 4] =
    ["UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE", "REQUEST_RUNNING_TOO_LONG", "ALL_OR_NONE_OPERATION_ROLLED_BACK"];
/// A delete of a record that is already gone has done its job.
const ALREADY_GONE: [&str; 2] = ["ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SalesforceError {
    #[error("the record has no value for \"{0}\", the external-id field Salesforce upserts by: map a column of that name")]
    MissingExternalId(String),
    #[error("no Salesforce Id is known for this key and the server has no external_id to delete it by: set external_id, or make the model's key the Id")]
    UnknownRecordId,
}

pub struct Salesforce {
    /// `{url}/services/data/vXX.X`
    api: String,
    opts: SalesforceOptions,
}

impl Salesforce {
    pub fn new(url: &str, opts: &SalesforceOptions) -> Self {
        Salesforce { api: format!("{url}/services/data/v{}", opts.api_version), opts: opts.clone() }
    }

    pub fn options(&self) -> &SalesforceOptions {
        &self.opts
    }

    pub fn api_base(&self) -> &str {
        &self.api
    }

    fn external_value<'a>(&self, record: &'a OutboxRecord) -> Option<&'a Value> {
        let field = self.opts.external_id.as_deref()?;
        record
            .fields
            .as_ref()
            .and_then(|f| f.get(field))
            .or_else(|| record.key.get(field))
            .or_else(|| single_key(record))
            .filter(|v| !v.is_null())
    }

    /// `.../sobjects/{object}/{external_id}/{value}`, the value escaped as one path segment.
    fn by_external_id_url(&self, record: &OutboxRecord) -> Result<String, String> {
        let field = self.opts.external_id.as_deref().unwrap_or_default();
        let value = match self.external_value(record) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => return Err(SalesforceError::MissingExternalId(field.to_string()).to_string()),
        };
        let mut url = url::Url::parse(&self.api).map_err(|e| e.to_string())?;
        url.path_segments_mut()
            .map_err(|()| "the server's url cannot take a path".to_string())?
            .extend(["sobjects", self.opts.object.as_str(), field, value.as_str()]);
        Ok(url.to_string())
    }

    /// The record's Salesforce Id: the one Salesforce gave it, or an `Id` column/key.
    fn record_id(&self, record: &OutboxRecord) -> Option<String> {
        if let Some(id) = &record.destination_id {
            return Some(id.clone());
        }
        let from_fields = record.fields.as_ref().and_then(|f| f.get("Id"));
        let from_key = record.key.as_object().filter(|k| k.len() == 1).and_then(|k| k.get("Id"));
        from_fields.or(from_key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string)
    }

    /// The record as an sObject: `attributes`, the model's fields (Id is never a writable field).
    fn sobject(&self, record: &OutboxRecord, id: Option<String>) -> Value {
        let mut object = Map::new();
        object.insert("attributes".into(), json!({ "type": self.opts.object }));
        if let Some(id) = id {
            object.insert("id".into(), Value::String(id));
        }
        for (name, value) in record.fields.as_ref().and_then(Value::as_object).into_iter().flatten() {
            if name != "Id" {
                object.insert(name.clone(), value.clone());
            }
        }
        if let (Some(field), Some(value)) = (self.opts.external_id.as_deref(), self.external_value(record)) {
            object.insert(field.to_string(), value.clone());
        }
        Value::Object(object)
    }
}

fn single_key(record: &OutboxRecord) -> Option<&Value> {
    record.key.as_object().filter(|k| k.len() == 1).and_then(|k| k.values().next())
}

/// "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)".
fn error_text(error: &Value) -> String {
    let code = error["statusCode"].as_str().or(error["errorCode"].as_str()).unwrap_or("ERROR");
    let message = error["message"].as_str().unwrap_or("no message");
    let fields: Vec<&str> = error["fields"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if fields.is_empty() {
        format!("{code}: {message}")
    } else {
        format!("{code}: {message} (fields: {})", fields.join(", "))
    }
}

/// The first error of a Salesforce error array (`[{"errorCode", "message"}]`).
fn first_error(body: &[u8]) -> Option<Value> {
    let json: Value = serde_json::from_slice(body).ok()?;
    json.as_array().and_then(|a| a.first()).cloned()
}

impl Destination for Salesforce {
    fn kind(&self) -> &'static str {
        "salesforce"
    }

    fn max_batch_size(&self) -> usize {
        MAX_BATCH
    }

    fn precheck(&self, record: &OutboxRecord) -> Result<(), String> {
        match (record.op, self.opts.external_id.as_deref()) {
            (Op::Delete, _) if self.record_id(record).is_none() && self.external_value(record).is_none() => {
                Err(SalesforceError::UnknownRecordId.to_string())
            }
            (Op::Delete, _) => Ok(()),
            (_, Some(field)) if self.external_value(record).is_none() => {
                Err(SalesforceError::MissingExternalId(field.to_string()).to_string())
            }
            _ => Ok(()),
        }
    }

    fn request_group(&self, record: &OutboxRecord) -> u8 {
        match (record.op, &self.opts.external_id) {
            (Op::Delete, _) if self.record_id(record).is_some() => DELETE,
            (Op::Delete, _) => DELETE_BY_EXTERNAL_ID,
            (_, Some(_)) => UPSERT,
            _ if self.record_id(record).is_some() => UPDATE,
            _ => CREATE,
        }
    }

    fn build_request(&self, _: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        let group = records.first().map_or(UPSERT, |r| self.request_group(r));
        let collection = format!("{}/composite/sobjects", self.api);
        let body = |with_id: bool| {
            let records: Vec<Value> =
                records.iter().map(|r| self.sobject(r, if with_id { self.record_id(r) } else { None })).collect();
            json!({ "allOrNone": false, "records": records }).to_string().into_bytes()
        };
        let (method, url, body) = match (group, self.opts.external_id.as_deref()) {
            (DELETE_BY_EXTERNAL_ID, _) => {
                let record = records.first().ok_or("no record")?;
                (reqwest::Method::DELETE, self.by_external_id_url(record)?, Vec::new())
            }
            (DELETE, _) => {
                let ids: Vec<String> = records.iter().filter_map(|r| self.record_id(r)).collect();
                (reqwest::Method::DELETE, format!("{collection}?ids={}&allOrNone=false", ids.join(",")), Vec::new())
            }
            (UPSERT, Some(field)) => (reqwest::Method::PATCH, format!("{collection}/{}/{field}", self.opts.object), body(false)),
            (UPDATE, _) => (reqwest::Method::PATCH, collection, body(true)),
            _ => (reqwest::Method::POST, collection, body(false)),
        };
        let mut headers = vec![("Accept".to_string(), "application/json".to_string())];
        if !body.is_empty() {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        if let Some(token) = token {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        Ok(HttpRequest { method, url, headers, body })
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let error = first_error(&resp.body).unwrap_or_default();
        let code = error["errorCode"].as_str().unwrap_or_default();
        if records.first().is_some_and(|r| self.request_group(r) == DELETE_BY_EXTERNAL_ID) {
            match resp.status {
                // Deleted now, or no such record (any more): either way it is gone.
                204 => return ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]),
                404 if error["message"] == "The requested resource does not exist" => {
                    return ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()])
                }
                300 => {
                    return ResponseOutcome::PerRecord(vec![
                        RecordResult::Rejected {
                            status: Some(300),
                            message: "several Salesforce records have this external id; delete them in Salesforce".into()
                        };
                        records.len()
                    ])
                }
                _ => {}
            }
        }
        match resp.status {
            200 => {
                let Some(items) = serde_json::from_slice::<Value>(&resp.body).ok().and_then(|v| v.as_array().cloned()) else {
                    return ResponseOutcome::Transient {
                        status: Some(200),
                        retry_after: None,
                        message: format!("malformed Salesforce response: {}", describe(resp, EXCERPT)),
                    };
                };
                if items.len() != records.len() {
                    return ResponseOutcome::Transient {
                        status: Some(200),
                        retry_after: None,
                        message: format!("Salesforce answered {} results for {} records", items.len(), records.len()),
                    };
                }
                let results = records.iter().zip(&items).map(|(record, item)| {
                    if item["success"] == true {
                        return match item["id"].as_str() {
                            Some(id) if record.op != Op::Delete => RecordResult::AckWithId(id.to_string()),
                            _ => RecordResult::Ack,
                        };
                    }
                    let errors: Vec<&Value> = item["errors"].as_array().into_iter().flatten().collect();
                    let codes: Vec<&str> = errors.iter().filter_map(|e| e["statusCode"].as_str()).collect();
                    let message = errors.iter().map(|e| error_text(e)).collect::<Vec<_>>().join("; ");
                    if record.op == Op::Delete && codes.iter().all(|c| ALREADY_GONE.contains(c)) && !codes.is_empty() {
                        RecordResult::Ack
                    } else if codes.iter().any(|c| TRANSIENT_CODES.contains(c)) {
                        RecordResult::Retry { message }
                    } else {
                        RecordResult::Rejected { status: None, message }
                    }
                });
                ResponseOutcome::PerRecord(results.collect())
            }
            401 => ResponseOutcome::Expired {
                message: format!("Salesforce rejected the session (HTTP 401 {}): check the token in the user mapping", error_text(&error)),
            },
            403 if code == "REQUEST_LIMIT_EXCEEDED" => ResponseOutcome::Fatal {
                status: Some(403),
                message: format!(
                    "Salesforce API request limit reached ({}): the rows stay queued for a later run",
                    error_text(&error)
                ),
            },
            404 if code == "NOT_FOUND" => ResponseOutcome::Fatal {
                status: Some(404),
                message: format!(
                    "Salesforce has no sObject \"{}\" (or API version {}): check the server's object and api_version options",
                    self.opts.object, self.opts.api_version
                ),
            },
            status if (400..500).contains(&status) && status != 408 && status != 429 && !error.is_null() && status != 403 => {
                let message = format!("HTTP {status} {}", error_text(&error));
                ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(status), message }; records.len()])
            }
            status => classify_failure(resp, EXCERPT).unwrap_or_else(|| ResponseOutcome::PerRecord(vec![
                RecordResult::Rejected { status: Some(status), message: describe(resp, EXCERPT) };
                records.len()
            ])),
        }
    }

    fn group_batch_size(&self, group: u8) -> usize {
        if group == DELETE_BY_EXTERNAL_ID {
            1
        } else {
            MAX_BATCH
        }
    }

    fn describe_request(&self, token: Option<&str>) -> Option<HttpRequest> {
        let mut headers = vec![("Accept".to_string(), "application/json".to_string())];
        if let Some(token) = token {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        let url = format!("{}/sobjects/{}/describe", self.api, self.opts.object);
        Some(HttpRequest { method: reqwest::Method::GET, url, headers, body: Vec::new() })
    }

    fn check_fields(&self, resp: &HttpResponse, fields: &[String]) -> Result<(), FieldProblem> {
        let object = &self.opts.object;
        if resp.status == 404 {
            return Err(FieldProblem::Refused(format!(
                "Salesforce has no sObject \"{object}\" (API version {}): check the server's object option",
                self.opts.api_version
            )));
        }
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        let Some(described) = json["fields"].as_array().filter(|_| resp.status == 200) else {
            return Err(FieldProblem::Unavailable(format!("Salesforce describe of {object}: {}", describe(resp, EXCERPT))));
        };
        // Field API names are case-insensitive.
        let by_name: HashMap<String, &Value> =
            described.iter().filter_map(|f| Some((f["name"].as_str()?.to_ascii_lowercase(), f))).collect();
        let writable = |f: &Value| f["createable"] == true || f["updateable"] == true;
        let wanted = fields.iter().map(String::as_str).filter(|f| !f.eq_ignore_ascii_case("Id"));
        let unknown: Vec<&str> = wanted.clone().filter(|f| !by_name.contains_key(&f.to_ascii_lowercase())).collect();
        let locked: Vec<&str> = wanted.filter(|f| by_name.get(&f.to_ascii_lowercase()).is_some_and(|d| !writable(d))).collect();
        let mut problems = Vec::new();
        if !unknown.is_empty() {
            problems.push(format!("Salesforce {object} has no field {}", quoted_list(&unknown)));
        }
        if !locked.is_empty() {
            problems.push(format!("Salesforce {object} field {} cannot be written (read-only)", quoted_list(&locked)));
        }
        if let Some(external_id) = &self.opts.external_id {
            match by_name.get(&external_id.to_ascii_lowercase()) {
                None => problems.push(format!("Salesforce {object} has no field \"{external_id}\" (the server's external_id)")),
                // Collections upsert only by external-id fields (not by Id, an idLookup field).
                Some(d) if d["externalId"] != true => {
                    problems.push(format!("Salesforce {object} field \"{external_id}\" is not an external id field"))
                }
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FieldProblem::Refused(problems.join("; ")))
        }
    }

    fn usage(&self, resp: &HttpResponse) -> Option<ApiUsage> {
        usage(resp)
    }
}

/// `Sforce-Limit-Info: api-usage=25/15000` -> "api-usage=25/15000", 25 spent.
pub fn usage(resp: &HttpResponse) -> Option<ApiUsage> {
    let part = resp.header("Sforce-Limit-Info")?.split(',').map(str::trim).find(|part| part.starts_with("api-usage="))?;
    let spent = part["api-usage=".len()..].split('/').next()?.trim().parse().ok()?;
    Some(ApiUsage { order: (0, spent), shown: part.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sf(external_id: Option<&str>) -> Salesforce {
        Salesforce::new(
            "https://acme.my.salesforce.com",
            &SalesforceOptions {
                object: "Contact".into(),
                external_id: external_id.map(str::to_string),
                api_version: "62.0".into(),
                bulk_threshold: None,
                bulk_poll: Duration::from_millis(10),
            },
        )
    }

    fn rec(id: i64, op: Op, fields: Option<Value>, destination_id: Option<&str>) -> OutboxRecord {
        OutboxRecord { id, op, key: json!({"External_Id__c": format!("k{id}")}), fields, destination_id: destination_id.map(str::to_string) }
    }

    fn ctx() -> BatchContext<'static> {
        BatchContext { sync_name: "s", run_id: 1, idempotency_key: "k".into() }
    }

    fn resp(status: u16, body: Value) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![("Sforce-Limit-Info".into(), "api-usage=25/15000".into())],
            body: body.to_string().into_bytes(),
        }
    }

    #[test]
    fn upsert_by_external_id() {
        let s = sf(Some("External_Id__c"));
        let r = rec(1, Op::Upsert, Some(json!({"External_Id__c": "k1", "LastName": "Lee", "Health_Score__c": 0.9})), None);
        let req = s.build_request(&ctx(), &[r], Some("tok")).unwrap();
        assert_eq!(req.method, reqwest::Method::PATCH);
        assert_eq!(req.url, "https://acme.my.salesforce.com/services/data/v62.0/composite/sobjects/Contact/External_Id__c");
        assert_eq!(
            serde_json::from_slice::<Value>(&req.body).unwrap(),
            json!({"allOrNone": false, "records": [{"attributes": {"type": "Contact"}, "External_Id__c": "k1", "LastName": "Lee", "Health_Score__c": 0.9}]})
        );
        // The key supplies the external id when the model does not map it as a field.
        let keyed = rec(2, Op::Upsert, Some(json!({"LastName": "Kim"})), None);
        assert_eq!(s.sobject(&keyed, None)["External_Id__c"], "k2");
        let mut nothing = rec(3, Op::Upsert, Some(json!({"LastName": "Kim"})), None);
        nothing.key = json!({"a": 1, "b": 2});
        assert_eq!(
            s.precheck(&nothing).unwrap_err(),
            "the record has no value for \"External_Id__c\", the external-id field Salesforce upserts by: map a column of that name"
        );
    }

    #[test]
    fn create_update_and_delete_by_id() {
        let s = sf(None);
        let new = rec(1, Op::Insert, Some(json!({"LastName": "Lee"})), None);
        let known = rec(2, Op::Update, Some(json!({"LastName": "Kim"})), Some("003A"));
        let gone = rec(3, Op::Delete, None, Some("003B"));
        assert_eq!((s.request_group(&new), s.request_group(&known), s.request_group(&gone)), (CREATE, UPDATE, DELETE));
        let create = s.build_request(&ctx(), &[new], None).unwrap();
        assert_eq!((create.method, create.url.as_str()), (reqwest::Method::POST, "https://acme.my.salesforce.com/services/data/v62.0/composite/sobjects"));
        let update = s.build_request(&ctx(), &[known], None).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&update.body).unwrap()["records"][0],
            json!({"attributes": {"type": "Contact"}, "id": "003A", "LastName": "Kim"})
        );
        let delete = s.build_request(&ctx(), &[gone], None).unwrap();
        assert_eq!(delete.method, reqwest::Method::DELETE);
        assert_eq!(delete.url, "https://acme.my.salesforce.com/services/data/v62.0/composite/sobjects?ids=003B&allOrNone=false");
        assert!(delete.body.is_empty());
        assert!(s.precheck(&rec(4, Op::Delete, None, None)).unwrap_err().starts_with("no Salesforce Id is known"));
        // With an external id, an unknown Id is no obstacle: the record is deleted by it.
        let by_ext = sf(Some("External_Id__c"));
        let mut unknown = rec(5, Op::Delete, None, None);
        unknown.key = json!({"External_Id__c": "k 5/x"});
        assert_eq!(by_ext.request_group(&unknown), DELETE_BY_EXTERNAL_ID);
        assert_eq!(by_ext.group_batch_size(DELETE_BY_EXTERNAL_ID), 1);
        let req = by_ext.build_request(&ctx(), &[unknown.clone()], None).unwrap();
        assert_eq!(
            (req.method, req.url.as_str()),
            (reqwest::Method::DELETE, "https://acme.my.salesforce.com/services/data/v62.0/sobjects/Contact/External_Id__c/k%205%2Fx")
        );
        let gone = HttpResponse { status: 404, headers: vec![], body: br#"[{"errorCode":"NOT_FOUND","message":"The requested resource does not exist"}]"#.to_vec() };
        assert_eq!(by_ext.classify(&[unknown], &gone), ResponseOutcome::PerRecord(vec![RecordResult::Ack]));
    }

    #[test]
    fn per_record_results() {
        let s = sf(Some("External_Id__c"));
        let records = [
            rec(1, Op::Upsert, Some(json!({"LastName": "Lee"})), None),
            rec(2, Op::Upsert, Some(json!({})), None),
            rec(3, Op::Delete, None, Some("003C")),
            rec(4, Op::Upsert, Some(json!({"LastName": "Kim"})), None),
        ];
        let answer = resp(
            200,
            json!([
                {"id": "003A", "success": true, "errors": [], "created": true},
                {"success": false, "errors": [{"statusCode": "REQUIRED_FIELD_MISSING", "message": "Required fields are missing: [LastName]", "fields": ["LastName"]}]},
                {"id": "003C", "success": false, "errors": [{"statusCode": "ENTITY_IS_DELETED", "message": "entity is deleted", "fields": []}]},
                {"success": false, "errors": [{"statusCode": "UNABLE_TO_LOCK_ROW", "message": "unable to obtain exclusive access", "fields": []}]}
            ]),
        );
        assert_eq!(
            s.classify(&records, &answer),
            ResponseOutcome::PerRecord(vec![
                RecordResult::AckWithId("003A".into()),
                RecordResult::Rejected {
                    status: None,
                    message: "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)".into()
                },
                RecordResult::Ack,
                RecordResult::Retry { message: "UNABLE_TO_LOCK_ROW: unable to obtain exclusive access".into() },
            ])
        );
        assert_eq!(s.usage(&answer), Some(ApiUsage { order: (0, 25), shown: "api-usage=25/15000".into() }));
    }

    #[test]
    fn fields_are_checked_against_describe() {
        let s = sf(Some("External_Id__c"));
        assert_eq!(s.describe_request(None).unwrap().url, "https://acme.my.salesforce.com/services/data/v62.0/sobjects/Contact/describe");
        let answer = resp(
            200,
            json!({"fields": [
                {"name": "Id", "createable": false, "updateable": false},
                {"name": "LastName", "createable": true, "updateable": true},
                {"name": "External_Id__c", "createable": true, "updateable": true, "externalId": true},
                {"name": "CreatedDate", "createable": false, "updateable": false}]}),
        );
        assert_eq!(s.check_fields(&answer, &["lastname".into(), "Id".into()]), Ok(()));
        assert_eq!(
            s.check_fields(&answer, &["LastName".into(), "Health_Score__c".into(), "CreatedDate".into()]),
            Err(FieldProblem::Refused(
                "Salesforce Contact has no field \"Health_Score__c\"; Salesforce Contact field \"CreatedDate\" cannot be \
                 written (read-only)"
                    .into()
            ))
        );
        let by_last_name = sf(Some("LastName"));
        assert_eq!(
            by_last_name.check_fields(&answer, &[]),
            Err(FieldProblem::Refused("Salesforce Contact field \"LastName\" is not an external id field".into()))
        );
    }

    #[test]
    fn whole_request_answers() {
        let s = sf(Some("External_Id__c"));
        let records = [rec(1, Op::Upsert, Some(json!({"Foo__c": 1})), None)];
        assert!(matches!(
            s.classify(&records, &resp(401, json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]))),
            ResponseOutcome::Expired { ref message } if message == "Salesforce rejected the session (HTTP 401 INVALID_SESSION_ID: Session expired or invalid): check the token in the user mapping"
        ));
        assert_eq!(
            s.classify(&records, &resp(400, json!([{"message": "No such column 'Foo__c' on sobject of type Contact", "errorCode": "INVALID_FIELD"}]))),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected {
                status: Some(400),
                message: "HTTP 400 INVALID_FIELD: No such column 'Foo__c' on sobject of type Contact".into()
            }])
        );
        assert_eq!(
            s.classify(&records, &resp(403, json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]))),
            ResponseOutcome::Fatal {
                status: Some(403),
                message: "Salesforce API request limit reached (REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded.): the rows stay queued for a later run".into()
            }
        );
        assert!(matches!(s.classify(&records, &resp(503, json!([{"errorCode": "SERVER_UNAVAILABLE"}]))), ResponseOutcome::Transient { .. }));
    }
}
