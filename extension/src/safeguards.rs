//! Plan-time safeguards: checked inside the planning transaction, after the diff is known and
//! before it commits, so a refusal queues nothing and the destination is never touched. The
//! worker records the refusal as a failed run (with what the plan would have sent).

use crate::errors::RetlError;
use crate::plan::{Mode, SyncDef};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::{Map, Value};

/// A sync's safeguard settings (columns of retl.syncs).
#[derive(Clone, Debug, Default)]
pub struct Safeguards {
    pub max_rows: Option<i64>,
    pub max_delete_percent: Option<f64>,
    pub max_delete_rows: Option<i64>,
    pub quota_share: f64,
    /// nulls => 'keep': NULL fields are left out of payloads.
    pub keep_nulls_out: bool,
}

/// What a run may pass (retl.run(..., allow_mass_delete, allow_schema_change)).
#[derive(Clone, Copy, Debug, Default)]
pub struct Allowed {
    pub mass_delete: bool,
    pub schema_change: bool,
}

/// The model columns a sync reads with their types, `{"column": "type"}`: the key and the
/// mapped columns, or every column when the sync maps them all.
pub fn model_columns(client: &SpiClient, sync: &SyncDef) -> Map<String, Value> {
    let all: Map<String, Value> = client
        .select(
            "SELECT coalesce(jsonb_object_agg(a.attname, format_type(a.atttypid, a.atttypmod)), '{}')::text \
               FROM pg_attribute a \
              WHERE a.attrelid = format('retl_models.%I', $1::text)::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            Some(1),
            &[sync.source.as_str().into()],
        )
        .and_then(|t| t.first().get_one::<String>())
        .unwrap_or_else(|e| error!("{e}"))
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    match &sync.mappings {
        None => all,
        Some(pairs) => all
            .into_iter()
            .filter(|(col, _)| sync.primary_key.contains(col) || pairs.iter().any(|(_, c)| c == col))
            .collect(),
    }
}

/// The schema contract: every column the last successful run read (and the sync still maps)
/// is still in the model with the same type. A new column is no breach.
pub fn check_schema(
    client: &SpiClient,
    sync: &SyncDef,
    current: &Map<String, Value>,
    allowed: Allowed,
) -> Result<(), RetlError> {
    if allowed.schema_change {
        return Ok(());
    }
    let last = client
        .select(
            "SELECT id, model_columns::text FROM retl.runs \
              WHERE sync_id = $1 AND status IN ('succeeded', 'partial') AND model_columns IS NOT NULL \
              ORDER BY id DESC LIMIT 1",
            Some(1),
            &[sync.id.into()],
        )
        .unwrap_or_else(|e| error!("{e}"));
    let Some(row) = last.into_iter().next() else { return Ok(()) };
    let run_id = row.get::<i64>(1).ok().flatten().unwrap_or_default();
    let contract: Map<String, Value> =
        row.get::<String>(2).ok().flatten().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let still_mapped = |col: &str| match &sync.mappings {
        None => true,
        Some(pairs) => sync.primary_key.iter().any(|k| k == col) || pairs.iter().any(|(_, c)| c == col),
    };
    let mut changes = Vec::new();
    for (col, was) in contract.iter().filter(|(col, _)| still_mapped(col)) {
        let was = was.as_str().unwrap_or_default();
        // Without mappings the sync reads whatever the model has: look the column up there.
        match current.get(col).and_then(Value::as_str) {
            None => changes.push(format!("column \"{col}\" ({was}) is gone")),
            Some(now) if now != was => changes.push(format!("column \"{col}\" is now {now} (was {was})")),
            Some(_) => {}
        }
    }
    if changes.is_empty() {
        return Ok(());
    }
    Err(RetlError::SchemaChanged {
        sync: sync.name.clone(),
        model: sync.source.clone(),
        run_id,
        changes: changes.join(", "),
    })
}

/// The destination's tag policy (retl._policy_violation): re-checked by every plan, since
/// the model's tags, its columns or the policy may have changed since create_sync.
pub fn check_policy(client: &SpiClient, sync: &SyncDef) -> Result<(), RetlError> {
    let problem = client
        .select("SELECT retl._policy_violation($1)", Some(1), &[sync.id.into()])
        .and_then(|t| t.first().get_one::<String>())
        .unwrap_or_else(|e| error!("{e}"));
    match problem {
        Some(problem) => Err(RetlError::PolicyViolation(problem)),
        None => Ok(()),
    }
}

/// What a plan is about to queue.
pub struct Planned {
    /// Rows the model returned (None: only changed keys were planned).
    pub rows_in_model: Option<i64>,
    pub total: i64,
    pub deletes: i64,
}

/// The row cap, the mass-delete guard (with the empty-model case) and the quota share.
pub fn check_plan(
    client: &SpiClient,
    sync: &SyncDef,
    guards: &Safeguards,
    planned: &Planned,
    allowed: Allowed,
) -> Result<(), RetlError> {
    if let Some(max_rows) = guards.max_rows {
        if planned.total > max_rows {
            return Err(RetlError::RowCap { sync: sync.name.clone(), planned: planned.total, max_rows });
        }
    }
    if !allowed.mass_delete {
        check_deletes(client, sync, guards, planned)?;
    }
    check_quota(client, sync, guards, planned)
}

fn check_deletes(client: &SpiClient, sync: &SyncDef, guards: &Safeguards, planned: &Planned) -> Result<(), RetlError> {
    let deleting = matches!(sync.mode, Mode::Mirror | Mode::Delete);
    if !deleting || planned.deletes == 0 {
        return Ok(());
    }
    if let Some(max) = guards.max_delete_rows {
        if planned.deletes > max {
            return Err(RetlError::MassDelete {
                sync: sync.name.clone(),
                what: format!("{} rows, more than max_delete_rows {max}", planned.deletes),
            });
        }
    }
    if sync.mode != Mode::Mirror {
        return Ok(());
    }
    let delivered = client
        .select("SELECT count(*) FROM retl.snapshots WHERE sync_id = $1", Some(1), &[sync.id.into()])
        .and_then(|t| t.first().get_one::<i64>())
        .unwrap_or_else(|e| error!("{e}"))
        .unwrap_or(0);
    if planned.rows_in_model == Some(0) {
        return Err(RetlError::EmptyModel { sync: sync.name.clone(), model: sync.source.clone(), delivered });
    }
    if let Some(max_percent) = guards.max_delete_percent {
        let percent = if delivered == 0 { 100.0 } else { planned.deletes as f64 * 100.0 / delivered as f64 };
        if percent > max_percent {
            return Err(RetlError::MassDelete {
                sync: sync.name.clone(),
                what: format!(
                    "{} of the {delivered} rows it delivered ({}%), more than max_delete_percent {}",
                    planned.deletes,
                    show_number(percent),
                    show_number(max_percent)
                ),
            });
        }
    }
    Ok(())
}

/// The destination's daily_row_quota (server option): this sync may send at most its
/// quota_share of it in 24 hours, and all syncs to the destination together all of it.
fn check_quota(client: &SpiClient, sync: &SyncDef, guards: &Safeguards, planned: &Planned) -> Result<(), RetlError> {
    if planned.total == 0 {
        return Ok(());
    }
    // The usage sums scan the last day's batches: only for a destination that has a quota (a
    // plan of one changed key spent half its time on them).
    let quota = client
        .select("SELECT retl._server_option($1, 'daily_row_quota')::bigint", Some(1), &[sync.destination.as_str().into()])
        .and_then(|t| t.first().get_one::<i64>())
        .unwrap_or_else(|e| error!("{e}"));
    let Some(quota) = quota else { return Ok(()) };
    let row = client
        .select(
            "SELECT (SELECT coalesce(sum(b.acknowledged + b.rejected), 0)::bigint \
                       FROM retl.batches b JOIN retl.runs r ON r.id = b.run_id \
                      WHERE r.sync_id = $1 AND b.finished_at > now() - interval '1 day'), \
                    (SELECT coalesce(sum(b.acknowledged + b.rejected), 0)::bigint \
                       FROM retl.batches b JOIN retl.runs r ON r.id = b.run_id JOIN retl.syncs s ON s.id = r.sync_id \
                      WHERE s.destination = $2 AND b.finished_at > now() - interval '1 day')",
            Some(1),
            &[sync.id.into(), sync.destination.as_str().into()],
        )
        .and_then(|t| t.first().get_two::<i64, i64>())
        .unwrap_or_else(|e| error!("{e}"));
    let (Some(used_by_sync), Some(used_by_all)) = row else { return Ok(()) };
    let share = (quota as f64 * guards.quota_share).floor() as i64;
    let refusal = |used: i64, limit: i64, whose: String| RetlError::Quota {
        destination: sync.destination.clone(),
        planned: planned.total,
        used,
        limit,
        whose,
    };
    if used_by_sync + planned.total > share && share < quota {
        return Err(refusal(
            used_by_sync,
            share,
            format!("the share of sync \"{}\" ({} of daily_row_quota {quota})", sync.name, guards.quota_share),
        ));
    }
    if used_by_all + planned.total > quota {
        return Err(refusal(used_by_all, quota, "its daily_row_quota (all syncs together)".into()));
    }
    Ok(())
}

/// 12.5 -> "12.5", 50.0 -> "50".
fn show_number(x: f64) -> String {
    let rounded = (x * 10.0).round() / 10.0;
    if rounded.fract() == 0.0 { format!("{rounded:.0}") } else { format!("{rounded}") }
}
