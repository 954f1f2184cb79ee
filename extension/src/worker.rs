//! The background workers (`retl.workers` of them). Each waits on its latch, turns
//! wait-requests into runs, makes a scheduling pass, then works on runs one slice at a time:
//! a queued run is planned, a delivering run gets one window of batches. Runs take turns by
//! when they were last served, so one huge sync cannot starve the others. Only the main
//! thread touches Postgres; the tokio runtime is driven with `block_on` between transactions
//! and only does HTTP.

use crate::alerts;
use crate::deliver;
use crate::scheduler::{self, LOCK_NAMESPACE};
use crate::settings;
use crate::shared::{self, SlotFailure, SlotState, WorkerState, WAITS};
use crate::transaction::{report_activity, report_idle, transaction};
use crate::{api, plan};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

/// Safety net only: commits, schedules and wait-requests set the latch or bound the sleep, so
/// a worker normally reacts at once; this bounds the delay if a wake-up was ever missed.
const IDLE_RECHECK: Duration = Duration::from_secs(5);
/// Candidates looked at per pick; enough that busy syncs locked by other workers are skipped.
const CANDIDATES: i32 = 16;

pub fn register() {
    for n in 0..settings::workers() {
        BackgroundWorkerBuilder::new(&format!("pg_reverse_etl worker {}", n + 1))
            .set_type("pg_reverse_etl worker")
            .set_function("retl_worker_main")
            .set_library("pg_reverse_etl")
            .set_argument(Some(pg_sys::Datum::from(n)))
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(Some(Duration::from_secs(5)))
            .load();
    }
}

/// Threads of the HTTP runtime (DNS lookups run on its blocking pool) must never run
/// Postgres's signal handlers: block every signal there.
fn block_signals_in_this_thread() {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

struct Worker {
    n: usize,
    runtime: tokio::runtime::Runtime,
    deliver: deliver::Deliveries,
    /// The last catalog problem logged, so it is logged once, not every pass.
    logged_problem: Option<String>,
    /// When this worker last evaluated alerts and purged history.
    alerts: alerts::AlertClock,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn retl_worker_main(arg: pg_sys::Datum) {
    let n = arg.value();
    // Built before the signal handlers are attached, so its threads inherit nothing useful.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(block_signals_in_this_thread)
        .build()
        .unwrap_or_else(|e| panic!("pg_reverse_etl: cannot start the HTTP runtime: {e}"));
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&settings::database_name()), None);
    name_in_pg_stat_activity(n);
    no_jit_for_bookkeeping();
    shared::set_worker_state(n, WorkerState::Starting, 0, 0);
    log!("pg_reverse_etl worker {} started in database \"{}\"", n + 1, settings::database_name());

    let mut worker = Worker { n, runtime, deliver: deliver::Deliveries::default(), logged_problem: None, alerts: Default::default() };
    while !shared::shutdown_requested() {
        let sleep = worker.work();
        if shared::shutdown_requested() {
            break;
        }
        report_idle();
        shared::sleep_on_latch(sleep);
    }
    shared::set_worker_state(n, WorkerState::Stopped, 0, 0);
    log!("pg_reverse_etl worker {} stopped", n + 1);
    // Exit code 1: the postmaster starts the worker again after retl's restart interval if it
    // was stopped on its own (pg_terminate_backend); at server shutdown it is not restarted.
    unsafe { pg_sys::proc_exit(1) };
}

/// The worker's own statements (run queue, alerts, acknowledgements) touch a few rows each, but
/// the planner can cost them high enough to be JIT-compiled: the alert pass, with a large
/// outbox, crossed `jit_above_cost` and spent 0.8 s compiling every 2 s, when it runs in 5 ms
/// without. So the worker's session has `jit` off; a model's query is planned with the server's
/// setting (plan::with_model_settings).
fn no_jit_for_bookkeeping() {
    unsafe {
        pg_sys::SetConfigOption(c"jit".as_ptr(), c"off".as_ptr(), pg_sys::GucContext::PGC_USERSET, pg_sys::GucSource::PGC_S_SESSION);
    }
}

/// application_name "pg_reverse_etl worker N", so each worker is told apart in pg_stat_activity.
fn name_in_pg_stat_activity(n: usize) {
    let name = std::ffi::CString::new(format!("pg_reverse_etl worker {}", n + 1)).unwrap_or_default();
    unsafe {
        pg_sys::SetConfigOption(
            c"application_name".as_ptr(),
            name.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
        pg_sys::pgstat_report_appname(name.as_ptr());
    }
}

fn reload_config_if_asked() {
    if BackgroundWorker::sighup_received() {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

impl Worker {
    fn state(&self, state: WorkerState, sync_id: i64, run_id: i64) {
        shared::set_worker_state(self.n, state, sync_id, run_id);
    }

    /// Everything there is to do now; returns how long to sleep afterwards.
    fn work(&mut self) -> Duration {
        loop {
            if shared::shutdown_requested() {
                return Duration::ZERO;
            }
            reload_config_if_asked();
            // Checked before every slice: DROP EXTENSION or ALTER EXTENSION ... UPDATE may run
            // while we work; then we wait quietly (one log line) instead of failing every pass.
            if let Some(problem) = catalog_problem() {
                self.state(WorkerState::Waiting, 0, 0);
                if self.logged_problem.as_deref() != Some(problem.as_str()) {
                    log!("pg_reverse_etl worker {}: {problem}; waiting", self.n + 1);
                    self.logged_problem = Some(problem);
                }
                return IDLE_RECHECK;
            }
            self.logged_problem = None;
            accept_wait_requests();
            settle_waiters();
            crate::probe::serve(&self.runtime);
            self.state(WorkerState::Scheduling, 0, 0);
            scheduler::schedule();
            self.alerts.tick(&self.runtime);
            let Some((run_id, sync_id, status)) = pick_run(self.n) else { break };
            // A run that ended is settled with its waiter at the top of the next pass.
            self.work_on(run_id, sync_id, &status);
            unlock_sync(sync_id);
            crate::transaction::flush_table_statistics();
        }
        self.state(WorkerState::Idle, 0, 0);
        crate::transaction::flush_table_statistics();
        scheduler::until_next_schedule().map_or(IDLE_RECHECK, |d| d.min(IDLE_RECHECK))
    }

    /// One slice of run `run_id` (locked for us): plan it if it is queued, then deliver a window.
    fn work_on(&mut self, run_id: i64, sync_id: i64, status: &str) {
        if status == "queued" {
            self.state(WorkerState::Planning, sync_id, run_id);
            if !plan_run(run_id) {
                return;
            }
        }
        self.state(WorkerState::Delivering, sync_id, run_id);
        self.deliver.slice(&self.runtime, run_id);
    }
}

/// Why the workers cannot work in this database now, if they cannot.
fn catalog_problem() -> Option<String> {
    let installed = transaction(|| Ok(api::installed_version())).unwrap_or_default();
    if installed.is_empty() {
        return Some("the extension is not installed in this database (CREATE EXTENSION pg_reverse_etl)".into());
    }
    let library = env!("CARGO_PKG_VERSION");
    (installed != library).then(|| {
        format!(
            "the library is version {library} but the extension's SQL objects are version {installed} \
             (run ALTER EXTENSION pg_reverse_etl UPDATE)"
        )
    })
}

/// The run to work on next, with its sync locked for this worker (session advisory lock):
/// the one waiting longest among those no other worker holds.
fn pick_run(n: usize) -> Option<(i64, i64, String)> {
    // A plan is one transaction, however large the model: when every other worker is planning,
    // this one delivers if any run is waiting to, so deliveries never stop behind plans.
    let deliver_first = settings::workers() > 1 && shared::others_planning(n) + 1 >= settings::workers();
    transaction(|| {
        Spi::connect(|client| {
            let mut candidates: Vec<(i64, i64, String)> = client
                .select("SELECT run_id, sync_id, status FROM retl._runnable_runs($1)", None, &[CANDIDATES.into()])
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter_map(|row| {
                    Some((row.get::<i64>(1).ok()??, row.get::<i64>(2).ok()??, row.get::<String>(3).ok()??))
                })
                .collect();
            if deliver_first {
                // Stable: among delivering runs (and then queued ones) the oldest turn first.
                candidates.sort_by_key(|(_, _, status)| status != "delivering");
            }
            for (run_id, sync_id, status) in candidates {
                let locked = client
                    .select(
                        "SELECT pg_try_advisory_lock($1, $2::int4)",
                        Some(1),
                        &[LOCK_NAMESPACE.into(), (sync_id as i32).into()],
                    )
                    .and_then(|t| t.first().get_one::<bool>())
                    .map_err(|e| e.to_string())?
                    .unwrap_or(false);
                if locked {
                    return Ok(Some((run_id, sync_id, status)));
                }
            }
            Ok(None)
        })
    })
    .unwrap_or_else(|message| {
        log!("pg_reverse_etl: cannot read the run queue: {message}");
        None
    })
}

fn unlock_sync(sync_id: i64) {
    let _ = transaction(|| {
        Spi::run_with_args("SELECT pg_advisory_unlock($1, $2::int4)", &[LOCK_NAMESPACE.into(), (sync_id as i32).into()])
            .map_err(|e| e.to_string())
    });
}

// utils/timeout.h, which pgrx does not bind (STATEMENT_TIMEOUT is 3 in Postgres 13-17).
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
extern "C" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}

/// The model runs as its owner, so it is bounded by the owner's `statement_timeout` (set with
/// ALTER ROLE [IN DATABASE] or ALTER DATABASE), as the owner's own sessions are. The worker
/// connects as the bootstrap superuser and runs no client statements, so Postgres applies
/// neither that setting nor the timer by itself.
fn arm_owners_statement_timeout(client: &mut pgrx::spi::SpiClient, owner: pg_sys::Oid) -> Result<(), String> {
    let setting = client
        .select(
            "SELECT substr(c, length('statement_timeout=') + 1)
               FROM pg_catalog.pg_db_role_setting d, unnest(d.setconfig) c
              WHERE c LIKE 'statement_timeout=%'
                AND (d.setrole, d.setdatabase) IN (($1, (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())),
                                                   ($1, 0),
                                                   (0, (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())))
              ORDER BY d.setrole DESC, d.setdatabase DESC LIMIT 1",
            Some(1),
            &[owner.into()],
        )
        .map_err(|e| e.to_string())?;
    if setting.is_empty() {
        return Ok(());
    }
    let Some(setting) = setting.first().get_one::<String>().map_err(|e| e.to_string())? else { return Ok(()) };
    client
        .update("SELECT pg_catalog.set_config('statement_timeout', $1, true)", None, &[setting.into()])
        .map_err(|e| e.to_string())?;
    let ms = unsafe { pg_sys::StatementTimeout };
    if ms > 0 {
        unsafe { enable_timeout_after(STATEMENT_TIMEOUT, ms) };
    }
    Ok(())
}

/// Plan a queued run in one transaction. Returns whether there is anything to deliver.
fn plan_run(run_id: i64) -> bool {
    // Committed before the plan's snapshot is taken: from now on a change to the model's
    // tables queues a follow-up run instead of counting on this plan, which may not see it.
    let started = transaction(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE retl.runs SET started_at = clock_timestamp() WHERE id = $1 AND status = 'queued'",
                    None,
                    &[run_id.into()],
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    });
    if let Err(message) = started {
        log!("pg_reverse_etl: cannot start run {run_id}: {message}");
        return false;
    }
    // A safeguard's refusal: what the plan would have queued (recorded on the failed run).
    let mut refused: Option<plan::PlanSummary> = None;
    let planned = transaction(|| {
        Spi::connect_mut(|client| {
            let sync_id = plan::sync_id_of_run(client, run_id)?;
            let sync = plan::load_sync_by_id(client, sync_id).ok_or("sync vanished")?;
            // Another worker may have planned it between our pick and our lock.
            let still_queued = client
                .select("SELECT 1 FROM retl.runs WHERE id = $1 AND status = 'queued'", None, &[run_id.into()])
                .map_err(|e| e.to_string())?;
            if still_queued.is_empty() {
                return Ok(Some(false));
            }
            if sync.paused {
                return Ok(None);
            }
            report_activity(&format!("retl: sync {} run {run_id}: planning", sync.name));
            arm_owners_statement_timeout(client, sync.owner)?;
            let summary = plan::with_output_settings(|| plan::plan_run(client, &sync, run_id)).map_err(|failure| {
                refused = failure.summary;
                failure.error.to_string()
            })?;
            let total = summary.total();
            record_plan(client, run_id, &summary)?;
            client
                .update(
                    "UPDATE retl.runs SET status = CASE WHEN $2 > 0 THEN 'delivering' ELSE 'succeeded' END, \
                            finished_at = CASE WHEN $2 > 0 THEN NULL ELSE clock_timestamp() END \
                      WHERE id = $1",
                    None,
                    &[run_id.into(), total.into()],
                )
                .map_err(|e| e.to_string())?;
            if total == 0 {
                deliver::log_finished_run(client, run_id);
            }
            Ok(Some(total > 0))
        })
    });
    // Armed by hand (Postgres arms it only for client statements); an abort does not disarm it.
    unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
    match planned {
        Ok(Some(deliver)) => deliver,
        Ok(None) => {
            deliver::finish_run(run_id, Some("sync was paused"), true);
            false
        }
        Err(message) => {
            // The plan rolled back: nothing was queued. Record why (and, for a safeguard's
            // refusal, what the plan would have sent).
            if let Some(summary) = refused {
                record_refused_plan(run_id, &summary);
            }
            deliver::finish_run(run_id, Some(&message), false);
            false
        }
    }
}

/// What a plan found, on its run: for a plan that queued its changes and for one a safeguard
/// refused alike.
fn record_plan(client: &mut pgrx::spi::SpiClient, run_id: i64, summary: &plan::PlanSummary) -> Result<(), String> {
    client
        .update(
            "UPDATE retl.runs SET planned_at = clock_timestamp(), rows_in_model = $2, planned_inserts = $3, \
                    planned_updates = $4, planned_deletes = $5, plan_scope = $6 WHERE id = $1",
            None,
            &[
                run_id.into(),
                summary.rows_in_model.into(),
                summary.inserts.into(),
                summary.updates.into(),
                summary.deletes.into(),
                summary.scope.into(),
            ],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn record_refused_plan(run_id: i64, summary: &plan::PlanSummary) {
    let recorded = transaction(|| Spi::connect_mut(|client| record_plan(client, run_id, summary)));
    if let Err(message) = recorded {
        log!("pg_reverse_etl: cannot record the refused plan of run {run_id}: {message}");
    }
}

/// Turn `retl.run(wait => true)` requests into committed runs. A request is claimed under
/// the lock first, so two workers never create two runs for it.
fn accept_wait_requests() {
    loop {
        let claimed = {
            let mut waits = WAITS.exclusive();
            let mut claimed = None;
            for (i, s) in waits.slots.iter_mut().enumerate() {
                if s.state == SlotState::Requested {
                    s.state = SlotState::Claimed;
                    claimed = Some((i, s.sync_id, s.trigger_manual, s.overrides));
                    break;
                }
            }
            claimed
        };
        let Some((slot, sync_id, manual, overrides)) = claimed else { return };
        let trigger = if manual { "manual" } else { "schedule" };
        let created = transaction(|| {
            Spi::connect_mut(|client| {
                let table = client
                    .update(
                        "INSERT INTO retl.runs (sync_id, trigger, allow_mass_delete, allow_schema_change) \
                         SELECT id, $2, $3, $4 FROM retl.syncs WHERE id = $1 RETURNING id",
                        None,
                        &[sync_id.into(), trigger.into(), overrides.mass_delete.into(), overrides.schema_change.into()],
                    )
                    .map_err(|e| e.to_string())?;
                Ok(table.into_iter().next().and_then(|row| row.get::<i64>(1).ok().flatten()))
            })
        });
        // The slot stayed ours (Claimed) meanwhile; requester 0 means the waiter gave up.
        let mut waits = WAITS.exclusive();
        let s = &mut waits.slots[slot];
        let waiter = s.requester_pid;
        match created {
            Ok(Some(run_id)) if waiter != 0 => {
                s.state = SlotState::Accepted;
                s.run_id = run_id;
            }
            // The run goes on; settle_waiters frees the slot when it is over.
            Ok(Some(run_id)) => {
                s.state = SlotState::Abandoned;
                s.run_id = run_id;
            }
            _ if waiter != 0 => {
                s.state = SlotState::Done;
                s.failure = SlotFailure::SyncNotFound;
                shared::wake_pid(waiter);
            }
            _ => *s = shared::WaitSlot::default(),
        }
    }
}

/// Tell waiting backends whose run has finished (also after a worker restart).
fn settle_waiters() {
    let waiting: Vec<(usize, i64)> = {
        let waits = WAITS.share();
        waits
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.state, SlotState::Accepted | SlotState::Abandoned) && s.run_id != 0)
            .map(|(i, s)| (i, s.run_id))
            .collect()
    };
    if waiting.is_empty() {
        return;
    }
    let ids: Vec<i64> = waiting.iter().map(|(_, id)| *id).collect();
    let finished = transaction(|| {
        Spi::connect(|client| {
            let table = client
                .select(
                    "SELECT id FROM retl.runs WHERE id = ANY($1) AND status NOT IN ('queued', 'delivering') \
                     UNION ALL SELECT x FROM unnest($1) x WHERE NOT EXISTS (SELECT 1 FROM retl.runs r WHERE r.id = x)",
                    None,
                    &[ids.into()],
                )
                .map_err(|e| e.to_string())?;
            Ok(table.into_iter().filter_map(|row| row.get::<i64>(1).ok().flatten()).collect::<Vec<i64>>())
        })
    })
    .unwrap_or_default();
    let mut waits = WAITS.exclusive();
    for (slot, run_id) in waiting {
        if !finished.contains(&run_id) {
            continue;
        }
        let s = &mut waits.slots[slot];
        if s.run_id != run_id {
            continue;
        }
        if s.state == SlotState::Abandoned {
            *s = shared::WaitSlot::default();
        } else {
            s.state = SlotState::Done;
            shared::wake_pid(s.requester_pid);
        }
    }
}
