//! Shared memory between user backends and the workers: who the workers are and what they do
//! (so a commit can wake them and `retl.worker_status()` can show them), the tables changed by
//! recent commits (on-change syncs), each destination's rate budget, and the slots through
//! which `retl.run(wait => true)` hands a run over and waits for it.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const WAIT_SLOTS: usize = 32;
/// Upper bound of `retl.workers`.
pub const MAX_WORKERS: usize = 16;
/// Distinct tables remembered between two scheduler passes; more means "all of them changed".
pub const CHANGED_RELATIONS: usize = 128;
/// Destinations with a rate limit that can be tracked at once.
pub const RATE_SLOTS: usize = 64;

#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum SlotState {
    #[default]
    Free,
    /// A backend asked for a run of `sync_id` and waits.
    Requested,
    /// A worker took the request and is creating the run.
    Claimed,
    /// The run `run_id` exists; the workers are working on it.
    Accepted,
    /// The run finished (or could not be created: `run_id` is 0 and `failure` says why).
    Done,
    /// The waiting backend gave up (cancelled, timed out); a worker frees the slot later.
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
    /// The safeguards the run may pass (retl.run(..., allow_mass_delete, allow_schema_change)).
    pub overrides: RunOverrides,
}

/// Safeguards a run is allowed to pass (runs.allow_mass_delete, runs.allow_schema_change).
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub struct RunOverrides {
    pub mass_delete: bool,
    pub schema_change: bool,
}

#[derive(Copy, Clone, Default)]
pub struct WaitSlots {
    pub slots: [WaitSlot; WAIT_SLOTS],
}
unsafe impl PGRXSharedMemory for WaitSlots {}

#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum WorkerState {
    #[default]
    Stopped,
    Starting,
    Idle,
    Scheduling,
    Planning,
    Delivering,
    /// The extension is missing or its SQL objects are another version than the library.
    Waiting,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Stopped => "stopped",
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Scheduling => "scheduling",
            WorkerState::Planning => "planning",
            WorkerState::Delivering => "delivering",
            WorkerState::Waiting => "waiting for the extension",
        }
    }
}

#[derive(Copy, Clone, Default, Debug)]
pub struct WorkerSlot {
    pub pid: i32,
    pub state: WorkerState,
    pub sync_id: i64,
    pub run_id: i64,
    /// Postgres timestamp (microseconds since 2000-01-01) of the last state change.
    pub since: i64,
}

#[derive(Copy, Clone, Default)]
pub struct Workers {
    pub slots: [WorkerSlot; MAX_WORKERS],
}
unsafe impl PGRXSharedMemory for Workers {}

/// Tables changed by commits since the scheduler last looked.
#[derive(Copy, Clone)]
pub struct ChangedRelations {
    pub count: usize,
    /// More distinct tables changed than fit: treat every on-change sync as changed.
    pub overflow: bool,
    pub relids: [pg_sys::Oid; CHANGED_RELATIONS],
}
impl Default for ChangedRelations {
    fn default() -> Self {
        ChangedRelations { count: 0, overflow: false, relids: [pg_sys::InvalidOid; CHANGED_RELATIONS] }
    }
}
unsafe impl PGRXSharedMemory for ChangedRelations {}

/// One destination's rate budget: the GCRA state shared by every worker delivering to it.
#[derive(Default)]
pub struct RateSlot {
    /// The foreign server's oid; 0 while the slot is free.
    pub server: AtomicU32,
    pub tat: AtomicU64,
}

pub struct RateBudgets {
    pub slots: [RateSlot; RATE_SLOTS],
}
impl Default for RateBudgets {
    fn default() -> Self {
        RateBudgets { slots: std::array::from_fn(|_| RateSlot::default()) }
    }
}
unsafe impl PGRXSharedMemory for RateBudgets {}

/// Concurrent destination checks (`create_sync` asking a worker to look at the destination's
/// fields: user backends never make HTTP calls themselves).
pub const PROBE_SLOTS: usize = 8;
/// Field names of one check, newline-separated.
pub const PROBE_FIELDS: usize = 8192;
pub const PROBE_MESSAGE: usize = 1024;

#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum ProbeState {
    #[default]
    Free,
    Requested,
    Claimed,
    /// Answered: `ok`, or `message` says what the destination refused or why it could not be asked.
    Done,
}

#[derive(Copy, Clone)]
pub struct ProbeSlot {
    pub state: ProbeState,
    pub requester_pid: i32,
    pub server: pg_sys::Oid,
    pub owner: pg_sys::Oid,
    pub fields_len: usize,
    pub fields: [u8; PROBE_FIELDS],
    /// Whether the destination refused a field (as opposed to could not be asked).
    pub refused: bool,
    pub message_len: usize,
    pub message: [u8; PROBE_MESSAGE],
}

impl Default for ProbeSlot {
    fn default() -> Self {
        ProbeSlot {
            state: ProbeState::Free,
            requester_pid: 0,
            server: pg_sys::InvalidOid,
            owner: pg_sys::InvalidOid,
            fields_len: 0,
            fields: [0; PROBE_FIELDS],
            refused: false,
            message_len: 0,
            message: [0; PROBE_MESSAGE],
        }
    }
}

#[derive(Copy, Clone)]
pub struct ProbeSlots {
    pub slots: [ProbeSlot; PROBE_SLOTS],
}
impl Default for ProbeSlots {
    fn default() -> Self {
        ProbeSlots { slots: [ProbeSlot::default(); PROBE_SLOTS] }
    }
}
unsafe impl PGRXSharedMemory for ProbeSlots {}

/// Access tokens refreshed by any worker (OAuth), so the others use them too instead of each
/// refreshing again. Keyed by server, sync owner and a fingerprint of the user mapping they
/// came from. Shared memory is readable only by server processes, like the catalog the
/// mapping itself is stored in.
pub const TOKEN_SLOTS: usize = 32;
pub const TOKEN_BYTES: usize = 4096;

#[derive(Copy, Clone)]
pub struct TokenSlot {
    pub server: u32,
    pub owner: u32,
    pub fingerprint: [u8; 32],
    pub len: usize,
    pub token: [u8; TOKEN_BYTES],
    /// When it was stored (Postgres timestamp): the oldest slot is reused first.
    pub stored: i64,
}

#[derive(Copy, Clone)]
pub struct TokenSlots {
    pub slots: [TokenSlot; TOKEN_SLOTS],
}
impl Default for TokenSlots {
    fn default() -> Self {
        let empty = TokenSlot { server: 0, owner: 0, fingerprint: [0; 32], len: 0, token: [0; TOKEN_BYTES], stored: 0 };
        TokenSlots { slots: [empty; TOKEN_SLOTS] }
    }
}
unsafe impl PGRXSharedMemory for TokenSlots {}

pub static TOKENS: PgLwLock<TokenSlots> = unsafe { PgLwLock::new(c"retl_token_slots") };

/// The token some worker refreshed for this server, owner and user mapping, if any.
pub fn cached_token(server: u32, owner: u32, fingerprint: &[u8; 32]) -> Option<String> {
    let tokens = TOKENS.share();
    let slot = tokens
        .slots
        .iter()
        .find(|t| t.len > 0 && t.server == server && t.owner == owner && t.fingerprint == *fingerprint)?;
    String::from_utf8(slot.token[..slot.len].to_vec()).ok()
}

pub fn cache_token(server: u32, owner: u32, fingerprint: &[u8; 32], token: &str) {
    if token.len() > TOKEN_BYTES {
        return;
    }
    let mut tokens = TOKENS.exclusive();
    let i = tokens
        .slots
        .iter()
        .position(|t| t.len > 0 && t.server == server && t.owner == owner)
        .or_else(|| tokens.slots.iter().enumerate().min_by_key(|(_, t)| (t.len > 0, t.stored)).map(|(i, _)| i))
        .unwrap_or(0);
    let slot = &mut tokens.slots[i];
    slot.server = server;
    slot.owner = owner;
    slot.fingerprint = *fingerprint;
    slot.token[..token.len()].copy_from_slice(token.as_bytes());
    slot.len = token.len();
    slot.stored = now_timestamp();
}

pub static PROBES: PgLwLock<ProbeSlots> = unsafe { PgLwLock::new(c"retl_probe_slots") };
pub static WAITS: PgLwLock<WaitSlots> = unsafe { PgLwLock::new(c"retl_wait_slots") };
pub static WORKERS: PgLwLock<Workers> = unsafe { PgLwLock::new(c"retl_workers") };
pub static CHANGED: PgLwLock<ChangedRelations> = unsafe { PgLwLock::new(c"retl_changed_relations") };
pub static RATES: PgAtomic<RateBudgets> = unsafe { PgAtomic::new(c"retl_rate_budgets") };

pub fn init() {
    pg_shmem_init!(WAITS);
    pg_shmem_init!(WORKERS);
    pg_shmem_init!(CHANGED);
    pg_shmem_init!(RATES);
    pg_shmem_init!(PROBES);
    pg_shmem_init!(TOKENS);
}

fn now_timestamp() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Record what worker `n` is doing (also shown by `retl.worker_status()`).
pub fn set_worker_state(n: usize, state: WorkerState, sync_id: i64, run_id: i64) {
    let pid = if state == WorkerState::Stopped { 0 } else { unsafe { pg_sys::MyProcPid } };
    let mut workers = WORKERS.exclusive();
    let slot = &mut workers.slots[n];
    if slot.state != state || slot.sync_id != sync_id || slot.run_id != run_id || slot.pid != pid {
        *slot = WorkerSlot { pid, state, sync_id, run_id, since: now_timestamp() };
    }
}

/// How many workers other than `n` are planning a run now.
pub fn others_planning(n: usize) -> usize {
    let workers = WORKERS.share();
    workers.slots[..crate::settings::workers()]
        .iter()
        .enumerate()
        .filter(|(i, w)| *i != n && w.state == WorkerState::Planning)
        .count()
}

pub fn any_worker_running() -> bool {
    WORKERS.share().slots.iter().any(|w| w.pid != 0)
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

/// Wake every worker: whichever is free takes the new work.
pub fn wake_workers() {
    let pids: Vec<i32> = WORKERS.share().slots.iter().map(|w| w.pid).filter(|&p| p != 0).collect();
    for pid in pids {
        wake_pid(pid);
    }
}

/// Remember that these tables changed (called at commit), and wake the workers.
pub fn note_changed(relids: &[pg_sys::Oid]) {
    {
        let mut changed = CHANGED.exclusive();
        for &relid in relids {
            let count = changed.count;
            if changed.relids[..count].contains(&relid) {
                continue;
            }
            if count == CHANGED_RELATIONS {
                changed.overflow = true;
                break;
            }
            changed.relids[count] = relid;
            changed.count += 1;
        }
    }
    wake_workers();
}

/// What changed since the last call: `None` when nothing did, `Some(None)` when too much did
/// to list, else the tables.
pub fn take_changed() -> Option<Option<Vec<pg_sys::Oid>>> {
    let mut changed = CHANGED.exclusive();
    if changed.count == 0 && !changed.overflow {
        return None;
    }
    let taken = if changed.overflow { None } else { Some(changed.relids[..changed.count].to_vec()) };
    *changed = ChangedRelations::default();
    Some(taken)
}

/// The shared GCRA state of destination `server`, claiming a free slot on first use. `None`
/// when every slot is taken (the worker then falls back to a per-process budget).
pub fn rate_state(server: pg_sys::Oid) -> Option<&'static AtomicU64> {
    let key = server.to_u32();
    let budgets: &'static RateBudgets = RATES.get();
    for slot in &budgets.slots {
        let current = slot.server.load(Ordering::Acquire);
        if current == key {
            return Some(&slot.tat);
        }
        if current == 0
            && slot
                .server
                .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                .map_or_else(|other| other == key, |_| true)
        {
            return Some(&slot.tat);
        }
    }
    None
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
            timeout.as_millis().min(i64::MAX as u128) as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}

/// Treat every on-change sync as changed (after a failed scheduling pass lost the list).
pub fn note_all_changed() {
    CHANGED.exclusive().overflow = true;
    wake_workers();
}
