//! pgrx-free core of pg_reverse_etl: everything the background worker needs to turn outbox
//! rows into HTTP calls, with no Postgres calls, so it is unit-testable with plain `cargo test`.

pub mod backoff;
pub mod connector;
pub mod cron;
pub mod deliver;
pub mod hash;
pub mod host_policy;
pub mod mapping;
pub mod oauth;
pub mod options;
pub mod ratelimit;
pub mod record;
pub mod template;

/// Sent on every request so destination operators can tell who is calling.
pub const USER_AGENT: &str = concat!("pg_reverse_etl/", env!("CARGO_PKG_VERSION"));
