//! Syncs that run by themselves: interval and cron schedules (in a time zone), missed slots,
//! never two runs of a sync at once, pause/resume, and dependencies between syncs (after => ...).
mod common;
use common::*;
use postgres::Client;
use std::time::{Duration, Instant};

/// Creates another sync on the fixture's model and destination; `extra` adds named arguments
/// (e.g. "schedule => '1 second'").
fn add_sync(f: &mut Fixture, suffix: &str, extra: &str) -> String {
    let name = format!("{}_{suffix}", f.sync);
    let extra = if extra.is_empty() { String::new() } else { format!(", {extra}") };
    f.exec(&format!(
        "SELECT retl.create_sync(name => '{name}', model => '{}', destination => '{}'{extra})",
        f.model, f.server
    ));
    name
}

/// (trigger, status) of every run of `sync`, oldest first.
fn runs_of(client: &mut Client, sync: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT r.trigger, r.status FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1 ORDER BY r.id",
            &[&sync],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn count_runs(client: &mut Client, sync: &str, trigger: &str) -> usize {
    runs_of(client, sync).iter().filter(|(t, _)| t == trigger).count()
}

fn succeeded_by_schedule(client: &mut Client, sync: &str) -> usize {
    runs_of(client, sync).iter().filter(|(trigger, status)| trigger == "schedule" && status == "succeeded").count()
}

fn active_runs(client: &mut Client, sync: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
              WHERE s.name = $1 AND r.status IN ('queued', 'delivering')",
            &[&sync],
        )
        .unwrap()
        .get(0)
}

/// Waits until `sync` has no queued or delivering run.
fn wait_idle(client: &mut Client, sync: &str) {
    wait_until(SHORT, &format!("the runs of {sync} to finish"), || active_runs(client, sync) == 0);
}

/// Give the workers time for the scheduling pass that follows a finished run (they make it
/// right after telling the waiting session), before asserting that something did NOT happen.
fn settle() {
    std::thread::sleep(Duration::from_millis(1000));
}

#[test]
fn an_interval_schedule_runs_by_itself_every_interval_and_delivers_changes() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    let every = add_sync(&mut f, "every", "schedule => '1 second'");
    let _cleanup = DropSyncs(vec![every.clone()]);
    // A manual run first: it wakes the workers, so what follows only depends on them sleeping
    // until the next scheduled run and not longer.
    let first = f.client.query_one("SELECT status, delivered FROM retl.run($1, wait => true)", &[&every]).unwrap();
    assert_eq!((first.get::<_, String>(0), first.get::<_, i64>(1)), ("succeeded".into(), 3));
    let start = Instant::now();
    f.exec(&format!("UPDATE {} SET score = 999 WHERE id = 2", f.table));
    wait_until(Duration::from_millis(2500), "the change to arrive without a manual run", || {
        fake.records() == f.model_state()
    });
    let remaining = Duration::from_millis(4500).saturating_sub(start.elapsed());
    std::thread::sleep(remaining);
    let scheduled = f
        .client
        .query(
            "SELECT r.status, r.queued_at FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
              WHERE s.name = $1 AND r.trigger = 'schedule' ORDER BY r.id",
            &[&every],
        )
        .unwrap();
    assert!(
        (3..=6).contains(&scheduled.len()),
        "a '1 second' schedule made {} runs in 4.5 s: {:?}",
        scheduled.len(),
        runs_of(&mut f.client, &every)
    );
    assert_eq!(runs_of(&mut f.client, &every).iter().filter(|(t, _)| t == "manual").count(), 1);
    let gaps = f
        .client
        .query(
            "SELECT extract(epoch FROM r.queued_at - lag(r.queued_at) OVER (ORDER BY r.id))::float8
               FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
              WHERE s.name = $1 AND r.trigger = 'schedule' ORDER BY r.id OFFSET 1",
            &[&every],
        )
        .unwrap();
    for gap in gaps.iter().map(|r| r.get::<_, f64>(0)) {
        assert!((0.95..2.5).contains(&gap), "scheduled runs {gap} s apart, the schedule says 1 second");
    }
}

#[test]
fn a_new_schedule_fires_on_time_when_the_workers_are_idle() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    let sync = add_sync(&mut f, "new", "schedule => '2 seconds'");
    let _cleanup = DropSyncs(vec![sync.clone()]);
    let created = Instant::now();
    let mut first = None;
    wait_until(Duration::from_secs(15), "the first scheduled run", || {
        if count_runs(&mut f.client, &sync, "schedule") > 0 {
            first = Some(created.elapsed());
        }
        first.is_some()
    });
    let first = first.unwrap();
    assert!(first <= Duration::from_millis(3000), "a '2 seconds' schedule first ran after {first:?}");
    wait_idle(&mut f.client, &sync);
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn a_due_schedule_never_starts_a_second_run_while_one_is_delivering() {
    let fake = FakeWebhook::start();
    // Every request takes 2 s; the schedule comes due every second meanwhile.
    fake.script(vec![Scripted::Delay(Duration::from_secs(2)); 8]);
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    // A model whose row changes at every run, so every run sends one record.
    let model = format!("{}_v", f.model);
    f.exec(&format!(
        "SELECT retl.create_model(name => '{model}', query => 'SELECT id, clock_timestamp()::text AS at FROM {}')",
        f.table
    ));
    let sync = format!("{}_busy", f.sync);
    f.exec(&format!(
        "SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{}', schedule => '1 second')",
        f.server
    ));
    let _cleanup = DropSyncs(vec![sync.clone()]);
    // A manual run to start with (it wakes the workers at commit).
    f.client.execute("SELECT retl.run($1)", &[&sync]).unwrap();
    // Watched until two scheduled runs have succeeded, at most 20 s: the manual run and two
    // scheduled ones, each a 2 s request, take about 6.3 s, and a fixed window of 7 s left too
    // little room for a slow scheduling pass (a clean clone once saw only one scheduled run).
    let start = Instant::now();
    let mut most_active = 0;
    while start.elapsed() < Duration::from_secs(20) && succeeded_by_schedule(&mut f.client, &sync) < 2 {
        let active = active_runs(&mut f.client, &sync);
        most_active = most_active.max(active);
        assert!(active <= 1, "{active} runs queued or delivering at once: {:?}", runs_of(&mut f.client, &sync));
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(most_active, 1);
    f.client.execute("SELECT retl.pause($1)", &[&sync]).unwrap();
    wait_idle(&mut f.client, &sync);

    let runs = f
        .client
        .query(
            "SELECT r.id, r.trigger, r.status, r.started_at, r.finished_at, r.delivered
               FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1 ORDER BY r.started_at",
            &[&sync],
        )
        .unwrap();
    let succeeded_by_schedule = runs
        .iter()
        .filter(|r| r.get::<_, String>(1) == "schedule" && r.get::<_, String>(2) == "succeeded")
        .inspect(|r| assert_eq!(r.get::<_, i64>(5), 1))
        .count();
    assert!(succeeded_by_schedule >= 2, "the schedule went on while runs were busy: {runs:?}");
    assert_eq!(runs[0].get::<_, String>(1), "manual");
    // No two runs overlap: each starts once the previous one finished.
    for pair in runs.windows(2) {
        let prev_finished: std::time::SystemTime = pair[0].get(4);
        let next_started: std::time::SystemTime = pair[1].get(3);
        assert!(next_started >= prev_finished, "run {} started before run {} finished", pair[1].get::<_, i64>(0), pair[0].get::<_, i64>(0));
    }
    // The destination agrees: one request at a time, each one 2 s long.
    let mut arrivals: Vec<(Instant, i64)> = fake
        .requests()
        .iter()
        .map(|r| (r.at, r.body.as_ref().unwrap()["run_id"].as_i64().unwrap()))
        .collect();
    arrivals.sort();
    assert!(arrivals.len() >= 3, "{arrivals:?}");
    for pair in arrivals.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= Duration::from_millis(1950), "requests of runs {} and {} overlapped", pair[0].1, pair[1].1);
        assert!(pair[1].1 > pair[0].1, "one request per run, in run order: {arrivals:?}");
    }
}

#[test]
fn missed_slots_run_once_after_downtime() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    let interval = add_sync(&mut f, "int", "schedule => '5 minutes'");
    let cron = add_sync(&mut f, "cron", "schedule => '*/15 * * * *'");
    let _cleanup = DropSyncs(vec![interval.clone(), cron.clone()]);
    // The workers were down: two slots of the interval and four of the cron schedule went by.
    f.exec(&format!(
        "UPDATE retl.syncs SET next_run_at = now() - interval '10 minutes' WHERE name = '{interval}';
         UPDATE retl.syncs SET next_run_at = now() - interval '1 hour' WHERE name = '{cron}';"
    ));
    // Any run makes the workers take a scheduling pass.
    assert_eq!(f.run().status, "succeeded");
    wait_until(SHORT, "the missed schedules to run", || {
        count_runs(&mut f.client, &interval, "schedule") >= 1 && count_runs(&mut f.client, &cron, "schedule") >= 1
    });
    wait_idle(&mut f.client, &interval);
    wait_idle(&mut f.client, &cron);
    // More passes change nothing: the missed slots are not made up one by one.
    assert_eq!(f.run().status, "succeeded");
    settle();
    assert_eq!(f.run().status, "succeeded");
    settle();
    for sync in [&interval, &cron] {
        assert_eq!(runs_of(&mut f.client, sync), vec![("schedule".to_string(), "succeeded".to_string())], "{sync}");
    }
    // The next slot is the first one after the pass, not after the missed ones.
    let row = f
        .client
        .query_one(
            "SELECT s.next_run_at > now(),
                    abs(extract(epoch FROM s.next_run_at - (r.queued_at + interval '5 minutes')))::float8
               FROM retl.syncs s JOIN retl.runs r ON r.sync_id = s.id WHERE s.name = $1",
            &[&interval],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(row.get::<_, f64>(1) < 1.0, "next_run_at is {} s off the pass + 5 minutes", row.get::<_, f64>(1));
    let row = f
        .client
        .query_one(
            "SELECT s.next_run_at > now(), s.next_run_at = date_bin('15 minutes', r.queued_at, '2000-01-01') + interval '15 minutes',
                    s.next_run_at::text
               FROM retl.syncs s JOIN retl.runs r ON r.sync_id = s.id WHERE s.name = $1",
            &[&cron],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1), "cron next_run_at {}", row.get::<_, String>(2));
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn cron_next_run_at_follows_the_expression_in_the_sync_time_zone() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    let (quarter, ny, tokyo, hourly) =
        (format!("{}_q", f.sync), format!("{}_ny", f.sync), format!("{}_tyo", f.sync), format!("{}_h", f.sync));
    let (model, server) = (f.model.clone(), f.server.clone());
    // All in one transaction, rolled back: now() is the same for create_sync and the checks,
    // and no worker ever sees these syncs.
    let mut tx = f.client.transaction().unwrap();
    let create = |tx: &mut postgres::Transaction, name: &str, schedule: &str, tz: &str| {
        tx.execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, schedule => $4, time_zone => $5)",
            &[&name, &model, &server, &schedule, &tz],
        )
        .unwrap();
    };
    create(&mut tx, &quarter, " */15  *  * * * ", "UTC");
    create(&mut tx, &ny, "0 9 * * *", "America/New_York");
    create(&mut tx, &tokyo, "30 6 * * MON", "Asia/Tokyo");
    create(&mut tx, &hourly, "@hourly", "UTC");
    let check = |tx: &mut postgres::Transaction, name: &str, expected_schedule: &str, condition: &str| {
        let row = tx
            .query_one(
                &format!("SELECT schedule, ({condition}), next_run_at::text, now()::text FROM retl.syncs WHERE name = $1"),
                &[&name],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), expected_schedule);
        assert!(row.get::<_, bool>(1), "{name}: next_run_at {} at now() {}: expected {condition}", row.get::<_, String>(2), row.get::<_, String>(3));
    };
    check(&mut tx, &quarter, "*/15 * * * *", "next_run_at = date_bin('15 minutes', now(), '2000-01-01') + interval '15 minutes'");
    // 09:00 New York time (13:00 or 14:00 UTC depending on daylight saving time), the first
    // one strictly after now.
    let ny_expected = "next_run_at AT TIME ZONE 'America/New_York' =
        date_trunc('day', now() AT TIME ZONE 'America/New_York') + interval '9 hours'
        + CASE WHEN date_trunc('minute', now() AT TIME ZONE 'America/New_York')
                    < date_trunc('day', now() AT TIME ZONE 'America/New_York') + interval '9 hours'
               THEN interval '0' ELSE interval '1 day' END
        AND extract(hour FROM next_run_at AT TIME ZONE 'UTC') IN (13, 14)";
    check(&mut tx, &ny, "0 9 * * *", ny_expected);
    check(
        &mut tx,
        &tokyo,
        "30 6 * * mon",
        "extract(isodow FROM next_run_at AT TIME ZONE 'Asia/Tokyo') = 1
         AND (next_run_at AT TIME ZONE 'Asia/Tokyo')::time = '06:30'
         AND next_run_at > now() AND next_run_at <= now() + interval '7 days'",
    );
    check(&mut tx, &hourly, "@hourly", "next_run_at = date_trunc('hour', now()) + interval '1 hour'");

    // A new time zone moves the next run to 09:00 there; the schedule stays.
    tx.execute("SELECT retl.alter_sync(name => $1, time_zone => 'Asia/Kolkata')", &[&ny]).unwrap();
    let kolkata = ny_expected.replace("America/New_York", "Asia/Kolkata").replace("IN (13, 14)", "= 3");
    check(&mut tx, &ny, "0 9 * * *", &kolkata);
    let tz: String = tx.query_one("SELECT time_zone FROM retl.syncs WHERE name = $1", &[&ny]).unwrap().get(0);
    assert_eq!(tz, "Asia/Kolkata");
    // A new schedule: an interval starts from now.
    tx.execute("SELECT retl.alter_sync(name => $1, schedule => '10 Minutes')", &[&ny]).unwrap();
    check(&mut tx, &ny, "10 minutes", "next_run_at = now() + interval '10 minutes'");
    // Back to manual: no next run.
    tx.execute("SELECT retl.alter_sync(name => $1, schedule => 'manual')", &[&ny]).unwrap();
    check(&mut tx, &ny, "manual", "next_run_at IS NULL");
    // Arguments left NULL keep the schedule and its next run.
    let before: String = tx.query_one("SELECT next_run_at::text FROM retl.syncs WHERE name = $1", &[&quarter]).unwrap().get(0);
    tx.execute("SELECT retl.alter_sync(name => $1, mode => 'mirror')", &[&quarter]).unwrap();
    let after: String = tx.query_one("SELECT next_run_at::text FROM retl.syncs WHERE name = $1", &[&quarter]).unwrap().get(0);
    assert_eq!(before, after);
    tx.rollback().unwrap();
}

#[test]
fn invalid_schedules_and_time_zones_are_refused_and_nothing_is_created() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    let name = format!("{}_bad", f.sync);
    let q = format!("\"{name}\"");
    let cases: Vec<(Option<&str>, Option<&str>, String)> = vec![
        (Some("every tuesday"), Some("UTC"), format!("schedule \"every tuesday\" of sync {q} is not valid")),
        (Some(""), Some("UTC"), format!("schedule \"\" of sync {q} is not valid")),
        (None, Some("UTC"), format!("schedule NULL of sync {q} is not valid")),
        (Some("500 milliseconds"), Some("UTC"), format!("schedule \"500 milliseconds\" of sync {q} is shorter than 1 second")),
        (Some("-5 minutes"), Some("UTC"), format!("schedule \"-5 minutes\" of sync {q} is shorter than 1 second")),
        (Some("61 * * * *"), Some("UTC"), "cron expression \"61 * * * *\": minute value 61 is out of range 0-59".into()),
        (Some("0 25 * * *"), Some("UTC"), "cron expression \"0 25 * * *\": hour value 25 is out of range 0-23".into()),
        (
            Some("*/0 * * * *"),
            Some("UTC"),
            "cron expression \"*/0 * * * *\": step 0 is not allowed in the minute field; use a step of 1 or more".into(),
        ),
        (
            Some("0 9 * * mon-fry"),
            Some("UTC"),
            "cron expression \"0 9 * * mon-fry\": \"fry\" is not a number or name in the day-of-week field; use a number 0-7 (0 and 7 are Sunday) or a name sun-sat".into(),
        ),
        (Some("0 0 30 2 *"), Some("UTC"), format!("cron schedule \"0 0 30 2 *\" of sync {q} never fires")),
        (Some("@fortnightly"), Some("UTC"), "cron expression \"@fortnightly\": unknown macro \"@fortnightly\"; use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly".into()),
        (Some("5 minutes"), Some("Mars/Olympus"), format!("time zone \"Mars/Olympus\" of sync {q} is not recognized")),
        (Some("0 9 * * *"), None, format!("time zone NULL of sync {q} is not recognized")),
    ];
    for (schedule, tz, expected) in &cases {
        let err = f
            .client
            .execute(
                "SELECT retl.create_sync(name => $1, model => $2, destination => $3, schedule => $4, time_zone => $5)",
                &[&name, &f.model, &f.server, schedule, tz],
            )
            .unwrap_err();
        assert_eq!(error_text(&err), ("22023".to_string(), expected.clone()), "schedule {schedule:?}, time zone {tz:?}");
        let n = f.count(&format!("SELECT count(*) FROM retl.syncs WHERE name = '{name}'"));
        assert_eq!(n, 0, "nothing is created for schedule {schedule:?}");
    }
    // alter_sync refuses the same, and keeps the schedule it had.
    let sync = add_sync(&mut f, "alt", "schedule => '5 minutes'");
    let _cleanup = DropSyncs(vec![sync.clone()]);
    let before = f.client.query_one("SELECT schedule, time_zone, next_run_at::text FROM retl.syncs WHERE name = $1", &[&sync]).unwrap();
    for (args, expected) in [
        ("schedule => 'every tuesday'", format!("schedule \"every tuesday\" of sync \"{sync}\" is not valid")),
        ("time_zone => 'Mars/Olympus'", format!("time zone \"Mars/Olympus\" of sync \"{sync}\" is not recognized")),
        ("schedule => '0 9 * * *', time_zone => 'Mars/Olympus'", format!("time zone \"Mars/Olympus\" of sync \"{sync}\" is not recognized")),
        ("schedule => '61 * * * *'", "cron expression \"61 * * * *\": minute value 61 is out of range 0-59".into()),
    ] {
        let err = f.client.execute(&format!("SELECT retl.alter_sync(name => $1, {args})"), &[&sync]).unwrap_err();
        assert_eq!(error_text(&err), ("22023".to_string(), expected), "{args}");
    }
    let after = f.client.query_one("SELECT schedule, time_zone, next_run_at::text FROM retl.syncs WHERE name = $1", &[&sync]).unwrap();
    for i in 0..3 {
        assert_eq!(before.get::<_, String>(i), after.get::<_, String>(i));
    }
    assert_eq!(before.get::<_, String>(0), "5 minutes");
}

#[test]
fn a_paused_schedule_does_not_fire_and_resume_restarts_it_from_now() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    let sync = add_sync(&mut f, "p", "schedule => '5 minutes', paused => true");
    let _cleanup = DropSyncs(vec![sync.clone()]);
    f.exec(&format!("UPDATE retl.syncs SET next_run_at = now() - interval '20 minutes' WHERE name = '{sync}'"));
    assert_eq!(f.run().status, "succeeded"); // a scheduling pass
    settle();
    assert!(runs_of(&mut f.client, &sync).is_empty(), "a paused sync's schedule does not fire");
    // Resuming starts the schedule over from now: the slots missed while paused are not made up.
    let mut tx = f.client.transaction().unwrap();
    tx.execute("SELECT retl.resume($1)", &[&sync]).unwrap();
    let exact: bool = tx
        .query_one("SELECT next_run_at = now() + interval '5 minutes' FROM retl.syncs WHERE name = $1", &[&sync])
        .unwrap()
        .get(0);
    assert!(exact);
    tx.commit().unwrap();
    assert_eq!(f.run().status, "succeeded");
    settle();
    assert!(runs_of(&mut f.client, &sync).is_empty());
}

#[test]
fn a_child_runs_once_after_both_parents_have_succeeded_since_its_last_run() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    let a = f.sync.clone();
    let b = add_sync(&mut f, "b", "");
    // A run of a parent before the child existed does not count.
    assert_eq!(f.run().status, "succeeded");
    let child = add_sync(&mut f, "child", &format!("after => '{{{a},{b}}}'"));
    let _cleanup = DropSyncs(vec![child.clone()]);
    let run_b = |client: &mut Client| -> String {
        client.query_one("SELECT status FROM retl.run($1, wait => true)", &[&b]).unwrap().get(0)
    };
    assert_eq!(run_b(&mut f.client), "succeeded");
    settle();
    assert!(runs_of(&mut f.client, &child).is_empty(), "only b succeeded since the child was created");
    assert_eq!(f.run().status, "succeeded");
    wait_until(SHORT, "the child to run", || count_runs(&mut f.client, &child, "after") == 1);
    wait_idle(&mut f.client, &child);
    settle();
    assert_eq!(runs_of(&mut f.client, &child), vec![("after".to_string(), "succeeded".to_string())]);
    assert_eq!(f.count(&format!("SELECT delivered FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{child}'")), 3);

    // Again, with partial parents (some rows rejected): they count as success. One parent
    // is not enough.
    fake.set_rejection_rule(|rec| (rec["fields"]["email"] == "bad").then(|| (422, "email is invalid".to_string())));
    f.exec(&format!("UPDATE {} SET email = 'bad' WHERE id = 1; UPDATE {0} SET score = 0 WHERE id = 2", f.table));
    assert_eq!(f.run().status, "partial");
    settle();
    assert_eq!(count_runs(&mut f.client, &child, "after"), 1, "a alone is not enough");
    assert_eq!(run_b(&mut f.client), "partial");
    wait_until(SHORT, "the child to run again", || count_runs(&mut f.client, &child, "after") == 2);
    wait_idle(&mut f.client, &child);
    settle();
    assert_eq!(
        runs_of(&mut f.client, &child),
        vec![("after".to_string(), "succeeded".to_string()), ("after".to_string(), "partial".to_string())]
    );
}

#[test]
fn a_failed_parent_blocks_the_child_until_it_succeeds() {
    let fake = FakeWebhook::builder().token("right-token").start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", Some("right-token"));
    let bad_server = format!("{}_bad", f.server);
    f.exec(&format!(
        "CREATE SERVER {bad_server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{}');
         CREATE USER MAPPING FOR CURRENT_USER SERVER {bad_server} OPTIONS (token 'wrong-token');",
        fake.url()
    ));
    let bad = format!("{}_badp", f.sync);
    let child = format!("{}_child", f.sync);
    f.exec(&format!(
        "SELECT retl.create_sync(name => '{bad}', model => '{m}', destination => '{bad_server}');
         SELECT retl.create_sync(name => '{child}', model => '{m}', destination => '{d}', after => '{{{p},{bad}}}');",
        m = f.model,
        d = f.server,
        p = f.sync
    ));
    let _cleanup = DropSyncs(vec![child.clone(), bad.clone()]);
    assert_eq!(f.run().status, "succeeded");
    let err = f.client.query_one("SELECT * FROM retl.run($1, wait => true)", &[&bad]).unwrap_err();
    assert_eq!(db_error(&err).0, "38000");
    settle();
    assert!(runs_of(&mut f.client, &child).is_empty(), "a failed parent blocks the child");
    // Another success of the other parent changes nothing.
    assert_eq!(f.run().status, "succeeded");
    settle();
    assert!(runs_of(&mut f.client, &child).is_empty());
    f.exec(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {bad_server} OPTIONS (SET token 'right-token')"));
    let status: String = f.client.query_one("SELECT status FROM retl.run($1, wait => true)", &[&bad]).unwrap().get(0);
    assert_eq!(status, "succeeded");
    wait_until(SHORT, "the child to run", || count_runs(&mut f.client, &child, "after") == 1);
    wait_idle(&mut f.client, &child);
    assert_eq!(runs_of(&mut f.client, &child), vec![("after".to_string(), "succeeded".to_string())]);
}

#[test]
fn dependency_refusals_unknown_self_cycles_and_dropping_a_parent() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    let a = f.sync.clone();
    let b = add_sync(&mut f, "b", &format!("after => '{{{a}}}'"));
    let c = add_sync(&mut f, "c", &format!("after => '{{{b},{b}}}'"));
    let _cleanup = DropSyncs(vec![c.clone(), b.clone()]);
    let create = |client: &mut Client, name: &str, after: &str| {
        client
            .execute(
                &format!("SELECT retl.create_sync(name => $1, model => $2, destination => $3, after => '{after}')"),
                &[&name, &f.model, &f.server],
            )
            .unwrap_err()
    };
    let x = format!("{}_x", f.sync);
    let err = create(&mut f.client, &x, &format!("{{{a},nope}}"));
    assert_eq!(error_text(&err), ("42704".into(), format!("sync \"{x}\" cannot run after \"nope\": no such sync")));
    let err = create(&mut f.client, &x, &format!("{{{x}}}"));
    assert_eq!(error_text(&err), ("22023".into(), format!("sync \"{x}\" cannot run after itself")));
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.syncs WHERE name = '{x}'")), 0, "nothing is created");

    let alter = |client: &mut Client, name: &str, after: &str| {
        client.execute(&format!("SELECT retl.alter_sync(name => $1, after => '{after}')"), &[&name]).unwrap_err()
    };
    let err = alter(&mut f.client, &a, &format!("{{{a}}}"));
    assert_eq!(error_text(&err), ("22023".into(), format!("sync \"{a}\" cannot run after itself")));
    let err = alter(&mut f.client, &b, &format!("{{{c}}}"));
    let (code, message, _, hint) = db_error(&err);
    assert_eq!((code.as_str(), message), ("22023", format!("sync dependencies would form a cycle: \"{b}\" -> \"{c}\" -> \"{b}\"")));
    assert_eq!(hint.as_deref(), Some("A sync cannot (indirectly) run after itself."));
    let err = alter(&mut f.client, &a, &format!("{{{c}}}"));
    assert_eq!(
        error_text(&err),
        ("22023".into(), format!("sync dependencies would form a cycle: \"{a}\" -> \"{c}\" -> \"{b}\" -> \"{a}\""))
    );
    // The refused changes changed nothing; a duplicated parent counts once.
    let parents = |client: &mut Client, name: &str| -> Option<Vec<String>> {
        client.query_one("SELECT after FROM retl.sync_status WHERE sync = $1", &[&name]).unwrap().get(0)
    };
    assert_eq!(parents(&mut f.client, &a), None);
    assert_eq!(parents(&mut f.client, &b), Some(vec![a.clone()]));
    assert_eq!(parents(&mut f.client, &c), Some(vec![b.clone()]));

    // A parent cannot be dropped while a child runs after it.
    f.exec(&format!("SELECT retl.alter_sync(name => '{c}', after => '{{{a},{b}}}')"));
    let err = f.client.execute("SELECT retl.drop_sync($1)", &[&a]).unwrap_err();
    let (code, message, _, hint) = db_error(&err);
    assert_eq!((code.as_str(), message), ("2BP01", format!("sync \"{a}\" is still a parent of \"{b}\", \"{c}\"")));
    assert!(hint.unwrap().contains("after => '{}'"));
    // after => NULL keeps the parents; after => '{}' removes them all.
    f.exec(&format!("SELECT retl.alter_sync(name => '{c}', mode => 'mirror')"));
    assert_eq!(parents(&mut f.client, &c), Some(vec![a.clone(), b.clone()]));
    f.exec(&format!("SELECT retl.alter_sync(name => '{c}', after => '{{}}')"));
    assert_eq!(parents(&mut f.client, &c), None);
    let err = f.client.execute("SELECT retl.drop_sync($1)", &[&a]).unwrap_err();
    assert_eq!(error_text(&err), ("2BP01".into(), format!("sync \"{a}\" is still a parent of \"{b}\"")));
    f.exec(&format!("SELECT retl.alter_sync(name => '{b}', after => '{{}}')"));
    f.exec(&format!("SELECT retl.drop_sync('{a}')"));
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.syncs WHERE name = '{a}'")), 0);
}

#[test]
fn a_removed_dependency_no_longer_triggers_the_child() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    let after = format!("after => '{{{}}}'", f.sync);
    let child = add_sync(&mut f, "child", &after);
    let _cleanup = DropSyncs(vec![child.clone()]);
    assert_eq!(f.run().status, "succeeded");
    wait_until(SHORT, "the child to run", || count_runs(&mut f.client, &child, "after") == 1);
    wait_idle(&mut f.client, &child);
    f.exec(&format!("SELECT retl.alter_sync(name => '{child}', after => '{{}}')"));
    assert_eq!(f.count(&format!("SELECT count(*) FROM retl.sync_parents p JOIN retl.syncs s ON s.id = p.sync_id WHERE s.name = '{child}'")), 0);
    f.exec(&format!("UPDATE {} SET score = 1 WHERE id = 1", f.table));
    assert_eq!(f.run().status, "succeeded");
    settle();
    assert_eq!(f.run().status, "succeeded");
    settle();
    assert_eq!(runs_of(&mut f.client, &child), vec![("after".to_string(), "succeeded".to_string())]);
}

#[test]
fn sync_status_shows_schedule_next_run_and_parents() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    let mut tx = f.client.transaction().unwrap();
    let (a, b, c, d) = (f.sync.clone(), format!("{}_b", f.sync), format!("{}_c", f.sync), format!("{}_d", f.sync));
    tx.batch_execute(&format!(
        "SELECT retl.create_sync(name => '{b}', model => '{m}', destination => '{s}', schedule => '2 Hours');
         SELECT retl.create_sync(name => '{c}', model => '{m}', destination => '{s}', schedule => '0 9 * * *',
                                 time_zone => 'Europe/Paris', after => '{{{b},{a}}}');
         SELECT retl.create_sync(name => '{d}', model => '{m}', destination => '{s}', schedule => '  On   CHANGE ');",
        m = f.model,
        s = f.server
    ))
    .unwrap();
    let rows = tx
        .query(
            "SELECT st.sync, st.schedule, st.next_run_at IS NOT DISTINCT FROM sy.next_run_at, st.after,
                    CASE st.sync WHEN $2 THEN st.next_run_at = now() + interval '2 hours'
                                 WHEN $3 THEN (st.next_run_at AT TIME ZONE 'Europe/Paris')::time = '09:00'
                                 ELSE st.next_run_at IS NULL END
               FROM retl.sync_status st JOIN retl.syncs sy ON sy.name = st.sync
              WHERE st.sync IN ($1, $2, $3, $4) ORDER BY st.sync",
            &[&a, &b, &c, &d],
        )
        .unwrap();
    let got: Vec<(String, String, bool, Option<Vec<String>>, bool)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
    assert_eq!(
        got,
        vec![
            (a.clone(), "manual".into(), true, None, true),
            (b.clone(), "2 hours".into(), true, None, true),
            (c.clone(), "0 9 * * *".into(), true, Some(vec![a.clone(), b.clone()]), true),
            (d.clone(), "on change".into(), true, None, true),
        ]
    );
    tx.rollback().unwrap();
}

/// The fire times of `schedule` in `tz` after `start` (UTC), `n` of them, as UTC "HH:MI".
fn fire_times(client: &mut Client, schedule: &str, tz: &str, start: &str, n: i32) -> Vec<String> {
    client
        .query(
            "WITH RECURSIVE s(n, t) AS (
                 SELECT 0, $3::text::timestamptz
                 UNION ALL
                 SELECT n + 1, retl._next_run_at($1, $2, t) FROM s WHERE n < $4)
             SELECT to_char(t AT TIME ZONE 'UTC', 'HH24:MI') FROM s WHERE n > 0 ORDER BY n",
            &[&schedule, &tz, &start, &n],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn quarter_hours(from: &str, n: usize) -> Vec<String> {
    let (h, m): (u32, u32) = (from[..2].parse().unwrap(), from[3..].parse().unwrap());
    (0..n as u32).map(|i| h * 60 + m + 15 * i).map(|t| format!("{:02}:{:02}", t / 60, t % 60)).collect()
}

#[test]
fn a_cron_schedule_keeps_firing_through_daylight_saving_changes() {
    // The schedule is evaluated in local time, so its fire times are the instants whose local
    // wall-clock time matches. When clocks go back (America/New_York, 1 November 2026,
    // 06:00 UTC: 02:00 EDT -> 01:00 EST) the local quarter-hours 01:00-01:45 happen twice,
    // and an every-15-minutes schedule goes on every 15 minutes of real time.
    // (now() cannot be moved, so this asks the function that computes next_run_at.)
    let mut client = connect();
    ensure_extension(&mut client);
    // Spring forward (8 March 2026, 07:00 UTC: 02:00 EST -> 03:00 EDT): no local 02:xx.
    assert_eq!(
        fire_times(&mut client, "*/15 * * * *", "America/New_York", "2026-03-08 06:05+00", 8),
        quarter_hours("06:15", 8)
    );
    assert_eq!(
        fire_times(&mut client, "*/15 * * * *", "America/New_York", "2026-11-01 04:50+00", 12),
        quarter_hours("05:00", 12)
    );
}

#[test]
fn a_sync_can_only_run_after_syncs_its_owner_owns() {
    // A dependency keeps its parent from being dropped, so another role must not be able to
    // pin someone else's sync by depending on it.
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 1, "upsert", "", None);
    let role = unique("bob");
    f.exec(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}';
         GRANT USAGE ON FOREIGN SERVER {server} TO {role};
         GRANT SELECT ON retl_models.{model} TO {role};",
        server = f.server,
        model = f.model
    ));
    let mut bob = retl_e2e::cluster::connect_as(&role, &format!("pw-{role}"));
    let child = format!("{}_bob", f.sync);
    let err = bob
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, after => ARRAY[$4])",
            &[&child, &f.model, &f.server, &f.sync],
        )
        .unwrap_err();
    assert_eq!(
        error_text(&err),
        ("42501".to_string(), format!("sync \"{child}\" cannot run after \"{}\" of another owner", f.sync))
    );
    let created = f.count(&format!("SELECT count(*) FROM retl.syncs WHERE name = '{child}'"));
    assert_eq!(created, 0);
    drop(bob);
    f.exec(&format!("SELECT retl.drop_sync('{}')", f.sync));
    f.exec(&format!(
        "REVOKE ALL ON retl_models.{model} FROM {role}; REVOKE USAGE ON FOREIGN SERVER {server} FROM {role}; DROP ROLE {role}",
        server = f.server,
        model = f.model
    ));
}
