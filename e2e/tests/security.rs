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

/// Restores `retl.allowed_hosts` to its default when dropped, even if the test fails.
struct AllowedHosts;

impl AllowedHosts {
    /// Sets the cluster-wide setting (as a superuser would) and waits until sessions see it;
    /// workers re-read their configuration before every slice of work.
    fn set(client: &mut postgres::Client, value: &str) -> AllowedHosts {
        client.execute(&format!("ALTER SYSTEM SET retl.allowed_hosts = '{value}'"), &[]).unwrap();
        reload_until(client, value);
        AllowedHosts
    }
}

fn reload_until(client: &mut postgres::Client, value: &str) {
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until(SHORT, "the new retl.allowed_hosts to apply", || {
        let shown: String = connect().query_one("SHOW retl.allowed_hosts", &[]).unwrap().get(0);
        shown == value
    });
}

impl Drop for AllowedHosts {
    fn drop(&mut self) {
        if let Some(mut client) = retl_e2e::cluster::try_connect() {
            let _ = client.batch_execute("ALTER SYSTEM RESET retl.allowed_hosts");
            reload_until(&mut client, "*");
        }
    }
}

const LINK_LOCAL: &str =
    "is a link-local address (cloud metadata services answer there): refused unless retl.allowed_hosts lists it explicitly";

#[test]
fn destinations_at_link_local_and_cloud_metadata_addresses_are_refused_by_default() {
    let mut client = connect();
    ensure_extension(&mut client);
    let shown: String = client.query_one("SHOW retl.allowed_hosts", &[]).unwrap().get(0);
    assert_eq!(shown, "*");
    let server = unique("meta");
    for (url, problem) in [
        ("http://169.254.169.254/latest/meta-data/iam/", format!("host \"169.254.169.254\" {LINK_LOCAL}")),
        // Other spellings of the same address are normalised before they are judged.
        ("http://0xA9FEA9FE/", format!("host \"169.254.169.254\" {LINK_LOCAL}")),
        ("http://[::ffff:a9fe:a9fe]/", format!("host \"::ffff:169.254.169.254\" {LINK_LOCAL}")),
        ("http://[fe80::1]:8080/", format!("host \"fe80::1\" {LINK_LOCAL}")),
        (
            "http://[fd00:ec2::254]/latest/",
            "host \"fd00:ec2::254\" is a cloud metadata address: refused unless retl.allowed_hosts lists it explicitly".into(),
        ),
        (
            "http://metadata.google.internal/computeMetadata/v1/",
            "host \"metadata.google.internal\" is a cloud metadata service: refused unless retl.allowed_hosts lists it explicitly".into(),
        ),
    ] {
        let err = client
            .batch_execute(&format!("CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}')"))
            .unwrap_err();
        assert_eq!(
            db_error(&err),
            (
                "42501".into(),
                format!("destination {problem}"),
                None,
                Some("A superuser sets retl.allowed_hosts in postgresql.conf or with ALTER SYSTEM, then SELECT pg_reload_conf().".into())
            ),
            "{url}"
        );
    }
    // An existing destination cannot be pointed there either; it keeps its URL.
    client
        .batch_execute(&format!("CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url 'http://127.0.0.1:9/hook')"))
        .unwrap();
    let err = client
        .batch_execute(&format!("ALTER SERVER {server} OPTIONS (SET url 'http://169.254.169.254/')"))
        .unwrap_err();
    assert_eq!(error_text(&err), ("42501".into(), format!("destination host \"169.254.169.254\" {LINK_LOCAL}")));
    let url: String = client
        .query_one("SELECT option_value FROM pg_foreign_server s, pg_options_to_table(s.srvoptions) WHERE srvname = $1 AND option_name = 'url'", &[&server])
        .unwrap()
        .get(0);
    assert_eq!(url, "http://127.0.0.1:9/hook");
    client.batch_execute(&format!("DROP SERVER {server}")).unwrap();
}

#[test]
fn retl_allowed_hosts_limits_destinations_and_is_checked_on_every_request() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "max_retries '0'", None);
    let _drop = DropSyncs(vec![f.sync.clone()]);
    assert_eq!(f.run().status, "succeeded");

    // Only a superuser changes it, and only cluster-wide: a session cannot widen it for itself.
    let err = f.client.batch_execute("SET retl.allowed_hosts = '*'").unwrap_err();
    assert_eq!(error_text(&err), ("55P02".into(), "parameter \"retl.allowed_hosts\" cannot be changed now".into()));

    let guard = AllowedHosts::set(&mut f.client, "api.example.com, *.example.org");
    // New destinations elsewhere are refused at definition...
    let other = unique("other");
    let err = f
        .client
        .batch_execute(&format!("CREATE SERVER {other} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{}')", fake.url()))
        .unwrap_err();
    let refused = "host \"127.0.0.1\" is not in retl.allowed_hosts (\"api.example.com, *.example.org\"): a superuser can add it to that setting";
    assert_eq!(error_text(&err), ("42501".into(), format!("destination {refused}")));
    f.client
        .batch_execute(&format!("CREATE SERVER {other} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url 'https://hooks.example.org/x')"))
        .unwrap();
    f.client.batch_execute(&format!("DROP SERVER {other}")).unwrap();
    // ...and the existing one is not contacted: the run fails at once, nothing is lost.
    fake.clear_journal();
    f.exec(&format!("UPDATE {} SET score = -1 WHERE id = 2", f.table));
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("failed", 0, 1), "{run:?}");
    assert_eq!(run.error.as_deref(), Some(&*format!("request refused: {refused}")));
    assert_eq!(fake.request_count(), 0);
    assert_eq!(f.outbox_rows(), 1);

    // Listing the host lets the queued change through.
    drop(guard);
    let _guard = AllowedHosts::set(&mut f.client, "api.example.com, 127.0.0.1");
    let run = f.run();
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 1), "{run:?}");
    assert_eq!(fake.records(), f.model_state());
}

#[test]
fn tls_certificates_are_verified() {
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    // A certificate for 127.0.0.1 issued by a CA of our own, which no trust store holds.
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=retl-test-ca -keyout ca.key -out ca.pem",
        "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out leaf.csr",
        "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile leaf.ext -out cert.pem",
    ] {
        let made = std::process::Command::new("openssl").args(args.split(' ')).current_dir(&dir).output().unwrap();
        assert!(made.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&made.stderr));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // A real TLS server: the right name, no trusted issuer.
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-cert", "cert.pem", "-key", "key.pem", "-www"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_until(SHORT, "openssl s_server to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    let mut f = Fixture::new(&format!("https://127.0.0.1:{port}/hook"), 2, "upsert", "max_retries '0'", Some("tls-secret-token"));
    let _drop = DropSyncs(vec![f.sync.clone()]);
    let run = f.run();
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!((run.status.as_str(), run.delivered), ("failed", 0), "{run:?}");
    assert_eq!(
        run.error.as_deref(),
        Some("gave up after 1 attempt: request failed: error sending request: client error (Connect): invalid peer certificate: UnknownIssuer")
    );
    // The client hung up in the handshake, so neither the token nor a row went out.
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(stderr.contains("alert unknown ca"), "{stderr}");
    assert_eq!(f.outbox_rows(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection as `user` that collects every NOTICE/WARNING the server sends it.
fn connect_collecting_notices(user: &str, password: &str) -> (postgres::Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = notices.clone();
    let client = retl_e2e::cluster::config(user, password)
        .notice_callback(move |notice| {
            sink.lock().unwrap().push(format!("{} {:?} {:?}", notice.message(), notice.detail(), notice.hint()))
        })
        .connect(postgres::NoTls)
        .unwrap();
    (client, notices)
}

#[test]
fn credentials_are_readable_by_no_other_role_and_appear_in_no_error_log_notice_or_table() {
    const SECRET: &str = "sk_live_CREDENTIAL_never_shown_42";
    let fake = FakeWebhook::builder().token(SECRET).start();
    fake.script((0..3).map(|_| Scripted::Delay(std::time::Duration::from_millis(300))).collect());
    let mut admin = connect();
    ensure_extension(&mut admin);
    let base = unique("cred");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {base}_t (id int PRIMARY KEY, email text);
             INSERT INTO {base}_t SELECT i, 'u' || i || '@x' FROM generate_series(1, 6) i;
             CREATE SERVER {base}_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}', batch_size '2', max_concurrency '1');",
            url = fake.url()
        ))
        .unwrap();
    let alice = create_role(&mut admin, &format!("{base}_d"));
    admin.batch_execute(&format!("GRANT SELECT ON {base}_t TO {}", alice.name)).unwrap();
    let bob = create_role(&mut admin, &format!("{base}_d"));
    let _drop = DropSyncs(vec![format!("{base}_s")]);

    // A credential given as a server option is refused (every user with access could read it),
    // and neither that statement nor a mistyped mapping reaches the server log.
    let err = admin
        .batch_execute(&format!("CREATE SERVER {base}_bad FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{}', token '{SECRET}')", fake.url()))
        .unwrap_err();
    assert_eq!(
        error_text(&err),
        (
            "HV00D".into(),
            "option \"token\" is a credential and belongs in a user mapping, not on the server: CREATE USER MAPPING FOR CURRENT_USER SERVER ... OPTIONS (token '...') (server options are readable by every user with access to the server)".into()
        )
    );
    let (mut as_alice, notices) = connect_collecting_notices(&alice.name, &alice.password);
    let err = as_alice
        .batch_execute(&format!("CREATE USER MAPPING FOR CURRENT_USER SERVER {base}_d OPTIONS (tokn '{SECRET}')"))
        .unwrap_err();
    assert_eq!(error_text(&err).0, "HV00D");
    assert!(!error_text(&err).1.contains(SECRET));

    // Alice's own mapping, model and sync; the run goes through with her token.
    as_alice
        .batch_execute(&format!(
            "CREATE USER MAPPING FOR CURRENT_USER SERVER {base}_d OPTIONS (token '{SECRET}');
             SELECT retl.create_model(name => '{base}_m', query => 'SELECT id, email FROM public.{base}_t');
             SELECT retl.create_sync(name => '{base}_s', model => '{base}_m', destination => '{base}_d');"
        ))
        .unwrap();
    let run_id: i64 = as_alice.query_one(&format!("SELECT id FROM retl.run('{base}_s')"), &[]).unwrap().get(0);
    // While it delivers, no session or worker shows the token.
    let mut peeks = 0;
    wait_until(SHORT, "the run to finish", || {
        let shown: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()", &[&SECRET])
            .unwrap()
            .get(0);
        assert_eq!(shown, 0, "the token is in pg_stat_activity");
        peeks += 1;
        let status: String = admin.query_one("SELECT status FROM retl.runs WHERE id = $1", &[&run_id]).unwrap().get(0);
        status == "succeeded"
    });
    assert!(peeks > 1, "looked while the run was delivering");
    assert_eq!(fake.records().len(), 6);

    // Bob, who may use the same server, cannot read her mapping's options, nor the catalog.
    let mut as_bob = connect_as(&bob.name, &bob.password);
    let options: Option<Vec<String>> = as_bob
        .query_one("SELECT umoptions FROM pg_user_mappings WHERE srvname = $1 AND usename = $2", &[&format!("{base}_d"), &alice.name])
        .unwrap()
        .get(0);
    assert_eq!(options, None);
    let err = as_bob.batch_execute("SELECT umoptions FROM pg_catalog.pg_user_mapping").unwrap_err();
    assert_eq!(error_text(&err), ("42501".into(), "permission denied for table pg_user_mapping".into()));

    // A wrong token later fails a run: the error names no token.
    as_alice.batch_execute(&format!("ALTER USER MAPPING FOR CURRENT_USER SERVER {base}_d OPTIONS (SET token 'sk_live_WRONG_token_43')")).unwrap();
    admin.batch_execute(&format!("UPDATE {base}_t SET email = 'changed' WHERE id = 1")).unwrap();
    let err = as_alice.query_one(&format!("SELECT * FROM retl.run('{base}_s', wait => true)"), &[]).unwrap_err();
    assert!(!format!("{err:?}").contains("sk_live_"), "{err:?}");

    // No retl table, no NOTICE, no log line holds either token.
    let tables: Vec<String> = admin
        .query("SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'retl'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 10, "{tables:?}");
    for table in tables {
        let hits: i64 = admin
            .query_one(&format!("SELECT count(*) FROM {table} t WHERE t::text LIKE '%sk_live_%'"), &[])
            .unwrap()
            .get(0);
        assert_eq!(hits, 0, "a token is in {table}");
    }
    assert!(notices.lock().unwrap().iter().all(|n| !n.contains("sk_live_")), "{:?}", notices.lock().unwrap());
    let log = server_log(&mut admin);
    // The refusals themselves are logged (this is the right log), their statements are not.
    assert!(log.contains("ERROR:  option \"token\" is a credential and belongs in a user mapping"), "read the right log");
    assert!(log.contains("ERROR:  unknown option \"tokn\" for a retl user mapping"), "read the right log");
    assert!(!log.contains("sk_live_"), "a token is in the server log");
    admin.batch_execute(&format!("DROP USER MAPPING FOR {} SERVER {base}_d", alice.name)).unwrap();
}

#[test]
fn names_filters_and_mappings_from_users_cannot_inject_sql() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    let _drop = DropSyncs(vec![f.sync.clone(), format!("{}_a", f.sync), format!("{}_q", f.sync)]);
    let canary = format!("{}_canary", f.table);
    f.exec(&format!("CREATE TABLE {canary} (n int); INSERT INTO {canary} VALUES (1)"));
    let drop = format!("DROP TABLE {canary}");
    // Names: quotes, semicolons, comments, and look-alikes (Cyrillic ѕ, fullwidth ；, ʼ).
    for name in [
        format!("x'; {drop}; --"),
        format!("x\"; {drop}; --"),
        "x/**/y".to_string(),
        "ѕync".to_string(),
        format!("x；{drop}"),
        "robertʼ);drop".to_string(),
        "Upper".to_string(),
    ] {
        for (kind, sql) in [
            ("model", "SELECT retl.create_model(name => $1, query => 'SELECT 1 AS id')"),
            ("sync", "SELECT retl.create_sync(name => $1, model => 'nope', destination => 'nope')"),
        ] {
            let err = f.client.execute(sql, &[&name]).unwrap_err();
            let (code, message, _, hint) = db_error(&err);
            assert_eq!((code.as_str(), message), ("42602", format!("{kind} name \"{}\" is not valid", name.replace('"', "\"\""))), "{name}");
            assert_eq!(hint.as_deref(), Some("Use 1 to 63 lower-case letters, digits and underscores, starting with a letter or underscore."));
        }
    }
    // Other names are looked up, never spliced.
    let err = f
        .client
        .execute("SELECT retl.create_sync(name => 'ok_name', model => $1, destination => $2)", &[&f.model, &format!("x'; {drop}; --")])
        .unwrap_err();
    assert_eq!(error_text(&err), ("42704".into(), format!("destination \"x'; {drop}; --\" does not exist")));
    let err = f
        .client
        .execute("SELECT retl.create_model(name => 'ok_name', query => 'SELECT 1 AS id', primary_key => ARRAY[$1])", &[&format!("id; {drop}")])
        .unwrap_err();
    assert_eq!(error_text(&err).0, "42703");
    // Filters: one boolean expression, nothing smuggled after it (whatever the quoting).
    for filter in [
        format!("true); {drop}; --"),
        format!("true; {drop}"),
        format!("true) UNION SELECT 1 FROM {canary} --"),
        format!("true；{drop}"),
        "true /* unterminated".to_string(),
    ] {
        let err = f
            .client
            .execute("SELECT retl.create_audience(name => 'inj_a', model => $1, filter => $2)", &[&f.model, &filter])
            .unwrap_err();
        // Refused either by the parser (42601, a syntax error) or as more than one expression.
        let (code, message) = error_text(&err);
        assert!(
            (code == "42601" && (message.starts_with("syntax error at or near") || message.starts_with("unterminated /* comment")))
                || (code == "22023" && message.starts_with("audience filter must be a single boolean expression")),
            "{filter}: {err:?}"
        );
    }
    // A quote inside a string literal is just data.
    let audience = format!("{}_aud", f.model);
    f.client
        .execute(
            "SELECT retl.create_audience(name => $1, model => $2, filter => $3)",
            &[&audience, &f.model, &format!("email <> 'x''; {drop}; --'")],
        )
        .unwrap();
    // Mappings: destination field names are data, sent as they are; column names must exist.
    let field = format!("it's\"; {drop}; --");
    let mappings = serde_json::json!({ field.clone(): "email" }).to_string();
    f.client
        .execute(
            "SELECT retl.create_sync(name => $1, audience => $2, destination => $3, mappings => $4::text::jsonb)",
            &[&format!("{}_a", f.sync), &audience, &f.server, &mappings],
        )
        .unwrap();
    let run = run_sync(&mut f.client, &format!("{}_a", f.sync));
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 3), "{run:?}");
    let sent = fake.requests().last().unwrap().body.clone().unwrap();
    assert_eq!(sent["records"][0]["fields"], serde_json::json!({ field: "user1@example.com" }));
    let bad_column = serde_json::json!({ "email": format!("email\"; {drop}; --") }).to_string();
    let err = f
        .client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mappings => $4::text::jsonb)",
            &[&format!("{}_q", f.sync), &f.model, &f.server, &bad_column],
        )
        .unwrap_err();
    assert_eq!(error_text(&err), ("42703".into(), format!("mapped column \"email\"\"; {drop}; --\" is not in model \"{}\"", f.model)));
    // Through all of it, the canary lives.
    assert_eq!(f.count(&format!("SELECT count(*) FROM {canary}")), 1);
}
