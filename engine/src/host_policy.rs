//! Which hosts destinations may be reached at (the `retl.allowed_hosts` setting), and the
//! addresses that are never reached unless that setting names them explicitly: link-local
//! addresses (where cloud metadata services answer, handing out the machine's cloud
//! credentials), other cloud metadata addresses and names, and the unspecified address.
//!
//! Checked twice: on the URL of every request (host names against the list, IP literals
//! against the list and the refused ranges), and on every address a host name resolves to,
//! at connect time, so a name pointing at a metadata address is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// One entry of `retl.allowed_hosts`.
#[derive(Clone, Debug, PartialEq)]
enum Pattern {
    /// `*`: every host, except the refused addresses.
    Any,
    /// `api.hubapi.com`: that host name (lower-case, no trailing dot).
    Name(String),
    /// `*.salesforce.com`: any name under that domain (stored as ".salesforce.com").
    Subdomains(String),
    /// `10.0.0.0/8`, `127.0.0.1`: addresses in that range, refused ones included.
    Net(IpAddr, u8),
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostPolicy {
    patterns: Vec<Pattern>,
    setting: String,
}

/// Why a request was not sent.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct HostRefused(pub String);

impl Default for HostPolicy {
    fn default() -> Self {
        HostPolicy { patterns: vec![Pattern::Any], setting: "*".into() }
    }
}

/// Names of cloud metadata services (they resolve to refused addresses anyway; naming them
/// gives the clearer error, and holds where the name resolves differently).
const METADATA_NAMES: &[&str] =
    &["metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal", "metadata.azure.com"];

impl HostPolicy {
    /// Parses the setting: comma-separated `*`, host names, `*.domain`, IP addresses and CIDR
    /// ranges. An empty setting allows no host at all.
    pub fn parse(setting: &str) -> Result<HostPolicy, String> {
        let patterns = setting
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                parse_pattern(item).ok_or_else(|| {
                    format!(
                        "retl.allowed_hosts entry \"{item}\" is not valid: use *, a host name, *.domain, an IP address or a CIDR range such as 10.0.0.0/8"
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(HostPolicy { patterns, setting: setting.trim().to_string() })
    }

    /// Checks the host of `url` (a request's, or a server's `url` option).
    pub fn check_url(&self, url: &str) -> Result<(), HostRefused> {
        let parsed = url::Url::parse(url).map_err(|_| HostRefused("the destination URL is not valid".into()))?;
        match parsed.host() {
            None => Err(HostRefused("the destination URL has no host".into())),
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(&ip.to_string(), IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => self.check_name(name),
        }
    }

    /// Checks an address that `name` (already allowed by [`check_url`]) resolved to.
    pub fn check_resolved(&self, name: &str, ip: IpAddr) -> Result<(), HostRefused> {
        let ip = ip.to_canonical();
        match refused_kind(ip) {
            Some(kind) if !self.lists_explicitly(ip) => Err(HostRefused(format!(
                "host \"{name}\" resolves to {ip}, {kind}: refused unless retl.allowed_hosts lists that address explicitly"
            ))),
            _ => Ok(()),
        }
    }

    fn check_ip(&self, shown: &str, ip: IpAddr) -> Result<(), HostRefused> {
        let ip = ip.to_canonical();
        if let Some(kind) = refused_kind(ip) {
            return if self.lists_explicitly(ip) {
                Ok(())
            } else {
                Err(HostRefused(format!("host \"{shown}\" is {kind}: refused unless retl.allowed_hosts lists it explicitly")))
            };
        }
        if self.patterns.iter().any(|p| matches!(p, Pattern::Any)) || self.lists_explicitly(ip) {
            Ok(())
        } else {
            Err(self.not_listed(shown))
        }
    }

    fn check_name(&self, name: &str) -> Result<(), HostRefused> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let named = |p: &Pattern| match p {
            Pattern::Name(n) => *n == name,
            Pattern::Subdomains(suffix) => name.ends_with(suffix.as_str()),
            _ => false,
        };
        if METADATA_NAMES.contains(&name.as_str()) {
            return if self.patterns.iter().any(named) {
                Ok(())
            } else {
                Err(HostRefused(format!(
                    "host \"{name}\" is a cloud metadata service: refused unless retl.allowed_hosts lists it explicitly"
                )))
            };
        }
        if self.patterns.iter().any(|p| matches!(p, Pattern::Any) || named(p)) {
            Ok(())
        } else {
            Err(self.not_listed(&name))
        }
    }

    fn lists_explicitly(&self, ip: IpAddr) -> bool {
        self.patterns.iter().any(|p| matches!(p, Pattern::Net(net, bits) if in_net(ip, *net, *bits)))
    }

    fn not_listed(&self, host: &str) -> HostRefused {
        HostRefused(format!(
            "host \"{host}\" is not in retl.allowed_hosts (\"{}\"): a superuser can add it to that setting",
            self.setting
        ))
    }
}

fn parse_pattern(item: &str) -> Option<Pattern> {
    if item == "*" {
        return Some(Pattern::Any);
    }
    if let Some((addr, bits)) = item.split_once('/') {
        let ip: IpAddr = addr.trim().parse().ok()?;
        let bits: u8 = bits.trim().parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return (bits <= max).then_some(Pattern::Net(ip.to_canonical(), bits));
    }
    if let Ok(ip) = item.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        let ip = ip.to_canonical();
        return Some(Pattern::Net(ip, if ip.is_ipv4() { 32 } else { 128 }));
    }
    let name = item.trim_end_matches('.').to_ascii_lowercase();
    let (wildcard, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, name.clone()),
    };
    let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if rest.is_empty() || rest.len() > 253 || !rest.split('.').all(label_ok) {
        return None;
    }
    Some(if wildcard { Pattern::Subdomains(format!(".{rest}")) } else { Pattern::Name(rest) })
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits)) };
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// What kind of refused address `ip` is, if it is one.
fn refused_kind(ip: IpAddr) -> Option<&'static str> {
    const LINK_LOCAL: &str = "a link-local address (cloud metadata services answer there)";
    const METADATA: &str = "a cloud metadata address";
    const UNSPECIFIED: &str = "the unspecified address";
    match ip {
        IpAddr::V4(v4) if v4.is_link_local() => Some(LINK_LOCAL),
        // Alibaba Cloud's metadata service.
        IpAddr::V4(v4) if v4 == Ipv4Addr::new(100, 100, 100, 200) => Some(METADATA),
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some(UNSPECIFIED),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some(LINK_LOCAL),
        // AWS's IPv6 metadata service.
        IpAddr::V6(v6) if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => Some(METADATA),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(UNSPECIFIED),
        _ => None,
    }
}

/// The HTTP client's resolver: resolves with the system resolver, then refuses the host if
/// any address it resolves to is a refused one.
pub struct GuardedResolver(pub Arc<HostPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for addr in &addrs {
                policy.check_resolved(&host, addr.ip())?;
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &HostPolicy, url: &str) -> String {
        policy.check_url(url).unwrap_err().0
    }

    #[test]
    fn by_default_every_host_but_link_local_metadata_and_unspecified_addresses() {
        let p = HostPolicy::default();
        for url in ["https://api.hubapi.com/x", "http://127.0.0.1:8080/hook", "http://10.1.2.3/", "http://[::1]:9/"] {
            assert_eq!(p.check_url(url), Ok(()), "{url}");
        }
        assert_eq!(
            refused(&p, "http://169.254.169.254/latest/meta-data/"),
            "host \"169.254.169.254\" is a link-local address (cloud metadata services answer there): refused unless retl.allowed_hosts lists it explicitly"
        );
        assert_eq!(
            refused(&p, "http://[fd00:ec2::254]/latest"),
            "host \"fd00:ec2::254\" is a cloud metadata address: refused unless retl.allowed_hosts lists it explicitly"
        );
        assert_eq!(
            refused(&p, "http://[::ffff:169.254.169.254]/"),
            "host \"::ffff:169.254.169.254\" is a link-local address (cloud metadata services answer there): refused unless retl.allowed_hosts lists it explicitly"
        );
        assert!(refused(&p, "http://[fe80::1]/").starts_with("host \"fe80::1\" is a link-local address"));
        assert!(refused(&p, "http://100.100.100.200/").contains("is a cloud metadata address"));
        assert!(refused(&p, "http://0.0.0.0:8080/").contains("is the unspecified address"));
        // url normalises other spellings of an IPv4 address (decimal, hex) before we see it.
        assert!(refused(&p, "http://2852039166/").starts_with("host \"169.254.169.254\""));
        assert!(refused(&p, "http://0xA9FEA9FE/").starts_with("host \"169.254.169.254\""));
        assert_eq!(
            refused(&p, "http://Metadata.Google.Internal./computeMetadata/v1/"),
            "host \"metadata.google.internal\" is a cloud metadata service: refused unless retl.allowed_hosts lists it explicitly"
        );
    }

    #[test]
    fn a_list_allows_only_its_hosts_and_explicit_entries_unlock_refused_addresses() {
        let p = HostPolicy::parse(" api.hubapi.com , *.salesforce.com, 10.0.0.0/8, 169.254.170.2 ").unwrap();
        assert_eq!(p.check_url("https://API.hubapi.com/crm"), Ok(()));
        assert_eq!(p.check_url("https://acme.my.salesforce.com/services"), Ok(()));
        assert_eq!(p.check_url("http://10.20.30.40/"), Ok(()));
        assert_eq!(p.check_url("http://169.254.170.2/v2/credentials"), Ok(()));
        assert_eq!(
            refused(&p, "https://salesforce.com/"),
            "host \"salesforce.com\" is not in retl.allowed_hosts (\"api.hubapi.com , *.salesforce.com, 10.0.0.0/8, 169.254.170.2\"): a superuser can add it to that setting"
        );
        assert!(refused(&p, "https://evilsalesforce.com/").starts_with("host \"evilsalesforce.com\" is not in"));
        assert!(refused(&p, "http://11.0.0.1/").starts_with("host \"11.0.0.1\" is not in"));
        assert!(refused(&p, "http://169.254.169.254/").contains("link-local"));
        // `*` does not unlock refused addresses; an explicit range does.
        let star = HostPolicy::parse("*").unwrap();
        assert!(star.check_resolved("evil.example", "169.254.169.254".parse().unwrap()).is_err());
        let explicit = HostPolicy::parse("*, 169.254.0.0/16").unwrap();
        assert_eq!(explicit.check_resolved("evil.example", "169.254.169.254".parse().unwrap()), Ok(()));
        assert_eq!(
            star.check_resolved("evil.example", "::ffff:169.254.169.254".parse().unwrap()).unwrap_err().0,
            "host \"evil.example\" resolves to 169.254.169.254, a link-local address (cloud metadata services answer there): refused unless retl.allowed_hosts lists that address explicitly"
        );
        assert_eq!(star.check_resolved("ok.example", "93.184.216.34".parse().unwrap()), Ok(()));
        // Empty: nothing at all.
        assert!(refused(&HostPolicy::parse("").unwrap(), "https://api.hubapi.com/").starts_with("host \"api.hubapi.com\" is not in retl.allowed_hosts (\"\")"));
    }

    #[test]
    fn invalid_entries_are_named() {
        for bad in ["10.0.0.0/33", "exa mple.com", "*.", "http://x.com", "a..b", "::1/129"] {
            assert_eq!(
                HostPolicy::parse(&format!("api.hubapi.com, {bad}")),
                Err(format!(
                    "retl.allowed_hosts entry \"{bad}\" is not valid: use *, a host name, *.domain, an IP address or a CIDR range such as 10.0.0.0/8"
                )),
                "{bad}"
            );
        }
    }
}
