//! The contract every destination implements: turn a batch into one HTTP request, and turn
//! the response into per-record outcomes. Connectors do no I/O; `deliver` does.

mod customerio;
mod http;
mod hubspot;
mod intercom;
mod meta;
pub mod salesforce;
mod slack;
mod stripe;
mod webhook;

pub use customerio::CustomerIo;
pub use http::Http;
pub use hubspot::HubSpot;
pub use intercom::Intercom;
pub use meta::MetaAudience;
pub use salesforce::Salesforce;
pub use slack::Slack;
pub use stripe::Stripe;
pub use webhook::Webhook;

use crate::options::{DestinationConfig, DestinationKind};
use crate::record::OutboxRecord;
use std::time::Duration;

pub struct BatchContext<'a> {
    pub sync_name: &'a str,
    pub run_id: i64,
    pub idempotency_key: String,
}

#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: reqwest::Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header of that name, compared case-insensitively as HTTP requires.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum RecordResult {
    Ack,
    /// Accepted, and the destination named its own id for the record (kept in the sync's
    /// identity map and given to later requests for the same key).
    AckWithId(String),
    /// The destination refused this record; retrying the same data will not help.
    Rejected {
        status: Option<u16>,
        message: String,
    },
    /// This record failed transiently; send it again.
    Retry {
        message: String,
    },
    /// The request only looked the record up: send it again at once, now with the
    /// destination's id for it (e.g. a HubSpot delete of a key the identity map never learned).
    Resolved(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum ResponseOutcome {
    /// Same length and order as the request's records.
    PerRecord(Vec<RecordResult>),
    /// The whole request is to be retried.
    Transient {
        status: Option<u16>,
        retry_after: Option<Duration>,
        message: String,
    },
    /// Nothing more will work in this run (e.g. bad credentials).
    Fatal { status: Option<u16>, message: String },
    /// The destination refused the access token as expired: a refreshed one may work (fatal
    /// when there is no way to refresh it).
    Expired { message: String },
}

pub trait Destination: Send + Sync {
    fn kind(&self) -> &'static str;
    /// The most records the destination accepts in one request.
    fn max_batch_size(&self) -> usize;
    /// The request for these records; an error (e.g. a template that cannot be rendered for
    /// this data) rejects them all without a call.
    fn build_request(&self, ctx: &BatchContext, records: &[OutboxRecord], token: Option<&str>)
        -> Result<HttpRequest, String>;
    fn classify(&self, records: &[OutboxRecord], resp: &HttpResponse) -> ResponseOutcome;
    /// Records the destination has no use for (e.g. a deleted row for a message channel): they
    /// are acknowledged without a call.
    fn skip(&self, _record: &OutboxRecord) -> bool {
        false
    }
    /// Why this record cannot be sent at all (e.g. it lacks the field the destination matches
    /// records by): it is rejected without a call, and the rest of its batch goes on.
    fn precheck(&self, _record: &OutboxRecord) -> Result<(), String> {
        Ok(())
    }
    /// Records of different groups never share a request (e.g. upserts and deletes go to
    /// different endpoints).
    fn request_group(&self, _record: &OutboxRecord) -> u8 {
        0
    }
    /// The most records of this request group in one request, when less than
    /// `max_batch_size` (e.g. an endpoint that takes one record per call).
    fn group_batch_size(&self, _group: u8) -> usize {
        usize::MAX
    }
    /// What is wrong with these fields that shows without asking the destination (e.g. a
    /// template naming a field the sync does not send).
    fn check_fields_locally(&self, _key_columns: &[String], _fields: &[String]) -> Result<(), String> {
        Ok(())
    }
    /// The request that describes the destination's fields, for connectors that can check a
    /// sync's fields before it runs (HubSpot properties, Salesforce describe).
    fn describe_request(&self, _token: Option<&str>) -> Option<HttpRequest> {
        None
    }
    /// The problem with these field names, judged from the answer to `describe_request`.
    fn check_fields(&self, _resp: &HttpResponse, _fields: &[String]) -> Result<(), FieldProblem> {
        Ok(())
    }
    /// The API usage the destination reports in a response (e.g. Salesforce's
    /// `Sforce-Limit-Info`), shown in the sync's status.
    fn usage(&self, _resp: &HttpResponse) -> Option<ApiUsage> {
        None
    }
}

/// An API usage reading: what is shown, and where it stands in time, so that of the answers to
/// concurrent requests (which can arrive in any order) the latest reading is the one kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiUsage {
    /// (the limit window the reading is in, how much of it is spent): within a window the
    /// spent count only grows.
    pub order: (u64, u64),
    pub shown: String,
}

impl ApiUsage {
    /// Keeps in `slot` whichever of it and `reading` is the later.
    pub fn keep_latest(slot: &mut Option<ApiUsage>, reading: ApiUsage) {
        if slot.as_ref().is_none_or(|kept| kept.order <= reading.order) {
            *slot = Some(reading);
        }
    }
}

/// Why a sync's fields were not accepted at definition time.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FieldProblem {
    /// The destination has no such field, or it cannot be written.
    #[error("{0}")]
    Refused(String),
    /// The destination could not be asked (down, credentials, unexpected answer).
    #[error("{0}")]
    Unavailable(String),
}

/// `"a", "b" and "c"`, for messages.
pub fn quoted_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

/// Splits records (in outbox order) into requests of at most `batch_size`, each holding one
/// request group; groups keep their records' relative order. The records are moved, not
/// copied: a window holds up to tens of thousands of payloads.
pub fn batches(dest: &dyn Destination, records: Vec<OutboxRecord>, batch_size: usize) -> Vec<Vec<OutboxRecord>> {
    let mut groups: Vec<(u8, Vec<OutboxRecord>)> = Vec::new();
    for record in records {
        let group = dest.request_group(&record);
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push(record),
            None => groups.push((group, vec![record])),
        }
    }
    let mut out = Vec::new();
    for (group, members) in groups {
        let size = batch_size.min(dest.group_batch_size(group)).max(1);
        let mut members = members.into_iter().peekable();
        while members.peek().is_some() {
            out.push(members.by_ref().take(size).collect());
        }
    }
    out
}

/// Hex blake3 over the sync's identity (`scope`), the run and the record ids in order. A retry
/// of the same records, even by a restarted worker, gets the same key, so the destination can
/// dedupe it.
pub fn idempotency_key(scope: &str, run_id: i64, records: &[OutboxRecord]) -> String {
    let mut hasher = blake3::Hasher::new();
    // Length prefix: ("ab", 1) and ("a", ...) must never collide.
    hasher.update(&(scope.len() as u64).to_le_bytes());
    hasher.update(scope.as_bytes());
    hasher.update(&run_id.to_le_bytes());
    for record in records {
        hasher.update(&record.id.to_le_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

/// At most `max` characters of a response body, for error messages and `retl.row_errors`.
pub fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}

/// "HTTP 422" or "HTTP 422: <body excerpt>", for error messages.
pub fn describe(resp: &HttpResponse, max: usize) -> String {
    let body = excerpt(&resp.body, max);
    if body.is_empty() {
        format!("HTTP {}", resp.status)
    } else {
        format!("HTTP {}: {body}", resp.status)
    }
}

/// What an unsuccessful answer means alike for every connector: 401/403 fail the run (bad
/// credentials), 408/425/429/5xx are retried honouring `Retry-After`, and redirects fail the
/// run (they are not followed: the token must not go to another host, and a moved endpoint
/// will not come back by itself). `None` for every other status: the connector decides.
pub fn classify_failure(resp: &HttpResponse, max_excerpt: usize) -> Option<ResponseOutcome> {
    let status = resp.status;
    match status {
        401 | 403 => Some(ResponseOutcome::Fatal {
            status: Some(status),
            message: format!("destination rejected the credentials (HTTP {status}): check the token in the user mapping"),
        }),
        408 | 425 | 429 | 500..=599 => Some(ResponseOutcome::Transient {
            status: Some(status),
            retry_after: resp
                .header("Retry-After")
                .and_then(|v| crate::backoff::parse_retry_after(v, std::time::SystemTime::now())),
            message: describe(resp, max_excerpt),
        }),
        300..=399 => Some(ResponseOutcome::Fatal {
            status: Some(status),
            message: format!(
                "destination answered HTTP {status} (redirect to {}); redirects are not followed: set the \
                 server's url to the final address",
                resp.header("Location").unwrap_or("nowhere")
            ),
        }),
        _ => None,
    }
}

/// Destinations sometimes echo the Authorization header back in error bodies; this keeps the
/// token out of anything we store or log.
pub fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(secret) if !secret.is_empty() => text.replace(secret, "[redacted]"),
        _ => text.to_string(),
    }
}

/// `redact` for every secret of a delivery (token, OAuth client secret and refresh token).
pub fn redact_all(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_string(), |text, secret| redact(&text, Some(secret)))
}

/// The connector for a destination's options (validated by `options::parse_server_options`,
/// so templates parse).
pub fn for_config(cfg: &DestinationConfig) -> Box<dyn Destination> {
    for_sync(cfg, &[])
}

/// `for_config` for one sync, whose destination fields some connectors need (Stripe unsets
/// the metadata keys a sync writes when a row leaves it).
pub fn for_sync(cfg: &DestinationConfig, sync_fields: &[String]) -> Box<dyn Destination> {
    match cfg.kind {
        DestinationKind::Slack => {
            if let Some(slack) = &cfg.slack {
                return Box::new(Slack::new(&cfg.url, slack));
            }
        }
        DestinationKind::Stripe => return Box::new(Stripe::new(&cfg.url, sync_fields)),
        DestinationKind::CustomerIo => return Box::new(CustomerIo::new(&cfg.url)),
        DestinationKind::Intercom => {
            if let Some(intercom) = &cfg.intercom {
                return Box::new(Intercom::new(&cfg.url, intercom));
            }
        }
        DestinationKind::MetaAudience => {
            if let Some(meta) = &cfg.meta {
                return Box::new(MetaAudience::new(&cfg.url, meta));
            }
        }
        _ => {}
    }
    match (&cfg.kind, &cfg.http, &cfg.hubspot, &cfg.salesforce) {
        (DestinationKind::Http, Some(http), _, _) => match Http::new(&cfg.url, http) {
            Ok(connector) => Box::new(connector),
            // Unreachable after validation; a connector that rejects everything says why.
            Err(message) => Box::new(http::Broken(message)),
        },
        (DestinationKind::HubSpot, _, Some(hubspot), _) => Box::new(HubSpot::new(&cfg.url, hubspot)),
        (DestinationKind::Salesforce, _, _, Some(salesforce)) => Box::new(Salesforce::new(&cfg.url, salesforce)),
        _ => Box::new(Webhook::new(&cfg.url)),
    }
}

/// The batch size actually used: the configured one, capped by what the connector accepts.
pub fn effective_batch_size(cfg: &DestinationConfig, dest: &dyn Destination) -> usize {
    cfg.batch_size.min(dest.max_batch_size()).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Op;
    use serde_json::json;

    fn rec(id: i64) -> OutboxRecord {
        OutboxRecord {
            id,
            op: Op::Upsert,
            key: json!({"id": id}),
            fields: None,
            destination_id: None,
        }
    }

    #[test]
    fn idempotency_key_is_stable_and_specific() {
        let key = idempotency_key("crm", 7, &[rec(1), rec(2)]);
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(key, idempotency_key("crm", 7, &[rec(1), rec(2)]));
        assert_ne!(key, idempotency_key("crm", 7, &[rec(2), rec(1)]));
        assert_ne!(key, idempotency_key("crm", 8, &[rec(1), rec(2)]));
        assert_ne!(key, idempotency_key("crm2", 7, &[rec(1), rec(2)]));
        assert_ne!(key, idempotency_key("crm", 7, &[rec(1)]));
    }

    #[test]
    fn excerpt_cuts_on_char_boundaries() {
        assert_eq!(excerpt(b"hello", 5), "hello");
        assert_eq!(excerpt(b"hello", 4), "hell…");
        assert_eq!(excerpt("héllo".as_bytes(), 2), "hé…");
        assert_eq!(excerpt(b"", 3), "");
        assert_eq!(excerpt(b"ok\xff", 10), "ok\u{fffd}");
    }

    #[test]
    fn redact_hides_the_secret() {
        assert_eq!(
            redact("bad token abc, abc", Some("abc")),
            "bad token [redacted], [redacted]"
        );
        assert_eq!(redact("bad token abc", None), "bad token abc");
        assert_eq!(redact("bad token abc", Some("")), "bad token abc");
    }

    #[test]
    fn factory_and_batch_cap() {
        let mut cfg = crate::options::parse_server_options(&[
            ("type".into(), "webhook".into()),
            ("url".into(), "https://example.com/h".into()),
        ])
        .unwrap();
        let dest = for_config(&cfg);
        assert_eq!(dest.kind(), "webhook");
        assert_eq!(dest.max_batch_size(), 1000);
        assert_eq!(effective_batch_size(&cfg, dest.as_ref()), 100);
        cfg.batch_size = 5000;
        assert_eq!(effective_batch_size(&cfg, dest.as_ref()), 1000);
    }

    #[test]
    fn batches_split_by_group_in_order_and_cap_each_request() {
        let cfg = crate::options::parse_server_options(&[("type".into(), "hubspot".into()), ("object".into(), "contacts".into()), ("id_property".into(), "email".into())]).unwrap();
        let dest = for_config(&cfg);
        // HubSpot: upserts, deletes of known ids (archive) and of unknown ones (lookup first)
        // never share a request.
        let mut records: Vec<OutboxRecord> = (1..=7).map(rec).collect();
        for r in &mut records[2..4] {
            r.op = Op::Delete;
            r.destination_id = Some(format!("hs-{}", r.id));
        }
        records[5].op = Op::Delete;
        let ids = |b: &Vec<Vec<OutboxRecord>>| -> Vec<Vec<i64>> { b.iter().map(|r| r.iter().map(|x| x.id).collect()).collect() };
        let split = batches(dest.as_ref(), records.clone(), 2);
        assert_eq!(ids(&split), vec![vec![1, 2], vec![5, 7], vec![3, 4], vec![6]]);
        assert_eq!((split[2][0].op, split[2][0].destination_id.as_deref()), (Op::Delete, Some("hs-3")), "records are moved whole");
        assert_eq!(ids(&batches(dest.as_ref(), records, 100)), vec![vec![1, 2, 5, 7], vec![3, 4], vec![6]]);
        assert!(batches(dest.as_ref(), Vec::new(), 2).is_empty());
    }

    #[test]
    fn header_lookup_ignores_case() {
        let resp = HttpResponse {
            status: 429,
            headers: vec![("retry-after".into(), "3".into())],
            body: vec![],
        };
        assert_eq!(resp.header("Retry-After"), Some("3"));
        assert_eq!(resp.header("Location"), None);
    }
}
