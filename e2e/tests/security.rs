//! The model runs with its owner's privileges, never the worker's: a non-superuser's sync
//! cannot read what its owner cannot read, row-level security holds, and other users cannot
//! touch someone else's sync.
mod common;
use common::*;
use retl_e2e::cluster::connect_as;

struct Role {
    name: String,
    password: String,
}

fn create_role(client: &mut postgres::Client, server: &str) -> Role {
    let name = unique("role");
    let password = format!("pw-{name}");
    client
        .batch_execute(&format!(
            "CREATE ROLE {name} LOGIN PASSWORD '{password}';
             GRANT USAGE ON FOREIGN SERVER {server} TO {name};"
        ))
        .unwrap();
    Role { name, password }
}

#[test]
fn a_sync_cannot_read_what_its_owner_cannot_read() {
    let fake = FakeWebhook::start();
    let mut admin = connect();
    ensure_extension(&mut admin);
    let base = unique("sec");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {base}_secret (id int PRIMARY KEY, ssn text);
             INSERT INTO {base}_secret VALUES (1, '078-05-1120');
             CREATE TABLE {base}_open (id int PRIMARY KEY, tenant text, email text);
             INSERT INTO {base}_open VALUES (1, 'alice', 'a@x'), (2, 'other', 'b@x'), (3, 'alice', 'c@x');
             ALTER TABLE {base}_open ENABLE ROW LEVEL SECURITY;
             CREATE SERVER {base}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');",
            url = fake.url()
        ))
        .unwrap();
    let alice = create_role(&mut admin, &format!("{base}_d"));
    admin
        .batch_execute(&format!(
            "GRANT SELECT ON {base}_open TO {a};
             CREATE POLICY tenant_rows ON {base}_open FOR SELECT TO {a} USING (tenant = 'alice');",
            a = alice.name
        ))
        .unwrap();
    let mut as_alice = connect_as(&alice.name, &alice.password);

    // Defining a model over a table she cannot read is refused, naming the table.
    let err = as_alice
        .batch_execute(&format!(
            "SELECT retl.create_model(name => '{base}_steal', query => 'SELECT id, ssn FROM public.{base}_secret')"
        ))
        .unwrap_err();
    assert_eq!(error_text(&err), ("42501".into(), format!("permission denied for table {base}_secret")));

    // Her own model runs as her: RLS shows her rows only, and current_user is alice.
    as_alice
        .batch_execute(&format!(
            "SELECT retl.create_model(name => '{base}_m', query => 'SELECT id, email, current_user::text AS seen_by FROM public.{base}_open');
             SELECT retl.create_sync(name => '{base}_s', model => '{base}_m', destination => '{base}_d');"
        ))
        .unwrap();
    let run = as_alice
        .query_one(&format!("SELECT status, delivered FROM retl.run('{base}_s', wait => true)"), &[])
        .unwrap();
    assert_eq!((run.get::<_, String>(0), run.get::<_, i64>(1)), ("succeeded".into(), 2));
    let records = fake.records();
    assert_eq!(records.len(), 2, "row-level security hid the other tenant's row");
    assert!(records.values().all(|r| r["seen_by"] == alice.name.as_str()), "{records:?}");

    // Her access is revoked: the worker (a superuser) still cannot read the table for her.
    admin.batch_execute(&format!("REVOKE SELECT ON {base}_open FROM {}; UPDATE {base}_open SET email = 'changed'", alice.name)).unwrap();
    fake.clear_journal();
    let err = as_alice
        .query_one(&format!("SELECT status, error, delivered FROM retl.run('{base}_s', wait => true)"), &[])
        .unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "38000");
    let run = as_alice
        .query_one(&format!("SELECT r.status, r.error FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{base}_s' ORDER BY r.id DESC LIMIT 1"), &[])
        .unwrap();
    assert_eq!(db.message(), format!("run {} of sync \"{base}_s\" failed: permission denied for table {base}_open", {
        let id: i64 = as_alice.query_one(&format!("SELECT max(r.id) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{base}_s'"), &[]).unwrap().get(0);
        id
    }));
    assert_eq!(run.get::<_, String>(0), "failed");
    assert_eq!(run.get::<_, Option<String>>(1).unwrap(), format!("permission denied for table {base}_open"));
    assert_eq!(fake.request_count(), 0);

    // Another user cannot run, change or drop her sync.
    let bob = create_role(&mut admin, &format!("{base}_d"));
    let mut as_bob = connect_as(&bob.name, &bob.password);
    for sql in [
        format!("SELECT retl.run('{base}_s')"),
        format!("SELECT retl.pause('{base}_s')"),
        format!("SELECT retl.drop_sync('{base}_s')"),
        format!("SELECT * FROM retl.preview('{base}_s')"),
    ] {
        let err = as_bob.batch_execute(&sql).unwrap_err();
        assert_eq!(error_text(&err), ("42501".into(), format!("must be owner of sync \"{base}_s\"")), "{sql}");
    }
    // Nor read the snapshot or outbox directly.
    let err = as_bob.batch_execute("SELECT * FROM retl.snapshots").unwrap_err();
    assert_eq!(error_text(&err).0, "42501");
}
