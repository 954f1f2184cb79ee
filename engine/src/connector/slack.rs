//! Slack (`type 'slack'`): a message per inserted or updated row, or one digest per run
//! (`per 'run'`), rendered from a Liquid template. With `channel`, `chat.postMessage` with the
//! bot token of the user mapping; without it, an incoming webhook, whose secret path
//! (`T.../B.../...`) is the user mapping's token. Deletes send nothing. Slack answers API
//! errors with HTTP 200 and `ok: false`: `ratelimited` is retried, credential errors fail the
//! run, anything else (e.g. `channel_not_found`) rejects the row.

use super::{classify_failure, BatchContext, Destination, HttpRequest, HttpResponse, RecordResult, ResponseOutcome};
use crate::options::SlackOptions;
use crate::record::{Op, OutboxRecord};
use crate::template::{self, Template};
use serde_json::{json, Value};

/// Slack truncates longer messages; the API refuses them (`msg_too_long`).
const MAX_TEXT: usize = 40_000;
const EXCERPT: usize = 300;
/// Errors that mean the token itself is wrong, not the message.
const AUTH_ERRORS: [&str; 5] = ["not_authed", "invalid_auth", "token_revoked", "token_expired", "account_inactive"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SlackError {
    #[error("text template: {0}")]
    Render(String),
    #[error("the message is empty: the text template rendered only whitespace")]
    Empty,
    #[error("the message is {0} characters long; Slack takes at most 40000")]
    TooLong(usize),
    #[error("an incoming webhook needs its secret path (T.../B.../...) as the token of the user mapping")]
    NoWebhookPath,
}

pub struct Slack {
    url: String,
    opts: SlackOptions,
    text: Result<Template, String>,
}

impl Slack {
    pub fn new(url: &str, opts: &SlackOptions) -> Self {
        Slack { url: url.to_string(), opts: opts.clone(), text: template::parse(&opts.text) }
    }

    fn render(&self, ctx: &BatchContext, records: &[OutboxRecord]) -> Result<String, SlackError> {
        let vars_of = |r: &OutboxRecord| json!({"op": r.op.as_str(), "key": r.key, "fields": r.fields});
        let mut vars = if self.opts.digest {
            json!({"records": records.iter().map(vars_of).collect::<Vec<_>>(), "count": records.len()})
        } else {
            records.first().map(vars_of).unwrap_or_default()
        };
        vars["sync"] = json!(ctx.sync_name);
        vars["run_id"] = json!(ctx.run_id);
        let template = self.text.as_ref().map_err(|e| SlackError::Render(e.clone()))?;
        let text = template.render(&vars).map_err(SlackError::Render)?;
        match text.chars().count() {
            _ if text.trim().is_empty() => Err(SlackError::Empty),
            n if n > MAX_TEXT => Err(SlackError::TooLong(n)),
            _ => Ok(text),
        }
    }

    fn reject_all(records: &[OutboxRecord], status: u16, message: String) -> ResponseOutcome {
        ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(status), message }; records.len()])
    }
}

impl Destination for Slack {
    fn kind(&self) -> &'static str {
        "slack"
    }

    fn max_batch_size(&self) -> usize {
        if self.opts.digest {
            1000
        } else {
            1
        }
    }

    /// A row leaving the model has nothing to announce.
    fn skip(&self, record: &OutboxRecord) -> bool {
        record.op == Op::Delete
    }

    fn check_fields_locally(&self, key_columns: &[String], fields: &[String]) -> Result<(), String> {
        let object = |names: &[String]| Value::Object(names.iter().map(|n| (n.clone(), Value::Null)).collect());
        let record = OutboxRecord { id: 1, op: Op::Upsert, key: object(key_columns), fields: Some(object(fields)), destination_id: None };
        let ctx = BatchContext { sync_name: "sync", run_id: 1, idempotency_key: String::new() };
        match self.render(&ctx, &[record]) {
            Err(SlackError::Render(e)) if e.contains("Unknown index") || e.contains("Unknown variable") => {
                Err(SlackError::Render(e).to_string())
            }
            _ => Ok(()),
        }
    }

    fn build_request(&self, ctx: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        let text = self.render(ctx, records).map_err(|e| e.to_string())?;
        let mut headers = vec![("Content-Type".to_string(), "application/json; charset=utf-8".to_string())];
        let (url, body) = match (&self.opts.channel, token) {
            (Some(channel), token) => {
                if let Some(token) = token {
                    headers.push(("Authorization".into(), format!("Bearer {token}")));
                }
                (format!("{}/api/chat.postMessage", self.url), json!({"channel": channel, "text": text}))
            }
            (None, Some(path)) => (format!("{}/{}", self.url, path.trim_matches('/')), json!({"text": text})),
            (None, None) => return Err(SlackError::NoWebhookPath.to_string()),
        };
        Ok(HttpRequest { method: reqwest::Method::POST, url, headers, body: body.to_string().into_bytes() })
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let text = String::from_utf8_lossy(&resp.body).trim().to_string();
        if resp.status == 200 {
            // A webhook answers "ok"; the API answers JSON with "ok".
            let json: Value = serde_json::from_str(&text).unwrap_or_default();
            if text == "ok" || json["ok"] == true {
                return ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]);
            }
            let error = json["error"].as_str().unwrap_or(&text);
            return match error {
                "ratelimited" => ResponseOutcome::Transient { status: Some(200), retry_after: None, message: "Slack: ratelimited".into() },
                e if AUTH_ERRORS.contains(&e) => ResponseOutcome::Fatal {
                    status: Some(200),
                    message: format!("Slack rejected the token ({e}): check the bot token in the user mapping"),
                },
                e => Self::reject_all(records, 200, format!("Slack: {e}")),
            };
        }
        match resp.status {
            // A webhook's answers: 400 invalid_payload/no_text, 403 action_prohibited, 404
            // no_service or channel_not_found, 410 channel_is_archived: the message will not go.
            404 if self.opts.channel.is_none() && text == "no_service" => ResponseOutcome::Fatal {
                status: Some(404),
                message: "Slack knows no incoming webhook at that path (no_service): check the token of the user mapping".into(),
            },
            400 | 403 | 404 | 410 => Self::reject_all(records, resp.status, format!("Slack: {}", super::excerpt(&resp.body, EXCERPT))),
            _ => classify_failure(resp, EXCERPT)
                .unwrap_or_else(|| Self::reject_all(records, resp.status, super::describe(resp, EXCERPT))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slack(channel: Option<&str>, text: &str, digest: bool) -> Slack {
        Slack::new("http://slack", &SlackOptions { channel: channel.map(str::to_string), text: text.into(), digest })
    }

    fn rec(id: i64, op: Op, name: &str) -> OutboxRecord {
        OutboxRecord { id, op, key: json!({"id": id}), fields: Some(json!({"name": name, "region": "EU"})), destination_id: None }
    }

    fn ctx() -> BatchContext<'static> {
        BatchContext { sync_name: "signups", run_id: 3, idempotency_key: "k".into() }
    }

    fn resp(status: u16, body: &str) -> HttpResponse {
        HttpResponse { status, headers: vec![], body: body.as_bytes().to_vec() }
    }

    #[test]
    fn a_message_per_row_or_a_digest() {
        let api = slack(Some("#sales"), "New pro signup: {{ fields.name }} in {{ fields.region }}", false);
        let req = api.build_request(&ctx(), &[rec(1, Op::Insert, "Ann")], Some("xoxb-1")).unwrap();
        assert_eq!(req.url, "http://slack/api/chat.postMessage");
        assert!(req.headers.contains(&("Authorization".into(), "Bearer xoxb-1".into())));
        assert_eq!(serde_json::from_slice::<Value>(&req.body).unwrap(), json!({"channel": "#sales", "text": "New pro signup: Ann in EU"}));
        let hook = slack(None, "{{ count }} signups: {% for r in records %}{{ r.fields.name }} {% endfor %}", true);
        let req = hook.build_request(&ctx(), &[rec(1, Op::Insert, "Ann"), rec(2, Op::Update, "Bo")], Some("T1/B2/xyz")).unwrap();
        assert_eq!(req.url, "http://slack/T1/B2/xyz");
        assert_eq!(serde_json::from_slice::<Value>(&req.body).unwrap(), json!({"text": "2 signups: Ann Bo "}));
        assert_eq!(hook.max_batch_size(), 1000);
        assert!(api.skip(&rec(3, Op::Delete, "x")));
        assert_eq!(
            hook.build_request(&ctx(), &[rec(1, Op::Insert, "Ann")], None).unwrap_err(),
            "an incoming webhook needs its secret path (T.../B.../...) as the token of the user mapping"
        );
    }

    #[test]
    fn answers() {
        let api = slack(Some("C1"), "{{ fields.name }}", false);
        let one = [rec(1, Op::Insert, "Ann")];
        assert_eq!(api.classify(&one, &resp(200, r#"{"ok":true,"ts":"1.2"}"#)), ResponseOutcome::PerRecord(vec![RecordResult::Ack]));
        assert_eq!(
            api.classify(&one, &resp(200, r#"{"ok":false,"error":"channel_not_found"}"#)),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(200), message: "Slack: channel_not_found".into() }])
        );
        assert!(matches!(api.classify(&one, &resp(200, r#"{"ok":false,"error":"ratelimited"}"#)), ResponseOutcome::Transient { .. }));
        assert_eq!(
            api.classify(&one, &resp(200, r#"{"ok":false,"error":"token_revoked"}"#)),
            ResponseOutcome::Fatal {
                status: Some(200),
                message: "Slack rejected the token (token_revoked): check the bot token in the user mapping".into()
            }
        );
        let hook = slack(None, "{{ fields.name }}", false);
        assert_eq!(hook.classify(&one, &resp(200, "ok")), ResponseOutcome::PerRecord(vec![RecordResult::Ack]));
        assert_eq!(
            hook.classify(&one, &resp(410, "channel_is_archived")),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(410), message: "Slack: channel_is_archived".into() }])
        );
        assert!(matches!(hook.classify(&one, &resp(404, "no_service")), ResponseOutcome::Fatal { .. }));
        assert!(matches!(hook.classify(&one, &resp(429, "rate_limited")), ResponseOutcome::Transient { .. }));
        assert_eq!(
            api.check_fields_locally(&["id".into()], &["email".into()]).unwrap_err().split(':').next(),
            Some("text template")
        );
    }
}
