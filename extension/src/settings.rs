//! GUCs, registered from `_PG_init`.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// The database the background worker connects to (the one with the extension installed).
pub static DATABASE_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));

pub fn define() {
    GucRegistry::define_string_guc(
        c"retl.database_name",
        c"Database in which the pg_reverse_etl worker runs syncs.",
        c"CREATE EXTENSION pg_reverse_etl in this database; runs requested elsewhere are refused.",
        &DATABASE_NAME,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

pub fn database_name() -> String {
    DATABASE_NAME
        .get()
        .and_then(|s| s.into_string().ok())
        .unwrap_or_else(|| "postgres".to_string())
}
