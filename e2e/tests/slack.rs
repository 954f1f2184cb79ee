//! The Slack connector (`type 'slack'`) against a strict fake of Slack: a message per
//! inserted or updated row through chat.postMessage, a digest per run through an incoming
//! webhook, deletes announce nothing, `ok: false` answers classified, 429s waited out.
mod common;
use common::*;
use retl_e2e::fake_slack::FakeSlack;

struct Setup {
    client: postgres::Client,
    table: String,
    server: String,
    sync: String,
}

/// A signups table of `rows` rows, a model, a slack destination with `options`, a user mapping
/// with `token`, and a sync in `mode`.
fn set_up(slack: &FakeSlack, rows: i64, options: &str, token: &str, mode: &str) -> Setup {
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("sl");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name text, region text);
             INSERT INTO {table} SELECT i, 'Ann ' || i, 'EU' FROM generate_series(1, {rows}) i;
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'slack', url '{url}', {options});
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token '{token}');",
            url = slack.base_url(),
        ))
        .unwrap();
    client
        .execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => $4)", &[&sync, &model, &server, &mode])
        .unwrap();
    Setup { client, table, server, sync }
}

fn texts(slack: &FakeSlack, channel: &str) -> Vec<String> {
    let mut texts: Vec<String> = slack.messages(channel).into_iter().map(|m| m.text).collect();
    texts.sort();
    texts
}

const MESSAGE: &str = "text 'New signup: {{ fields.name }} in {{ fields.region }}', channel '#sales', rate_limit '50'";

#[test]
fn a_message_per_new_or_changed_row_and_none_for_unchanged_or_deleted_rows() {
    let slack = FakeSlack::start("xoxb-1");
    slack.add_channel("C0001", "sales");
    let mut s = set_up(&slack, 2, MESSAGE, "xoxb-1", "upsert");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let first = run_sync(&mut s.client, &s.sync);
    assert_eq!((first.status.as_str(), first.delivered, first.api_calls), ("succeeded", 2, 2), "{first:?}");
    assert_eq!(texts(&slack, "C0001"), ["New signup: Ann 1 in EU", "New signup: Ann 2 in EU"]);
    assert!(slack.calls().iter().all(|c| c.path == "/api/chat.postMessage" && c.authorization.as_deref() == Some("Bearer xoxb-1")));

    slack.clear_calls();
    s.client.batch_execute(&format!("UPDATE {t} SET region = 'US' WHERE id = 2; DELETE FROM {t} WHERE id = 1;", t = s.table)).unwrap();
    let second = run_sync(&mut s.client, &s.sync);
    assert_eq!((second.status.as_str(), second.delivered, second.api_calls), ("succeeded", 1, 1), "{second:?}");
    assert_eq!(slack.messages("C0001").last().unwrap().text, "New signup: Ann 2 in US");
    slack.clear_calls();
    let third = run_sync(&mut s.client, &s.sync);
    assert_eq!((third.delivered, third.api_calls), (0, 0));
    assert!(slack.calls().is_empty());
}

#[test]
fn a_message_slack_refuses_is_a_row_error_and_the_others_go() {
    let slack = FakeSlack::start("xoxb-2");
    slack.add_channel("C0001", "sales");
    let mut s = set_up(&slack, 3, MESSAGE, "xoxb-2", "upsert");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    s.client.batch_execute(&format!("UPDATE {} SET name = repeat('x', 40001) WHERE id = 2", s.table)).unwrap();
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("partial", 2, 1), "{run:?}");
    assert_eq!(
        row_errors(&mut s.client, &s.sync),
        [("2".to_string(), None, "the message is 40019 characters long; Slack takes at most 40000".to_string())]
    );
    assert_eq!(texts(&slack, "C0001"), ["New signup: Ann 1 in EU", "New signup: Ann 3 in EU"]);

    // A channel Slack does not know: channel_not_found rejects every row, permanently.
    s.client.batch_execute(&format!("ALTER SERVER {} OPTIONS (SET channel '#nowhere')", s.server)).unwrap();
    s.client.batch_execute(&format!("UPDATE {} SET region = 'APAC' WHERE id = 1", s.table)).unwrap();
    // (Row 2, still too long, is tried again and fails again.)
    let lost = run_sync(&mut s.client, &s.sync);
    assert_eq!((lost.status.as_str(), lost.delivered, lost.failed), ("partial", 0, 2), "{lost:?}");
    assert!(row_errors(&mut s.client, &s.sync).contains(&("1".to_string(), Some(200), "Slack: channel_not_found".to_string())));
}

#[test]
fn a_429_is_waited_out_and_a_revoked_token_fails_the_run_without_showing_it() {
    let slack = FakeSlack::start("xoxb-secret-3");
    slack.add_channel("C0001", "sales");
    let mut s = set_up(&slack, 2, MESSAGE, "xoxb-secret-3", "upsert");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    slack.throttle_next(1);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 2, 3), "{run:?}");
    assert_eq!(slack.calls().iter().filter(|c| c.status == 429).count(), 1);
    assert_eq!(slack.messages("C0001").len(), 2);

    slack.revoke_token();
    s.client.batch_execute(&format!("UPDATE {} SET region = 'US' WHERE id = 1", s.table)).unwrap();
    let revoked = run_sync(&mut s.client, &s.sync);
    assert_eq!(revoked.status, "failed");
    assert_eq!(revoked.error.as_deref(), Some("Slack rejected the token (token_revoked): check the bot token in the user mapping"));
    let leaked: i64 = s
        .client
        .query_one("SELECT count(*) FROM (SELECT error FROM retl.runs UNION ALL SELECT error FROM retl.batches) t WHERE error LIKE '%xoxb-secret-3%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
}

#[test]
fn a_digest_per_run_through_an_incoming_webhook() {
    let slack = FakeSlack::start("xoxb-4");
    slack.add_channel("C0002", "growth");
    slack.add_webhook("T0001/B0001/abcdefghijklmnopqrstuvwx", "C0002");
    let options = "text '{{ count }} new signups: {% for r in records %}{{ r.fields.name }}{% unless forloop.last %}, {% endunless %}{% endfor %}', per 'run'";
    let base = slack.base_url();
    let mut s = set_up(&slack, 3, options, "T0001/B0001/abcdefghijklmnopqrstuvwx", "insert");
    s.client.batch_execute(&format!("ALTER SERVER {} OPTIONS (SET url '{base}/services')", s.server)).unwrap();
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 3, 1), "{run:?}");
    let messages = slack.messages("C0002");
    assert_eq!(messages.len(), 1);
    assert_eq!((messages[0].via.as_str(), messages[0].text.as_str()), ("webhook", "3 new signups: Ann 1, Ann 2, Ann 3"));
    // A template naming a column the sync does not send is refused at create_sync.
    let err = s
        .client
        .execute(
            "SELECT retl.create_sync(name => $1 || '_x', model => (SELECT m.name FROM retl.syncs y JOIN retl.models m ON m.id = y.model_id WHERE y.name = $1), \
                     destination => $2, mappings => '{\"region\": \"region\"}')",
            &[&s.sync, &s.server],
        )
        .unwrap_err();
    let (code, message, _, _) = db_error(&err);
    assert_eq!(code, "42703");
    assert!(message.contains("text template: ") && message.contains("name"), "{message}");
}

#[test]
fn the_default_rate_keeps_within_slacks_one_message_per_second_per_channel() {
    let slack = FakeSlack::start("xoxb-5");
    slack.add_channel("C0001", "sales");
    slack.enforce_channel_rate(true);
    let mut s = set_up(&slack, 4, "text 'Hi {{ fields.name }}', channel 'C0001'", "xoxb-5", "insert");
    let _drop = DropSyncs(vec![s.sync.clone()]);
    let run = run_sync(&mut s.client, &s.sync);
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 4, 4), "{run:?}");
    assert!(slack.calls().iter().all(|c| c.status == 200), "no 429: {:?}", slack.calls().iter().map(|c| c.status).collect::<Vec<_>>());
    assert_eq!(slack.messages("C0001").len(), 4);
    let _ = &s.table;
}
