//! Observability: retl.sync_status figures, retrying and discarding rejected rows, alerts
//! (rows, NOTIFY, the alert destination), history retention, and the metrics view as a real
//! postgres_exporter scrapes it.

mod common;

use common::*;
use retl_e2e::fake_slack::FakeSlack;
use postgres::fallible_iterator::FallibleIterator;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Rejects the records whose key id is in `ids` with 422 while `on` is set.
fn reject_ids(fake: &FakeWebhook, ids: &'static [i64], on: Arc<AtomicBool>) {
    fake.set_rejection_rule(move |rec| {
        let id = rec["key"]["id"].as_i64().unwrap_or_default();
        (on.load(Ordering::SeqCst) && ids.contains(&id)).then(|| (422, format!("id {id} is blocked")))
    });
}

fn wait_for_run(f: &mut Fixture, run_id: i64) -> String {
    let mut status = String::new();
    wait_until(SHORT, "the run finishes", || {
        status = f.client.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&run_id]).unwrap().get(0);
        !matches!(status.as_str(), "queued" | "delivering")
    });
    status
}

#[test]
fn sync_status_shows_rates_latency_usage_against_quotas_and_the_freshness_sla() {
    let fake = FakeWebhook::start();
    reject_ids(&fake, &[3], Arc::new(AtomicBool::new(true)));
    let mut f = Fixture::new(&fake.url(), 4, "upsert", "daily_api_quota '1000', daily_row_quota '100'", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', freshness => '1 hour')", f.sync));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("partial", 3, 1));

    let row = f
        .client
        .query_one(
            "SELECT window_runs, window_success_rate::text, window_row_error_rate::text,
                    extract(epoch FROM delivery_latency_p50)::float8, extract(epoch FROM delivery_latency_p99)::float8,
                    api_calls_24h, daily_api_quota, rows_24h, daily_row_quota, freshness_sla::text, sla_breached, open_alerts
               FROM retl.sync_status WHERE sync = $1",
            &[&f.sync],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, String>(1), "1.000");
    assert_eq!(row.get::<_, String>(2), "0.2500", "1 of the 4 rows sent was rejected");
    let (p50, p99): (f64, f64) = (row.get(3), row.get(4));
    assert!(p50 > 0.0 && p50 <= p99 && p99 < 30.0, "latency p50 {p50} s, p99 {p99} s");
    assert_eq!(row.get::<_, i64>(5), run.api_calls);
    assert_eq!(row.get::<_, Option<i64>>(6), Some(1000));
    assert_eq!(row.get::<_, i64>(7), 4);
    assert_eq!(row.get::<_, Option<i64>>(8), Some(100));
    assert_eq!(row.get::<_, String>(9), "01:00:00");
    assert!(!row.get::<_, bool>(10));
    assert_eq!(row.get::<_, i64>(11), 0);

    // The window is a setting: a one-minute window still holds the run; the SLA can be breached.
    f.exec("SET retl.status_window = '1min'");
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', freshness => '1 second')", f.sync));
    std::thread::sleep(Duration::from_millis(1100));
    let row = f
        .client
        .query_one("SELECT window_runs, sla_breached FROM retl.sync_status WHERE sync = $1", &[&f.sync])
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (1, true));
    f.exec("RESET retl.status_window");
}

#[test]
fn retry_failed_sends_only_the_rejected_rows_again() {
    let fake = FakeWebhook::start();
    let blocked = Arc::new(AtomicBool::new(true));
    reject_ids(&fake, &[2], blocked.clone());
    let mut f = Fixture::new(&fake.url(), 4, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(f.run().status, "partial");
    assert_eq!(row_errors(&mut f.client, &f.sync), vec![("2".to_string(), Some(422), "id 2 is blocked".to_string())]);

    // Row 4 changes too; the retry leaves it for the next run.
    f.exec(&format!("UPDATE {} SET name = 'Renamed' WHERE id = 4", f.table));
    blocked.store(false, Ordering::SeqCst);
    fake.clear_journal();
    let row = f.client.query_one("SELECT id, trigger FROM retl.retry_failed($1)", &[&f.sync]).unwrap();
    assert_eq!(row.get::<_, String>(1), "retry");
    assert_eq!(wait_for_run(&mut f, row.get(0)), "succeeded");
    assert_eq!(fake.request_count(), 1);
    assert_eq!(keys_in_request(&fake, 0), [key(2)].into_iter().collect());
    assert!(row_errors(&mut f.client, &f.sync).is_empty());
    assert_eq!(fake.records()[&key(4)]["name"], json!("Person 4"));

    let run = f.run();
    assert_eq!((run.updates, run.delivered), (1, 1));
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn discard_failed_stops_retrying_a_row_until_it_changes() {
    let fake = FakeWebhook::start();
    reject_ids(&fake, &[2, 3], Arc::new(AtomicBool::new(true)));
    let mut f = Fixture::new(&fake.url(), 4, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(f.run().failed, 2);

    let e = f
        .client
        .query_one("SELECT retl.discard_failed($1, keys => '[{\"id\": 9}]')", &[&f.sync])
        .unwrap_err();
    let (code, message, _, _) = db_error(&e);
    assert_eq!((code.as_str(), message), ("42704", format!("sync \"{}\" has no rejected row with key {{\"id\": 9}}", f.sync)));

    let n: i64 = f.client.query_one("SELECT retl.discard_failed($1, keys => '[{\"id\": 2}]')", &[&f.sync]).unwrap().get(0);
    assert_eq!(n, 1);
    assert_eq!(row_errors(&mut f.client, &f.sync).len(), 1, "row 3 is still failing");
    fake.clear_journal();
    let run = f.run();
    assert_eq!((run.inserts, run.failed), (1, 1), "only row 3 is tried again");
    assert_eq!(keys_in_request(&fake, 0), [key(3)].into_iter().collect());

    // Once row 2 changes it is sent again.
    f.exec(&format!("UPDATE {} SET score = 0 WHERE id = 2", f.table));
    fake.clear_journal();
    f.run();
    assert_eq!(keys_in_request(&fake, 0), [key(2), key(3)].into_iter().collect());
    let n: i64 = f.client.query_one("SELECT retl.discard_failed($1)", &[&f.sync]).unwrap().get(0);
    assert_eq!(n, 2);
    fake.clear_journal();
    assert_eq!(f.run().api_calls, 0);
    assert_eq!(fake.request_count(), 0);
}

fn open_alert(client: &mut postgres::Client, sync: &str, kind: &str) -> Option<(i64, String)> {
    client
        .query_opt(
            "SELECT al.id, al.message FROM retl.alerts al JOIN retl.syncs s ON s.id = al.sync_id
              WHERE s.name = $1 AND al.kind = $2 AND al.resolved_at IS NULL",
            &[&sync, &kind],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

fn wait_for_alert(client: &mut postgres::Client, sync: &str, kind: &str) -> (i64, String) {
    let mut found = None;
    wait_until(SHORT, &format!("a {kind} alert"), || {
        found = open_alert(client, sync, kind);
        found.is_some()
    });
    found.unwrap()
}

fn wait_resolved(client: &mut postgres::Client, alert_id: i64) {
    wait_until(SHORT, "the alert is resolved", || {
        client
            .query_one("SELECT resolved_at IS NOT NULL FROM retl.alerts WHERE id = $1", &[&alert_id])
            .unwrap()
            .get::<_, bool>(0)
    });
}

#[test]
fn failed_runs_in_a_row_raise_an_alert_that_is_notified_sent_and_resolved() {
    let fake = FakeWebhook::builder().token("right-token").start();
    let alerts = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", Some("wrong-token"));
    let _drop = DropSyncs(vec![f.sync.clone()]);
    let alert_server = format!("{}_alerts", f.server);
    f.exec(&format!("CREATE SERVER {alert_server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{}')", alerts.url()));
    f.exec(&format!(
        "SELECT retl.alter_sync(name => '{}', alert_after_failures => 2, alert_destination => '{alert_server}')",
        f.sync
    ));
    let mut listener = connect();
    listener.batch_execute("LISTEN retl_alerts").unwrap();

    let first = f.run();
    assert_eq!(first.status, "failed");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(open_alert(&mut f.client, &f.sync, "failed_runs"), None, "one failure is not two in a row");
    let second = f.run();
    let (alert_id, message) = wait_for_alert(&mut f.client, &f.sync, "failed_runs");
    let expected = format!(
        "sync \"{}\" failed 2 runs in a row; the last one (run {}): {}",
        f.sync,
        second.id,
        second.error.clone().unwrap()
    );
    assert_eq!(message, expected);
    assert!(!message.contains("wrong-token"), "{message}");

    // NOTIFY retl_alerts, with the alert as JSON.
    let note = notification(&mut listener, alert_id, "raised");
    assert_eq!((note["sync"].as_str(), note["kind"].as_str()), (Some(f.sync.as_str()), Some("failed_runs")));
    assert_eq!(note["message"], json!(expected));

    // Sent once to the alert destination.
    wait_until(SHORT, "the alert reaches the alert destination", || alerts.request_count() == 1);
    let record = alerts.requests()[0].body.clone().unwrap()["records"][0].clone();
    assert_eq!(record["key"], json!({"alert_id": alert_id}));
    assert_eq!(record["fields"]["sync"], json!(f.sync));
    assert_eq!(record["fields"]["kind"], json!("failed_runs"));
    assert_eq!(record["fields"]["message"], json!(expected));
    let sent: bool = f.client.query_one("SELECT sent_at IS NOT NULL FROM retl.alerts WHERE id = $1", &[&alert_id]).unwrap().get(0);
    assert!(sent);

    // Fixed: the next run succeeds and the alert resolves (and is notified, not sent again).
    f.exec(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {} OPTIONS (SET token 'right-token')", f.server));
    assert_eq!(f.run().status, "succeeded");
    wait_resolved(&mut f.client, alert_id);
    notification(&mut listener, alert_id, "resolved");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(alerts.request_count(), 1);
    let open: i64 = f
        .client
        .query_one("SELECT open_alerts FROM retl.sync_status WHERE sync = $1", &[&f.sync])
        .unwrap()
        .get(0);
    assert_eq!(open, 0);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', reset => '{{alert_destination}}')", f.sync));
    f.exec(&format!("DROP SERVER {alert_server}"));
}

#[test]
fn an_alert_goes_to_a_slack_alert_destination_as_a_message() {
    let fake = FakeWebhook::builder().token("right-token").start();
    let slack = FakeSlack::start("xoxb-alerts");
    slack.add_channel("C0042", "ops");
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", Some("wrong-token"));
    let _drop = DropSyncs(vec![f.sync.clone()]);
    let alert_server = format!("{}_slack", f.server);
    f.exec(&format!(
        "CREATE SERVER {alert_server} FOREIGN DATA WRAPPER retl OPTIONS (type 'slack', url '{}', channel '#ops', text '{{{{ fields.x }}}}');
         CREATE USER MAPPING FOR CURRENT_USER SERVER {alert_server} OPTIONS (token 'xoxb-alerts');",
        slack.base_url()
    ));
    f.exec(&format!(
        "SELECT retl.alter_sync(name => '{}', alert_after_failures => 1, alert_destination => '{alert_server}')",
        f.sync
    ));
    let run = f.run();
    assert_eq!(run.status, "failed");
    let (alert_id, message) = wait_for_alert(&mut f.client, &f.sync, "failed_runs");
    assert_eq!(message, format!("sync \"{}\" failed 1 run in a row; the last one (run {}): {}", f.sync, run.id, run.error.unwrap()));
    wait_until(SHORT, "the alert reaches Slack", || !slack.messages("C0042").is_empty());
    let texts: Vec<String> = slack.messages("C0042").into_iter().map(|m| m.text).collect();
    assert_eq!(texts, vec![format!(":rotating_light: *failed_runs* on sync `{}`: {message}", f.sync)]);
    let sent: bool = f.client.query_one("SELECT sent_at IS NOT NULL FROM retl.alerts WHERE id = $1", &[&alert_id]).unwrap().get(0);
    assert!(sent);
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', reset => '{{alert_destination}}')", f.sync));
    f.exec(&format!("DROP SERVER {alert_server} CASCADE"));
}

/// The retl_alerts notification of `alert_id` in `state` (others are skipped).
fn notification(listener: &mut postgres::Client, alert_id: i64, state: &str) -> Value {
    let deadline = std::time::Instant::now() + SHORT;
    while std::time::Instant::now() < deadline {
        let mut notes = listener.notifications();
        let mut it = notes.timeout_iter(Duration::from_secs(1));
        while let Ok(Some(n)) = it.next() {
            assert_eq!(n.channel(), "retl_alerts");
            let v: Value = serde_json::from_str(n.payload()).unwrap();
            if v["id"] == json!(alert_id) && v["state"] == json!(state) {
                return v;
            }
        }
    }
    panic!("no {state} notification for alert {alert_id}");
}

#[test]
fn row_count_change_row_error_rate_and_queue_depth_alerts() {
    let fake = FakeWebhook::start();
    let blocked = Arc::new(AtomicBool::new(true));
    reject_ids(&fake, &[1, 2], blocked.clone());
    let mut f = Fixture::new(&fake.url(), 10, "upsert", "max_retries '0'", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.exec(&format!(
        "SELECT retl.alter_sync(name => '{}', alert_count_change_percent => 20, alert_row_error_rate => 0.1, alert_queue_depth => 3)",
        f.sync
    ));
    let first = f.run();
    let (errors_id, message) = wait_for_alert(&mut f.client, &f.sync, "row_error_rate");
    assert_eq!(
        message,
        format!(
            "run {} of sync \"{}\": the destination rejected 2 of 10 rows (20.0%), above alert_row_error_rate 0.1",
            first.id, f.sync
        )
    );

    // 3 of 10 rows leave the model: -30%.
    f.exec(&format!("DELETE FROM {} WHERE id > 7", f.table));
    blocked.store(false, Ordering::SeqCst);
    let second = f.run();
    let (count_id, message) = wait_for_alert(&mut f.client, &f.sync, "row_count_change");
    assert_eq!(
        message,
        format!(
            "the model of sync \"{}\" returned 7 rows in run {}, fewer than the 10 of run {} (-30.0%, above \
             alert_count_change_percent 20)",
            f.sync, second.id, first.id
        )
    );
    wait_resolved(&mut f.client, errors_id);

    // A destination down: 5 changed rows stay queued (no retries), above the high-water mark 3.
    f.exec(&format!("UPDATE {} SET score = -score WHERE id <= 5", f.table));
    fake.script(vec![Scripted::status(503)]);
    assert_eq!(f.run().status, "failed");
    let (queue_id, message) = wait_for_alert(&mut f.client, &f.sync, "queue_depth");
    assert_eq!(message, format!("sync \"{}\" has 5 rows queued, above alert_queue_depth 3", f.sync));
    // Back up: the queue drains, the row count holds still; both alerts resolve.
    assert_eq!(f.run().status, "succeeded");
    wait_resolved(&mut f.client, queue_id);
    wait_resolved(&mut f.client, count_id);
    let records = fake.records();
    for (k, v) in f.model_state() {
        assert_eq!(records[&k], v);
    }
    assert_eq!(records.len(), 10, "upsert leaves the rows that left the model");
}

#[test]
fn a_sync_that_misses_its_freshness_sla_raises_an_alert() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    // A worker working on sync 1 holds the advisory key of sync 1, which the alerts' pass
    // shared until 0.11.0: alerts were then skipped for as long as it worked.
    let mut sync_1_worker = connect();
    sync_1_worker.batch_execute("SELECT pg_advisory_lock(1380275276, 1)").unwrap();
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', freshness => '1 second')", f.sync));
    let (alert_id, message) = wait_for_alert(&mut f.client, &f.sync, "freshness");
    drop(sync_1_worker);
    let prefix = format!("sync \"{}\" has not succeeded since it was created ", f.sync);
    assert!(message.starts_with(&prefix) && message.ends_with(" ago, beyond its freshness SLA of 00:00:01"), "{message}");
    // A successful run and an SLA it can keep: resolved.
    f.exec(&format!("SELECT retl.alter_sync(name => '{}', freshness => '1 hour')", f.sync));
    f.run();
    wait_resolved(&mut f.client, alert_id);
}

#[test]
fn history_older_than_the_retention_is_purged_but_the_latest_runs_are_kept() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    let show = |f: &mut Fixture, name: &str| -> String { f.client.query_one(&format!("SHOW {name}"), &[]).unwrap().get(0) };
    assert_eq!(show(&mut f, "retl.history_retention"), "30d");
    assert_eq!(show(&mut f, "retl.status_window"), "1d");

    let runs: Vec<i64> = (0..3)
        .map(|i| {
            f.exec(&format!("UPDATE {} SET score = {i}", f.table));
            f.run().id
        })
        .collect();
    // Make them 40 days old, the last one a failure.
    f.exec(&format!(
        "UPDATE retl.runs SET queued_at = queued_at - interval '40 days', finished_at = finished_at - interval '40 days'
          WHERE id IN ({}, {}, {}); UPDATE retl.runs SET status = 'failed' WHERE id = {}",
        runs[0], runs[1], runs[2], runs[2]
    ));
    let deleted: i64 = f.client.query_one("SELECT retl._purge_history('30 days')", &[]).unwrap().get(0);
    assert!(deleted >= 1);
    let kept: Vec<i64> = f
        .client
        .query("SELECT r.id FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1 ORDER BY r.id", &[&f.sync])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept, vec![runs[1], runs[2]], "the latest successful run and the latest run stay");
    let batches: i64 = f.client.query_one("SELECT count(*) FROM retl.batches WHERE run_id = $1", &[&runs[0]]).unwrap().get(0);
    assert_eq!(batches, 0);
    // Nothing to do without a retention.
    let none: i64 = f.client.query_one("SELECT retl._purge_history('0')", &[]).unwrap().get(0);
    assert_eq!(none, 0);
}

/// GET `path` from 127.0.0.1:`port` (HTTP/1.0, the whole body).
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn postgres_exporter_scrapes_the_metrics_view_with_the_shipped_queries_file() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "daily_row_quota '100'", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    f.run();
    let row = f
        .client
        .query_one(
            "SELECT queue_depth, rows_synced, runs_total, rows_delivered_total, last_run_ok, daily_row_quota, daily_api_quota
               FROM retl.metrics WHERE sync = $1",
            &[&f.sync],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2), row.get::<_, i64>(3), row.get::<_, i32>(4)),
        (0, 3, 1, 3, 1)
    );
    assert_eq!((row.get::<_, Option<i64>>(5), row.get::<_, Option<i64>>(6)), (Some(100), None));

    let queries = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/postgres_exporter/queries.yaml");
    let yaml = std::fs::read_to_string(queries).unwrap();
    // The metric columns the file declares (GAUGE and COUNTER entries).
    let declared: Vec<String> = yaml
        .lines()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[1].contains("usage: \"GAUGE\"") || w[1].contains("usage: \"COUNTER\""))
        .map(|w| w[0].trim().trim_start_matches("- ").trim_end_matches(':').to_string())
        .collect();
    assert_eq!(declared.len(), 24, "{declared:?}");

    let exporter = "/usr/bin/prometheus-postgres-exporter";
    assert!(std::path::Path::new(exporter).exists(), "{exporter} is missing: run make deps");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dsn = format!(
        "postgresql://{}:{}@{}:{}/{}?sslmode=disable",
        std::env::var("PGUSER").unwrap_or("postgres".into()),
        std::env::var("PGPASSWORD").unwrap_or("retl-dev".into()),
        std::env::var("PGHOST").unwrap_or("127.0.0.1".into()),
        std::env::var("PGPORT").unwrap_or("28815".into()),
        std::env::var("PGDATABASE").unwrap_or("postgres".into()),
    );
    let _child = Child(
        std::process::Command::new(exporter)
            .env("DATA_SOURCE_NAME", dsn)
            .arg(format!("--extend.query-path={queries}"))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut body = String::new();
    wait_until(SHORT, "postgres_exporter serves our metrics", || {
        body = http_get(port, "/metrics").unwrap_or_default();
        body.contains("pg_reverse_etl_rows_synced{")
    });
    let ours = |metric: &str| -> Option<String> {
        body.lines()
            .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains(&format!("sync=\"{}\"", f.sync)))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
    };
    for column in &declared {
        assert!(ours(&format!("pg_reverse_etl_{column}")).is_some(), "pg_reverse_etl_{column} missing from the scrape");
    }
    assert_eq!(ours("pg_reverse_etl_rows_synced").as_deref(), Some("3"));
    assert_eq!(ours("pg_reverse_etl_rows_delivered_total").as_deref(), Some("3"));
    assert_eq!(ours("pg_reverse_etl_last_run_ok").as_deref(), Some("1"));
    assert_eq!(ours("pg_reverse_etl_daily_row_quota").as_deref(), Some("100"));
    assert_eq!(ours("pg_reverse_etl_daily_api_quota").as_deref(), Some("NaN"));
    let line = body.lines().find(|l| l.starts_with("pg_reverse_etl_queue_depth{") && l.contains(&f.sync)).unwrap();
    assert!(line.contains(&format!("destination=\"{}\"", f.server)) && line.contains("mode=\"upsert\""), "{line}");
}
