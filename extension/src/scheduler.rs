//! The scheduling pass every worker makes before picking work: runs for on-change syncs whose
//! tables changed, and for schedules that are due. One worker at a time does it (a
//! transaction-level advisory lock); the others skip the pass rather than wait.

use crate::shared;
use crate::transaction::transaction;
use pgrx::prelude::*;

/// Advisory-lock namespace of pg_reverse_etl ("RETL", 1380275276: retl._wait_for_worker takes
/// a sync's key by that number); key 0 is the scheduler, ALERTS_KEY the alerts' pass, keys > 0
/// are sync ids (two runs of one sync never overlap).
pub const LOCK_NAMESPACE: i32 = 0x5245_544c;
/// The alerts' pass. It was key 1 until 0.11.0, the key of sync 1: a worker delivering sync 1
/// made the others skip their alerts, and a worker evaluating alerts kept the others off sync 1.
pub const ALERTS_KEY: i32 = -1;

/// Returns how many runs were queued.
pub fn schedule() -> i64 {
    let mut taken = None;
    let result = transaction(|| {
        Spi::connect_mut(|client| {
            let got = client
                .select("SELECT pg_try_advisory_xact_lock($1, 0)", Some(1), &[LOCK_NAMESPACE.into()])
                .and_then(|t| t.first().get_one::<bool>())
                .map_err(|e| e.to_string())?
                .unwrap_or(false);
            if !got {
                return Ok(0);
            }
            let mut queued = 0;
            taken = shared::take_changed();
            if let Some(relids) = &taken {
                queued += client
                    .update("SELECT retl._queue_changed($1)", Some(1), &[relids.clone().into()])
                    .and_then(|t| t.first().get_one::<i32>())
                    .map_err(|e| e.to_string())?
                    .unwrap_or(0) as i64;
            }
            queued += client
                .update("SELECT retl._schedule_due()", Some(1), &[])
                .and_then(|t| t.first().get_one::<i32>())
                .map_err(|e| e.to_string())?
                .unwrap_or(0) as i64;
            Ok(queued)
        })
    });
    match result {
        Ok(queued) => queued,
        Err(message) => {
            // Put the changes back: the next pass retries them.
            match taken {
                Some(Some(relids)) => shared::note_changed(&relids),
                Some(None) => shared::note_all_changed(),
                None => {}
            }
            log!("pg_reverse_etl: scheduling failed: {message}");
            0
        }
    }
}

/// How long until the earliest schedule is due, if any sync has one.
pub fn until_next_schedule() -> Option<std::time::Duration> {
    let micros = transaction(|| {
        Spi::get_one::<f64>("SELECT (extract(epoch FROM retl._next_schedule_at() - now()) * 1e6)::float8")
            .map_err(|e| e.to_string())
    })
    .ok()
    .flatten()?;
    Some(std::time::Duration::from_micros(micros.max(0.0) as u64))
}
