//! SQL-callable functions implemented in Rust. The catalog API itself is plpgsql
//! (sql/catalog.sql); these are the parts that need the parser, shared memory or the engine.

use crate::errors::{OrReport, RetlError};
use crate::{identity, parse, plan, settings, shared};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use retl_engine::options;

/// Validator of the `retl` foreign-data wrapper: rejects unknown or malformed destination
/// and credential options at CREATE/ALTER SERVER and USER MAPPING time.
#[pg_extern]
fn _fdw_validator(options: Option<Vec<Option<String>>>, catalog: Option<pg_sys::Oid>) {
    let pairs = option_pairs(options.unwrap_or_default()).or_report();
    match catalog {
        Some(pg_sys::ForeignServerRelationId) => {
            let config = options::parse_server_options(&pairs).inspect_err(|e| {
                if matches!(e, options::OptionsError::Credential { .. }) {
                    hide_statement_from_log();
                }
            });
            check_host(&config.or_report().url).or_report();
        }
        Some(pg_sys::UserMappingRelationId) => {
            // The statement carries the secret: if it fails, here (a mistyped option name, say)
            // or later in the transaction, its text must not reach the server log.
            hide_statement_from_log();
            options::parse_user_mapping_options(&pairs).or_report();
        }
        Some(pg_sys::ForeignDataWrapperRelationId) => {
            options::parse_wrapper_options(&pairs).or_report();
        }
        _ => ErrorReport::new(
            PgSqlErrorCode::ERRCODE_FDW_INVALID_OPTION_NAME,
            "the retl foreign-data wrapper only takes options on servers and user mappings",
            "pg_reverse_etl",
        )
        .report(PgLogLevel::ERROR),
    }
}

/// A destination's URL must be one `retl.allowed_hosts` allows (checked again on every
/// request, where the addresses a name resolves to are checked too). A templated URL (the
/// http connector's) is judged by its fixed start, which names the host.
fn check_host(url: &str) -> Result<(), RetlError> {
    let policy = settings::host_policy().map_err(RetlError::HostPolicy)?;
    policy.check_url(options::fixed_url_part(url)).map_err(|refused| RetlError::HostRefused(refused.to_string()))
}

/// Keeps the statement out of the server log for the error about to be raised: Postgres logs a
/// failing statement's text (log_min_error_statement), and this one holds a secret. Set for
/// the rest of the (failing) transaction only, as SET LOCAL would.
fn hide_statement_from_log() {
    unsafe {
        pg_sys::set_config_option(
            c"log_min_error_statement".as_ptr(),
            c"panic".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// `{"name=value", ...}` as Postgres stores generic options, split into pairs.
pub fn option_pairs(raw: Vec<Option<String>>) -> Result<Vec<(String, String)>, RetlError> {
    Ok(raw
        .into_iter()
        .flatten()
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (item, String::new()),
        })
        .collect())
}

/// The role calling the API, seen through our SECURITY DEFINER functions.
#[pg_extern(stable, parallel_safe)]
fn _caller() -> pg_sys::Oid {
    identity::caller()
}

/// The exact text of the single SELECT in a model query, or an error saying what is wrong.
#[pg_extern(immutable, parallel_safe)]
fn _check_query(query: &str) -> String {
    parse::single_select(query).or_report()
}

/// Errors unless `filter` is one boolean expression (an audience's WHERE condition).
#[pg_extern(immutable, parallel_safe)]
fn _check_filter(filter: &str) {
    parse::check_filter(filter).or_report()
}

/// Errors unless `role` can read the model or audience view `view_name`: the view runs with
/// its owner's privileges, so this proves at definition time that the owner can read what the
/// query reads (a permission error names the table).
#[pg_extern(volatile)]
fn _check_readable(view_name: &str, role: pg_sys::Oid) {
    let sql = format!("SELECT * FROM retl_models.{} LIMIT 0", quote_identifier(view_name));
    identity::as_role(role, || Spi::run(&sql)).unwrap_or_else(|e| error!("{e}"));
}

/// blake3 of a row's canonical encoding (jsonb's text form: keys sorted, no insignificant
/// whitespace), used by the planner to notice changed rows.
#[pg_extern(immutable, strict, parallel_safe)]
fn _row_hash(canonical: &str) -> Vec<u8> {
    retl_engine::hash::row_hash(canonical.as_bytes()).to_vec()
}

/// Errors when this database is not the one the worker serves: runs queued here would
/// never start.
#[pg_extern(stable)]
fn _check_worker_database() {
    let current = Spi::get_one::<String>("SELECT current_database()::text")
        .ok()
        .flatten()
        .unwrap_or_default();
    let worker_db = settings::database_name();
    if current != worker_db {
        RetlError::WrongDatabase { worker_db, current }.report();
    }
}

/// Wakes the worker when the calling transaction commits (a queued run becomes visible).
#[pg_extern(volatile)]
fn _wake_worker_at_commit() {
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, shared::wake_workers);
}

/// Released SQL scripts call this (0.1.0's retl.run): its signature is frozen. It only runs
/// under a 0.1.0 catalog with a newer library, where the workers wait for the update.
#[pg_extern(volatile)]
fn _run_and_wait(sync_id: i64, trigger: &str) -> i64 {
    // The argument names are part of the frozen signature.
    let _ = (sync_id, trigger);
    RetlError::VersionMismatch { library: env!("CARGO_PKG_VERSION"), installed: installed_version() }.report()
}

/// The version of the extension's SQL objects in this database.
pub fn installed_version() -> String {
    Spi::get_one::<String>("SELECT extversion::text FROM pg_catalog.pg_extension WHERE extname = 'pg_reverse_etl'")
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Refuses fields the destination does not have or cannot write (asked through a worker; only
/// for connectors that can describe their fields).
#[pg_extern(volatile)]
fn _check_destination_fields(
    sync_name: &str,
    destination: &str,
    owner: pg_sys::Oid,
    fields: Vec<Option<String>>,
    key_columns: Vec<Option<String>>,
) {
    let fields = fields.into_iter().flatten().collect();
    let key_columns = key_columns.into_iter().flatten().collect();
    crate::probe::check_fields(sync_name, destination, owner, fields, key_columns).or_report();
}

/// Hands sync `sync_id` to the workers, which create and commit the run themselves, and waits
/// until that run has finished, or `timeout_ms` passed. Returns the run id.
#[pg_extern(volatile)]
fn _await_run(sync_id: i64, timeout_ms: Option<i64>, allow_mass_delete: bool, allow_schema_change: bool) -> i64 {
    let timeout = timeout_ms.map(|ms| std::time::Duration::from_millis(ms.max(1) as u64));
    let overrides = shared::RunOverrides { mass_delete: allow_mass_delete, schema_change: allow_schema_change };
    crate::waiting::await_run(sync_id, true, overrides, timeout).or_report()
}

/// Whether a schedule is a cron expression (5 fields or a macro such as @daily).
#[pg_extern(immutable, strict, parallel_safe)]
fn _is_cron(schedule: &str) -> bool {
    retl_engine::cron::is_cron(schedule)
}

/// The first minute strictly after `after` (local wall-clock time) matching `expr`.
#[pg_extern(immutable, strict, parallel_safe)]
fn _cron_next(expr: &str, after: pgrx::datum::Timestamp) -> Option<pgrx::datum::Timestamp> {
    let cron = retl_engine::cron::CronSchedule::parse(expr).or_report();
    if !after.is_finite() {
        return None;
    }
    let (h, m, sec, micros) = after.to_hms_micro();
    let date = chrono::NaiveDate::from_ymd_opt(after.year(), after.month() as u32, after.day() as u32)?;
    let local = date.and_hms_micro_opt(h as u32, m as u32, sec as u32, micros % 1_000_000)?;
    let next = cron.next_after(local)?;
    use chrono::{Datelike, Timelike};
    pgrx::datum::Timestamp::new(next.year(), next.month() as u8, next.day() as u8, next.hour() as u8, next.minute() as u8, 0.0).ok()
}

/// One row per worker slot, for retl.worker_status().
#[pg_extern(volatile)]
fn _worker_slots() -> TableIterator<
    'static,
    (
        name!(worker, i32),
        name!(pid, i32),
        name!(state, String),
        name!(sync_id, i64),
        name!(run_id, i64),
        name!(since, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    let n = settings::workers();
    let slots: Vec<shared::WorkerSlot> = shared::WORKERS.share().slots[..n].to_vec();
    TableIterator::new(slots.into_iter().enumerate().map(|(i, w)| {
        let since = if w.since == 0 { None } else { pgrx::datum::TimestampWithTimeZone::try_from(w.since).ok() };
        (i as i32 + 1, w.pid, w.state.as_str().to_string(), w.sync_id, w.run_id, since)
    }))
}

/// The changes the next run of a sync would send (op, key, payload), sending nothing.
#[pg_extern(volatile)]
fn preview(
    sync: &str,
) -> TableIterator<'static, (name!(op, String), name!(key, pgrx::JsonB), name!(payload, Option<pgrx::JsonB>))> {
    let rows = plan::preview(sync).or_report();
    TableIterator::new(rows.into_iter().map(|(op, key, payload)| {
        (op, pgrx::JsonB(key), payload.map(pgrx::JsonB))
    }))
}

extension_sql!(
    r#"
COMMENT ON FUNCTION retl.preview(text) IS
  'The changes the next run of a sync would send: op (insert, update, upsert, delete), key and payload. Sends nothing and changes nothing.';
-- Internals that act for another role: only the extension's own SECURITY DEFINER API calls them.
REVOKE ALL ON FUNCTION retl._run_and_wait(bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION retl._await_run(bigint, bigint, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION retl._check_readable(text, oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION retl._check_destination_fields(text, text, oid, text[], text[]) FROM PUBLIC;
"#,
    name = "api_comments",
    requires = ["run", preview, _await_run, _check_destination_fields]
);
