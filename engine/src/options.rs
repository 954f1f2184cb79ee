//! Validation of the foreign-data-wrapper options. It runs at DDL time (the validator of
//! CREATE SERVER / USER MAPPING), so every message says what is wrong and how to fix it.

mod engagement;
mod saas;

pub use engagement::{IntercomObject, IntercomOptions, MetaOptions, SlackOptions};
pub use saas::{HubSpotOptions, OAuthSecrets, SalesforceOptions, UserMapping};

use std::fmt;
use std::time::Duration;

const SERVER_OPTIONS: &str = "type, url, batch_size, rate_limit, max_concurrency, timeout_ms, max_retries, \
     max_backoff_ms, method, headers, body, per, encoding, success, results, result_ok, result_error, result_id, \
     object, id_property, external_id, api_version, bulk_threshold, bulk_poll_ms, token_url, channel, text, audience_id, tag, \
     daily_row_quota, daily_api_quota";
/// Options that only some destination types take (every other option is common to all).
const TYPE_OPTIONS: [(&str, &[DestinationKind]); 20] = {
    use DestinationKind::*;
    [
        ("method", &[Http]),
        ("headers", &[Http]),
        ("body", &[Http]),
        ("per", &[Http, Slack]),
        ("encoding", &[Http]),
        ("success", &[Http]),
        ("results", &[Http]),
        ("result_ok", &[Http]),
        ("result_error", &[Http]),
        ("result_id", &[Http]),
        ("object", &[HubSpot, Salesforce, Intercom]),
        ("id_property", &[HubSpot]),
        ("external_id", &[Salesforce]),
        ("api_version", &[Salesforce, MetaAudience, Intercom]),
        ("bulk_threshold", &[Salesforce]),
        ("bulk_poll_ms", &[Salesforce]),
        ("channel", &[Slack]),
        ("text", &[Slack]),
        ("audience_id", &[MetaAudience]),
        ("tag", &[Intercom]),
    ]
};
const MAPPING_OPTIONS: &str = "token, token_env, client_id, client_secret, refresh_token";
const WRAPPER_OPTIONS: &str = "none (put destination settings on CREATE SERVER and credentials on CREATE USER MAPPING)";
const SUPPORTED_TYPES: &str = "webhook, http, hubspot, salesforce, slack, stripe, intercom, customerio, meta_audience";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionsError {
    #[error("unknown option \"{option}\" for a {context}; valid options: {valid}")]
    Unknown {
        option: String,
        context: &'static str,
        valid: &'static str,
    },
    #[error("option \"{option}\" is a credential and belongs in a user mapping, not on the server: CREATE USER MAPPING FOR CURRENT_USER SERVER ... OPTIONS ({option} '...') (server options are readable by every user with access to the server)")]
    Credential { option: String },
    #[error("option \"{option}\" is given more than once")]
    Duplicate { option: String },
    #[error("option \"{option}\" is required ({hint})")]
    Missing { option: &'static str, hint: &'static str },
    #[error("unknown destination type \"{0}\" (supported: {SUPPORTED_TYPES})")]
    UnknownType(String),
    #[error("option \"{option}\" must be {expected}, got \"{value}\"")]
    Invalid {
        option: &'static str,
        value: String,
        expected: &'static str,
    },
    /// Like `Invalid`, for secrets: the value never appears in the message (it would end up in
    /// the server log and in the client's error).
    #[error("option \"{option}\" must be {expected}; the value is not shown")]
    InvalidSecret {
        option: &'static str,
        expected: &'static str,
    },
    #[error("option {0}")]
    Conflict(String),
    #[error("option \"{option}\" is not a valid template: {problem}")]
    Template { option: &'static str, problem: String },
    #[error("environment variable \"{name}\" named by token_env {problem}")]
    Env { name: String, problem: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationKind {
    Webhook,
    /// Any HTTP API, requests built from Liquid templates.
    Http,
    /// HubSpot CRM v3 objects (batch upsert by a unique property, batch archive).
    HubSpot,
    /// Salesforce sObjects (sObject Collections, Bulk API 2.0 for large runs).
    Salesforce,
    /// Slack messages (incoming webhook or chat.postMessage).
    Slack,
    /// Stripe customers (fields and metadata).
    Stripe,
    /// Intercom contacts and companies, and audience membership as a tag.
    Intercom,
    /// Customer.io people (Track API identify and delete).
    CustomerIo,
    /// Meta custom audience membership (hashed identifiers).
    MetaAudience,
}

impl DestinationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::Webhook => "webhook",
            DestinationKind::Http => "http",
            DestinationKind::HubSpot => "hubspot",
            DestinationKind::Salesforce => "salesforce",
            DestinationKind::Slack => "slack",
            DestinationKind::Stripe => "stripe",
            DestinationKind::Intercom => "intercom",
            DestinationKind::CustomerIo => "customerio",
            DestinationKind::MetaAudience => "meta_audience",
        }
    }
}

/// The generic HTTP connector's settings (templates as written; they are known to parse).
#[derive(Clone, Debug, PartialEq)]
pub struct HttpOptions {
    pub method: String,
    /// Header name and value template.
    pub headers: Vec<(String, String)>,
    /// `None`: the records as JSON (`{"op", "key", "fields"}`, or `{"records": [...]}` per batch).
    pub body: Option<String>,
    /// One request per batch of records rather than per record.
    pub per_batch: bool,
    /// Send the rendered JSON object as application/x-www-form-urlencoded.
    pub form: bool,
    /// Statuses that mean success (inclusive ranges).
    pub success: Vec<(u16, u16)>,
    /// Per-record results in a successful response: JSON pointers to the array (aligned with
    /// the records), and within each item to its success flag and error message.
    pub results: Option<ResultPointers>,
    /// JSON pointer to the destination's id for a record, in the response of a per-record
    /// request or in the record's item of `results`: kept in the sync's identity map and
    /// given to later templates as `destination_id`.
    pub result_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResultPointers {
    pub array: String,
    pub ok: String,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DestinationConfig {
    pub kind: DestinationKind,
    pub url: String,
    pub batch_size: usize,
    /// Requests per second; `None` = unlimited.
    pub rate_limit: Option<f64>,
    pub max_concurrency: usize,
    pub timeout: Duration,
    pub max_retries: u32,
    pub max_backoff: Duration,
    /// Type 'http' only.
    pub http: Option<HttpOptions>,
    /// Type 'hubspot' only.
    pub hubspot: Option<HubSpotOptions>,
    /// Type 'salesforce' only.
    pub salesforce: Option<SalesforceOptions>,
    /// Type 'slack' only.
    pub slack: Option<SlackOptions>,
    /// Type 'meta_audience' only.
    pub meta: Option<MetaOptions>,
    /// Type 'intercom' only.
    pub intercom: Option<IntercomOptions>,
    /// Where an OAuth access token is refreshed: `token_url`, or the vendor's for hubspot and
    /// salesforce.
    pub token_url: Option<String>,
}

/// Rejects a second occurrence of any option, and any option not in `valid`.
fn check_names(opts: &[(String, String)], valid: &'static str, context: &'static str) -> Result<(), OptionsError> {
    let names: Vec<&str> = valid.split(", ").filter(|n| !n.is_empty()).collect();
    for (i, (name, _)) in opts.iter().enumerate() {
        if !names.contains(&name.as_str()) {
            return Err(OptionsError::Unknown {
                option: name.clone(),
                context,
                valid,
            });
        }
        if opts[..i].iter().any(|(earlier, _)| earlier == name) {
            return Err(OptionsError::Duplicate { option: name.clone() });
        }
    }
    Ok(())
}

/// The part of a (templated) URL before its first `{{` or `{%`: for the http connector, the
/// part that names the scheme and host.
pub fn fixed_url_part(url: &str) -> &str {
    url.split("{{").next().unwrap_or_default().split("{%").next().unwrap_or_default()
}

/// A user-mapping option (credentials): refused on servers, whose options every user with
/// access to the server can read.
pub fn is_credential(name: &str) -> bool {
    MAPPING_OPTIONS.split(", ").any(|option| option == name)
}

pub(crate) fn get<'a>(opts: &'a [(String, String)], name: &str) -> Option<&'a str> {
    opts.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// An optional integer option within `range`, or `default` when absent.
pub(crate) fn int(
    opts: &[(String, String)],
    option: &'static str,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
    expected: &'static str,
) -> Result<u64, OptionsError> {
    let Some(value) = get(opts, option) else {
        return Ok(default);
    };
    match value.trim().parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(OptionsError::Invalid {
            option,
            value: value.to_string(),
            expected,
        }),
    }
}

pub fn parse_server_options(opts: &[(String, String)]) -> Result<DestinationConfig, OptionsError> {
    if let Some((name, _)) = opts.iter().find(|(name, _)| is_credential(name)) {
        return Err(OptionsError::Credential { option: name.clone() });
    }
    check_names(opts, SERVER_OPTIONS, "retl destination")?;
    let kind = match get(opts, "type") {
        None => {
            return Err(OptionsError::Missing {
                option: "type",
                hint: "one of: webhook, http, hubspot, salesforce, slack, stripe, intercom, customerio, meta_audience",
            })
        }
        Some("webhook") => DestinationKind::Webhook,
        Some("http") => DestinationKind::Http,
        Some("hubspot") => DestinationKind::HubSpot,
        Some("salesforce") => DestinationKind::Salesforce,
        Some("slack") => DestinationKind::Slack,
        Some("stripe") => DestinationKind::Stripe,
        Some("intercom") => DestinationKind::Intercom,
        Some("customerio") => DestinationKind::CustomerIo,
        Some("meta_audience") => DestinationKind::MetaAudience,
        Some(other) => return Err(OptionsError::UnknownType(other.to_string())),
    };
    for (option, kinds) in TYPE_OPTIONS {
        if get(opts, option).is_some() && !kinds.contains(&kind) {
            let names: Vec<String> = kinds.iter().map(|k| format!("'{}'", k.as_str())).collect();
            let names = match names.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => names.join(""),
            };
            return Err(OptionsError::Conflict(format!(
                "\"{option}\" is for destinations of type {names} only, not '{}'",
                kind.as_str()
            )));
        }
    }
    let url = match (get(opts, "url"), kind) {
        (Some(url), _) => url,
        (None, DestinationKind::HubSpot) => saas::HUBSPOT_URL,
        (None, kind) if engagement::default_url(kind, opts).is_some() => engagement::default_url(kind, opts).unwrap_or_default(),
        (None, DestinationKind::Salesforce) => {
            return Err(OptionsError::Missing {
                option: "url",
                hint: "your org's instance URL, e.g. 'https://acme.my.salesforce.com'",
            })
        }
        (None, _) => {
            return Err(OptionsError::Missing {
                option: "url",
                hint: "the endpoint records are POSTed to, e.g. 'https://example.com/hooks/retl'",
            })
        }
    };
    let valid_url = if kind == DestinationKind::Http {
        // A template: its fixed start must already name the scheme and host.
        url::Url::parse(fixed_url_part(url))
            .map(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()))
            .unwrap_or(false)
            && crate::template::parse(url).is_ok()
    } else {
        url::Url::parse(url)
            .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .unwrap_or(false)
    };
    if !valid_url {
        return Err(OptionsError::Invalid {
            option: "url",
            value: url.to_string(),
            expected: "an http or https URL",
        });
    }
    // A trailing slash would double up when paths are appended.
    let url = if matches!(kind, DestinationKind::Webhook | DestinationKind::Http) { url } else { url.trim_end_matches('/') };
    let rate_limit = match get(opts, "rate_limit") {
        None => saas::default_rate_limit(kind).or(engagement::default_rate_limit(kind)),
        Some(value) => match value.trim().parse::<f64>() {
            // The comparison also rejects NaN.
            Ok(r) if r > 0.0 && r <= 10_000.0 => Some(r),
            _ => {
                return Err(OptionsError::Invalid {
                    option: "rate_limit",
                    value: value.to_string(),
                    expected: "a number of requests per second greater than 0 and at most 10000 (omit it for no limit)",
                })
            }
        },
    };
    // Read by the planner (daily_row_quota: the row-quota safeguard) and retl.sync_status.
    for quota in ["daily_row_quota", "daily_api_quota"] {
        int(opts, quota, 1..=1_000_000_000_000, 1, "a positive whole number per day")?;
    }
    let ms = |option, range, default, expected| int(opts, option, range, default, expected).map(Duration::from_millis);
    Ok(DestinationConfig {
        kind,
        url: url.to_string(),
        batch_size: match kind {
            DestinationKind::HubSpot => int(opts, "batch_size", 1..=100, 100, "an integer between 1 and 100 (HubSpot's batch limit)")?,
            DestinationKind::Salesforce => {
                int(opts, "batch_size", 1..=200, 200, "an integer between 1 and 200 (the sObject Collections limit)")?
            }
            DestinationKind::MetaAudience => {
                int(opts, "batch_size", 1..=10_000, 10_000, "an integer between 1 and 10000 (Meta's limit per request)")?
            }
            // Only a digest (per 'run') batches; one message per row ignores it.
            DestinationKind::Slack => int(opts, "batch_size", 1..=1000, 1000, "an integer between 1 and 1000")?,
            _ => int(opts, "batch_size", 1..=1000, 100, "an integer between 1 and 1000")?,
        } as usize,
        rate_limit,
        max_concurrency: int(opts, "max_concurrency", 1..=32, 4, "an integer between 1 and 32")? as usize,
        timeout: ms(
            "timeout_ms",
            100..=600_000,
            30_000,
            "an integer number of milliseconds between 100 and 600000",
        )?,
        max_retries: int(opts, "max_retries", 0..=20, 5, "an integer between 0 and 20")? as u32,
        max_backoff: ms(
            "max_backoff_ms",
            100..=3_600_000,
            60_000,
            "an integer number of milliseconds between 100 and 3600000",
        )?,
        http: match kind {
            DestinationKind::Http => Some(parse_http_options(opts)?),
            _ => None,
        },
        hubspot: match kind {
            DestinationKind::HubSpot => Some(saas::parse_hubspot(opts)?),
            _ => None,
        },
        salesforce: match kind {
            DestinationKind::Salesforce => Some(saas::parse_salesforce(opts)?),
            _ => None,
        },
        slack: match kind {
            DestinationKind::Slack => Some(engagement::parse_slack(opts)?),
            _ => None,
        },
        meta: match kind {
            DestinationKind::MetaAudience => Some(engagement::parse_meta(opts)?),
            _ => None,
        },
        intercom: match kind {
            DestinationKind::Intercom => Some(engagement::parse_intercom(opts)?),
            _ => None,
        },
        token_url: saas::token_url(opts, kind, url)?,
    })
}

/// A template option: it must parse (the message says where it does not).
fn template(opts: &[(String, String)], option: &'static str) -> Result<Option<String>, OptionsError> {
    match get(opts, option) {
        None => Ok(None),
        Some(source) => match crate::template::parse(source) {
            Ok(_) => Ok(Some(source.to_string())),
            Err(problem) => Err(OptionsError::Template { option, problem }),
        },
    }
}

fn parse_http_options(opts: &[(String, String)]) -> Result<HttpOptions, OptionsError> {
    let method = template(opts, "method")?.unwrap_or_else(|| "POST".into());
    if !method.contains("{{") && !method.contains("{%") && !HTTP_METHODS.contains(&method.as_str()) {
        return Err(OptionsError::Invalid {
            option: "method",
            value: method,
            expected: "one of GET, POST, PUT, PATCH, DELETE (or a template rendering one of them)",
        });
    }
    let headers = match get(opts, "headers") {
        None => Vec::new(),
        Some(text) => {
            let invalid = || OptionsError::Invalid {
                option: "headers",
                value: text.to_string(),
                expected: "a JSON object of header names and value templates, e.g. '{\"Authorization\": \"Bearer {{ token }}\"}'",
            };
            let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).map_err(|_| invalid())?;
            let mut headers = Vec::new();
            for (name, value) in object {
                let value = value.as_str().ok_or_else(invalid)?;
                let valid_name = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
                if !valid_name {
                    return Err(invalid());
                }
                crate::template::parse(value).map_err(|problem| OptionsError::Template { option: "headers", problem })?;
                headers.push((name, value.to_string()));
            }
            headers
        }
    };
    let choice = |option: &'static str, values: [&'static str; 2], expected: &'static str| -> Result<bool, OptionsError> {
        match get(opts, option) {
            None => Ok(false),
            Some(v) if v == values[0] => Ok(false),
            Some(v) if v == values[1] => Ok(true),
            Some(v) => Err(OptionsError::Invalid { option, value: v.to_string(), expected }),
        }
    };
    let per_batch = choice("per", ["record", "batch"], "'record' (one request per record, the default) or 'batch'")?;
    let form = choice("encoding", ["json", "form"], "'json' (the default) or 'form'")?;
    let success = match get(opts, "success") {
        None => vec![(200, 299)],
        Some(text) => parse_statuses(text).ok_or_else(|| OptionsError::Invalid {
            option: "success",
            value: text.to_string(),
            expected: "HTTP statuses or classes separated by commas, e.g. '2xx' or '200,201,204'",
        })?,
    };
    let pointer = |option: &'static str| -> Result<Option<String>, OptionsError> {
        match get(opts, option) {
            None => Ok(None),
            Some(p) if p.is_empty() || p.starts_with('/') => Ok(Some(p.to_string())),
            Some(p) => Err(OptionsError::Invalid {
                option,
                value: p.to_string(),
                expected: "a JSON pointer such as '/results' or '/ok'",
            }),
        }
    };
    let results = match (pointer("results")?, pointer("result_ok")?, pointer("result_error")?) {
        (Some(array), Some(ok), error) => Some(ResultPointers { array, ok, error }),
        (None, None, None) => None,
        _ => {
            return Err(OptionsError::Conflict(
                "\"results\" and \"result_ok\" go together (\"result_error\" is optional with them): \
                 set both to read per-record results from the response"
                    .into(),
            ))
        }
    };
    if results.is_some() && !per_batch {
        return Err(OptionsError::Conflict(
            "\"results\" reads per-record results of a batch request: it needs per 'batch'".into(),
        ));
    }
    let result_id = pointer("result_id")?;
    if result_id.is_some() && per_batch && results.is_none() {
        return Err(OptionsError::Conflict(
            "\"result_id\" with per 'batch' points into each record's result: set \"results\" and \"result_ok\" too".into(),
        ));
    }
    Ok(HttpOptions { method, headers, body: template(opts, "body")?, per_batch, form, success, results, result_id })
}

const HTTP_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// "2xx,404" -> [(200, 299), (404, 404)].
fn parse_statuses(text: &str) -> Option<Vec<(u16, u16)>> {
    text.split(',')
        .map(str::trim)
        .map(|part| match part.as_bytes() {
            [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                let class = u16::from(c - b'0') * 100;
                Some((class, class + 99))
            }
            _ => part.parse::<u16>().ok().filter(|s| (100..=599).contains(s)).map(|s| (s, s)),
        })
        .collect()
}

/// How the worker authenticates to the destination, from the user mapping.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    None,
    Token(String),
    /// Name of an environment variable of the Postgres server holding the token, so the secret
    /// need not be stored in the catalog.
    TokenEnv(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Token(_) => f.write_str("Token(<redacted>)"),
            Credentials::TokenEnv(name) => f.debug_tuple("TokenEnv").field(name).finish(),
        }
    }
}

pub(crate) const TOKEN_EXPECTED: &str = "a non-empty token of printable ASCII characters without spaces";

/// A token ends up in an `Authorization` header: anything else would fail every request.
pub(crate) fn valid_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub fn parse_user_mapping_options(opts: &[(String, String)]) -> Result<UserMapping, OptionsError> {
    check_names(opts, MAPPING_OPTIONS, "retl user mapping")?;
    let credentials = match (get(opts, "token"), get(opts, "token_env")) {
        (Some(_), Some(_)) => {
            return Err(OptionsError::Conflict(
                "\"token\" and \"token_env\" cannot both be set; use one".into(),
            ))
        }
        (Some(token), None) if valid_token(token) => Credentials::Token(token.to_string()),
        (Some(_), None) => {
            return Err(OptionsError::InvalidSecret {
                option: "token",
                expected: TOKEN_EXPECTED,
            })
        }
        (None, Some(name)) if valid_env_name(name) => Credentials::TokenEnv(name.to_string()),
        (None, Some(name)) => {
            return Err(OptionsError::Invalid {
                option: "token_env",
                value: name.to_string(),
                expected: "an environment variable name (letters, digits and underscores, not starting with a digit)",
            })
        }
        (None, None) => Credentials::None,
    };
    Ok(UserMapping { credentials, oauth: saas::parse_oauth(opts)? })
}

/// The wrapper itself is configuration-free; accepting options there would only hide typos.
pub fn parse_wrapper_options(opts: &[(String, String)]) -> Result<(), OptionsError> {
    check_names(opts, "", "retl foreign-data wrapper").map_err(|e| match e {
        OptionsError::Unknown { option, context, .. } => OptionsError::Unknown {
            option,
            context,
            valid: WRAPPER_OPTIONS,
        },
        other => other,
    })
}

impl Credentials {
    /// The bearer token to send, if any. `env` looks up the server's environment (injected so
    /// tests need not mutate the process environment).
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<Option<String>, OptionsError> {
        match self {
            Credentials::None => Ok(None),
            Credentials::Token(token) => Ok(Some(token.clone())),
            Credentials::TokenEnv(name) => match env(name) {
                Some(token) if valid_token(&token) => Ok(Some(token)),
                Some(token) if !token.is_empty() => Err(OptionsError::Env {
                    name: name.clone(),
                    problem: "contains spaces or non-printable characters; the value is not shown",
                }),
                _ => Err(OptionsError::Env {
                    name: name.clone(),
                    problem: "is not set in the server's environment",
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn server_err(pairs: &[(&str, &str)]) -> String {
        parse_server_options(&opts(pairs)).unwrap_err().to_string()
    }

    const BASE: [(&str, &str); 2] = [("type", "webhook"), ("url", "https://example.com/hook")];

    fn with<'a>(extra: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
        let mut v = BASE.to_vec();
        v.push(extra);
        v
    }

    #[test]
    fn server_defaults() {
        let cfg = parse_server_options(&opts(&BASE)).unwrap();
        assert_eq!(
            cfg,
            DestinationConfig {
                kind: DestinationKind::Webhook,
                url: "https://example.com/hook".into(),
                batch_size: 100,
                rate_limit: None,
                max_concurrency: 4,
                timeout: Duration::from_secs(30),
                max_retries: 5,
                max_backoff: Duration::from_secs(60),
                http: None,
                hubspot: None,
                salesforce: None,
                slack: None,
                meta: None,
                intercom: None,
                token_url: None,
            }
        );
        assert_eq!(cfg.kind.as_str(), "webhook");
    }

    #[test]
    fn server_all_options() {
        let cfg = parse_server_options(&opts(&[
            ("type", "webhook"),
            ("url", "http://127.0.0.1:8080/x"),
            ("batch_size", "1000"),
            ("rate_limit", "2.5"),
            ("max_concurrency", "1"),
            ("timeout_ms", "100"),
            ("max_retries", "0"),
            ("max_backoff_ms", "3600000"),
        ]))
        .unwrap();
        assert_eq!(cfg.batch_size, 1000);
        assert_eq!(cfg.rate_limit, Some(2.5));
        assert_eq!(cfg.max_concurrency, 1);
        assert_eq!(cfg.timeout, Duration::from_millis(100));
        assert_eq!(cfg.max_retries, 0);
        assert_eq!(cfg.max_backoff, Duration::from_secs(3600));
    }

    #[test]
    fn credentials_on_a_server_are_refused_without_showing_them() {
        for option in ["token", "token_env", "client_id", "client_secret", "refresh_token"] {
            let err = server_err(&with((option, "sk_live_secret")));
            assert_eq!(
                err,
                format!(
                    "option \"{option}\" is a credential and belongs in a user mapping, not on the server: CREATE USER MAPPING FOR CURRENT_USER SERVER ... OPTIONS ({option} '...') (server options are readable by every user with access to the server)"
                )
            );
        }
    }

    #[test]
    fn server_errors_are_explicit() {
        assert_eq!(
            server_err(&with(("batchsize", "10"))),
            "unknown option \"batchsize\" for a retl destination; valid options: type, url, batch_size, \
             rate_limit, max_concurrency, timeout_ms, max_retries, max_backoff_ms, method, headers, body, per, \
             encoding, success, results, result_ok, result_error, result_id, object, id_property, external_id, \
             api_version, bulk_threshold, bulk_poll_ms, token_url, channel, text, audience_id, tag, \
             daily_row_quota, daily_api_quota"
        );
        assert_eq!(
            server_err(&with(("daily_row_quota", "0"))),
            "option \"daily_row_quota\" must be a positive whole number per day, got \"0\""
        );
        assert_eq!(
            server_err(&with(("daily_api_quota", "1e6"))),
            "option \"daily_api_quota\" must be a positive whole number per day, got \"1e6\""
        );
        assert!(parse_server_options(&opts(&with(("daily_row_quota", "250000")))).is_ok());
        assert_eq!(
            server_err(&with(("batch_size", "abc"))),
            "option \"batch_size\" must be an integer between 1 and 1000, got \"abc\""
        );
        assert_eq!(
            server_err(&with(("batch_size", "1001"))),
            "option \"batch_size\" must be an integer between 1 and 1000, got \"1001\""
        );
        assert_eq!(
            server_err(&with(("max_concurrency", "0"))),
            "option \"max_concurrency\" must be an integer between 1 and 32, got \"0\""
        );
        assert_eq!(
            server_err(&with(("timeout_ms", "99"))),
            "option \"timeout_ms\" must be an integer number of milliseconds between 100 and 600000, got \"99\""
        );
        assert_eq!(
            server_err(&with(("max_retries", "21"))),
            "option \"max_retries\" must be an integer between 0 and 20, got \"21\""
        );
        assert_eq!(
            server_err(&with(("max_backoff_ms", "-1"))),
            "option \"max_backoff_ms\" must be an integer number of milliseconds between 100 and 3600000, got \"-1\""
        );
        for bad in ["0", "NaN", "10001", "fast"] {
            assert_eq!(
                server_err(&with(("rate_limit", bad))),
                format!(
                    "option \"rate_limit\" must be a number of requests per second greater than 0 and at most \
                     10000 (omit it for no limit), got \"{bad}\""
                )
            );
        }
        assert_eq!(
            server_err(&[("url", "https://example.com")]),
            "option \"type\" is required (one of: webhook, http, hubspot, salesforce, slack, stripe, intercom, customerio, meta_audience)"
        );
        assert_eq!(
            server_err(&[("type", "hubspt"), ("url", "https://example.com")]),
            "unknown destination type \"hubspt\" (supported: webhook, http, hubspot, salesforce, slack, stripe, intercom, customerio, meta_audience)"
        );
        assert_eq!(
            server_err(&[("type", "webhook")]),
            "option \"url\" is required (the endpoint records are POSTed to, e.g. 'https://example.com/hooks/retl')"
        );
        for bad in ["ftp://x", "example.com/hook", "http://"] {
            assert_eq!(
                server_err(&[("type", "webhook"), ("url", bad)]),
                format!("option \"url\" must be an http or https URL, got \"{bad}\"")
            );
        }
        assert_eq!(
            server_err(&with(("url", "https://other.example"))),
            "option \"url\" is given more than once"
        );
    }

    fn http_err(pairs: &[(&str, &str)]) -> String {
        let mut v = vec![("type", "http"), ("url", "https://api.example.com/users/{{ key.id }}")];
        v.extend_from_slice(pairs);
        server_err(&v)
    }

    #[test]
    fn http_options() {
        let cfg = parse_server_options(&opts(&[
            ("type", "http"),
            ("url", "https://api.example.com/users/{{ key.id }}"),
            ("method", "PATCH"),
            ("headers", r#"{"X-Api-Key": "{{ token }}"}"#),
            ("body", r#"{"email": {{ fields.email | json }}}"#),
            ("per", "batch"),
            ("encoding", "form"),
            ("success", "2xx, 409"),
            ("results", "/results"),
            ("result_ok", "/ok"),
        ]))
        .unwrap();
        assert_eq!(cfg.kind, DestinationKind::Http);
        assert_eq!(
            cfg.http.unwrap(),
            HttpOptions {
                method: "PATCH".into(),
                headers: vec![("X-Api-Key".into(), "{{ token }}".into())],
                body: Some(r#"{"email": {{ fields.email | json }}}"#.into()),
                per_batch: true,
                form: true,
                success: vec![(200, 299), (409, 409)],
                results: Some(ResultPointers { array: "/results".into(), ok: "/ok".into(), error: None }),
                result_id: None,
            }
        );
        let defaults = parse_server_options(&opts(&[("type", "http"), ("url", "https://api.example.com/x")])).unwrap();
        let http = defaults.http.unwrap();
        assert_eq!((http.method.as_str(), http.per_batch, http.form, http.success), ("POST", false, false, vec![(200, 299)]));
    }

    #[test]
    fn http_option_errors_say_what_is_wrong() {
        assert!(http_err(&[("body", "{{ fields.email ")]).starts_with("option \"body\" is not a valid template: "));
        assert_eq!(
            http_err(&[("method", "BREW")]),
            "option \"method\" must be one of GET, POST, PUT, PATCH, DELETE (or a template rendering one of them), got \"BREW\""
        );
        assert_eq!(
            http_err(&[("per", "row")]),
            "option \"per\" must be 'record' (one request per record, the default) or 'batch', got \"row\""
        );
        assert_eq!(
            http_err(&[("success", "2xx,abc")]),
            "option \"success\" must be HTTP statuses or classes separated by commas, e.g. '2xx' or '200,201,204', got \"2xx,abc\""
        );
        assert!(http_err(&[("headers", "[1]")]).starts_with("option \"headers\" must be a JSON object"));
        assert!(http_err(&[("headers", r#"{"Bad Header": "x"}"#)]).starts_with("option \"headers\" must be a JSON object"));
        assert_eq!(
            http_err(&[("results", "/results")]),
            "option \"results\" and \"result_ok\" go together (\"result_error\" is optional with them): set both to read \
             per-record results from the response"
        );
        assert_eq!(
            http_err(&[("results", "/results"), ("result_ok", "/ok")]),
            "option \"results\" reads per-record results of a batch request: it needs per 'batch'"
        );
        assert_eq!(
            server_err(&[("type", "http"), ("url", "{{ base }}/users")]),
            "option \"url\" must be an http or https URL, got \"{{ base }}/users\""
        );
        assert_eq!(
            server_err(&with(("body", "{}"))),
            "option \"body\" is for destinations of type 'http' only, not 'webhook'"
        );
    }

    #[test]
    fn user_mapping() {
        let parse = |pairs: &[(&str, &str)]| parse_user_mapping_options(&opts(pairs)).map(|m| m.credentials);
        assert_eq!(parse(&[]), Ok(Credentials::None));
        assert_eq!(parse(&[("token", "s3cr3t")]), Ok(Credentials::Token("s3cr3t".into())));
        assert_eq!(
            parse(&[("token_env", "HOOK_TOKEN_1")]),
            Ok(Credentials::TokenEnv("HOOK_TOKEN_1".into()))
        );
        assert_eq!(
            parse(&[("token", "a"), ("token_env", "B")]).unwrap_err().to_string(),
            "option \"token\" and \"token_env\" cannot both be set; use one"
        );
        assert_eq!(
            parse(&[("token", "")]).unwrap_err().to_string(),
            "option \"token\" must be a non-empty token of printable ASCII characters without spaces; the value is not shown"
        );
        assert_eq!(
            parse(&[("token_env", "1BAD")]).unwrap_err().to_string(),
            "option \"token_env\" must be an environment variable name (letters, digits and underscores, not \
             starting with a digit), got \"1BAD\""
        );
        assert_eq!(
            parse(&[("password", "hunter2")]).unwrap_err().to_string(),
            "unknown option \"password\" for a retl user mapping; valid options: token, token_env, client_id, \
             client_secret, refresh_token"
        );
        assert_eq!(
            parse(&[("token", "a"), ("token", "b")]).unwrap_err().to_string(),
            "option \"token\" is given more than once"
        );
    }

    #[test]
    fn secrets_never_leak() {
        let secret = "sk_live_abc def\n";
        let err = parse_user_mapping_options(&opts(&[("token", secret)])).unwrap_err();
        assert!(!err.to_string().contains("sk_live"), "{err}");
        assert!(!format!("{err:?}").contains("sk_live"), "{err:?}");
        let dup = parse_user_mapping_options(&opts(&[("token", "sk_live_1"), ("token", "sk_live_2")])).unwrap_err();
        assert!(!dup.to_string().contains("sk_live"), "{dup}");
        assert_eq!(
            format!("{:?}", Credentials::Token("sk_live_1".into())),
            "Token(<redacted>)"
        );
        assert_eq!(format!("{:?}", Credentials::TokenEnv("T".into())), "TokenEnv(\"T\")");
        let err = Credentials::TokenEnv("T".into())
            .resolve(|_| Some("sk_live bad".into()))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable \"T\" named by token_env contains spaces or non-printable characters; the value is not shown"
        );
    }

    #[test]
    fn resolve_credentials() {
        let env = |name: &str| match name {
            "SET" => Some("tok".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(Credentials::None.resolve(env), Ok(None));
        assert_eq!(Credentials::Token("x".into()).resolve(env), Ok(Some("x".into())));
        assert_eq!(Credentials::TokenEnv("SET".into()).resolve(env), Ok(Some("tok".into())));
        for name in ["EMPTY", "UNSET"] {
            assert_eq!(
                Credentials::TokenEnv(name.into()).resolve(env).unwrap_err().to_string(),
                format!("environment variable \"{name}\" named by token_env is not set in the server's environment")
            );
        }
    }

    #[test]
    fn wrapper_takes_no_options() {
        assert_eq!(parse_wrapper_options(&[]), Ok(()));
        assert_eq!(
            parse_wrapper_options(&opts(&[("url", "x")])).unwrap_err().to_string(),
            "unknown option \"url\" for a retl foreign-data wrapper; valid options: none (put destination \
             settings on CREATE SERVER and credentials on CREATE USER MAPPING)"
        );
    }
}
