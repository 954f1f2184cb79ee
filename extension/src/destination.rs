//! A sync's destination as the worker sees it: the retl foreign server's options and the
//! sync owner's user mapping, read from the catalogs (the worker is the only reader of the
//! secret, which never leaves this process's memory).

use crate::api::option_pairs;
use crate::errors::RetlError;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use retl_engine::options::{self, DestinationConfig};

pub struct Destination {
    /// The foreign server's oid: keys the destination's shared rate budget.
    pub server: pg_sys::Oid,
    pub config: DestinationConfig,
    pub token: Option<String>,
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
    let credentials = options::parse_user_mapping_options(&option_pairs(mapping)?).map_err(misconfigured)?;
    let token = credentials
        .resolve(|name| std::env::var(name).ok())
        .map_err(misconfigured)?;
    Ok(Destination { server: server_oid, config, token })
}
