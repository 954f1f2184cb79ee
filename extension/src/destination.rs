//! A sync's destination as the worker sees it: the retl foreign server's options and the
//! sync owner's user mapping, read from the catalogs (the worker is the only reader of the
//! secret, which never leaves this process's memory).

use crate::api::option_pairs;
use crate::errors::RetlError;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use retl_engine::oauth::OAuthClient;
use retl_engine::options::{self, DestinationConfig, OptionsError};

pub struct Destination {
    /// The foreign server's oid: keys the destination's shared rate budget.
    pub server: pg_sys::Oid,
    pub config: DestinationConfig,
    pub token: Option<String>,
    /// How to get a new access token when the destination says this one expired.
    pub oauth: Option<OAuthClient>,
}

impl Destination {
    /// Identifies the user mapping's credentials (a changed mapping must not get a token
    /// refreshed with the old one).
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        let oauth = self.oauth.as_ref().map(|o| &o.secrets);
        let parts = [
            self.token.as_deref(),
            oauth.map(|o| o.client_id.as_str()),
            oauth.map(|o| o.client_secret.as_str()),
            oauth.and_then(|o| o.refresh_token.as_deref()),
        ];
        for part in parts {
            let part = part.unwrap_or_default();
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        *hasher.finalize().as_bytes()
    }

    /// The credentials to start a delivery with: the newest token a worker refreshed for this
    /// mapping, else the mapping's own.
    pub fn auth(&self, owner: pg_sys::Oid) -> retl_engine::oauth::Auth {
        let cached = crate::shared::cached_token(self.server.to_u32(), owner.to_u32(), &self.fingerprint());
        retl_engine::oauth::Auth::new(cached.or_else(|| self.token.clone()), self.oauth.clone())
    }

    /// Shares a token refreshed during a delivery with every worker.
    pub fn keep_refreshed(&self, owner: pg_sys::Oid, auth: &retl_engine::oauth::Auth) {
        if auth.generation() > 0 {
            if let Some(token) = auth.token() {
                crate::shared::cache_token(self.server.to_u32(), owner.to_u32(), &self.fingerprint(), &token);
            }
        }
    }
}

pub fn load(client: &SpiClient, server: &str, owner: pg_sys::Oid) -> Result<Destination, RetlError> {
    let server_options = client
        .select(
            "SELECT s.srvoptions, s.oid FROM pg_catalog.pg_foreign_server s \
               JOIN pg_catalog.pg_foreign_data_wrapper w ON w.oid = s.srvfdw \
              WHERE s.srvname = $1 AND w.fdwname = 'retl'",
            Some(1),
            &[server.into()],
        )
        .unwrap_or_else(|e| error!("{e}"));
    if server_options.is_empty() {
        return Err(RetlError::DestinationMissing(server.to_string()));
    }
    let (raw, server_oid) = server_options
        .first()
        .get_two::<Vec<Option<String>>, pg_sys::Oid>()
        .unwrap_or((None, None));
    let (raw, server_oid) = (raw.unwrap_or_default(), server_oid.unwrap_or(pg_sys::InvalidOid));
    let misconfigured = |source| RetlError::DestinationOptions { name: server.to_string(), source };
    let config = options::parse_server_options(&option_pairs(raw)?).map_err(misconfigured)?;

    // The owner's own mapping wins over a PUBLIC one (umuser 0).
    let mapping: Vec<Option<String>> = client
        .select(
            "SELECT um.umoptions FROM pg_catalog.pg_user_mapping um \
               JOIN pg_catalog.pg_foreign_server s ON s.oid = um.umserver \
              WHERE s.srvname = $1 AND um.umuser IN ($2, 0) \
              ORDER BY um.umuser DESC LIMIT 1",
            Some(1),
            &[server.into(), owner.into()],
        )
        .ok()
        .and_then(|t| if t.is_empty() { None } else { t.first().get_one().ok().flatten() })
        .unwrap_or_default();
    let mapping = options::parse_user_mapping_options(&option_pairs(mapping)?).map_err(misconfigured)?;
    let token = mapping
        .credentials
        .resolve(|name| std::env::var(name).ok())
        .map_err(misconfigured)?;
    let oauth = match (mapping.oauth, &config.token_url) {
        (None, _) => None,
        (Some(secrets), Some(token_url)) => Some(OAuthClient { token_url: token_url.clone(), secrets }),
        (Some(_), None) => {
            return Err(misconfigured(OptionsError::Conflict(format!(
                "\"client_id\" and \"client_secret\" of the user mapping need the server's \"token_url\" (the OAuth \
                 token endpoint) on a destination of type '{}'",
                config.kind.as_str()
            ))))
        }
    };
    Ok(Destination { server: server_oid, config, token, oauth })
}
