//! Shared memory between user backends and the worker: the worker's pid (so a commit can wake
//! it) and the slots through which `retl.run(wait => true)` hands a run over and waits for it.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicI32, Ordering};

pub const WAIT_SLOTS: usize = 32;

#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum SlotState {
    #[default]
    Free,
    /// A backend asked for a run of `sync_id` and waits.
    Requested,
    /// The worker created run `run_id` and is working on it.
    Accepted,
    /// The run finished (or could not be created: `run_id` is 0 and `failure` says why).
    Done,
    /// The waiting backend gave up (cancelled); the worker frees the slot when it is done.
    Abandoned,
}

#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum SlotFailure {
    #[default]
    None,
    SyncNotFound,
}

#[derive(Copy, Clone, Default, Debug)]
pub struct WaitSlot {
    pub state: SlotState,
    pub failure: SlotFailure,
    pub sync_id: i64,
    pub run_id: i64,
    pub requester_pid: i32,
    pub trigger_manual: bool,
}

#[derive(Copy, Clone, Default)]
pub struct WaitSlots {
    pub slots: [WaitSlot; WAIT_SLOTS],
}
unsafe impl PGRXSharedMemory for WaitSlots {}

pub static WAITS: PgLwLock<WaitSlots> = unsafe { PgLwLock::new(c"retl_wait_slots") };
pub static WORKER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"retl_worker_pid") };

pub fn init() {
    pg_shmem_init!(WAITS);
    pg_shmem_init!(WORKER_PID);
}

pub fn worker_pid() -> i32 {
    WORKER_PID.get().load(Ordering::Acquire)
}

pub fn set_worker_pid(pid: i32) {
    WORKER_PID.get().store(pid, Ordering::Release);
}

/// Set the latch of the backend or worker with this pid, if it is still alive.
pub fn wake_pid(pid: i32) {
    if pid == 0 {
        return;
    }
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if !proc_.is_null() {
            pg_sys::SetLatch(&mut (*proc_).procLatch);
        }
    }
}

pub fn wake_worker() {
    wake_pid(worker_pid());
}

/// Whether the worker was asked to stop (SIGTERM). Unlike pgrx's `sigterm_received`, this
/// does not reset: every layer that polls it sees the same answer.
pub fn shutdown_requested() -> bool {
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// Sleep until our latch is set or `timeout` passes; exits the process if the postmaster
/// died. Interrupts (cancel, terminate) are serviced on return.
pub fn sleep_on_latch(timeout: std::time::Duration) {
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis() as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}
