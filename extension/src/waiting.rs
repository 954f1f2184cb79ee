//! The backend side of `retl.run(wait => true)`: hand the sync to the workers through shared
//! memory (a worker creates and commits the run, which this transaction could not do) and
//! sleep on our latch until a worker says the run is over, or the timeout passes.

use crate::errors::RetlError;
use crate::shared::{self, SlotFailure, SlotState, WAITS, WAIT_SLOTS};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How long to wait for a (re)starting worker before giving up.
const WORKER_START_GRACE: Duration = Duration::from_secs(15);

pub fn await_run(
    sync_id: i64,
    manual: bool,
    overrides: shared::RunOverrides,
    timeout: Option<Duration>,
) -> Result<i64, RetlError> {
    let started = Instant::now();
    while !shared::any_worker_running() {
        if started.elapsed() > WORKER_START_GRACE {
            return Err(RetlError::WorkerNotRunning);
        }
        shared::sleep_on_latch(Duration::from_millis(100));
    }
    let me = unsafe { pg_sys::MyProcPid };
    let slot = {
        let mut waits = WAITS.exclusive();
        let free = waits.slots.iter().position(|s| s.state == SlotState::Free);
        let Some(i) = free else { return Err(RetlError::TooManyWaiters(WAIT_SLOTS)) };
        waits.slots[i] = shared::WaitSlot {
            state: SlotState::Requested,
            failure: SlotFailure::None,
            sync_id,
            run_id: 0,
            requester_pid: me,
            trigger_manual: manual,
            overrides,
        };
        i
    };
    shared::wake_workers();

    // Cancelled while waiting: leave the slot for a worker to free.
    let outcome = PgTryBuilder::new(|| loop {
        let s = WAITS.share().slots[slot];
        if s.state == SlotState::Done {
            break Ok((s.run_id, s.failure));
        }
        let left = match timeout {
            Some(t) => match t.checked_sub(started.elapsed()) {
                Some(left) if !left.is_zero() => left,
                _ => break Err(s.run_id),
            },
            None => Duration::from_secs(1),
        };
        shared::sleep_on_latch(left.min(Duration::from_secs(1)));
    })
    .catch_others(|e| {
        abandon(slot);
        e.rethrow()
    })
    .execute();

    match outcome {
        Ok((run_id, failure)) => {
            WAITS.exclusive().slots[slot] = shared::WaitSlot::default();
            match failure {
                SlotFailure::SyncNotFound => Err(RetlError::SyncNotVisible(sync_id)),
                SlotFailure::None => Ok(run_id),
            }
        }
        Err(run_id) => {
            abandon(slot);
            Err(RetlError::RunTimedOut { run_id, waited: timeout.unwrap_or_default() })
        }
    }
}

/// Nobody waits for this slot any more. Who frees it depends on who holds it: nobody yet
/// (free it now), a worker creating the run (it frees it: requester 0), or a run in progress
/// (settle_waiters frees it when the run is over).
fn abandon(slot: usize) {
    let mut waits = WAITS.exclusive();
    let s = &mut waits.slots[slot];
    match s.state {
        SlotState::Requested | SlotState::Done => *s = shared::WaitSlot::default(),
        SlotState::Claimed => s.requester_pid = 0,
        _ => s.state = SlotState::Abandoned,
    }
}
