//! Salesforce Bulk API 2.0 ingest jobs for large runs: create an upsert job, upload the
//! records as one CSV, close it, poll its state, then read the successful and failed results
//! and match them back to records by external id. This module builds the requests and reads
//! the answers; `deliver::bulk` sends them.

use super::{error_text, first_error, Salesforce};
use crate::connector::{describe, HttpRequest, HttpResponse, RecordResult};
use crate::record::OutboxRecord;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};

/// Bulk API 2.0's marker for "set this field to null" (an empty cell leaves it unchanged).
const NULL: &str = "#N/A";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BulkError {
    #[error("Bulk API job request failed: {0}")]
    Refused(String),
    #[error("Bulk API job {id} ended {state}: {message}")]
    JobFailed { id: String, state: String, message: String },
    #[error("malformed Bulk API answer: {0}")]
    Malformed(String),
}

/// A job's state as Salesforce reports it.
#[derive(Debug, PartialEq)]
pub enum JobState {
    Running,
    Complete,
    /// Failed or Aborted, with the job's error message.
    Ended { state: String, message: String },
}

impl Salesforce {
    fn bulk_request(&self, method: reqwest::Method, path: &str, body: Option<(&str, Vec<u8>)>, token: Option<&str>) -> HttpRequest {
        let mut headers = vec![("Accept".to_string(), "application/json".to_string())];
        let body = match body {
            Some((content_type, body)) => {
                headers.push(("Content-Type".into(), content_type.into()));
                body
            }
            None => Vec::new(),
        };
        if let Some(token) = token {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        HttpRequest { method, url: format!("{}/jobs/ingest{path}", self.api), headers, body }
    }

    pub fn bulk_create(&self, token: Option<&str>) -> HttpRequest {
        let body = json!({
            "object": self.opts.object,
            "externalIdFieldName": self.opts.external_id,
            "contentType": "CSV",
            "operation": "upsert",
            "lineEnding": "LF",
            "columnDelimiter": "COMMA",
        });
        self.bulk_request(reqwest::Method::POST, "", Some(("application/json", body.to_string().into_bytes())), token)
    }

    pub fn bulk_upload(&self, job: &str, csv: Vec<u8>, token: Option<&str>) -> HttpRequest {
        self.bulk_request(reqwest::Method::PUT, &format!("/{job}/batches"), Some(("text/csv", csv)), token)
    }

    pub fn bulk_set_state(&self, job: &str, state: &str, token: Option<&str>) -> HttpRequest {
        let body = json!({ "state": state }).to_string().into_bytes();
        self.bulk_request(reqwest::Method::PATCH, &format!("/{job}"), Some(("application/json", body)), token)
    }

    pub fn bulk_state(&self, job: &str, token: Option<&str>) -> HttpRequest {
        self.bulk_request(reqwest::Method::GET, &format!("/{job}"), None, token)
    }

    /// `successful` true: `successfulResults/`, else `failedResults/`.
    pub fn bulk_results(&self, job: &str, successful: bool, token: Option<&str>) -> HttpRequest {
        let which = if successful { "successfulResults" } else { "failedResults" };
        let mut request = self.bulk_request(reqwest::Method::GET, &format!("/{job}/{which}/"), None, token);
        request.headers[0].1 = "text/csv".into();
        request
    }

    /// The records as one CSV: the external id column first, then every field any record has.
    pub fn bulk_csv(&self, records: &[OutboxRecord]) -> Result<Vec<u8>, BulkError> {
        let external_id = self.opts.external_id.clone().unwrap_or_default();
        let objects: Vec<Value> = records.iter().map(|r| self.sobject(r, None)).collect();
        let mut columns: BTreeSet<&str> = BTreeSet::new();
        for object in &objects {
            columns.extend(object.as_object().into_iter().flatten().map(|(k, _)| k.as_str()));
        }
        columns.remove("attributes");
        columns.remove(external_id.as_str());
        let header: Vec<&str> = std::iter::once(external_id.as_str()).chain(columns).collect();
        let mut out = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
        let failed = |e: csv::Error| BulkError::Malformed(e.to_string());
        out.write_record(&header).map_err(failed)?;
        for object in &objects {
            let row = header.iter().map(|column| match object.get(*column) {
                // A field only other records have: leave it as it is in Salesforce.
                None => String::new(),
                Some(Value::Null) => NULL.to_string(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            });
            out.write_record(row).map_err(failed)?;
        }
        out.into_inner().map_err(|e| BulkError::Malformed(e.to_string()))
    }

    /// The job id from the create answer.
    pub fn bulk_job_id(&self, resp: &HttpResponse) -> Result<String, BulkError> {
        check(resp)?;
        let json: Value = serde_json::from_slice(&resp.body).map_err(|_| BulkError::Malformed(describe(resp, 300)))?;
        json["id"].as_str().map(str::to_string).ok_or_else(|| BulkError::Malformed(describe(resp, 300)))
    }

    pub fn bulk_job_state(&self, job: &str, resp: &HttpResponse) -> Result<JobState, BulkError> {
        check(resp)?;
        let json: Value = serde_json::from_slice(&resp.body).map_err(|_| BulkError::Malformed(describe(resp, 300)))?;
        Ok(match json["state"].as_str() {
            Some("JobComplete") => JobState::Complete,
            Some(state @ ("Failed" | "Aborted")) => JobState::Ended {
                state: state.to_string(),
                message: json["errorMessage"].as_str().unwrap_or("no message").to_string(),
            },
            Some(_) => JobState::Running,
            None => return Err(BulkError::Malformed(format!("job {job}: {}", describe(resp, 300)))),
        })
    }

    /// Each record's outcome from the two result files: matched by external id; a record in
    /// neither was not processed and is sent again.
    pub fn bulk_outcome(&self, records: &[OutboxRecord], successful: &[u8], failed: &[u8]) -> Result<Vec<RecordResult>, BulkError> {
        let external_id = self.opts.external_id.clone().unwrap_or_default();
        let index: HashMap<String, usize> = records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((cell(self.external_value(r)?), i)))
            .collect();
        let mut outcome: Vec<Option<RecordResult>> = vec![None; records.len()];
        for (file, ok) in [(successful, true), (failed, false)] {
            let mut reader = csv::ReaderBuilder::new().from_reader(file);
            let header = reader.headers().map_err(|e| BulkError::Malformed(e.to_string()))?.clone();
            let col = |name: &str| header.iter().position(|h| h == name);
            let (Some(key_col), Some(info_col)) = (col(&external_id), col(if ok { "sf__Id" } else { "sf__Error" })) else {
                if header.is_empty() || reader.records().next().is_none() {
                    continue;
                }
                return Err(BulkError::Malformed(format!("result file without {external_id} column")));
            };
            for row in reader.records() {
                let row = row.map_err(|e| BulkError::Malformed(e.to_string()))?;
                let Some(&i) = row.get(key_col).and_then(|k| index.get(k)) else { continue };
                let info = row.get(info_col).unwrap_or_default();
                outcome[i] = Some(if ok && !info.is_empty() {
                    RecordResult::AckWithId(info.to_string())
                } else if ok {
                    RecordResult::Ack
                } else {
                    RecordResult::Rejected { status: None, message: bulk_error(info) }
                });
            }
        }
        Ok(outcome
            .into_iter()
            .map(|o| o.unwrap_or_else(|| RecordResult::Retry { message: "not processed by the Bulk API job".into() }))
            .collect())
    }
}

/// How a value is written to (and comes back in) the CSV.
fn cell(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// "REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --" ->
/// "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)".
fn bulk_error(text: &str) -> String {
    let text = text.trim().trim_end_matches("--").trim();
    let Some((code, rest)) = text.split_once(':') else {
        return text.to_string();
    };
    let (message, fields) = match rest.rsplit_once(':') {
        Some((message, fields)) if !fields.contains(' ') || fields.trim().is_empty() => (message, fields.trim()),
        _ => (rest, ""),
    };
    let error = json!({ "statusCode": code, "message": message, "fields": fields.split(',').filter(|f| !f.is_empty()).collect::<Vec<_>>() });
    error_text(&error)
}

/// A non-2xx answer to a job request, with Salesforce's reason.
fn check(resp: &HttpResponse) -> Result<(), BulkError> {
    if (200..300).contains(&resp.status) {
        return Ok(());
    }
    Err(BulkError::Refused(match first_error(&resp.body) {
        Some(error) => format!("HTTP {} {}", resp.status, error_text(&error)),
        None => describe(resp, 300),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::SalesforceOptions;
    use crate::record::Op;
    use std::time::Duration;

    fn sf() -> Salesforce {
        Salesforce::new(
            "https://acme.my.salesforce.com",
            &SalesforceOptions {
                object: "Contact".into(),
                external_id: Some("External_Id__c".into()),
                api_version: "62.0".into(),
                bulk_threshold: Some(2),
                bulk_poll: Duration::from_millis(10),
            },
        )
    }

    fn rec(id: i64, fields: Value) -> OutboxRecord {
        OutboxRecord { id, op: Op::Upsert, key: json!({"External_Id__c": format!("k{id}")}), fields: Some(fields), destination_id: None }
    }

    #[test]
    fn csv_quotes_and_marks_nulls() {
        let csv = sf()
            .bulk_csv(&[
                rec(1, json!({"LastName": "O\"Neil, Jr", "Email": null})),
                rec(2, json!({"LastName": "Kim\nLee", "Health_Score__c": 0.5})),
            ])
            .unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "External_Id__c,Email,Health_Score__c,LastName\nk1,#N/A,,\"O\"\"Neil, Jr\"\nk2,,0.5,\"Kim\nLee\"\n"
        );
    }

    #[test]
    fn results_are_matched_by_external_id() {
        let records = [rec(1, json!({"LastName": "A"})), rec(2, json!({})), rec(3, json!({"LastName": "C"}))];
        let ok = b"\"sf__Id\",\"sf__Created\",\"External_Id__c\",\"LastName\"\n\"003A\",\"true\",\"k1\",\"A\"\n";
        let failed = b"\"sf__Id\",\"sf__Error\",\"External_Id__c\",\"LastName\"\n\"\",\"REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --\",\"k2\",\"\"\n";
        assert_eq!(
            sf().bulk_outcome(&records, ok, failed).unwrap(),
            vec![
                RecordResult::AckWithId("003A".into()),
                RecordResult::Rejected {
                    status: None,
                    message: "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)".into()
                },
                RecordResult::Retry { message: "not processed by the Bulk API job".into() },
            ]
        );
    }

    #[test]
    fn job_requests_and_states() {
        let s = sf();
        let create = s.bulk_create(Some("t"));
        assert_eq!(create.url, "https://acme.my.salesforce.com/services/data/v62.0/jobs/ingest");
        assert_eq!(
            serde_json::from_slice::<Value>(&create.body).unwrap(),
            json!({"object": "Contact", "externalIdFieldName": "External_Id__c", "contentType": "CSV", "operation": "upsert", "lineEnding": "LF", "columnDelimiter": "COMMA"})
        );
        assert_eq!(s.bulk_upload("750X", vec![], None).url, "https://acme.my.salesforce.com/services/data/v62.0/jobs/ingest/750X/batches");
        assert_eq!(s.bulk_results("750X", false, None).url, "https://acme.my.salesforce.com/services/data/v62.0/jobs/ingest/750X/failedResults/");
        let answer = |status, body: Value| HttpResponse { status, headers: vec![], body: body.to_string().into_bytes() };
        assert_eq!(s.bulk_job_state("750X", &answer(200, json!({"state": "InProgress"}))), Ok(JobState::Running));
        assert_eq!(s.bulk_job_state("750X", &answer(200, json!({"state": "JobComplete"}))), Ok(JobState::Complete));
        assert_eq!(
            s.bulk_job_state("750X", &answer(200, json!({"state": "Failed", "errorMessage": "InvalidBatch : Field name not found : Foo__c"}))),
            Ok(JobState::Ended { state: "Failed".into(), message: "InvalidBatch : Field name not found : Foo__c".into() })
        );
        assert_eq!(
            s.bulk_job_id(&answer(400, json!([{"errorCode": "INVALIDJOB", "message": "bad"}]))).unwrap_err().to_string(),
            "Bulk API job request failed: HTTP 400 INVALIDJOB: bad"
        );
    }
}
