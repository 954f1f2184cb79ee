//! The extension layer's errors, mapped to SQLSTATEs at the SQL boundary.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use retl_engine::options::OptionsError;

#[derive(Debug, thiserror::Error)]
pub enum RetlError {
    #[error("{0}")]
    Options(#[from] OptionsError),
    #[error("{0}")]
    Cron(#[from] retl_engine::cron::CronError),
    #[error("destination \"{name}\" is misconfigured: {source}")]
    DestinationOptions { name: String, source: OptionsError },
    #[error("destination \"{0}\" does not exist")]
    DestinationMissing(String),
    #[error("model query must be a single SELECT statement, found {0} statements")]
    MultipleStatements(usize),
    #[error("model query must be a SELECT, VALUES or TABLE statement, not {0}")]
    NotASelect(&'static str),
    #[error("model query must not use SELECT INTO")]
    SelectInto,
    #[error("audience filter must be a single boolean expression over the model's columns, got {0:?}")]
    BadFilter(String),
    #[error("model \"{model}\" returned {count} duplicate primary {} (e.g. {example} appears {times} times)", plural(*.count, "key", "keys"))]
    DuplicateKeys { model: String, count: i64, example: String, times: i64 },
    #[error("model \"{model}\" returned {count} {} with a NULL primary key ({columns})", plural(*.count, "row", "rows"))]
    NullKeys { model: String, count: i64, columns: String },
    #[error("mapped column \"{column}\" is not in model \"{model}\" (its columns: {columns})")]
    MissingColumn { column: String, model: String, columns: String },
    #[error("pg_reverse_etl's worker runs syncs in database \"{worker_db}\", not in \"{current}\"")]
    WrongDatabase { worker_db: String, current: String },
    #[error("the pg_reverse_etl background worker is not running")]
    WorkerNotRunning,
    #[error("too many sessions are waiting for runs ({0} at most)")]
    TooManyWaiters(usize),
    #[error("sync id {0} is not visible to the worker")]
    SyncNotVisible(i64),
    #[error("the run did not finish within {}; it goes on in the background{}", show_duration(*.waited), run_note(*.run_id))]
    RunTimedOut { run_id: i64, waited: std::time::Duration },
    #[error("sync \"{sync}\" cannot write to destination \"{destination}\": {problem}")]
    DestinationFields { sync: String, destination: String, problem: String },
    #[error("could not check the fields of sync \"{sync}\" against destination \"{destination}\": {problem}")]
    DestinationUnchecked { sync: String, destination: String, problem: String },
    #[error("run would send {planned} changes, more than max_rows {max_rows} of sync \"{sync}\"; nothing was queued. If this is expected, raise the cap: SELECT retl.alter_sync(name => '{sync}', max_rows => ...)")]
    RowCap { sync: String, planned: i64, max_rows: i64 },
    #[error("{0}; nothing was queued")]
    PolicyViolation(String),
    #[error("run would delete {what}; nothing was queued. If this is intended, run it once with SELECT retl.run('{sync}', allow_mass_delete => true)")]
    MassDelete { sync: String, what: String },
    #[error("model \"{model}\" of mirror sync \"{sync}\" returned no rows: the run would delete all {delivered} rows the sync delivered; nothing was queued. If this is intended, run it once with SELECT retl.run('{sync}', allow_mass_delete => true)")]
    EmptyModel { sync: String, model: String, delivered: i64 },
    #[error("run would send {planned} rows to destination \"{destination}\" and exceed {whose}: {used} of {limit} rows were sent in the last 24 hours; nothing was queued")]
    Quota { destination: String, planned: i64, used: i64, limit: i64, whose: String },
    #[error("model \"{model}\" of sync \"{sync}\" changed since the last successful run (run {run_id}): {changes}; nothing was queued. If this is intended, run it once with SELECT retl.run('{sync}', allow_schema_change => true)")]
    SchemaChanged { sync: String, model: String, run_id: i64, changes: String },
    #[error("destination {0}")]
    HostRefused(String),
    #[error("{0}")]
    HostPolicy(String),
    #[error("the pg_reverse_etl library is version {library} but the extension's SQL objects are version {installed}")]
    VersionMismatch { library: &'static str, installed: String },
}

fn show_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 { format!("{} s", ms / 1000) } else { format!("{ms} ms") }
}

fn run_note(run_id: i64) -> String {
    if run_id == 0 { " (the run was not created yet)".into() } else { format!(" as run {run_id}") }
}

fn plural(count: i64, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 { one } else { many }
}

impl RetlError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            RetlError::Options(OptionsError::Unknown { .. } | OptionsError::Credential { .. }) => ERRCODE_FDW_INVALID_OPTION_NAME,
            RetlError::Options(_) => ERRCODE_FDW_INVALID_ATTRIBUTE_VALUE,
            RetlError::DestinationOptions { .. } => ERRCODE_FDW_INVALID_ATTRIBUTE_VALUE,
            RetlError::DestinationMissing(_) => ERRCODE_UNDEFINED_OBJECT,
            RetlError::MultipleStatements(_) | RetlError::NotASelect(_) | RetlError::SelectInto => {
                ERRCODE_INVALID_PARAMETER_VALUE
            }
            RetlError::BadFilter(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            RetlError::DuplicateKeys { .. } => ERRCODE_UNIQUE_VIOLATION,
            RetlError::NullKeys { .. } => ERRCODE_NOT_NULL_VIOLATION,
            RetlError::MissingColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            RetlError::WrongDatabase { .. } | RetlError::WorkerNotRunning => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            RetlError::TooManyWaiters(_) => ERRCODE_INSUFFICIENT_RESOURCES,
            RetlError::SyncNotVisible(_) => ERRCODE_UNDEFINED_OBJECT,
            RetlError::Cron(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            RetlError::RunTimedOut { .. } => ERRCODE_QUERY_CANCELED,
            RetlError::VersionMismatch { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            RetlError::DestinationFields { .. } => ERRCODE_UNDEFINED_COLUMN,
            RetlError::DestinationUnchecked { .. } => ERRCODE_FDW_UNABLE_TO_ESTABLISH_CONNECTION,
            RetlError::RowCap { .. } | RetlError::Quota { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            RetlError::MassDelete { .. } | RetlError::EmptyModel { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            RetlError::SchemaChanged { .. } => ERRCODE_DATATYPE_MISMATCH,
            RetlError::PolicyViolation(_) | RetlError::HostRefused(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            RetlError::HostPolicy(_) => ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }

    pub fn hint(&self) -> Option<String> {
        Some(match self {
            RetlError::MultipleStatements(_) | RetlError::NotASelect(_) | RetlError::SelectInto => {
                "Pass one query (e.g. 'SELECT id, email FROM customers') or the name of a table or view.".into()
            }
            RetlError::BadFilter(_) => "Write a WHERE condition without the WHERE, e.g. 'churn_risk > 0.7'.".into(),
            RetlError::DuplicateKeys { .. } => {
                "A model must return one row per primary key; fix the query (GROUP BY, DISTINCT ON) or the key.".into()
            }
            RetlError::NullKeys { .. } => "Filter those rows out of the model or pick a key that is never NULL.".into(),
            RetlError::MissingColumn { .. } => "Fix the sync's mappings with retl.alter_sync, or add the column to the model.".into(),
            RetlError::WrongDatabase { worker_db, .. } => format!(
                "Use the database \"{worker_db}\", or set retl.database_name in postgresql.conf and restart."
            ),
            RetlError::WorkerNotRunning => {
                "Check the server log; the worker restarts by itself after a crash.".into()
            }
            RetlError::SyncNotVisible(_) => {
                "The worker only sees committed syncs: commit the transaction that created the sync, then run it.".into()
            }
            RetlError::DestinationMissing(_) => "Create it with CREATE SERVER ... FOREIGN DATA WRAPPER retl.".into(),
            RetlError::Cron(_) => {
                "Cron fields are minute hour day-of-month month day-of-week, e.g. '*/15 * * * *' or '0 6 * * mon-fri'.".into()
            }
            RetlError::RunTimedOut { .. } => "Follow it in retl.runs, or wait longer with a larger timeout.".into(),
            RetlError::DestinationFields { .. } => {
                "Fields are the mappings' keys (or the model's columns without mappings) and must name writable fields \
                 of the destination object: fix the mappings, or create the field in the destination first."
                    .into()
            }
            RetlError::DestinationUnchecked { .. } => {
                "Fix the destination or its user mapping, or SET retl.check_destination = off to define the sync \
                 without the check (the first run then reports any field the destination refuses)."
                    .into()
            }
            RetlError::HostRefused(_) => {
                "A superuser sets retl.allowed_hosts in postgresql.conf or with ALTER SYSTEM, then SELECT pg_reload_conf().".into()
            }
            RetlError::HostPolicy(_) => "Fix retl.allowed_hosts in postgresql.conf, then SELECT pg_reload_conf().".into(),
            RetlError::VersionMismatch { library, .. } => {
                format!("Run ALTER EXTENSION pg_reverse_etl UPDATE TO '{library}'; the workers wait until then.")
            }
            _ => return None,
        })
    }

    /// Raise this error as a Postgres ERROR with its SQLSTATE and hint.
    pub fn report(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "pg_reverse_etl");
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

pub trait OrReport<T> {
    fn or_report(self) -> T;
}

impl<T, E: Into<RetlError>> OrReport<T> for Result<T, E> {
    fn or_report(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.into().report(),
        }
    }
}
