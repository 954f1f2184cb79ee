//! Plan-time refusals queue nothing and say exactly what is wrong; bad definitions are
//! refused at DDL time with the right SQLSTATE.
mod common;
use common::*;

fn queued_and_last_error(f: &mut Fixture) -> (i64, String) {
    let queued = f.outbox_rows();
    let row = f
        .client
        .query_one(
            "SELECT r.status, r.error FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1 ORDER BY r.id DESC LIMIT 1",
            &[&f.sync],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    (queued, row.get(1))
}

#[test]
fn duplicate_primary_keys_are_refused_with_nothing_queued() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 4, "upsert", "", None);
    f.exec(&format!(
        "ALTER TABLE {t} DROP CONSTRAINT {t}_pkey; INSERT INTO {t} VALUES (2, 'b@x', 'B', 1), (2, 'c@x', 'C', 1), (3, 'd@x', 'D', 1)",
        t = f.table
    ));
    let run = f.run();
    assert_eq!(run.status, "failed");
    assert_eq!(fake.request_count(), 0);
    let (queued, error) = queued_and_last_error(&mut f);
    assert_eq!(queued, 0);
    assert_eq!(error, format!("model \"{}\" returned 2 duplicate primary keys (e.g. {{\"id\": 2}} appears 3 times)", f.model));
    // preview raises the same refusal, with SQLSTATE unique_violation.
    let err = f.client.query("SELECT * FROM retl.preview($1)", &[&f.sync]).unwrap_err();
    assert_eq!(error_text(&err), ("23505".to_string(), error));
}

#[test]
fn null_primary_keys_are_refused_with_nothing_queued() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 3, "upsert", "", None);
    f.exec(&format!("ALTER TABLE {t} DROP CONSTRAINT {t}_pkey; ALTER TABLE {t} ALTER id DROP NOT NULL; INSERT INTO {t} VALUES (NULL, 'n@x', 'N', 1)", t = f.table));
    let run = f.run();
    assert_eq!(run.status, "failed");
    let (queued, error) = queued_and_last_error(&mut f);
    assert_eq!(queued, 0);
    assert_eq!(error, format!("model \"{}\" returned 1 row with a NULL primary key (id)", f.model));
    assert_eq!(fake.request_count(), 0);
    let err = f.client.query("SELECT * FROM retl.preview($1)", &[&f.sync]).unwrap_err();
    assert_eq!(error_text(&err).0, "23502");
}

#[test]
fn a_mapped_column_missing_from_the_model_is_refused() {
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    let err = f
        .client
        .execute(
            "SELECT retl.alter_sync(name => $1, mappings => '{\"Email\": \"email\", \"Phone\": \"phone\"}')",
            &[&f.sync],
        )
        .unwrap_err();
    let (code, message) = error_text(&err);
    assert_eq!(code, "42703");
    assert_eq!(message, format!("mapped column \"phone\" is not in model \"{}\"", f.model));
    let err = f
        .client
        .execute(
            "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mappings => '{\"x\": \"nope\"}')",
            &[&format!("{}_2", f.sync), &f.model, &f.server],
        )
        .unwrap_err();
    assert_eq!(error_text(&err).0, "42703");
}

#[test]
fn destination_options_are_validated_at_ddl_time() {
    let mut client = connect();
    ensure_extension(&mut client);
    let name = unique("bad");
    let cases = [
        ("OPTIONS (type 'webhook', url 'http://127.0.0.1:1/x', batchsize '10')", "HV00D", "unknown option \"batchsize\""),
        ("OPTIONS (type 'webhook', url 'http://127.0.0.1:1/x', batch_size 'ten')", "HV024", "option \"batch_size\" must be an integer between 1 and 1000, got \"ten\""),
        ("OPTIONS (type 'webhook', url 'ftp://example.com')", "HV024", "option \"url\" must be an http or https URL, got \"ftp://example.com\""),
        ("OPTIONS (type 'hubspt', url 'http://127.0.0.1:1/x')", "HV024", "unknown destination type \"hubspt\""),
        ("OPTIONS (url 'http://127.0.0.1:1/x')", "HV024", "option \"type\" is required"),
    ];
    for (options, code, expected) in cases {
        let err = client
            .batch_execute(&format!("CREATE SERVER {name} FOREIGN DATA WRAPPER retl {options}"))
            .unwrap_err();
        let (got_code, message) = error_text(&err);
        assert_eq!(got_code, code, "{options}: {message}");
        assert!(message.starts_with(expected), "{options}: got {message:?}");
    }
    client
        .batch_execute(&format!("CREATE SERVER {name} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url 'http://127.0.0.1:1/x')"))
        .unwrap();
    let err = client
        .batch_execute(&format!("CREATE USER MAPPING FOR CURRENT_USER SERVER {name} OPTIONS (token 'abc', token_env 'X')"))
        .unwrap_err();
    assert_eq!(error_text(&err).1, "option \"token\" and \"token_env\" cannot both be set; use one");
    let err = client
        .batch_execute(&format!("CREATE USER MAPPING FOR CURRENT_USER SERVER {name} OPTIONS (password 'hunter2')"))
        .unwrap_err();
    let (code, message) = error_text(&err);
    assert_eq!(code, "HV00D");
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn bad_models_and_syncs_are_refused_clearly() {
    let mut client = connect();
    ensure_extension(&mut client);
    let name = unique("bm");
    let expect = |client: &mut postgres::Client, sql: &str, code: &str, message: &str| {
        let err = client.batch_execute(sql).unwrap_err();
        assert_eq!(error_text(&err), (code.to_string(), message.to_string()), "{sql}");
    };
    expect(
        &mut client,
        &format!("SELECT retl.create_model(name => '{name}', query => 'SELECT 1 AS id; DROP TABLE x', primary_key => '{{id}}')"),
        "22023",
        "model query must be a single SELECT statement, found 2 statements",
    );
    expect(
        &mut client,
        &format!("SELECT retl.create_model(name => '{name}', query => 'DELETE FROM pg_class RETURNING oid', primary_key => '{{oid}}')"),
        "22023",
        "model query must be a SELECT, VALUES or TABLE statement, not DELETE",
    );
    expect(
        &mut client,
        &format!("SELECT retl.create_model(name => '{name}', query => 'no_such_table_xyz')"),
        "42P01",
        "relation \"no_such_table_xyz\" does not exist",
    );
    expect(
        &mut client,
        &format!("SELECT retl.create_model(name => '{name}', query => 'SELECT 1 AS id', primary_key => '{{uid}}')"),
        "42703",
        &format!("primary key column \"uid\" is not in model \"{name}\""),
    );
    expect(
        &mut client,
        "SELECT retl.create_model(name => 'Bad Name', query => 'SELECT 1 AS id')",
        "42602",
        "model name \"Bad Name\" is not valid",
    );
    client
        .batch_execute(&format!("SELECT retl.create_model(name => '{name}', query => 'SELECT 1 AS id, 0.5 AS churn')"))
        .unwrap();
    expect(
        &mut client,
        &format!("SELECT retl.create_audience(name => '{name}_a', model => '{name}', filter => 'true) UNION SELECT 2, 0.1 WHERE (true')"),
        "22023",
        "audience filter must be a single boolean expression over the model's columns, got \"true) UNION SELECT 2, 0.1 WHERE (true\"",
    );
    expect(
        &mut client,
        &format!("SELECT retl.create_sync(name => '{name}_s', model => '{name}', destination => 'no_such_server')"),
        "42704",
        "destination \"no_such_server\" does not exist",
    );
    expect(
        &mut client,
        &format!("SELECT retl.create_sync(name => '{name}_s', model => '{name}', destination => 'x', mode => 'merge')"),
        "22023",
        "unknown sync mode \"merge\"",
    );
    expect(
        &mut client,
        &format!("SELECT retl.run('{name}_nope')"),
        "42704",
        &format!("sync \"{name}_nope\" does not exist"),
    );
}
