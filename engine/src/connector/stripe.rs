//! Stripe (`type 'stripe'`): updates existing customers, one request per row:
//! `POST /v1/customers/{id}`, form-encoded. The customer id is the mapped field `id` (or a
//! one-column key); `metadata.KEY` fields become `metadata[KEY]`, dotted names nest
//! (`address.city` -> `address[city]`), NULL sends "" (Stripe unsets it). The customer id of an
//! updated row is kept in the identity map, so a row leaving a mirror sync (which carries only
//! its key) unsets the metadata keys the sync writes on that customer (the customer itself is
//! never deleted: that would cancel its subscriptions). Every request carries an `Idempotency-Key` derived
//! from the sync, run and outbox row, so a retry, even after a restart, is applied once.
//! Stripe's error object is classified by `type`.

use super::{classify_failure, describe, BatchContext, Destination, HttpRequest, HttpResponse, RecordResult, ResponseOutcome};
use crate::record::{Op, OutboxRecord};
use serde_json::Value;

const EXCERPT: usize = 300;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StripeError {
    #[error("the record has no Stripe customer id: map a column to the destination field \"id\" (e.g. '{{\"id\": \"stripe_customer_id\"}}')")]
    NoCustomerId,
    #[error("nothing to unset: the sync writes no metadata.* fields")]
    NoMetadata,
}

pub struct Stripe {
    url: String,
    /// The destination fields the sync writes (to unset its metadata keys on removal).
    fields: Vec<String>,
}

impl Stripe {
    pub fn new(url: &str, sync_fields: &[String]) -> Self {
        Stripe { url: url.to_string(), fields: sync_fields.to_vec() }
    }

    fn customer_id(record: &OutboxRecord) -> Option<String> {
        if let Some(known) = record.destination_id.as_ref().filter(|_| record.op == Op::Delete) {
            return Some(known.clone());
        }
        let from_fields = record.fields.as_ref().and_then(|f| f.get("id"));
        let from_key = record.key.get("id").or_else(|| record.key.as_object().filter(|k| k.len() == 1).and_then(|k| k.values().next()));
        match from_fields.or(from_key)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        }
    }

    /// `metadata.plan` -> `metadata[plan]`, `address.city` -> `address[city]`.
    fn parameter(field: &str) -> String {
        let mut parts = field.split('.');
        let head = parts.next().unwrap_or_default().to_string();
        parts.fold(head, |name, part| format!("{name}[{part}]"))
    }

    fn form(&self, record: &OutboxRecord) -> Result<String, StripeError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        if record.op == Op::Delete {
            let keys: Vec<&String> = self.fields.iter().filter(|f| f.starts_with("metadata.")).collect();
            if keys.is_empty() {
                return Err(StripeError::NoMetadata);
            }
            for key in keys {
                form.append_pair(&Self::parameter(key), "");
            }
            return Ok(form.finish());
        }
        for (name, value) in record.fields.as_ref().and_then(Value::as_object).into_iter().flatten() {
            if name == "id" {
                continue;
            }
            let value = match value {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            form.append_pair(&Self::parameter(name), &value);
        }
        Ok(form.finish())
    }
}

impl Destination for Stripe {
    fn kind(&self) -> &'static str {
        "stripe"
    }

    fn max_batch_size(&self) -> usize {
        1
    }

    fn precheck(&self, record: &OutboxRecord) -> Result<(), String> {
        Self::customer_id(record).map(|_| ()).ok_or_else(|| StripeError::NoCustomerId.to_string())
    }

    fn build_request(&self, ctx: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        let record = records.first().ok_or("no record")?;
        let id = Self::customer_id(record).ok_or_else(|| StripeError::NoCustomerId.to_string())?;
        let body = self.form(record).map_err(|e| e.to_string())?;
        let mut url = url::Url::parse(&self.url).map_err(|e| e.to_string())?;
        url.path_segments_mut().map_err(|()| "the server's url cannot take a path")?.extend(["v1", "customers", &id]);
        let mut headers = vec![
            ("Content-Type".to_string(), "application/x-www-form-urlencoded".to_string()),
            ("Idempotency-Key".to_string(), ctx.idempotency_key.clone()),
        ];
        if let Some(token) = token {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
        Ok(HttpRequest { method: reqwest::Method::POST, url: url.to_string(), headers, body: body.into_bytes() })
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        if (200..300).contains(&resp.status) {
            return ResponseOutcome::PerRecord(
                records
                    .iter()
                    .map(|r| match json["id"].as_str() {
                        Some(id) if r.op != Op::Delete => RecordResult::AckWithId(id.to_string()),
                        _ => RecordResult::Ack,
                    })
                    .collect(),
            );
        }
        let error = &json["error"];
        let kind = error["type"].as_str().unwrap_or_default();
        let message = match (error["code"].as_str(), error["message"].as_str()) {
            (Some(code), Some(message)) => format!("Stripe {kind} ({code}): {message}"),
            (None, Some(message)) => format!("Stripe {kind}: {message}"),
            _ => describe(resp, EXCERPT),
        };
        match (resp.status, kind) {
            (401, _) => ResponseOutcome::Fatal {
                status: Some(401),
                message: "Stripe rejected the API key (HTTP 401): check the secret key in the user mapping".into(),
            },
            // Stripe says when a retry may succeed; its own errors and lock timeouts are worth one.
            (_, "api_error") | (409, _) => ResponseOutcome::Transient { status: Some(resp.status), retry_after: None, message },
            _ if resp.header("Stripe-Should-Retry") == Some("true") || resp.status == 429 || resp.status >= 500 => {
                classify_failure(resp, EXCERPT).unwrap_or(ResponseOutcome::Transient {
                    status: Some(resp.status),
                    retry_after: None,
                    message,
                })
            }
            // invalid_request_error, card_error, idempotency_error: this row will not go as it is.
            (status, _) => ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(status), message }; records.len()]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(op: Op, fields: Option<Value>) -> OutboxRecord {
        OutboxRecord { id: 4, op, key: json!({"account_id": 9}), fields, destination_id: None }
    }

    fn ctx() -> BatchContext<'static> {
        BatchContext { sync_name: "s", run_id: 1, idempotency_key: "idem-1".into() }
    }

    #[test]
    fn form_encoded_updates_with_metadata_and_a_stable_idempotency_key() {
        let stripe = Stripe::new("https://api.stripe.com", &["id".into(), "email".into(), "metadata.plan".into()]);
        let r = rec(Op::Upsert, Some(json!({"id": "cus_A", "email": "a@x.io", "metadata.plan": "pro", "metadata.seats": 3, "address.city": null})));
        let req = stripe.build_request(&ctx(), &[r], Some("sk_test_1")).unwrap();
        assert_eq!(req.url, "https://api.stripe.com/v1/customers/cus_A");
        assert_eq!(
            String::from_utf8(req.body).unwrap(),
            "address%5Bcity%5D=&email=a%40x.io&metadata%5Bplan%5D=pro&metadata%5Bseats%5D=3"
        );
        assert!(req.headers.contains(&("Idempotency-Key".into(), "idem-1".into())));
        // Removal unsets the sync's metadata keys, on the customer the identity map knows.
        let gone = OutboxRecord { destination_id: Some("cus_A".into()), ..rec(Op::Delete, None) };
        let req = stripe.build_request(&ctx(), &[gone], None).unwrap();
        assert_eq!(String::from_utf8(req.body).unwrap(), "metadata%5Bplan%5D=");
        assert_eq!(
            stripe.precheck(&rec(Op::Upsert, Some(json!({"email": "a@x.io"})))).unwrap_err(),
            "the record has no Stripe customer id: map a column to the destination field \"id\" (e.g. '{\"id\": \"stripe_customer_id\"}')"
        );
    }

    #[test]
    fn errors_by_type() {
        let stripe = Stripe::new("https://api.stripe.com", &[]);
        let one = [rec(Op::Upsert, Some(json!({"id": "cus_A"})))];
        let answer = |status, body: Value, headers: Vec<(String, String)>| HttpResponse { status, headers, body: body.to_string().into_bytes() };
        assert_eq!(
            stripe.classify(&one, &answer(400, json!({"error": {"type": "invalid_request_error", "code": "email_invalid", "message": "Invalid email address: x"}}), vec![])),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected {
                status: Some(400),
                message: "Stripe invalid_request_error (email_invalid): Invalid email address: x".into()
            }])
        );
        assert!(matches!(
            stripe.classify(&one, &answer(429, json!({"error": {"type": "invalid_request_error", "code": "rate_limit"}}), vec![("Stripe-Should-Retry".into(), "true".into())])),
            ResponseOutcome::Transient { .. }
        ));
        assert!(matches!(stripe.classify(&one, &answer(500, json!({"error": {"type": "api_error"}}), vec![])), ResponseOutcome::Transient { .. }));
        assert!(matches!(stripe.classify(&one, &answer(401, json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****1"}}), vec![])), ResponseOutcome::Fatal { .. }));
    }
}
