//! Generic HTTP (`type 'http'`): the long tail of APIs without code. URL, method, headers and
//! body are Liquid templates rendered per record (or per batch) with `op`, `key`, `fields`
//! (`records` per batch), `sync`, `run_id` and `token`; the body is sent as JSON or
//! form-encoded; which statuses mean success is configurable, and a batch response can carry
//! per-record results (JSON pointers to them).

use super::{BatchContext, Destination, HttpRequest, HttpResponse, RecordResult, ResponseOutcome};
use crate::options::{HttpOptions, ResultPointers};
use crate::record::{Op, OutboxRecord};
use crate::template::{self, Template};
use serde_json::{json, Value};

/// Most records in one request of a per-batch destination.
const MAX_BATCH: usize = 1000;
/// Longest response or body text kept in an error message.
const EXCERPT: usize = 300;
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Why a record could not be turned into a request (it is rejected without a call).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HttpError {
    /// A template could not be rendered for this record (`part`: url, method, body, header X).
    #[error("{part} template: {problem}")]
    Render { part: String, problem: String },
    #[error("url template rendered {0:?}, not an http or https URL")]
    BadUrl(String),
    #[error("method template rendered {0:?}, not one of GET, POST, PUT, PATCH, DELETE")]
    BadMethod(String),
    #[error("body template rendered invalid JSON ({problem}): {text}")]
    BadJson { problem: String, text: String },
    #[error("a form-encoded body must be a JSON object")]
    FormNotObject,
    #[error("header {0} rendered a line break")]
    HeaderLineBreak(String),
}

impl HttpError {
    /// A template named a variable the record does not have (the one failure that does not
    /// depend on the values).
    fn is_unknown_name(&self) -> bool {
        matches!(self, HttpError::Render { problem, .. } if problem.contains("Unknown index") || problem.contains("Unknown variable"))
    }
}

pub struct Http {
    url: Template,
    method: Template,
    headers: Vec<(String, Template)>,
    body: Option<Template>,
    per_batch: bool,
    form: bool,
    success: Vec<(u16, u16)>,
    results: Option<ResultPointers>,
    result_id: Option<String>,
}

impl Http {
    pub fn new(url: &str, opts: &HttpOptions) -> Result<Self, String> {
        let parse = |what: &str, source: &str| template::parse(source).map_err(|e| format!("{what}: {e}"));
        Ok(Http {
            url: parse("url", url)?,
            method: parse("method", &opts.method)?,
            headers: opts
                .headers
                .iter()
                .map(|(name, value)| Ok((name.clone(), parse(name, value)?)))
                .collect::<Result<_, String>>()?,
            body: opts.body.as_deref().map(|b| parse("body", b)).transpose()?,
            per_batch: opts.per_batch,
            form: opts.form,
            success: opts.success.clone(),
            results: opts.results.clone(),
            result_id: opts.result_id.clone(),
        })
    }

    fn is_success(&self, status: u16) -> bool {
        self.success.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

/// A destination whose options could not be turned into a connector (cannot happen after the
/// validator accepted them): every record is rejected with the reason.
pub struct Broken(pub String);

impl Destination for Broken {
    fn kind(&self) -> &'static str {
        "http"
    }
    fn max_batch_size(&self) -> usize {
        MAX_BATCH
    }
    fn build_request(&self, _: &BatchContext, _: &[OutboxRecord], _: Option<&str>) -> Result<HttpRequest, String> {
        Err(self.0.clone())
    }
    fn classify(&self, records: &[OutboxRecord], _: &HttpResponse) -> ResponseOutcome {
        ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: None, message: self.0.clone() }; records.len()])
    }
}

/// What a template sees of one record.
fn record_vars(r: &OutboxRecord) -> Value {
    json!({
        "op": r.op.as_str(),
        "key": r.key,
        "fields": if r.op == Op::Delete { Value::Null } else { r.fields.clone().unwrap_or(Value::Null) },
        "destination_id": r.destination_id,
    })
}

/// `{"a": 1, "m": {"k": "v"}}` -> `a=1&m[k]=v` (nested objects in brackets, the convention of
/// Stripe and most form APIs; arrays as `a[]=`; null as empty).
fn form_encode(value: &Value) -> Result<String, HttpError> {
    fn walk(prefix: &str, value: &Value, out: &mut url::form_urlencoded::Serializer<'_, String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}[{k}]") };
                    walk(&name, v, out);
                }
            }
            Value::Array(items) => {
                for v in items {
                    walk(&format!("{prefix}[]"), v, out);
                }
            }
            Value::Null => {
                out.append_pair(prefix, "");
            }
            Value::String(s) => {
                out.append_pair(prefix, s);
            }
            other => {
                out.append_pair(prefix, &other.to_string());
            }
        }
    }
    if !value.is_object() {
        return Err(HttpError::FormNotObject);
    }
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    walk("", value, &mut out);
    Ok(out.finish())
}

fn excerpt(text: &str) -> String {
    super::excerpt(text.as_bytes(), EXCERPT)
}

fn malformed(status: u16, message: String) -> ResponseOutcome {
    ResponseOutcome::Transient { status: Some(status), retry_after: None, message: format!("malformed response: {message}") }
}

impl Http {
    /// The request for these records, or why there is none.
    fn request(&self, ctx: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, HttpError> {
        let mut vars = if self.per_batch {
            json!({"records": records.iter().map(record_vars).collect::<Vec<_>>()})
        } else {
            let Some(record) = records.first() else {
                return Err(HttpError::Render { part: "url".into(), problem: "no record to send".into() });
            };
            record_vars(record)
        };
        vars["sync"] = json!(ctx.sync_name);
        vars["run_id"] = json!(ctx.run_id);
        vars["token"] = json!(token);

        let url = self.url.render(&vars).map_err(|problem| HttpError::Render { part: "url".into(), problem })?;
        let valid_url = url::Url::parse(url.trim())
            .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .unwrap_or(false);
        if !valid_url {
            return Err(HttpError::BadUrl(excerpt(&url)));
        }
        let method = self.method.render(&vars).map_err(|problem| HttpError::Render { part: "method".into(), problem })?;
        let method = method.trim().to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            return Err(HttpError::BadMethod(excerpt(&method)));
        }

        // GET and DELETE carry no body (a delete's fields are null, so a body template naming
        // fields could not even be rendered for it).
        let bodiless = method == "GET" || method == "DELETE";
        let body_json = match &self.body {
            _ if bodiless => Value::Null,
            Some(body) => {
                let text = body.render(&vars).map_err(|problem| HttpError::Render { part: "body".into(), problem })?;
                serde_json::from_str::<Value>(&text)
                    .map_err(|e| HttpError::BadJson { problem: e.to_string(), text: excerpt(&text) })?
            }
            None if self.per_batch => json!({"sync": ctx.sync_name, "run_id": ctx.run_id, "records": vars["records"]}),
            None => json!({"op": vars["op"], "key": vars["key"], "fields": vars["fields"], "destination_id": vars["destination_id"]}),
        };
        let (content_type, body) = if bodiless {
            ("application/json", Vec::new())
        } else if self.form {
            ("application/x-www-form-urlencoded", form_encode(&body_json)?.into_bytes())
        } else {
            ("application/json", serde_json::to_vec(&body_json).expect("JSON values always serialise"))
        };

        let mut headers = vec![
            ("Content-Type".to_string(), content_type.to_string()),
            ("User-Agent".to_string(), crate::USER_AGENT.to_string()),
            ("Idempotency-Key".to_string(), ctx.idempotency_key.clone()),
        ];
        for (name, value) in &self.headers {
            let value = value.render(&vars).map_err(|problem| HttpError::Render { part: format!("header {name}"), problem })?;
            if value.contains(['\r', '\n']) {
                return Err(HttpError::HeaderLineBreak(name.clone()));
            }
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            headers.push((name.clone(), value));
        }
        if let Some(token) = token {
            if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("Authorization")) {
                headers.push(("Authorization".to_string(), format!("Bearer {token}")));
            }
        }
        Ok(HttpRequest {
            method: reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| HttpError::BadMethod(method.clone()))?,
            url: url.trim().to_string(),
            headers,
            body,
        })
    }

    /// Acknowledged, with the destination's id when `result_id` finds one (a string or number).
    fn acknowledge(&self, item: &Value) -> RecordResult {
        match self.result_id.as_deref().and_then(|p| item.pointer(p)) {
            Some(Value::String(id)) if !id.is_empty() => RecordResult::AckWithId(id.clone()),
            Some(Value::Number(n)) => RecordResult::AckWithId(n.to_string()),
            _ => RecordResult::Ack,
        }
    }

    fn per_record_results(&self, pointers: &ResultPointers, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let Ok(json) = serde_json::from_slice::<Value>(&resp.body) else {
            return malformed(resp.status, format!("not JSON: {}", excerpt(&String::from_utf8_lossy(&resp.body))));
        };
        let Some(items) = json.pointer(&pointers.array).and_then(Value::as_array) else {
            return malformed(resp.status, format!("no array at {}", pointers.array));
        };
        if items.len() != records.len() {
            return malformed(resp.status, format!("{} results for {} records", items.len(), records.len()));
        }
        let results = items
            .iter()
            .map(|item| {
                let ok = match item.pointer(&pointers.ok) {
                    Some(Value::Bool(b)) => *b,
                    Some(Value::Number(n)) => n.as_u64().is_some_and(|s| (200..300).contains(&s)),
                    _ => false,
                };
                if ok {
                    return self.acknowledge(item);
                }
                let message = match pointers.error.as_deref().and_then(|p| item.pointer(p)) {
                    Some(Value::String(s)) => excerpt(s),
                    Some(other) => excerpt(&other.to_string()),
                    None => format!("rejected: {}", excerpt(&item.to_string())),
                };
                RecordResult::Rejected { status: Some(resp.status), message }
            })
            .collect();
        ResponseOutcome::PerRecord(results)
    }
}

impl Destination for Http {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn max_batch_size(&self) -> usize {
        if self.per_batch {
            MAX_BATCH
        } else {
            1
        }
    }

    /// Renders the templates for a record with exactly the sync's key columns and fields (all
    /// null): Liquid is strict about unknown variables, so a template naming a field the sync
    /// does not send fails here, at create_sync, instead of rejecting every record later.
    fn check_fields_locally(&self, key_columns: &[String], fields: &[String]) -> Result<(), String> {
        let object = |names: &[String]| Value::Object(names.iter().map(|n| (n.clone(), Value::Null)).collect());
        let record = OutboxRecord {
            id: 1,
            op: Op::Upsert,
            key: object(key_columns),
            fields: Some(object(fields)),
            destination_id: Some(String::new()),
        };
        let ctx = BatchContext { sync_name: "sync", run_id: 1, idempotency_key: String::new() };
        match self.request(&ctx, &[record], Some("token")) {
            // Only unknown names are certain; other failures may depend on real values.
            Err(e) if e.is_unknown_name() => Err(e.to_string()),
            _ => Ok(()),
        }
    }

    fn build_request(&self, ctx: &BatchContext, records: &[OutboxRecord], token: Option<&str>) -> Result<HttpRequest, String> {
        self.request(ctx, records, token).map_err(|e| e.to_string())
    }

    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome {
        let status = resp.status;
        if self.is_success(status) {
            return match (&self.results, &self.result_id) {
                (Some(pointers), _) => self.per_record_results(pointers, records, resp),
                // One record per request: its id is in the response itself.
                (None, Some(_)) => match serde_json::from_slice::<Value>(&resp.body) {
                    Ok(json) => ResponseOutcome::PerRecord(vec![self.acknowledge(&json); records.len()]),
                    Err(_) => ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]),
                },
                (None, None) => ResponseOutcome::PerRecord(vec![RecordResult::Ack; records.len()]),
            };
        }
        // Other 4xx, and statuses the success rule leaves out: this data is refused.
        super::classify_failure(resp, EXCERPT).unwrap_or_else(|| {
            ResponseOutcome::PerRecord(vec![
                RecordResult::Rejected { status: Some(status), message: super::describe(resp, EXCERPT) };
                records.len()
            ])
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn templates_are_checked_against_the_syncs_fields() {
        let cfg = crate::options::parse_server_options(&[
            ("type".into(), "http".into()),
            ("url".into(), "https://api.example.com/users/{{ key.id }}".into()),
            ("body".into(), r#"{"email": {{ fields.email | json }}, "n": {{ fields.score | plus: 1 }}}"#.into()),
        ])
        .unwrap();
        let http = Http::new(&cfg.url, cfg.http.as_ref().unwrap()).unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(http.check_fields_locally(&names(&["id"]), &names(&["email", "score"])), Ok(()));
        let err = http.check_fields_locally(&names(&["id"]), &names(&["mail", "score"])).unwrap_err();
        assert!(err.starts_with("body template: ") && err.contains("email"), "{err}");
        let err = http.check_fields_locally(&names(&["user_id"]), &names(&["email", "score"])).unwrap_err();
        assert!(err.starts_with("url template: ") && err.contains("id"), "{err}");
    }

    use super::*;
    use crate::options::parse_server_options;

    fn connector(pairs: &[(&str, &str)]) -> Http {
        let mut opts: Vec<(String, String)> = vec![("type".into(), "http".into())];
        opts.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let cfg = parse_server_options(&opts).unwrap();
        Http::new(&cfg.url, cfg.http.as_ref().unwrap()).unwrap()
    }

    fn rec(id: i64, op: Op, fields: Value) -> OutboxRecord {
        OutboxRecord { id, op, key: json!({"id": id}), fields: Some(fields), destination_id: None }
    }

    fn ctx() -> BatchContext<'static> {
        BatchContext { sync_name: "s", run_id: 7, idempotency_key: "k".into() }
    }

    fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
        req.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn response(status: u16, body: &str) -> HttpResponse {
        HttpResponse { status, headers: vec![], body: body.as_bytes().to_vec() }
    }

    #[test]
    fn per_record_templates_build_url_method_headers_and_body() {
        let c = connector(&[
            ("url", "https://api.example.com/v1/users/{{ key.id }}"),
            ("method", "{% if op == 'delete' %}DELETE{% else %}PUT{% endif %}"),
            ("headers", r#"{"X-Api-Key": "{{ token }}", "X-Sync": "{{ sync }}"}"#),
            ("body", r#"{"email": {{ fields.email | json }}, "plan": {{ fields.plan | upcase | json }}}"#),
        ]);
        assert_eq!(c.max_batch_size(), 1);
        let req = c.build_request(&ctx(), &[rec(42, Op::Upsert, json!({"email": "a@x.com", "plan": "pro"}))], Some("sekret")).unwrap();
        assert_eq!(req.method, reqwest::Method::PUT);
        assert_eq!(req.url, "https://api.example.com/v1/users/42");
        assert_eq!(header(&req, "X-Api-Key"), Some("sekret"));
        assert_eq!(header(&req, "X-Sync"), Some("s"));
        assert_eq!(header(&req, "Authorization"), Some("Bearer sekret"));
        assert_eq!(header(&req, "Content-Type"), Some("application/json"));
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body, json!({"email": "a@x.com", "plan": "PRO"}));

        let del = OutboxRecord { id: 43, op: Op::Delete, key: json!({"id": 43}), fields: None, destination_id: None };
        let c = connector(&[
            ("url", "https://api.example.com/v1/users/{{ key.id }}"),
            ("method", "{% if op == 'delete' %}DELETE{% else %}PUT{% endif %}"),
        ]);
        let req = c.build_request(&ctx(), std::slice::from_ref(&del), None).unwrap();
        assert_eq!((req.method.clone(), req.url.as_str()), (reqwest::Method::DELETE, "https://api.example.com/v1/users/43"));
        assert!(req.body.is_empty());
        // The body template names fields, which a delete has not: DELETE sends no body.
        let c = connector(&[
            ("url", "https://api.example.com/v1/users/{{ key.id }}"),
            ("method", "{% if op == 'delete' %}DELETE{% else %}PUT{% endif %}"),
            ("body", r#"{"email": {{ fields.email | json }}}"#),
        ]);
        assert!(c.build_request(&ctx(), &[del], None).unwrap().body.is_empty());
        assert_eq!(header(&req, "Authorization"), None);
    }

    #[test]
    fn form_encoding_and_batches() {
        let c = connector(&[
            ("url", "https://api.example.com/customers/{{ key.id }}"),
            ("encoding", "form"),
            ("body", r#"{"email": {{ fields.email | json }}, "metadata": {"score": {{ fields.score | json }}}, "tags": ["a b", "c&d"]}"#),
        ]);
        let req = c.build_request(&ctx(), &[rec(1, Op::Update, json!({"email": "a+b@x.com", "score": 9.5}))], None).unwrap();
        assert_eq!(header(&req, "Content-Type"), Some("application/x-www-form-urlencoded"));
        assert_eq!(
            String::from_utf8(req.body).unwrap(),
            "email=a%2Bb%40x.com&metadata%5Bscore%5D=9.5&tags%5B%5D=a+b&tags%5B%5D=c%26d"
        );

        let c = connector(&[("url", "https://api.example.com/bulk"), ("per", "batch")]);
        assert_eq!(c.max_batch_size(), 1000);
        let req = c
            .build_request(&ctx(), &[rec(1, Op::Upsert, json!({"a": 1})), rec(2, Op::Delete, json!({}))], None)
            .unwrap();
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            body,
            json!({"sync": "s", "run_id": 7, "records": [
                {"op": "upsert", "key": {"id": 1}, "fields": {"a": 1}, "destination_id": null},
                {"op": "delete", "key": {"id": 2}, "fields": null, "destination_id": null}]})
        );
    }

    #[test]
    fn render_problems_reject_the_record_with_the_reason() {
        let c = connector(&[("url", "https://api.example.com/{{ fields.emial }}")]);
        let err = c.build_request(&ctx(), &[rec(1, Op::Upsert, json!({"email": "a@x.com"}))], None).unwrap_err();
        assert!(err.starts_with("url template: ") && err.contains("emial"), "{err}");
        let c = connector(&[("url", "https://api.example.com/x"), ("body", r#"{"email": {{ fields.email }}}"#)]);
        let err = c.build_request(&ctx(), &[rec(1, Op::Upsert, json!({"email": "a@x.com"}))], None).unwrap_err();
        assert!(err.starts_with("body template rendered invalid JSON"), "{err}");
        let c = connector(&[("url", "https://api.example.com/x"), ("method", "{{ fields.m }}")]);
        let err = c.build_request(&ctx(), &[rec(1, Op::Upsert, json!({"m": "BREW"}))], None).unwrap_err();
        assert_eq!(err, "method template rendered \"BREW\", not one of GET, POST, PUT, PATCH, DELETE");
        let c = connector(&[("url", "https://api.example.com/x"), ("headers", r#"{"X-A": "{{ fields.v }}"}"#)]);
        let err = c.build_request(&ctx(), &[rec(1, Op::Upsert, json!({"v": "a\r\nEvil: 1"}))], None).unwrap_err();
        assert_eq!(err, "header X-A rendered a line break");
    }

    #[test]
    fn destination_ids_are_read_and_given_back_to_templates() {
        let c = connector(&[
            ("url", "https://api.example.com/v1/users{% if destination_id %}/{{ destination_id }}{% endif %}"),
            ("method", "{% if op == 'delete' %}DELETE{% elsif destination_id %}PUT{% else %}POST{% endif %}"),
            ("result_id", "/user/id"),
        ]);
        let mut r = rec(1, Op::Upsert, json!({"email": "a@x.com"}));
        let req = c.build_request(&ctx(), std::slice::from_ref(&r), None).unwrap();
        assert_eq!((req.method, req.url.as_str()), (reqwest::Method::POST, "https://api.example.com/v1/users"));
        assert_eq!(
            c.classify(std::slice::from_ref(&r), &response(201, r#"{"user": {"id": "u_7"}}"#)),
            ResponseOutcome::PerRecord(vec![RecordResult::AckWithId("u_7".into())])
        );
        assert_eq!(
            c.classify(std::slice::from_ref(&r), &response(200, r#"{"user": {"id": 42}}"#)),
            ResponseOutcome::PerRecord(vec![RecordResult::AckWithId("42".into())])
        );
        assert_eq!(c.classify(std::slice::from_ref(&r), &response(204, "")), ResponseOutcome::PerRecord(vec![RecordResult::Ack]));
        r.destination_id = Some("u_7".into());
        let req = c.build_request(&ctx(), std::slice::from_ref(&r), None).unwrap();
        assert_eq!((req.method, req.url.as_str()), (reqwest::Method::PUT, "https://api.example.com/v1/users/u_7"));
    }

    #[test]
    fn success_rule_and_per_record_results() {
        let recs = [rec(1, Op::Upsert, json!({})), rec(2, Op::Upsert, json!({}))];
        let c = connector(&[("url", "https://api.example.com/x"), ("per", "batch"), ("success", "200,207"),
            ("results", "/data/results"), ("result_ok", "/ok"), ("result_error", "/error/message")]);
        let out = c.classify(&recs, &response(207, r#"{"data": {"results": [{"ok": true}, {"ok": false, "error": {"message": "bad email"}}]}}"#));
        assert_eq!(
            out,
            ResponseOutcome::PerRecord(vec![
                RecordResult::Ack,
                RecordResult::Rejected { status: Some(207), message: "bad email".into() }
            ])
        );
        assert!(matches!(c.classify(&recs, &response(200, r#"{"data": {"results": [{"ok": true}]}}"#)), ResponseOutcome::Transient { .. }));
        // 201 is not in the success rule: the records are refused, with the status.
        assert_eq!(
            c.classify(&recs, &response(201, "created?")),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(201), message: "HTTP 201: created?".into() }; 2])
        );
        assert!(matches!(c.classify(&recs, &response(429, "")), ResponseOutcome::Transient { status: Some(429), .. }));
        assert!(matches!(c.classify(&recs, &response(401, "")), ResponseOutcome::Fatal { .. }));
        assert_eq!(
            c.classify(&recs, &response(422, "no")),
            ResponseOutcome::PerRecord(vec![RecordResult::Rejected { status: Some(422), message: "HTTP 422: no".into() }; 2])
        );
    }
}
