//! The backend side of `retl.run(wait => true)`: hand the sync to the worker through shared
//! memory (the worker creates and commits the run, which this transaction could not do) and
//! sleep on our latch until the worker says the run is over.

use crate::errors::RetlError;
use crate::shared::{self, SlotFailure, SlotState, WAITS, WAIT_SLOTS};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How long to wait for a (re)starting worker before giving up.
const WORKER_START_GRACE: Duration = Duration::from_secs(15);

pub fn run_and_wait(sync_id: i64, manual: bool) -> Result<i64, RetlError> {
    let started = Instant::now();
    while shared::worker_pid() == 0 {
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
        };
        i
    };
    shared::wake_worker();

    // If we are cancelled while waiting, leave the slot for the worker to free.
    let outcome = PgTryBuilder::new(|| loop {
        {
            let waits = WAITS.share();
            let s = waits.slots[slot];
            if s.state == SlotState::Done {
                break (s.run_id, s.failure);
            }
        }
        shared::sleep_on_latch(Duration::from_secs(1));
    })
    .catch_others(|e| {
        abandon(slot);
        e.rethrow()
    })
    .execute();

    WAITS.exclusive().slots[slot] = shared::WaitSlot::default();
    match outcome {
        (_, SlotFailure::SyncNotFound) => Err(RetlError::SyncNotVisible(sync_id)),
        (run_id, SlotFailure::None) => Ok(run_id),
    }
}

fn abandon(slot: usize) {
    let mut waits = WAITS.exclusive();
    let s = &mut waits.slots[slot];
    *s = if s.state == SlotState::Done {
        shared::WaitSlot::default()
    } else {
        shared::WaitSlot { state: SlotState::Abandoned, ..*s }
    };
}
