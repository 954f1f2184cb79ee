//! Foreign-data-wrapper options: `parse_server_options` (and through it every per-connector
//! sub-parser: http, hubspot, salesforce, slack, intercom, meta_audience, token_url),
//! `parse_user_mapping_options` (tokens, OAuth secrets) and `parse_wrapper_options`.
//!
//! Input: UTF-8 text, one option per line, `name=value` (split at the first `=`; a line
//! without one is a name with an empty value). Values cannot hold a newline, which no option
//! needs to exercise its parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use retl_engine::options::{parse_server_options, parse_user_mapping_options, parse_wrapper_options, DestinationKind};

/// Secret values in the seeds carry this marker: no error message may repeat such a value.
const SECRET_MARK: &str = "s3cr3t";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let opts: Vec<(String, String)> = text
        .split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| match line.split_once('=') {
            Some((name, value)) => (name.to_string(), value.to_string()),
            None => (line.to_string(), String::new()),
        })
        .collect();

    let server = parse_server_options(&opts);
    // Deterministic: the validator and the worker parse the same options independently.
    assert_eq!(server, parse_server_options(&opts));
    match &server {
        Ok(cfg) => {
            let ty = opts.iter().find(|(n, _)| n == "type").map(|(_, v)| v.as_str());
            assert_eq!(ty, Some(cfg.kind.as_str()), "kind must be the type option");
            // The URL is kept as written (WHATWG parsing accepts e.g. "https:host/x" too) and is
            // an http(s) URL with a host; for type http, its fixed start before any tag.
            let fixed = match cfg.kind {
                DestinationKind::Http => cfg.url.split("{{").next().unwrap_or_default().split("{%").next().unwrap_or_default(),
                _ => &cfg.url,
            };
            let parsed = url::Url::parse(fixed).unwrap_or_else(|e| panic!("url {:?}: {e}", cfg.url));
            assert!(matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some(), "url {:?}", cfg.url);
            assert!((1..=10_000).contains(&cfg.batch_size), "batch_size {}", cfg.batch_size);
            assert!((1..=32).contains(&cfg.max_concurrency));
            assert!(cfg.max_retries <= 20);
            assert!(cfg.rate_limit.is_none_or(|r| r > 0.0 && r <= 10_000.0));
            assert!(cfg.timeout.as_millis() >= 100 && cfg.max_backoff.as_millis() >= 100);
            // Exactly the connector's own settings are present.
            assert_eq!(cfg.http.is_some(), cfg.kind == DestinationKind::Http);
            assert_eq!(cfg.hubspot.is_some(), cfg.kind == DestinationKind::HubSpot);
            assert_eq!(cfg.salesforce.is_some(), cfg.kind == DestinationKind::Salesforce);
            assert_eq!(cfg.slack.is_some(), cfg.kind == DestinationKind::Slack);
            assert_eq!(cfg.meta.is_some(), cfg.kind == DestinationKind::MetaAudience);
            assert_eq!(cfg.intercom.is_some(), cfg.kind == DestinationKind::Intercom);
            if let Some(http) = &cfg.http {
                // Templates accepted at DDL time must parse again in the worker.
                for source in std::iter::once(&cfg.url)
                    .chain(std::iter::once(&http.method))
                    .chain(http.headers.iter().map(|(_, v)| v))
                    .chain(http.body.iter())
                {
                    assert!(retl_engine::template::parse(source).is_ok(), "{source:?}");
                }
                assert!(!http.success.is_empty());
                assert!(http.success.iter().all(|&(lo, hi)| 100 <= lo && lo <= hi && hi <= 599));
            }
        }
        Err(e) => check_message(&e.to_string(), &opts),
    }

    let mapping = parse_user_mapping_options(&opts);
    assert_eq!(mapping, parse_user_mapping_options(&opts));
    match &mapping {
        Ok(m) => {
            // Debug output (logged) never shows a secret.
            check_message(&format!("{m:?}"), &opts);
        }
        Err(e) => check_message(&e.to_string(), &opts),
    }

    match parse_wrapper_options(&opts) {
        Ok(()) => assert!(opts.is_empty(), "the wrapper takes no options"),
        Err(e) => check_message(&e.to_string(), &opts),
    }
});

/// One line, and no secret value in it.
fn check_message(message: &str, opts: &[(String, String)]) {
    assert!(!message.contains('\n'), "message spans lines: {message}");
    let secret = |name: &str| matches!(name, "token" | "client_secret" | "refresh_token");
    for (name, value) in opts {
        if secret(name) && value.contains(SECRET_MARK) && message.contains(value.as_str()) {
            // Fine if the text is also an option's name or a non-secret option's value (those
            // are shown on purpose).
            let shown = opts.iter().any(|(n, v)| n.contains(value.as_str()) || (!secret(n) && v.contains(value.as_str())));
            assert!(shown, "secret {name} leaked: {message}");
        }
    }
}
