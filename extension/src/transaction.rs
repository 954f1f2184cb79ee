//! Transactions in the worker: each one short, and an error inside one is caught, rolled
//! back and returned as text, so one failing sync or batch never kills the worker.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::panic::AssertUnwindSafe;

/// Run `f` in its own transaction: committed when it returns Ok, rolled back when it
/// returns Err or raises.
pub fn transaction<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        share_the_extension();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let outcome = PgTryBuilder::new(AssertUnwindSafe(f))
        .catch_others(|e| Err(describe(e)))
        .execute();
    unsafe {
        match outcome {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    outcome
}

/// Hold the extension itself (ACCESS SHARE) before this transaction touches any of its tables.
///
/// `DROP EXTENSION` locks the extension first and then each of its tables in turn. A worker
/// that had locked the outbox and then waited for a snapshot table the drop already held
/// made a deadlock, and Postgres broke it by failing the DBA's `DROP EXTENSION`. Holding the
/// extension first orders the two: the drop waits at its very first lock until this short
/// transaction ends, and a transaction starting during the drop waits for it to commit.
/// Taken before the snapshot, so a transaction that waited sees the drop's outcome.
unsafe fn share_the_extension() {
    let oid = unsafe { pg_sys::get_extension_oid(c"pg_reverse_etl".as_ptr(), true) };
    if oid != pg_sys::InvalidOid {
        unsafe {
            pg_sys::LockDatabaseObject(pg_sys::ExtensionRelationId, oid, 0, pg_sys::AccessShareLock as pg_sys::LOCKMODE)
        };
    }
}

/// Hand the table statistics this process gathered (rows inserted, updated, deleted) to the
/// cumulative statistics system, at most once a second. A backend does this when it goes idle;
/// a background worker must do it itself, or autovacuum never learns that the outbox and the
/// snapshots change and never vacuums or analyzes them (bloat, and plans built on no
/// statistics at all). Call it between transactions.
pub fn flush_table_statistics() {
    unsafe {
        let _ = pg_sys::pgstat_report_stat(false);
    }
}

fn describe(e: CaughtError) -> String {
    let report = match &e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    match report.detail() {
        Some(detail) if !detail.is_empty() => format!("{} ({detail})", report.message()),
        _ => report.message().to_string(),
    }
}

/// Show what the worker is doing in pg_stat_activity.query.
pub fn report_activity(what: &str) {
    let text = std::ffi::CString::new(what).unwrap_or_default();
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, text.as_ptr()) };
}

pub fn report_idle() {
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null()) };
}
