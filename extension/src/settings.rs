//! GUCs, registered from `_PG_init`.

use crate::shared::MAX_WORKERS;
use retl_engine::deliver::Deliverer;
use retl_engine::host_policy::HostPolicy;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// The database the background workers connect to (the one with the extension installed).
pub static DATABASE_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// How many background workers plan and deliver runs.
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);
/// Log one line per finished run (reloadable).
pub static LOG_RUNS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Check a sync's fields against the destination (HubSpot properties, Salesforce describe)
/// when it is created or altered.
pub static CHECK_DESTINATION: GucSetting<bool> = GucSetting::<bool>::new(true);

/// The window retl.sync_status computes rates and latencies over, in minutes.
pub static STATUS_WINDOW: GucSetting<i32> = GucSetting::<i32>::new(24 * 60);
/// Runs and resolved alerts older than this (minutes) are deleted; 0 keeps them forever.
pub static HISTORY_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(30 * 24 * 60);
/// The hosts destinations may be reached at (engine::host_policy).
pub static ALLOWED_HOSTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"*"));
/// The destination alerts of syncs without an alert_destination are sent to.
pub static ALERT_DESTINATION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn define() {
    GucRegistry::define_int_guc(
        c"retl.status_window",
        c"Window of the rates and latencies in retl.sync_status and retl.metrics.",
        c"Success rate, row-error rate and delivery latency are computed over the runs and batches that finished within it.",
        &STATUS_WINDOW,
        1,
        10 * 366 * 24 * 60,
        GucContext::Userset,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_int_guc(
        c"retl.history_retention",
        c"How long pg_reverse_etl keeps finished runs, their batches and resolved alerts.",
        c"Older ones are deleted by the workers about once a minute; a sync's latest run and latest successful run are always kept. 0 keeps everything.",
        &HISTORY_RETENTION,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_string_guc(
        c"retl.allowed_hosts",
        c"Hosts pg_reverse_etl may send requests to.",
        c"Comma-separated: * (any host), host names, *.domain, IP addresses, CIDR ranges; empty allows none. Link-local and cloud metadata addresses are refused unless listed explicitly as addresses or ranges (never by *).",
        &ALLOWED_HOSTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"retl.alert_destination",
        c"Destination (a slack or webhook retl server) that alerts are sent to.",
        c"For syncs without their own alert_destination; empty sends none (alerts are still rows in retl.alerts and NOTIFYs on channel retl_alerts).",
        &ALERT_DESTINATION,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"retl.check_destination",
        c"Check a sync's fields against the destination at create_sync and alter_sync.",
        c"A worker asks the destination (HubSpot properties API, Salesforce describe) and unknown or read-only fields are refused. Turn off to define syncs while the destination is unreachable.",
        &CHECK_DESTINATION,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"retl.database_name",
        c"Database in which the pg_reverse_etl workers run syncs.",
        c"CREATE EXTENSION pg_reverse_etl in this database; runs requested elsewhere are refused.",
        &DATABASE_NAME,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"retl.workers",
        c"Number of pg_reverse_etl background workers.",
        c"Each plans and delivers runs; runs of different syncs take turns, so one large sync cannot starve the others.",
        &WORKERS,
        1,
        MAX_WORKERS as i32,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"retl.log_runs",
        c"Log one line per finished pg_reverse_etl run.",
        c"The line gives the run id, sync, status, rows delivered and failed, and API calls.",
        &LOG_RUNS,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

pub fn database_name() -> String {
    DATABASE_NAME
        .get()
        .and_then(|s| s.into_string().ok())
        .unwrap_or_else(|| "postgres".to_string())
}

pub fn history_retention_minutes() -> i32 {
    HISTORY_RETENTION.get()
}

/// The `retl.allowed_hosts` policy, or what is wrong with the setting.
pub fn host_policy() -> Result<HostPolicy, String> {
    HostPolicy::parse(&ALLOWED_HOSTS.get().and_then(|s| s.into_string().ok()).unwrap_or_default())
}

/// An HTTP deliverer held to `retl.allowed_hosts`. Every request the extension makes goes
/// through one.
pub fn deliverer(timeout: std::time::Duration) -> Result<Deliverer, String> {
    Deliverer::with_policy(timeout, host_policy()?)
}

pub fn alert_destination() -> String {
    ALERT_DESTINATION.get().and_then(|s| s.into_string().ok()).unwrap_or_default()
}

pub fn workers() -> usize {
    WORKERS.get().clamp(1, MAX_WORKERS as i32) as usize
}
