//! Alerts: the workers evaluate the alert conditions every few seconds (retl._evaluate_alerts
//! raises, resolves and NOTIFYs), and send each raised alert once to its sync's alert
//! destination (a slack or webhook destination), with the sync owner's credentials.

use crate::destination;
use crate::settings;
use crate::transaction::transaction;
use pgrx::prelude::*;
use retl_engine::connector;
use retl_engine::deliver::{DeliveryLimits, Job};
use retl_engine::record::{Op, OutboxRecord};
use serde_json::json;
use std::time::{Duration, Instant};

/// How often a worker evaluates the alert conditions.
const EVALUATE_EVERY: Duration = Duration::from_secs(2);
/// How often a worker purges history older than retl.history_retention.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Alerts sent per pass at most (the rest wait for the next pass).
const SEND_PER_PASS: i32 = 20;
/// The Slack message of an alert (the destination's own text template is for its syncs' rows).
const SLACK_TEXT: &str = ":rotating_light: *{{ fields.kind }}* on sync `{{ fields.sync }}`: {{ fields.message }}";

#[derive(Default)]
pub struct AlertClock {
    evaluated: Option<Instant>,
    purged: Option<Instant>,
}

impl AlertClock {
    /// Evaluate (and send) alerts, and purge old history, when their time has come.
    pub fn tick(&mut self, runtime: &tokio::runtime::Runtime) {
        if self.evaluated.is_none_or(|t| t.elapsed() >= EVALUATE_EVERY) {
            self.evaluated = Some(Instant::now());
            evaluate();
            send_pending(runtime);
        }
        if self.purged.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            self.purged = Some(Instant::now());
            purge();
        }
    }
}

/// One worker at a time (the advisory lock key ALERTS_KEY); the others skip this pass.
fn evaluate() {
    let result = transaction(|| {
        Spi::connect_mut(|client| {
            let got = client
                .select(
                    "SELECT pg_try_advisory_xact_lock($1, $2)",
                    Some(1),
                    &[crate::scheduler::LOCK_NAMESPACE.into(), crate::scheduler::ALERTS_KEY.into()],
                )
                .and_then(|t| t.first().get_one::<bool>())
                .map_err(|e| e.to_string())?
                .unwrap_or(false);
            if got {
                client.update("SELECT retl._evaluate_alerts()", Some(1), &[]).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    });
    if let Err(message) = result {
        log!("pg_reverse_etl: evaluating alerts failed: {message}");
    }
}

fn purge() {
    let retention = settings::history_retention_minutes();
    if retention <= 0 {
        return;
    }
    let result = transaction(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "SELECT retl._purge_history(make_interval(mins => $1))",
                    Some(1),
                    &[retention.into()],
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    });
    if let Err(message) = result {
        log!("pg_reverse_etl: purging run history failed: {message}");
    }
}

struct PendingAlert {
    id: i64,
    destination: String,
    sync: String,
    kind: String,
    message: String,
    raised_at: String,
    owner: pg_sys::Oid,
}

/// Claim the alerts to send (sent_at set now, so no other worker sends them too).
fn claim() -> Vec<PendingAlert> {
    transaction(|| {
        Spi::connect_mut(|client| {
            let table = client
                .update(
                    "WITH pending AS (SELECT p.*, s.owner FROM retl._alerts_to_send($1, $2) p \
                                        JOIN retl.alerts al ON al.id = p.alert_id \
                                        JOIN retl.syncs s ON s.id = al.sync_id \
                                         FOR UPDATE OF al SKIP LOCKED), \
                          claimed AS (UPDATE retl.alerts al SET sent_at = clock_timestamp() \
                                        FROM pending p WHERE al.id = p.alert_id RETURNING al.id) \
                     SELECT p.alert_id, p.destination, p.sync, p.kind, p.message, p.raised_at::text, p.owner::oid \
                       FROM pending p JOIN claimed c ON c.id = p.alert_id ORDER BY p.alert_id",
                    None,
                    &[settings::alert_destination().into(), SEND_PER_PASS.into()],
                )
                .map_err(|e| e.to_string())?;
            Ok(table
                .into_iter()
                .filter_map(|row| {
                    Some(PendingAlert {
                        id: row.get::<i64>(1).ok()??,
                        destination: row.get::<String>(2).ok()??,
                        sync: row.get::<String>(3).ok()??,
                        kind: row.get::<String>(4).ok()??,
                        message: row.get::<String>(5).ok()??,
                        raised_at: row.get::<String>(6).ok()??,
                        owner: row.get::<pg_sys::Oid>(7).ok()??,
                    })
                })
                .collect())
        })
    })
    .unwrap_or_else(|message| {
        log!("pg_reverse_etl: reading alerts to send failed: {message}");
        Vec::new()
    })
}

fn send_pending(runtime: &tokio::runtime::Runtime) {
    for alert in claim() {
        let outcome = send(runtime, &alert);
        if let Err(problem) = outcome {
            log!("pg_reverse_etl: alert {} could not be sent to destination \"{}\": {problem}", alert.id, alert.destination);
            let _ = transaction(|| {
                Spi::connect_mut(|client| {
                    client
                        .update(
                            "UPDATE retl.alerts SET sent_at = NULL, send_error = $2 WHERE id = $1",
                            None,
                            &[alert.id.into(), problem.as_str().into()],
                        )
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            });
        }
    }
}

/// One alert as one record to the alert destination. Errors are already redacted.
fn send(runtime: &tokio::runtime::Runtime, alert: &PendingAlert) -> Result<(), String> {
    let dest = transaction(|| {
        Spi::connect(|client| destination::load(client, &alert.destination, alert.owner).map_err(|e| e.to_string()))
    })?;
    let mut config = dest.config.clone();
    if let Some(slack) = config.slack.as_mut() {
        slack.text = SLACK_TEXT.to_string();
        slack.digest = false;
    }
    let fields: Vec<String> = ["alert_id", "sync", "kind", "message", "raised_at"].map(String::from).to_vec();
    let connector = connector::for_sync(&config, &fields);
    let record = OutboxRecord {
        id: alert.id,
        op: Op::Upsert,
        key: json!({ "alert_id": alert.id }),
        fields: Some(json!({
            "alert_id": alert.id,
            "sync": alert.sync,
            "kind": alert.kind,
            "message": alert.message,
            "raised_at": alert.raised_at,
        })),
        destination_id: None,
    };
    let deliverer = crate::settings::deliverer(config.timeout)?;
    let auth = dest.auth(alert.owner);
    let job = Job {
        dest: connector.as_ref(),
        limits: &DeliveryLimits::from_config(&config),
        budget: None,
        sync_name: "alerts",
        key_scope: "alerts",
        run_id: alert.id,
        auth: &auth,
        should_stop: &crate::shared::shutdown_requested,
    };
    let reports = runtime.block_on(deliverer.deliver(job, vec![vec![record]]));
    let report = reports.into_iter().next().unwrap_or_default();
    if report.acked.contains(&alert.id) {
        return Ok(());
    }
    Err(report
        .rejected
        .first()
        .map(|r| r.message.clone())
        .or(report.error)
        .unwrap_or_else(|| "the destination did not acknowledge it".into()))
}
