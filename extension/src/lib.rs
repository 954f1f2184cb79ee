//! pg_reverse_etl: the SQL API and the background worker glue. The pgrx-free work (options,
//! connectors, delivery, rate limits, backoff, hashing) lives in the `retl-engine` crate.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

mod alerts;
mod api;
mod changes;
mod destination;
mod errors;
mod fingerprint;
mod one_pass;
mod identity;
mod jsonb_rows;
mod key_source;
mod parse;
mod plan;
mod probe;
mod safeguards;
mod settings;
mod shared;
mod transaction;
mod waiting;
mod worker;
mod deliver;
mod scheduler;

::pgrx::pg_module_magic!(name, version);

// The catalog (tables, views, plpgsql API) is hand-written SQL; it needs the Rust helpers
// it calls to exist first.
pgrx::extension_sql_file!(
    "../sql/catalog.sql",
    name = "catalog",
    requires = [
        api::_fdw_validator,
        api::_caller,
        api::_check_query,
        api::_check_filter,
        api::_check_readable,
        api::_check_destination_fields,
    ]
);

pgrx::extension_sql_file!(
    "../sql/automation.sql",
    name = "automation",
    requires = ["catalog", api::_is_cron, api::_cron_next, api::_worker_slots, changes::_on_change, key_source::_key_source]
);

pgrx::extension_sql_file!(
    "../sql/operations.sql",
    name = "operations",
    requires = ["run"]
);

pgrx::extension_sql_file!(
    "../sql/governance.sql",
    name = "governance",
    requires = ["operations"]
);

pgrx::extension_sql_file!(
    "../sql/backup.sql",
    name = "backup",
    requires = ["governance"]
);

pgrx::extension_sql_file!(
    "../sql/spec.sql",
    name = "spec",
    requires = ["backup"]
);

pgrx::extension_sql_file!(
    "../sql/run.sql",
    name = "run",
    requires = ["automation", api::_wake_worker_at_commit, api::_await_run, api::_check_worker_database]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Shared memory and background workers can only be set up from shared_preload_libraries.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_reverse_etl must be loaded via shared_preload_libraries",
            function_name!(),
        )
        .set_hint(
            "Add pg_reverse_etl to shared_preload_libraries in postgresql.conf \
             (ALTER SYSTEM SET shared_preload_libraries = 'pg_reverse_etl'), restart the server, \
             then run CREATE EXTENSION pg_reverse_etl.",
        )
        .report(PgLogLevel::ERROR);
    }
    settings::define();
    shared::init();
    worker::register();
}
