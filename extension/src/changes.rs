//! On-change syncs: a statement trigger on every base table of an on-change sync's model
//! notes the table in this transaction; at commit the tables go to shared memory and the
//! workers are woken, so the run starts within milliseconds of the commit, without polling.
//! An aborted transaction wakes nobody.

use crate::shared;
use pgrx::prelude::*;
use pgrx::{PgXactCallbackEvent, WhoAllocated};
use std::cell::RefCell;

thread_local! {
    /// Tables changed by this transaction so far; `None` until the first change, when the
    /// commit and abort callbacks are registered.
    static CHANGED_IN_XACT: RefCell<Option<Vec<pg_sys::Oid>>> = const { RefCell::new(None) };
}

#[pg_trigger]
fn _on_change<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, pgrx::PgTriggerError> {
    let relid = trigger.relid()?;
    CHANGED_IN_XACT.with(|cell| {
        let mut changed = cell.borrow_mut();
        match changed.as_mut() {
            Some(tables) => {
                if !tables.contains(&relid) {
                    tables.push(relid);
                }
            }
            None => {
                *changed = Some(vec![relid]);
                pgrx::register_xact_callback(PgXactCallbackEvent::Commit, || {
                    if let Some(tables) = CHANGED_IN_XACT.with(|c| c.borrow_mut().take()) {
                        shared::note_changed(&tables);
                    }
                });
                pgrx::register_xact_callback(PgXactCallbackEvent::Abort, || {
                    CHANGED_IN_XACT.with(|c| c.borrow_mut().take());
                });
            }
        }
    });
    // A statement-level AFTER trigger's result is ignored.
    Ok(None::<PgHeapTuple<'a, pgrx::AllocatedByRust>>)
}
