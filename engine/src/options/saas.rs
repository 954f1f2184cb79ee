//! Options of the SaaS connectors (type 'hubspot' and 'salesforce') and the OAuth client
//! credentials a user mapping may carry for them.

use super::{get, int, valid_token, DestinationKind, OptionsError, TOKEN_EXPECTED};
use std::fmt;
use std::time::Duration;

pub const HUBSPOT_URL: &str = "https://api.hubapi.com";
/// HubSpot allows 100 requests per rolling 10 seconds (private apps and OAuth apps on most
/// tiers). With a burst equal to the rate, a budget of r/s lets through at most r + 10r requests
/// in any 10 seconds, so 9/s is the largest rate that can never trip the limit.
const HUBSPOT_RATE: f64 = 9.0;
const SALESFORCE_API_VERSION: &str = "62.0";
/// Runs with at least this many upserts go through Bulk API 2.0 unless the server says otherwise
/// (Salesforce recommends Bulk API above a few thousand records).
const SALESFORCE_BULK_THRESHOLD: u64 = 10_000;

#[derive(Clone, Debug, PartialEq)]
pub struct HubSpotOptions {
    /// Object type: `contacts`, `companies`, a custom object's `p_name` or `2-123456`.
    pub object: String,
    /// The unique property records are upserted by (e.g. `email` for contacts).
    pub id_property: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SalesforceOptions {
    /// sObject API name: `Contact`, `Account`, `Churn_Risk__c`.
    pub object: String,
    /// External-id field to upsert by; `None`: records are created, then updated by their Id.
    pub external_id: Option<String>,
    pub api_version: String,
    /// Upserts per run from which Bulk API 2.0 is used; `None`: never.
    pub bulk_threshold: Option<usize>,
    /// How often a Bulk API job's state is polled.
    pub bulk_poll: Duration,
}

/// OAuth client credentials (from the user mapping) to get a new access token when the
/// destination says the current one expired: refresh-token flow when `refresh_token` is set,
/// client-credentials flow otherwise.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuthSecrets {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: Option<String>,
}

impl fmt::Debug for OAuthSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthSecrets")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A user mapping's options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserMapping {
    pub credentials: super::Credentials,
    pub oauth: Option<OAuthSecrets>,
}

pub fn default_rate_limit(kind: DestinationKind) -> Option<f64> {
    (kind == DestinationKind::HubSpot).then_some(HUBSPOT_RATE)
}

/// API names are plain identifiers; anything else would end up unescaped in a URL path.
fn name(
    opts: &[(String, String)],
    option: &'static str,
    expected: &'static str,
    valid: impl Fn(&str) -> bool,
) -> Result<Option<String>, OptionsError> {
    match get(opts, option) {
        None => Ok(None),
        Some(v) if valid(v) => Ok(Some(v.to_string())),
        Some(v) => Err(OptionsError::Invalid { option, value: v.to_string(), expected }),
    }
}

fn salesforce_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic()) && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn hubspot_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn parse_hubspot(opts: &[(String, String)]) -> Result<HubSpotOptions, OptionsError> {
    let object = name(opts, "object", "a HubSpot object type such as 'contacts', 'companies' or 'p_accounts'", hubspot_name)?
        .ok_or(OptionsError::Missing {
            option: "object",
            hint: "the HubSpot object type to write, e.g. 'contacts', 'companies' or a custom object's 'p_name'",
        })?;
    let id_property = match name(opts, "id_property", "a HubSpot property name such as 'email'", hubspot_name)? {
        Some(p) => p,
        None => match object.as_str() {
            "contacts" | "0-1" => "email".to_string(),
            "companies" | "0-2" => "domain".to_string(),
            _ => {
                return Err(OptionsError::Missing {
                    option: "id_property",
                    hint: "the unique property records are matched by (contacts default to 'email', companies to 'domain')",
                })
            }
        },
    };
    Ok(HubSpotOptions { object, id_property })
}

pub fn parse_salesforce(opts: &[(String, String)]) -> Result<SalesforceOptions, OptionsError> {
    const API_NAME: &str = "a Salesforce API name such as 'Contact' or 'Churn_Risk__c'";
    let object = name(opts, "object", API_NAME, salesforce_name)?.ok_or(OptionsError::Missing {
        option: "object",
        hint: "the sObject to write, e.g. 'Contact', 'Account' or 'Churn_Risk__c'",
    })?;
    let external_id = name(opts, "external_id", "a Salesforce field API name such as 'External_Id__c'", salesforce_name)?;
    let api_version = name(opts, "api_version", "a Salesforce API version such as '62.0'", |v| {
        v.split_once('.')
            .is_some_and(|(major, minor)| !major.is_empty() && minor.len() == 1 && (major.to_owned() + minor).bytes().all(|b| b.is_ascii_digit()))
    })?
    .unwrap_or_else(|| SALESFORCE_API_VERSION.into());
    let threshold = int(
        opts,
        "bulk_threshold",
        0..=100_000_000,
        SALESFORCE_BULK_THRESHOLD,
        "a number of rows (0 never uses Bulk API)",
    )?;
    if threshold > 0 && get(opts, "bulk_threshold").is_some() && external_id.is_none() {
        return Err(OptionsError::Conflict(
            "\"bulk_threshold\" needs \"external_id\": Bulk API jobs upsert by an external-id field".into(),
        ));
    }
    let bulk_poll = int(opts, "bulk_poll_ms", 10..=60_000, 2_000, "an integer number of milliseconds between 10 and 60000")?;
    Ok(SalesforceOptions {
        bulk_threshold: (threshold > 0 && external_id.is_some()).then_some(threshold as usize),
        object,
        external_id,
        api_version,
        bulk_poll: Duration::from_millis(bulk_poll),
    })
}

/// The OAuth token endpoint: `token_url`, or the vendor's default under `url` (webhook and http
/// destinations have none: OAuth there needs `token_url`).
pub fn token_url(opts: &[(String, String)], kind: DestinationKind, url: &str) -> Result<Option<String>, OptionsError> {
    let default = match kind {
        DestinationKind::HubSpot => Some(format!("{url}/oauth/v1/token")),
        DestinationKind::Salesforce => Some(format!("{url}/services/oauth2/token")),
        _ => None,
    };
    match get(opts, "token_url") {
        None => Ok(default),
        Some(v) if url::Url::parse(v).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) => {
            Ok(Some(v.to_string()))
        }
        Some(v) => Err(OptionsError::Invalid { option: "token_url", value: v.to_string(), expected: "an http or https URL" }),
    }
}

pub fn parse_oauth(opts: &[(String, String)]) -> Result<Option<OAuthSecrets>, OptionsError> {
    let secret = |option: &'static str| -> Result<Option<String>, OptionsError> {
        match get(opts, option) {
            None => Ok(None),
            Some(v) if valid_token(v) => Ok(Some(v.to_string())),
            Some(_) => Err(OptionsError::InvalidSecret { option, expected: TOKEN_EXPECTED }),
        }
    };
    let client_id = match get(opts, "client_id") {
        None => None,
        Some(v) if valid_token(v) => Some(v.to_string()),
        Some(v) => {
            return Err(OptionsError::Invalid {
                option: "client_id",
                value: v.to_string(),
                expected: "the OAuth app's client id (printable ASCII without spaces)",
            })
        }
    };
    match (client_id, secret("client_secret")?, secret("refresh_token")?) {
        (None, None, None) => Ok(None),
        (Some(client_id), Some(client_secret), refresh_token) => {
            Ok(Some(OAuthSecrets { client_id, client_secret, refresh_token }))
        }
        _ => Err(OptionsError::Conflict(
            "\"client_id\" and \"client_secret\" go together (with \"refresh_token\" for the refresh-token flow, \
             without it for the client-credentials flow)"
                .into(),
        )),
    }
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
    fn hubspot_defaults_follow_the_vendor() {
        let cfg = parse_server_options(&opts(&[("type", "hubspot"), ("object", "contacts")])).unwrap();
        assert_eq!(cfg.kind, DestinationKind::HubSpot);
        assert_eq!(cfg.url, "https://api.hubapi.com");
        assert_eq!(cfg.batch_size, 100);
        assert_eq!(cfg.rate_limit, Some(9.0));
        assert_eq!(cfg.token_url.as_deref(), Some("https://api.hubapi.com/oauth/v1/token"));
        assert_eq!(cfg.hubspot, Some(HubSpotOptions { object: "contacts".into(), id_property: "email".into() }));
        let custom = parse_server_options(&opts(&[
            ("type", "hubspot"),
            ("url", "http://127.0.0.1:9/"),
            ("object", "p_accounts"),
            ("id_property", "account_key"),
            ("rate_limit", "5"),
        ]))
        .unwrap();
        assert_eq!(custom.url, "http://127.0.0.1:9");
        assert_eq!(custom.rate_limit, Some(5.0));
        assert_eq!(custom.hubspot.unwrap().id_property, "account_key");
    }

    #[test]
    fn hubspot_errors() {
        assert_eq!(
            err(&[("type", "hubspot"), ("object", "contacts"), ("batch_size", "101")]),
            "option \"batch_size\" must be an integer between 1 and 100 (HubSpot's batch limit), got \"101\""
        );
        assert_eq!(
            err(&[("type", "hubspot"), ("object", "p_accounts")]),
            "option \"id_property\" is required (the unique property records are matched by (contacts default to \
             'email', companies to 'domain'))"
        );
        assert_eq!(
            err(&[("type", "hubspot"), ("object", "contacts/../x")]),
            "option \"object\" must be a HubSpot object type such as 'contacts', 'companies' or 'p_accounts', got \
             \"contacts/../x\""
        );
        assert_eq!(
            err(&[("type", "hubspot"), ("object", "contacts"), ("external_id", "x")]),
            "option \"external_id\" is for destinations of type 'salesforce' only, not 'hubspot'"
        );
        assert_eq!(
            err(&[("type", "webhook"), ("url", "https://x.example"), ("object", "contacts")]),
            "option \"object\" is for destinations of type 'hubspot', 'salesforce' or 'intercom' only, not 'webhook'"
        );
    }

    #[test]
    fn salesforce_options() {
        let cfg = parse_server_options(&opts(&[
            ("type", "salesforce"),
            ("url", "https://acme.my.salesforce.com"),
            ("object", "Contact"),
            ("external_id", "External_Id__c"),
        ]))
        .unwrap();
        assert_eq!(cfg.batch_size, 200);
        assert_eq!(cfg.rate_limit, None);
        assert_eq!(cfg.token_url.as_deref(), Some("https://acme.my.salesforce.com/services/oauth2/token"));
        assert_eq!(
            cfg.salesforce,
            Some(SalesforceOptions {
                object: "Contact".into(),
                external_id: Some("External_Id__c".into()),
                api_version: "62.0".into(),
                bulk_threshold: Some(10_000),
                bulk_poll: Duration::from_secs(2),
            })
        );
        let by_id = parse_server_options(&opts(&[
            ("type", "salesforce"),
            ("url", "https://acme.my.salesforce.com"),
            ("object", "Churn_Risk__c"),
            ("api_version", "59.0"),
        ]))
        .unwrap()
        .salesforce
        .unwrap();
        assert_eq!((by_id.external_id, by_id.bulk_threshold, by_id.api_version.as_str()), (None, None, "59.0"));
        assert_eq!(
            err(&[("type", "salesforce"), ("object", "Contact")]),
            "option \"url\" is required (your org's instance URL, e.g. 'https://acme.my.salesforce.com')"
        );
        assert_eq!(
            err(&[("type", "salesforce"), ("url", "https://a.example"), ("object", "Contact"), ("batch_size", "201")]),
            "option \"batch_size\" must be an integer between 1 and 200 (the sObject Collections limit), got \"201\""
        );
        assert_eq!(
            err(&[("type", "salesforce"), ("url", "https://a.example"), ("object", "Contact'; --")]),
            "option \"object\" must be a Salesforce API name such as 'Contact' or 'Churn_Risk__c', got \"Contact'; --\""
        );
        assert_eq!(
            err(&[("type", "salesforce"), ("url", "https://a.example"), ("object", "Contact"), ("api_version", "v62")]),
            "option \"api_version\" must be a Salesforce API version such as '62.0', got \"v62\""
        );
        assert_eq!(
            err(&[("type", "salesforce"), ("url", "https://a.example"), ("object", "Contact"), ("bulk_threshold", "5")]),
            "option \"bulk_threshold\" needs \"external_id\": Bulk API jobs upsert by an external-id field"
        );
    }

    #[test]
    fn oauth_client_credentials() {
        let parse = |pairs: &[(&str, &str)]| parse_user_mapping_options(&opts(pairs));
        let m = parse(&[("token", "at"), ("client_id", "cid"), ("client_secret", "cs"), ("refresh_token", "rt")]).unwrap();
        assert_eq!(m.credentials, Credentials::Token("at".into()));
        assert_eq!(
            m.oauth,
            Some(OAuthSecrets { client_id: "cid".into(), client_secret: "cs".into(), refresh_token: Some("rt".into()) })
        );
        assert_eq!(
            format!("{:?}", m.oauth.unwrap()),
            "OAuthSecrets { client_id: \"cid\", client_secret: \"<redacted>\", refresh_token: Some(\"<redacted>\") }"
        );
        assert_eq!(parse(&[("client_id", "cid"), ("client_secret", "cs")]).unwrap().oauth.unwrap().refresh_token, None);
        assert_eq!(
            parse(&[("client_id", "cid"), ("refresh_token", "rt")]).unwrap_err().to_string(),
            "option \"client_id\" and \"client_secret\" go together (with \"refresh_token\" for the refresh-token flow, \
             without it for the client-credentials flow)"
        );
        let leaked = parse(&[("client_id", "cid"), ("client_secret", "top secret")]).unwrap_err().to_string();
        assert_eq!(
            leaked,
            "option \"client_secret\" must be a non-empty token of printable ASCII characters without spaces; the value is not shown"
        );
    }
}
