//! Governance: the retl_* roles and what each user sees, PII tags and destination policies
//! (checked at create_sync, alter_sync and every plan), the audit log, and retl.forget.

mod common;

use common::*;
use retl_e2e::cluster::connect_as;
use serde_json::json;

struct Role {
    name: String,
    password: String,
}

impl Role {
    fn connect(&self) -> postgres::Client {
        connect_as(&self.name, &self.password)
    }
}

/// A login role, member of `member_of` (if any).
fn login_role(admin: &mut postgres::Client, member_of: Option<&str>) -> Role {
    let name = unique("gov");
    let password = format!("pw-{name}");
    admin.batch_execute(&format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'")).unwrap();
    if let Some(group) = member_of {
        admin.batch_execute(&format!("GRANT {group} TO {name}")).unwrap();
    }
    Role { name, password }
}

fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

fn sql_error(c: &mut postgres::Client, sql: &str) -> (String, String) {
    let e = c.batch_execute(sql).expect_err(sql);
    let (code, message, _, _) = db_error(&e);
    (code, message)
}

#[test]
fn roles_decide_who_sees_and_who_may_operate_or_change_a_sync() {
    let fake = FakeWebhook::start();
    let mut admin = connect();
    ensure_extension(&mut admin);
    let roles: i64 = count(
        &mut admin,
        "SELECT count(*) FROM pg_roles WHERE rolname IN ('retl_viewer', 'retl_operator', 'retl_admin')
            AND pg_has_role('retl_admin', 'retl_viewer', 'MEMBER') AND pg_has_role('retl_operator', 'retl_viewer', 'MEMBER')",
    );
    assert_eq!(roles, 3);
    let base = unique("roles");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {base}_t (id int PRIMARY KEY, email text);
             INSERT INTO {base}_t VALUES (1, 'a@x'), (2, 'b@x');
             CREATE SERVER {base}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');",
            url = fake.url()
        ))
        .unwrap();
    let alice = login_role(&mut admin, None);
    let bob = login_role(&mut admin, None);
    let viewer = login_role(&mut admin, Some("retl_viewer"));
    let operator = login_role(&mut admin, Some("retl_operator"));
    let boss = login_role(&mut admin, Some("retl_admin"));
    admin
        .batch_execute(&format!("GRANT SELECT ON {base}_t TO {a}; GRANT USAGE ON FOREIGN SERVER {base}_d TO {a};", a = alice.name))
        .unwrap();
    let sync = format!("{base}_s");
    let mut as_alice = alice.connect();
    as_alice
        .batch_execute(&format!(
            "SELECT retl.create_model(name => '{base}_m', query => 'SELECT id, email FROM public.{base}_t');
             SELECT retl.create_sync(name => '{sync}', model => '{base}_m', destination => '{base}_d');"
        ))
        .unwrap();
    // Its own statement: the worker only sees the committed sync.
    as_alice.batch_execute(&format!("SELECT * FROM retl.run('{sync}', wait => true)")).unwrap();
    let _drop = DropSyncs(vec![sync.clone()]);
    let visible = |c: &mut postgres::Client| -> [i64; 5] {
        [
            count(c, &format!("SELECT count(*) FROM retl.syncs WHERE name = '{sync}'")),
            count(c, &format!("SELECT count(*) FROM retl.sync_status WHERE sync = '{sync}'")),
            count(c, &format!("SELECT count(*) FROM retl.runs r WHERE r.sync_id = (SELECT id FROM retl.syncs WHERE name = '{sync}')")),
            count(c, &format!("SELECT count(*) FROM retl.models WHERE name = '{base}_m'")),
            count(c, &format!("SELECT count(*) FROM retl.metrics WHERE sync = '{sync}'")),
        ]
    };
    assert_eq!(visible(&mut as_alice), [1, 1, 1, 1, 1], "the owner sees her sync");
    let mut as_bob = bob.connect();
    assert_eq!(visible(&mut as_bob), [0, 0, 0, 0, 0], "another user sees nothing of it");
    let mut as_viewer = viewer.connect();
    assert_eq!(visible(&mut as_viewer), [1, 1, 1, 1, 1], "retl_viewer sees everything");
    let runs_seen = count(&mut as_bob, "SELECT count(*) FROM retl.runs");
    let runs_all = count(&mut admin, "SELECT count(*) FROM retl.runs");
    assert!(runs_seen < runs_all);

    // Viewers and other users may not run it; operators may run, pause and resume it.
    let must_own = ("42501".to_string(), format!("must be owner of sync \"{sync}\""));
    assert_eq!(sql_error(&mut as_viewer, &format!("SELECT retl.run('{sync}')")), must_own);
    assert_eq!(sql_error(&mut as_bob, &format!("SELECT retl.pause('{sync}')")), must_own);
    let mut as_operator = operator.connect();
    let status: String = as_operator
        .query_one(&format!("SELECT status FROM retl.run('{sync}', wait => true)"), &[])
        .unwrap()
        .get(0);
    assert_eq!(status, "succeeded");
    as_operator.batch_execute(&format!("SELECT retl.pause('{sync}'); SELECT retl.resume('{sync}')")).unwrap();
    // ... but not change or drop it; retl_admin may change it.
    assert_eq!(sql_error(&mut as_operator, &format!("SELECT retl.alter_sync(name => '{sync}', max_rows => 5)")), must_own);
    assert_eq!(sql_error(&mut as_operator, &format!("SELECT retl.drop_sync('{sync}')")), must_own);
    let mut as_boss = boss.connect();
    as_boss.batch_execute(&format!("SELECT retl.alter_sync(name => '{sync}', max_rows => 5)")).unwrap();
    assert_eq!(count(&mut admin, &format!("SELECT max_rows FROM retl.syncs WHERE name = '{sync}'")), 5);
    // Row errors (rejected payloads) follow the same rule.
    assert_eq!(count(&mut as_bob, "SELECT count(*) FROM retl.row_errors"), 0);
}

#[test]
fn tagged_columns_are_refused_by_destination_policies_at_definition_and_at_every_plan() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    ensure_extension(&mut c);
    let base = unique("pii");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, email text, phone text, plan text);
         INSERT INTO {table} VALUES (1, 'a@x', '+1 555', 'pro'), (2, 'b@x', '+1 556', 'free');
         COMMENT ON COLUMN {table}.phone IS 'Mobile number, as entered. [pii: phone]';
         SELECT retl.create_model(name => '{model}', query => 'SELECT id, email, phone, plan FROM {table}');
         SELECT retl.tag_column(model => '{model}', column_name => 'email', tags => '{{Email}}');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');",
        url = fake.url()
    ))
    .unwrap();
    let _drop = DropSyncs(vec![sync.clone()]);
    let tags: Vec<(String, String, String)> = c
        .query("SELECT column_name, tag, source FROM retl.model_column_tags WHERE model = $1 ORDER BY 1, 2", &[&model])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        tags,
        vec![
            ("email".to_string(), "email".to_string(), "retl.tag_column".to_string()),
            ("phone".to_string(), "phone".to_string(), format!("comment on public.{table}.phone")),
        ]
    );

    // A mapping sending the blocked tag is refused; nothing is created.
    c.batch_execute(&format!("SELECT retl.set_policy(destination => '{server}', block => '{{phone}}')")).unwrap();
    let (code, message) = sql_error(
        &mut c,
        &format!(
            "SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}',
                                     mappings => '{{\"email\": \"email\", \"mobile\": \"phone\"}}')"
        ),
    );
    assert_eq!(
        (code.as_str(), message),
        ("42501", format!("sync \"{sync}\" would send columns that the policy of destination \"{server}\" does not allow: \"phone\" (tagged phone)"))
    );
    assert_eq!(count(&mut c, &format!("SELECT count(*) FROM retl.syncs WHERE name = '{sync}'")), 0);
    // Without mappings every column is sent, phone too.
    let (_, message) = sql_error(&mut c, &format!("SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}')"));
    assert!(message.ends_with("does not allow: \"phone\" (tagged phone)"), "{message}");

    c.batch_execute(&format!(
        "SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}',
                                 mappings => '{{\"email\": \"email\", \"plan\": \"plan\"}}')"
    ))
    .unwrap();
    assert_eq!(run_sync(&mut c, &sync).status, "succeeded");

    // An allow-list without "email": the next plan refuses, and nothing reaches the destination.
    c.batch_execute(&format!("SELECT retl.set_policy(destination => '{server}', allow => '{{marketing}}')")).unwrap();
    assert_eq!(
        count(&mut c, &format!("SELECT count(*) FROM retl.policy_violations WHERE sync = '{sync}'")),
        1
    );
    c.batch_execute(&format!("UPDATE {table} SET plan = 'team'")).unwrap();
    let requests = fake.request_count();
    let run = run_sync(&mut c, &sync);
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some(format!(
            "sync \"{sync}\" would send columns that the policy of destination \"{server}\" does not allow: \"email\" (tagged email); nothing was queued"
        ).as_str())
    );
    assert_eq!(fake.request_count(), requests);

    // The default policy ('*') applies without one of the destination's own; a tag written
    // into a column comment later is seen by the next plan.
    c.batch_execute(&format!(
        "SELECT retl.drop_policy('{server}');
         SELECT retl.set_policy(destination => '*', block => '{{ssn}}');
         COMMENT ON COLUMN {table}.plan IS '[pii: ssn, contract]';"
    ))
    .unwrap();
    let run = run_sync(&mut c, &sync);
    assert_eq!(
        run.error.as_deref(),
        Some(format!("sync \"{sync}\" would send columns that the default policy ('*') does not allow: \"plan\" (tagged ssn); nothing was queued").as_str())
    );
    c.batch_execute(&format!("SELECT retl.alter_sync(name => '{sync}', mappings => '{{\"email\": \"email\"}}')")).unwrap();
    assert_eq!(run_sync(&mut c, &sync).status, "succeeded");
    assert_eq!(fake.records()[&key(1)], json!({"email": "a@x"}));
    c.batch_execute("SELECT retl.drop_policy('*')").unwrap();

    // Only retl_admin members and the destination's owner set policies.
    let bob = login_role(&mut c, None);
    let (code, message) = sql_error(&mut bob.connect(), &format!("SELECT retl.set_policy(destination => '{server}', block => '{{email}}')"));
    assert_eq!((code.as_str(), message), ("42501", format!("permission denied to set the policy of destination \"{server}\"")));
}

#[test]
fn the_audit_log_records_who_changed_what_before_and_after_without_secrets() {
    let fake = FakeWebhook::start();
    let mut c = connect();
    ensure_extension(&mut c);
    let base = unique("aud");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    let alice = login_role(&mut c, None);
    let first_id: i64 = count(&mut c, "SELECT coalesce(max(id), 0) FROM retl.audit_log");
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, email text);
         GRANT SELECT ON {table} TO {a};
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         GRANT USAGE ON FOREIGN SERVER {server} TO {a};
         ALTER SERVER {server} OPTIONS (ADD batch_size '10');
         CREATE USER MAPPING FOR {a} SERVER {server} OPTIONS (token 'very-secret-token');
         ALTER USER MAPPING FOR {a} SERVER {server} OPTIONS (SET token 'another-secret-token');",
        a = alice.name,
        url = fake.url()
    ))
    .unwrap();
    let mut as_alice = alice.connect();
    as_alice
        .batch_execute(&format!(
            "SELECT retl.create_model(name => '{model}', query => 'SELECT id, email FROM public.{table}');
             SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}', schedule => '1 second');
             SELECT retl.alter_sync(name => '{sync}', max_rows => 100);
             SELECT retl.pause('{sync}');"
        ))
        .unwrap();
    // The workers' schedule bookkeeping is not a change: let it tick a few times first.
    as_alice.batch_execute(&format!("SELECT retl.resume('{sync}')")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    as_alice
        .batch_execute(&format!("SELECT retl.drop_sync('{sync}'); SELECT retl.drop_model('{model}');"))
        .unwrap();
    c.batch_execute(&format!("DROP USER MAPPING FOR {a} SERVER {server}; DROP SERVER {server};", a = alice.name))
        .unwrap();

    let entries: Vec<(String, String, String, String)> = c
        .query(
            "SELECT actor, action, object_type, object_name FROM retl.audit_log
              WHERE id > $1 AND (object_name LIKE $2 || '%' OR object_name LIKE '%' || $2 || '%') ORDER BY id",
            &[&first_id, &base],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let a = alice.name.clone();
    let su = "postgres".to_string();
    let mapping = format!("{a} on server {server}");
    let e = |actor: &str, action: &str, kind: &str, name: &str| (actor.to_string(), action.to_string(), kind.to_string(), name.to_string());
    assert_eq!(
        entries,
        vec![
            e(&su, "create", "destination", &server),
            e(&su, "alter", "destination", &server),
            e(&su, "create", "user mapping", &mapping),
            e(&su, "alter", "user mapping", &mapping),
            e(&a, "create", "model", &model),
            e(&a, "create", "sync", &sync),
            e(&a, "alter", "sync", &sync),
            e(&a, "alter", "sync", &sync),
            e(&a, "alter", "sync", &sync),
            e(&a, "drop", "sync", &sync),
            e(&a, "drop", "model", &model),
            e(&su, "drop", "user mapping", &mapping),
            e(&su, "drop", "destination", &server),
        ]
    );
    // Before and after: the sync's max_rows, the server's options.
    let row = c
        .query_one(
            "SELECT before ->> 'max_rows', after ->> 'max_rows' FROM retl.audit_log
              WHERE id > $1 AND object_name = $2 AND action = 'alter' ORDER BY id LIMIT 1",
            &[&first_id, &sync],
        )
        .unwrap();
    assert_eq!((row.get::<_, Option<String>>(0), row.get::<_, Option<String>>(1)), (None, Some("100".to_string())));
    let row = c
        .query_one(
            "SELECT before -> 'options' ->> 'batch_size', after -> 'options' ->> 'batch_size', after -> 'options' ->> 'url'
               FROM retl.audit_log WHERE id > $1 AND object_name = $2 AND action = 'alter'",
            &[&first_id, &server],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, Option<String>>(0), row.get::<_, Option<String>>(1), row.get::<_, Option<String>>(2)),
        (None, Some("10".to_string()), Some(fake.url()))
    );
    let leaked = count(&mut c, &format!("SELECT count(*) FROM retl.audit_log a WHERE id > {first_id} AND a::text LIKE '%secret-token%'"));
    assert_eq!(leaked, 0, "user mapping options never reach the audit log");
    // Alice reads the entries about her objects; another user reads none of them.
    assert_eq!(
        count(&mut as_alice, &format!("SELECT count(*) FROM retl.audit_log WHERE id > {first_id} AND object_name = '{sync}'")),
        5
    );
    let bob = login_role(&mut c, None);
    assert_eq!(
        count(&mut bob.connect(), &format!("SELECT count(*) FROM retl.audit_log WHERE id > {first_id} AND object_name LIKE '{base}%'")),
        0
    );
}

#[test]
fn forget_removes_a_key_from_every_table_and_message_and_a_delete_sync_erases_it_downstream() {
    let fake = FakeWebhook::start();
    fake.set_rejection_rule(|rec| (rec["key"]["email"] == "carl@x.org").then(|| (422, "carl@x.org is on a blocklist".to_string())));
    let mut c = connect();
    ensure_extension(&mut c);
    let base = unique("gdpr");
    let (customers, erasures, server) = (format!("{base}_c"), format!("{base}_e"), format!("{base}_d"));
    let (upsert, erase) = (format!("{base}_up"), format!("{base}_erase"));
    c.batch_execute(&format!(
        "CREATE TABLE {customers} (email text, name text);
         INSERT INTO {customers} VALUES ('ada@x.org', 'Ada'), ('bob@x.org', 'Bob'), ('carl@x.org', 'Carl'), ('ada@x.org', 'Ada again');
         CREATE TABLE {erasures} (email text PRIMARY KEY);
         SELECT retl.create_model(name => '{base}_cm', query => 'SELECT email, name FROM {customers}', primary_key => '{{email}}');
         SELECT retl.create_model(name => '{base}_em', query => 'SELECT email FROM {erasures}', primary_key => '{{email}}');
         CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => '{upsert}', model => '{base}_cm', destination => '{server}');
         SELECT retl.create_sync(name => '{erase}', model => '{base}_em', destination => '{server}', mode => 'delete');",
        url = fake.url()
    ))
    .unwrap();
    let _drop = DropSyncs(vec![upsert.clone(), erase.clone()]);
    // A failed run whose error quotes the key, then a run that delivers 2 and rejects carl.
    let failed = run_sync(&mut c, &upsert);
    assert!(failed.error.as_deref().unwrap_or_default().contains("ada@x.org"), "{failed:?}");
    c.batch_execute(&format!("DELETE FROM {customers} WHERE name = 'Ada again'")).unwrap();
    let run = run_sync(&mut c, &upsert);
    assert_eq!((run.delivered, run.failed), (2, 1));

    // The erasure request: the delete sync erases Ada in the destination.
    c.batch_execute(&format!("INSERT INTO {erasures} VALUES ('ada@x.org'); DELETE FROM {customers} WHERE email = 'ada@x.org'"))
        .unwrap();
    assert_eq!(run_sync(&mut c, &erase).delivered, 1);
    assert!(!fake.records().contains_key(&json!({"email": "ada@x.org"}).to_string()));
    c.batch_execute(&format!("DELETE FROM {erasures}")).unwrap();

    let mentions = |c: &mut postgres::Client, text: &str| -> Vec<String> {
        let tables: Vec<String> = c
            .query("SELECT c.relname::text FROM pg_class c WHERE c.relnamespace = 'retl'::regnamespace AND c.relkind = 'r' ORDER BY 1", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        tables
            .into_iter()
            .filter(|t| count(c, &format!("SELECT count(*) FROM retl.{t} x WHERE x::text LIKE '%{text}%'")) > 0)
            .collect()
    };
    assert_eq!(mentions(&mut c, "ada@x.org"), vec!["runs", "snapshots"]);
    assert_eq!(mentions(&mut c, "carl@x.org"), vec!["row_errors"]);

    // Only retl_admin members may forget.
    let bob = login_role(&mut c, None);
    let (code, message) = sql_error(&mut bob.connect(), "SELECT retl.forget('{\"email\": \"ada@x.org\"}')");
    assert_eq!((code.as_str(), message), ("42501", "permission denied to forget keys".to_string()));

    let removed: i64 = count(&mut c, "SELECT retl.forget('{\"email\": \"ada@x.org\"}')");
    assert_eq!(removed, 3, "two snapshot rows (the upsert and the erasure sync) and one run error");
    assert_eq!(mentions(&mut c, "ada@x.org"), Vec::<String>::new());
    let removed: i64 = count(&mut c, &format!("SELECT retl.forget('{{\"email\": \"carl@x.org\"}}', model => '{base}_cm')"));
    assert_eq!(removed, 1, "its row error");
    assert_eq!(mentions(&mut c, "carl@x.org"), Vec::<String>::new());
    let forgets = count(&mut c, "SELECT count(*) FROM retl.audit_log WHERE action = 'forget' AND at > now() - interval '1 minute'");
    assert!(forgets >= 2);
    // Bob is still there, untouched.
    assert_eq!(mentions(&mut c, "bob@x.org"), vec!["snapshots"]);
}
