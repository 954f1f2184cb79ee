//! Customer.io (`type 'customerio'`): identifies people through the Track API, one request per
//! row: `PUT /api/v1/customers/{id}` with the mapped fields as attributes, and
//! `DELETE /api/v1/customers/{id}` for rows that leave a mirror sync or are listed by a delete
//! (erasure) sync. The id is the mapped field `id` (or a one-column key). Basic auth: the user
//! mapping's token is `SITE_ID:API_KEY`.

use super::{classify_failure, describe, BatchContext, Destination, HttpRequest, HttpResponse, RecordResult, ResponseOutcome};
use crate::record::{Op, OutboxRecord};
use base64::Engine;
use serde_json::{Map, Value};

const EXCERPT: usize = 300;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CustomerIoError {
    #[error("the record has no Customer.io id: map a column to the destination field \"id\"")]
    NoId,
    #[error("Customer.io needs SITE_ID:API_KEY as the token of the user mapping")]
    NoCredentials,
}

pub struct CustomerIo {
    url: String,
}

impl CustomerIo {
    pub fn new(url: &str) -> Self {
        CustomerIo { url: url.to_string() }
    }

    fn id(record: &OutboxRecord) -> Option<String> {
        let from_fields = record.fields.as_ref().and_then(|f| f.get("id"));
        let from_key = record.key.get("id").or_else(|| record.key.as_object().filter(|k| k.len() == 1).and_then(|k| k.values().next()));
        match from_fields.or(from_key)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

impl Destination for CustomerIo {
    fn kind(&self) -> &'static str {
        "customerio"
    }

    fn max_batch_size(&self) -> usize {
        1
    }

    fn precheck(&self, record: &OutboxRecord) -> Result<(), String> {
        Self::id(record).map(|_| ()).ok_or_else(|| CustomerIoError::NoId.to_string())
    }

    fn build_request(&self, _: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        let record = records.first().ok_or("no record")?;
        let id = Self::id(record).ok_or_else(|| CustomerIoError::NoId.to_string())?;
        let token = token.filter(|t| t.contains(':')).ok_or_else(|| CustomerIoError::NoCredentials.to_string())?;
        let mut url = url::Url::parse(&self.url).map_err(|e| e.to_string())?;
        url.path_segments_mut().map_err(|()| "the server's url cannot take a path")?.extend(["api", "v1", "customers", &id]);
        let mut headers = vec![(
            "Authorization".to_string(),
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(token)),
        )];
        let (method, body) = if record.op == Op::Delete {
            (reqwest::Method::DELETE, Vec::new())
        } else {
            let attributes: Map<String, Value> = record
                .fields
                .as_ref()
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter(|(name, _)| *name != "id")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            headers.push(("Content-Type".into(), "application/json".into()));
            (reqwest::Method::PUT, Value::Object(attributes).to_string().into_bytes())
        };
        Ok(HttpRequest { method, url: url.to_string(), headers, body })
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        if (200..300).contains(&resp.status) {
            return ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]);
        }
        if resp.status == 401 {
            return ResponseOutcome::Fatal {
                status: Some(401),
                message: "Customer.io rejected the credentials (HTTP 401): check SITE_ID:API_KEY in the user mapping".into(),
            };
        }
        classify_failure(resp, EXCERPT).unwrap_or_else(|| {
            let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
            let message = match json["meta"]["error"].as_str().or(json["meta"]["errors"][0].as_str()) {
                Some(error) => format!("Customer.io: {error}"),
                None => describe(resp, EXCERPT),
            };
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(resp.status), message }; records.len()])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> BatchContext<'static> {
        BatchContext { sync_name: "s", run_id: 1, idempotency_key: "k".into() }
    }

    #[test]
    fn identify_and_delete() {
        let cio = CustomerIo::new("https://track.customer.io");
        let r = OutboxRecord { id: 1, op: Op::Upsert, key: json!({"user_id": "u 1"}), fields: Some(json!({"email": "a@x.io", "plan": "pro"})), destination_id: None };
        let req = cio.build_request(&ctx(), std::slice::from_ref(&r), Some("site:key")).unwrap();
        assert_eq!((req.method.as_str(), req.url.as_str()), ("PUT", "https://track.customer.io/api/v1/customers/u%201"));
        assert!(req.headers.contains(&("Authorization".into(), "Basic c2l0ZTprZXk=".into())));
        assert_eq!(serde_json::from_slice::<Value>(&req.body).unwrap(), json!({"email": "a@x.io", "plan": "pro"}));
        let del = OutboxRecord { op: Op::Delete, fields: None, ..r.clone() };
        let req = cio.build_request(&ctx(), &[del], Some("site:key")).unwrap();
        assert_eq!((req.method.as_str(), req.body.len()), ("DELETE", 0));
        assert_eq!(cio.build_request(&ctx(), &[r], Some("nocolon")).unwrap_err(), "Customer.io needs SITE_ID:API_KEY as the token of the user mapping");
    }

    #[test]
    fn answers() {
        let cio = CustomerIo::new("https://track.customer.io");
        let one = [OutboxRecord { id: 1, op: Op::Upsert, key: json!({"id": "u1"}), fields: None, destination_id: None }];
        let answer = |status, body: &str| HttpResponse { status, headers: vec![], body: body.as_bytes().to_vec() };
        assert_eq!(
            cio.classify(&one, &answer(400, r#"{"meta":{"error":"invalid email"}}"#)),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(400), message: "Customer.io: invalid email".into() }])
        );
        assert!(matches!(cio.classify(&one, &answer(401, "")), ResponseOutcome::Fatal { .. }));
        assert!(matches!(cio.classify(&one, &answer(429, "")), ResponseOutcome::Transient { .. }));
        assert_eq!(cio.classify(&one, &answer(200, "{}")), ResponseOutcome::PerRecord(vec![RecordResult::Ack]));
    }
}
