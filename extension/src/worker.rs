//! The background worker: waits on its latch, turns wait-requests into runs, plans queued
//! runs and delivers them. Only this main thread touches Postgres; the tokio runtime is
//! driven with `block_on` between transactions and only does HTTP.

use crate::deliver::{self, Buckets, Delivered};
use crate::plan;
use crate::settings;
use crate::shared::{self, SlotFailure, SlotState, WAITS};
use crate::transaction::{report_activity, report_idle, transaction};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

/// Safety net only: commits and wait-requests set the latch, so the worker normally reacts
/// at once; this bounds the delay if a wake-up was ever missed.
const IDLE_RECHECK: Duration = Duration::from_secs(10);

/// Advisory-lock namespace of per-sync run locks ("RETL").
const LOCK_NAMESPACE: i32 = 0x5245_544c;

pub fn register() {
    BackgroundWorkerBuilder::new("pg_reverse_etl worker")
        .set_type("pg_reverse_etl worker")
        .set_function("retl_worker_main")
        .set_library("pg_reverse_etl")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
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

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn retl_worker_main(_arg: pg_sys::Datum) {
    // Built before the signal handlers are attached, so its threads inherit nothing useful.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(block_signals_in_this_thread)
        .build()
        .unwrap_or_else(|e| panic!("pg_reverse_etl: cannot start the HTTP runtime: {e}"));
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&settings::database_name()), None);
    shared::set_worker_pid(unsafe { pg_sys::MyProcPid });
    log!("pg_reverse_etl worker started in database \"{}\"", settings::database_name());

    let mut buckets = Buckets::default();
    loop {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        work(&runtime, &mut buckets);
        report_idle();
        if shared::shutdown_requested() {
            break;
        }
        // Returns at once if the latch was set while we worked (a commit or a wait-request).
        shared::sleep_on_latch(IDLE_RECHECK);
        if shared::shutdown_requested() {
            break;
        }
    }
    shared::set_worker_pid(0);
    log!("pg_reverse_etl worker stopped");
}

/// Everything there is to do now: requested runs, queued runs, runs left mid-delivery.
fn work(runtime: &tokio::runtime::Runtime, buckets: &mut Buckets) {
    let installed = transaction(|| {
        Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_reverse_etl')")
            .map_err(|e| e.to_string())
    });
    if installed != Ok(Some(true)) {
        return; // no extension in this database (yet): nothing to do, quietly
    }
    loop {
        accept_wait_requests();
        settle_waiters();
        if shared::shutdown_requested() {
            return;
        }
        let next = transaction(|| {
            Spi::connect(|client| {
                let table = client
                    .select(
                        "SELECT id, status FROM retl.runs WHERE status IN ('queued', 'delivering') \
                          ORDER BY status = 'delivering' DESC, id LIMIT 1",
                        Some(1),
                        &[],
                    )
                    .map_err(|e| e.to_string())?;
                if table.is_empty() {
                    return Ok((None, None));
                }
                table.first().get_two::<i64, String>().map_err(|e| e.to_string())
            })
        });
        let (run_id, status) = match next {
            Ok((Some(id), Some(status))) => (id, status),
            Ok(_) => return,
            Err(message) => {
                log!("pg_reverse_etl: cannot read the run queue: {message}");
                return;
            }
        };
        let delivering = status == "delivering" || plan_run(run_id);
        if delivering {
            if let Delivered::Interrupted = deliver::deliver_run(runtime, buckets, run_id) {
                return;
            }
        }
    }
}

/// Plan a queued run in one transaction. Returns whether there is anything to deliver.
fn plan_run(run_id: i64) -> bool {
    let planned = transaction(|| {
        Spi::connect_mut(|client| {
            let sync_id = plan::sync_id_of_run(client, run_id)?;
            // Two runs of one sync never overlap.
            client
                .select("SELECT pg_advisory_xact_lock($1, $2::int4)", None, &[LOCK_NAMESPACE.into(), (sync_id as i32).into()])
                .map_err(|e| e.to_string())?;
            let sync = plan::load_sync_by_id(client, sync_id).ok_or("sync vanished")?;
            if sync.paused {
                return Ok(None);
            }
            report_activity(&format!("retl: sync {} run {run_id}: planning", sync.name));
            client
                .update("UPDATE retl.runs SET started_at = clock_timestamp() WHERE id = $1", None, &[run_id.into()])
                .map_err(|e| e.to_string())?;
            let summary = plan::plan_run(client, &sync, run_id).map_err(|e| e.to_string())?;
            let total = summary.total();
            client
                .update(
                    "UPDATE retl.runs SET status = CASE WHEN $6 > 0 THEN 'delivering' ELSE 'succeeded' END, \
                            planned_at = clock_timestamp(), \
                            finished_at = CASE WHEN $6 > 0 THEN NULL ELSE clock_timestamp() END, \
                            rows_in_model = $2, planned_inserts = $3, planned_updates = $4, planned_deletes = $5 \
                      WHERE id = $1",
                    None,
                    &[
                        run_id.into(),
                        summary.rows_in_model.into(),
                        summary.inserts.into(),
                        summary.updates.into(),
                        summary.deletes.into(),
                        total.into(),
                    ],
                )
                .map_err(|e| e.to_string())?;
            Ok(Some(total > 0))
        })
    });
    match planned {
        Ok(Some(deliver)) => deliver,
        Ok(None) => {
            deliver::finish_run(run_id, Some("sync was paused"), true);
            false
        }
        Err(message) => {
            // The plan rolled back: nothing was queued. Record why.
            deliver::finish_run(run_id, Some(&message), false);
            false
        }
    }
}

/// Turn `retl.run(wait => true)` requests into committed runs.
fn accept_wait_requests() {
    let requested: Vec<(usize, i64, bool)> = {
        let waits = WAITS.share();
        waits
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == SlotState::Requested || (s.state == SlotState::Abandoned && s.run_id == 0))
            .map(|(i, s)| (i, s.sync_id, s.trigger_manual))
            .collect()
    };
    for (slot, sync_id, manual) in requested {
        if WAITS.share().slots[slot].state == SlotState::Abandoned {
            WAITS.exclusive().slots[slot] = shared::WaitSlot::default();
            continue;
        }
        let trigger = if manual { "manual" } else { "scheduled" };
        let created = transaction(|| {
            Spi::get_one_with_args::<i64>(
                "INSERT INTO retl.runs (sync_id, trigger) SELECT id, $2 FROM retl.syncs WHERE id = $1 RETURNING id",
                &[sync_id.into(), trigger.into()],
            )
            .map_err(|e| e.to_string())
        });
        let mut waits = WAITS.exclusive();
        let s = &mut waits.slots[slot];
        match (created, s.state) {
            (Ok(Some(run_id)), SlotState::Requested) => {
                s.state = SlotState::Accepted;
                s.run_id = run_id;
            }
            (Ok(Some(_)), _) => *s = shared::WaitSlot::default(), // abandoned meanwhile; the run goes on
            (_, SlotState::Requested) => {
                s.state = SlotState::Done;
                s.failure = SlotFailure::SyncNotFound;
                shared::wake_pid(s.requester_pid);
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
