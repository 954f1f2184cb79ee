//! Generic JSON webhook. The e2e fake server implements exactly this contract:
//! `POST {url}` with `{"sync", "run_id", "records": [{"op", "key", "fields"?}]}`; the reply is
//! either a plain 2xx (everything accepted) or `{"results": [{"status", "error"?}, ...]}`.

use super::{BatchContext, Destination, HttpRequest, HttpResponse, RecordResult, ResponseOutcome};
use crate::record::{Op, OutboxRecord};
use serde::Serialize;

/// Most records per request; keeps request bodies to a size any endpoint accepts.
const MAX_BATCH: usize = 1000;
/// Longest response text kept in an error message.
const EXCERPT: usize = 300;

pub struct Webhook {
    url: String,
}

impl Webhook {
    pub fn new(url: &str) -> Self {
        Webhook { url: url.to_string() }
    }
}

// Structs rather than `json!` so the keys go out in the documented order.
#[derive(Serialize)]
struct Body<'a> {
    sync: &'a str,
    run_id: i64,
    records: Vec<Record<'a>>,
}

#[derive(Serialize)]
struct Record<'a> {
    op: &'static str,
    key: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<&'a serde_json::Value>,
}

fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500..=599)
}

fn malformed(status: u16, message: String) -> ResponseOutcome {
    // Retrying is harmless: the Idempotency-Key lets the endpoint recognise the repeat.
    ResponseOutcome::Transient {
        status: Some(status),
        retry_after: None,
        message: format!("malformed response: {message}"),
    }
}

/// One entry of `results`, or why it is unusable.
fn record_result(entry: &serde_json::Value) -> Result<RecordResult, String> {
    let status = entry
        .get("status")
        .and_then(serde_json::Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .ok_or_else(|| format!("result {entry} has no integer \"status\""))?;
    let message = || match entry.get("error") {
        Some(serde_json::Value::String(s)) => super::excerpt(s.as_bytes(), EXCERPT),
        _ => format!("HTTP {status}"),
    };
    Ok(match status {
        200..=299 => RecordResult::Ack,
        s if retryable(s) => RecordResult::Retry { message: message() },
        _ => RecordResult::Rejected {
            status: Some(status),
            message: message(),
        },
    })
}

fn classify_success(records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
    let all_acked = || ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]);
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&resp.body) else {
        // Plain text ("ok") acknowledges everything; a body that starts as JSON and does not
        // parse was cut short or garbled, and may have held rejections: ask again.
        if resp.body.trim_ascii_start().first().is_some_and(|b| matches!(b, b'{' | b'[')) {
            return malformed(resp.status, "the JSON body does not parse".into());
        }
        return all_acked();
    };
    let Some(results) = json.get("results").and_then(serde_json::Value::as_array) else {
        return all_acked();
    };
    if results.len() != records.len() {
        return malformed(
            resp.status,
            format!("{} results for {} records", results.len(), records.len()),
        );
    }
    match results.iter().map(record_result).collect() {
        Ok(per_record) => ResponseOutcome::PerRecord(per_record),
        Err(message) => malformed(resp.status, message),
    }
}

impl Destination for Webhook {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn max_batch_size(&self) -> usize {
        MAX_BATCH
    }

    fn build_request(&self, ctx: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        let body = Body {
            sync: ctx.sync_name,
            run_id: ctx.run_id,
            records: records
                .iter()
                .map(|r| Record {
                    op: r.op.as_str(),
                    key: &r.key,
                    fields: if r.op == Op::Delete { None } else { r.fields.as_ref() },
                })
                .collect(),
        };
        let mut headers = vec![
            ("Content-Type".to_string(), "application/json".to_string()),
            ("User-Agent".to_string(), crate::USER_AGENT.to_string()),
            ("Idempotency-Key".to_string(), ctx.idempotency_key.clone()),
        ];
        if let Some(token) = token {
            headers.push(("Authorization".to_string(), format!("Bearer {token}")));
        }
        Ok(HttpRequest {
            method: reqwest::Method::POST,
            url: self.url.clone(),
            headers,
            // Serialising borrowed JSON values into a Vec cannot fail.
            body: serde_json::to_vec(&body).expect("JSON values always serialise"),
        })
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let status = resp.status;
        if (200..=299).contains(&status) {
            return classify_success(records, resp);
        }
        if let Some(outcome) = super::classify_failure(resp, EXCERPT) {
            return outcome;
        }
        match status {
            400..=499 => {
                let body = super::excerpt(&resp.body, EXCERPT);
                let message = if body.is_empty() { format!("HTTP {status}") } else { body };
                ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(status), message }; records.len()])
            }
            _ => ResponseOutcome::Transient {
                status: Some(status),
                retry_after: None,
                message: super::describe(resp, EXCERPT),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn records(n: i64) -> Vec<OutboxRecord> {
        (1..=n)
            .map(|id| OutboxRecord {
                id,
                op: Op::Upsert,
                key: json!({"id": id}),
                fields: Some(json!({"n": id})),
                destination_id: None,
            })
            .collect()
    }

    fn respond(status: u16, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn classify(n: i64, resp: HttpResponse) -> ResponseOutcome {
        Webhook::new("http://x").classify(&records(n), &resp)
    }

    fn rejected(status: u16, message: &str) -> RecordResult {
        RecordResult::Rejected {
            status: Some(status),
            message: message.into(),
        }
    }

    #[test]
    fn request_shape() {
        let ctx = BatchContext {
            sync_name: "crm",
            run_id: 42,
            idempotency_key: "k1".into(),
        };
        let mut recs = records(2);
        recs[1].op = Op::Delete;
        let hook = Webhook::new("https://example.com/hook");
        let req = hook.build_request(&ctx, &recs, Some("tok")).unwrap();
        assert_eq!(req.method, reqwest::Method::POST);
        assert_eq!(req.url, "https://example.com/hook");
        assert_eq!(
            String::from_utf8(req.body).unwrap(),
            r#"{"sync":"crm","run_id":42,"records":[{"op":"upsert","key":{"id":1},"fields":{"n":1}},{"op":"delete","key":{"id":2}}]}"#
        );
        let headers: Vec<(&str, &str)> = req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            headers,
            [
                ("Content-Type", "application/json"),
                ("User-Agent", concat!("pg_reverse_etl/", env!("CARGO_PKG_VERSION"))),
                ("Idempotency-Key", "k1"),
                ("Authorization", "Bearer tok"),
            ]
        );
        let anonymous = hook.build_request(&ctx, &recs, None).unwrap();
        assert!(anonymous.headers.iter().all(|(k, _)| k != "Authorization"));
    }

    #[test]
    fn plain_success_acks_everything() {
        let all = ResponseOutcome::PerRecord(vec![RecordResult::Ack; 2]);
        assert_eq!(classify(2, respond(200, &[], "")), all);
        assert_eq!(classify(2, respond(204, &[], "")), all);
        assert_eq!(classify(2, respond(200, &[], "OK")), all);
        assert_eq!(classify(2, respond(202, &[], r#"{"accepted": true}"#)), all);
        assert_eq!(classify(2, respond(200, &[], r#"{"results": "fine"}"#)), all);
    }

    #[test]
    fn per_record_results() {
        let body = r#"{"results": [{"status": 200}, {"status": 422, "error": "email is invalid"},
            {"status": 429}, {"status": 503, "error": "busy"}, {"status": 404}, {"status": 201}]}"#;
        assert_eq!(
            classify(6, respond(207, &[], body)),
            ResponseOutcome::PerRecord(vec![
                RecordResult::Ack,
                rejected(422, "email is invalid"),
                RecordResult::Retry {
                    message: "HTTP 429".into()
                },
                RecordResult::Retry { message: "busy".into() },
                rejected(404, "HTTP 404"),
                RecordResult::Ack,
            ])
        );
    }

    #[test]
    fn a_truncated_json_body_is_transient_and_plain_text_acknowledges() {
        assert_eq!(
            classify(2, respond(200, &[], r#"{"results": [{"status": 200}, {"sta"#)),
            ResponseOutcome::Transient {
                status: Some(200),
                retry_after: None,
                message: "malformed response: the JSON body does not parse".into()
            }
        );
        assert_eq!(classify(2, respond(200, &[], "ok")), ResponseOutcome::PerRecord(vec![RecordResult::Ack; 2]));
        assert_eq!(classify(2, respond(200, &[], "")), ResponseOutcome::PerRecord(vec![RecordResult::Ack; 2]));
    }

    #[test]
    fn malformed_results_are_transient() {
        let body = r#"{"results": [{"status": 200}, {"status": 200}, {"status": 200}]}"#;
        assert_eq!(
            classify(5, respond(200, &[], body)),
            ResponseOutcome::Transient {
                status: Some(200),
                retry_after: None,
                message: "malformed response: 3 results for 5 records".into()
            }
        );
        assert_eq!(
            classify(
                2,
                respond(200, &[], r#"{"results": [{"status": 200}, {"status": "ok"}]}"#)
            ),
            ResponseOutcome::Transient {
                status: Some(200),
                retry_after: None,
                message: r#"malformed response: result {"status":"ok"} has no integer "status""#.into()
            }
        );
        assert!(matches!(
            classify(1, respond(200, &[], r#"{"results": [7]}"#)),
            ResponseOutcome::Transient { .. }
        ));
    }

    #[test]
    fn whole_response_failures() {
        for status in [401, 403] {
            assert_eq!(
                classify(2, respond(status, &[], "nope")),
                ResponseOutcome::Fatal {
                    status: Some(status),
                    message: format!(
                        "destination rejected the credentials (HTTP {status}): check the token in the user mapping"
                    )
                }
            );
        }
        assert_eq!(
            classify(2, respond(429, &[("retry-after", "7")], "")),
            ResponseOutcome::Transient {
                status: Some(429),
                retry_after: Some(Duration::from_secs(7)),
                message: "HTTP 429".into()
            }
        );
        assert_eq!(
            classify(2, respond(503, &[], "down for maintenance")),
            ResponseOutcome::Transient {
                status: Some(503),
                retry_after: None,
                message: "HTTP 503: down for maintenance".into()
            }
        );
        for status in [408, 425, 500] {
            assert!(matches!(
                classify(1, respond(status, &[], "")),
                ResponseOutcome::Transient { .. }
            ));
        }
        let long = "x".repeat(400);
        assert_eq!(
            classify(2, respond(400, &[], &long)),
            ResponseOutcome::PerRecord(vec![rejected(400, &format!("{}…", "x".repeat(300))); 2])
        );
        assert_eq!(
            classify(1, respond(404, &[], "")),
            ResponseOutcome::PerRecord(vec![rejected(404, "HTTP 404")])
        );
        assert_eq!(
            classify(1, respond(301, &[("Location", "https://new.example/hook")], "")),
            ResponseOutcome::Fatal {
                status: Some(301),
                message: "destination answered HTTP 301 (redirect to https://new.example/hook); redirects are not \
                          followed: set the server's url to the final address"
                    .into()
            }
        );
    }
}
