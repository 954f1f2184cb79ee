//! Options of the engagement connectors: Slack, Stripe, Customer.io and Meta custom audiences.

use super::{get, DestinationKind, OptionsError};

pub const SLACK_API_URL: &str = "https://slack.com";
pub const SLACK_WEBHOOK_URL: &str = "https://hooks.slack.com/services";
pub const STRIPE_URL: &str = "https://api.stripe.com";
pub const CUSTOMERIO_URL: &str = "https://track.customer.io";
pub const META_URL: &str = "https://graph.facebook.com";
pub const INTERCOM_URL: &str = "https://api.intercom.io";
const INTERCOM_VERSION: &str = "2.14";
/// Intercom allows 10,000 calls per minute per app (and 25,000 per workspace).
const INTERCOM_RATE: f64 = 150.0;
const META_API_VERSION: &str = "21.0";

/// Slack posts about one message per second per channel.
const SLACK_RATE: f64 = 1.0;
/// Stripe allows 100 operations per second in live mode and 25 in test mode: the lower one
/// works for both.
const STRIPE_RATE: f64 = 25.0;
/// Customer.io's Track API asks for at most 100 requests per second.
const CUSTOMERIO_RATE: f64 = 100.0;
/// Meta's custom-audience endpoint is limited per ad account; a few requests per second
/// of up to 10,000 users each is far below it.
const META_RATE: f64 = 5.0;

#[derive(Clone, Debug, PartialEq)]
pub struct SlackOptions {
    /// `chat.postMessage` to this channel (id or name) with the bot token; `None`: an incoming
    /// webhook, whose secret path is the user mapping's token.
    pub channel: Option<String>,
    /// Liquid template of the message.
    pub text: String,
    /// One message per batch of records (`records` in the template) rather than per record.
    pub digest: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum IntercomObject {
    Contacts,
    Companies,
}

#[derive(Clone, Debug, PartialEq)]
pub struct IntercomOptions {
    pub object: IntercomObject,
    /// Mirror audience membership as this tag on existing contacts, instead of writing them.
    pub tag: Option<String>,
    /// The Intercom-Version header.
    pub version: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MetaOptions {
    pub audience_id: String,
    /// Graph API version without the `v`, e.g. "21.0".
    pub api_version: String,
}

pub fn default_url(kind: DestinationKind, opts: &[(String, String)]) -> Option<&'static str> {
    match kind {
        DestinationKind::Slack if get(opts, "channel").is_some() => Some(SLACK_API_URL),
        DestinationKind::Slack => Some(SLACK_WEBHOOK_URL),
        DestinationKind::Stripe => Some(STRIPE_URL),
        DestinationKind::CustomerIo => Some(CUSTOMERIO_URL),
        DestinationKind::MetaAudience => Some(META_URL),
        DestinationKind::Intercom => Some(INTERCOM_URL),
        _ => None,
    }
}

pub fn default_rate_limit(kind: DestinationKind) -> Option<f64> {
    match kind {
        DestinationKind::Slack => Some(SLACK_RATE),
        DestinationKind::Stripe => Some(STRIPE_RATE),
        DestinationKind::CustomerIo => Some(CUSTOMERIO_RATE),
        DestinationKind::MetaAudience => Some(META_RATE),
        DestinationKind::Intercom => Some(INTERCOM_RATE),
        _ => None,
    }
}

pub fn parse_slack(opts: &[(String, String)]) -> Result<SlackOptions, OptionsError> {
    let text = get(opts, "text").ok_or(OptionsError::Missing {
        option: "text",
        hint: "the message as a Liquid template, e.g. 'New pro signup: {{ fields.name }} in {{ fields.region }}'",
    })?;
    crate::template::parse(text).map_err(|problem| OptionsError::Template { option: "text", problem })?;
    let channel = match get(opts, "channel") {
        None => None,
        Some(c) if !c.is_empty() && c.len() <= 80 && !c.contains(char::is_whitespace) => Some(c.to_string()),
        Some(c) => {
            return Err(OptionsError::Invalid {
                option: "channel",
                value: c.to_string(),
                expected: "a Slack channel id or name, e.g. 'C0123456' or '#sales'",
            })
        }
    };
    let digest = match get(opts, "per") {
        None | Some("record") => false,
        Some("run") => true,
        Some(other) => {
            return Err(OptionsError::Invalid {
                option: "per",
                value: other.to_string(),
                expected: "'record' (one message per row, the default) or 'run' (one digest message per run, `records` in the template)",
            })
        }
    };
    Ok(SlackOptions { channel, text: text.to_string(), digest })
}

pub fn parse_intercom(opts: &[(String, String)]) -> Result<IntercomOptions, OptionsError> {
    let object = match get(opts, "object") {
        None | Some("contacts") => IntercomObject::Contacts,
        Some("companies") => IntercomObject::Companies,
        Some(other) => {
            return Err(OptionsError::Invalid {
                option: "object",
                value: other.to_string(),
                expected: "'contacts' (the default) or 'companies'",
            })
        }
    };
    let tag = match get(opts, "tag") {
        None => None,
        Some(_) if object == IntercomObject::Companies => {
            return Err(OptionsError::Conflict("\"tag\" mirrors membership on contacts: it needs object 'contacts'".into()))
        }
        Some(t) if !t.trim().is_empty() && t.len() <= 190 => Some(t.to_string()),
        Some(t) => {
            return Err(OptionsError::Invalid { option: "tag", value: t.to_string(), expected: "a tag name (1 to 190 characters)" })
        }
    };
    let version = match get(opts, "api_version") {
        None => INTERCOM_VERSION.to_string(),
        Some(v) if v.split('.').count() == 2 && v.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) => v.to_string(),
        Some(v) => {
            return Err(OptionsError::Invalid { option: "api_version", value: v.to_string(), expected: "an Intercom API version such as '2.14'" })
        }
    };
    Ok(IntercomOptions { object, tag, version })
}

pub fn parse_meta(opts: &[(String, String)]) -> Result<MetaOptions, OptionsError> {
    let audience_id = match get(opts, "audience_id") {
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => id.to_string(),
        Some(id) => {
            return Err(OptionsError::Invalid {
                option: "audience_id",
                value: id.to_string(),
                expected: "the custom audience's numeric id",
            })
        }
        None => {
            return Err(OptionsError::Missing { option: "audience_id", hint: "the custom audience's numeric id, from Ads Manager" })
        }
    };
    let api_version = match get(opts, "api_version") {
        None => META_API_VERSION.to_string(),
        Some(v) => {
            let bare = v.trim_start_matches('v');
            let valid = bare.split_once('.').is_some_and(|(a, b)| {
                !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
            });
            if !valid {
                return Err(OptionsError::Invalid {
                    option: "api_version",
                    value: v.to_string(),
                    expected: "a Graph API version such as '21.0'",
                });
            }
            bare.to_string()
        }
    };
    Ok(MetaOptions { audience_id, api_version })
}

#[cfg(test)]
mod tests {
    use super::super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        parse_server_options(&opts(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_follow_each_vendor() {
        let slack = parse_server_options(&opts(&[("type", "slack"), ("channel", "#sales"), ("text", "Hi {{ fields.name }}")])).unwrap();
        assert_eq!((slack.url.as_str(), slack.rate_limit), ("https://slack.com", Some(1.0)));
        let hook = parse_server_options(&opts(&[("type", "slack"), ("text", "{% for r in records %}{{ r.fields.name }}{% endfor %}"), ("per", "run")])).unwrap();
        assert_eq!(hook.url, "https://hooks.slack.com/services");
        assert_eq!(hook.slack.unwrap(), SlackOptions { channel: None, text: "{% for r in records %}{{ r.fields.name }}{% endfor %}".into(), digest: true });
        assert_eq!(hook.batch_size, 1000);
        let stripe = parse_server_options(&opts(&[("type", "stripe")])).unwrap();
        assert_eq!((stripe.url.as_str(), stripe.rate_limit), ("https://api.stripe.com", Some(25.0)));
        let cio = parse_server_options(&opts(&[("type", "customerio"), ("url", "https://track-eu.customer.io")])).unwrap();
        assert_eq!((cio.url.as_str(), cio.rate_limit), ("https://track-eu.customer.io", Some(100.0)));
        let meta = parse_server_options(&opts(&[("type", "meta_audience"), ("audience_id", "2385")])).unwrap();
        assert_eq!((meta.url.as_str(), meta.batch_size), ("https://graph.facebook.com", 10_000));
        assert_eq!(meta.meta.unwrap(), MetaOptions { audience_id: "2385".into(), api_version: "21.0".into() });
    }

    #[test]
    fn intercom_options() {
        let cfg = parse_server_options(&opts(&[("type", "intercom"), ("tag", "churn_risk")])).unwrap();
        assert_eq!((cfg.url.as_str(), cfg.rate_limit), ("https://api.intercom.io", Some(150.0)));
        assert_eq!(
            cfg.intercom.unwrap(),
            IntercomOptions { object: IntercomObject::Contacts, tag: Some("churn_risk".into()), version: "2.14".into() }
        );
        assert_eq!(
            err(&[("type", "intercom"), ("object", "companies"), ("tag", "x")]),
            "option \"tag\" mirrors membership on contacts: it needs object 'contacts'"
        );
        assert_eq!(
            err(&[("type", "intercom"), ("object", "leads")]),
            "option \"object\" must be 'contacts' (the default) or 'companies', got \"leads\""
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            err(&[("type", "slack")]),
            "option \"text\" is required (the message as a Liquid template, e.g. 'New pro signup: {{ fields.name }} in {{ fields.region }}')"
        );
        assert!(err(&[("type", "slack"), ("text", "{{ fields.name ")]).starts_with("option \"text\" is not a valid template: "));
        assert_eq!(
            err(&[("type", "meta_audience"), ("audience_id", "abc")]),
            "option \"audience_id\" must be the custom audience's numeric id, got \"abc\""
        );
        assert_eq!(
            err(&[("type", "meta_audience"), ("audience_id", "1"), ("batch_size", "10001")]),
            "option \"batch_size\" must be an integer between 1 and 10000 (Meta's limit per request), got \"10001\""
        );
        assert_eq!(
            err(&[("type", "stripe"), ("channel", "x")]),
            "option \"channel\" is for destinations of type 'slack' only, not 'stripe'"
        );
    }
}
