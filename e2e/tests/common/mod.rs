//! Shared set-up for the end-to-end tests: each test makes its own table, model, destination
//! (pointing at its own fake) and sync, so tests never see each other's rows.
#![allow(dead_code, unused_imports)]

pub use retl_e2e::cluster::{connect, error_text, unique, wait_until};
pub use retl_e2e::fake_webhook::{FakeWebhook, Scripted};
use postgres::Client;
use serde_json::{json, Value};
use std::time::Duration;

pub struct Fixture {
    pub client: Client,
    pub table: String,
    pub model: String,
    pub server: String,
    pub sync: String,
}

/// The summary columns of `retl.run(...)` the tests look at.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: i64,
    pub status: String,
    pub rows_in_model: Option<i64>,
    pub inserts: i64,
    pub updates: i64,
    pub deletes: i64,
    pub delivered: i64,
    pub failed: i64,
    pub api_calls: i64,
    pub error: Option<String>,
}

pub const RUN_COLUMNS: &str = "id, status, rows_in_model, planned_inserts, planned_updates, planned_deletes, \
                               delivered, failed, api_calls, error";

pub fn run_from_row(row: &postgres::Row) -> Run {
    Run {
        id: row.get(0),
        status: row.get(1),
        rows_in_model: row.get(2),
        inserts: row.get(3),
        updates: row.get(4),
        deletes: row.get(5),
        delivered: row.get(6),
        failed: row.get(7),
        api_calls: row.get(8),
        error: row.get(9),
    }
}

pub fn ensure_extension(client: &mut Client) {
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_reverse_etl")
        .expect("CREATE EXTENSION");
}

impl Fixture {
    /// A `people` table with rows 1..=n, a model over it, a destination at `url` with
    /// `server_options` (e.g. "batch_size '2'"), a user mapping with `token`, and a sync.
    pub fn new(url: &str, n: i64, mode: &str, server_options: &str, token: Option<&str>) -> Fixture {
        let mut client = connect();
        ensure_extension(&mut client);
        let base = unique("e2e");
        let (table, model, server, sync) =
            (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id bigint PRIMARY KEY, email text, name text, score int);
                 INSERT INTO {table} SELECT i, 'user' || i || '@example.com', 'Person ' || i, i * 10
                   FROM generate_series(1, {n}) i;"
            ))
            .unwrap();
        client
            .execute(
                "SELECT retl.create_model(name => $1, query => $2, primary_key => '{id}')",
                &[&model, &format!("SELECT id, email, name, score FROM {table}")],
            )
            .unwrap();
        let extra = if server_options.is_empty() { String::new() } else { format!(", {server_options}") };
        client
            .batch_execute(&format!(
                "CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}'{extra})"
            ))
            .unwrap();
        if let Some(token) = token {
            client
                .batch_execute(&format!(
                    "CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token '{token}')"
                ))
                .unwrap();
        }
        client
            .execute(
                "SELECT retl.create_sync(name => $1, model => $2, destination => $3, mode => $4)",
                &[&sync, &model, &server, &mode],
            )
            .unwrap();
        Fixture { client, table, model, server, sync }
    }

    /// Runs the sync with `wait => true` (see [`run_sync`]).
    pub fn run(&mut self) -> Run {
        run_sync(&mut self.client, &self.sync)
    }

    /// The sync's latest run.
    pub fn last_run(&mut self) -> Run {
        last_run_of(&mut self.client, &self.sync)
    }

    pub fn exec(&mut self, sql: &str) {
        // A server error's Display is only "db error": show its message and detail.
        self.client.batch_execute(sql).unwrap_or_else(|e| match e.as_db_error() {
            Some(db) => panic!("{sql}: {} ({:?})", db.message(), db.detail()),
            None => panic!("{sql}: {e}"),
        });
    }

    pub fn count(&mut self, sql: &str) -> i64 {
        self.client.query_one(sql, &[]).unwrap().get(0)
    }

    /// The rows the model holds now, as the destination should hold them (fields by column).
    pub fn model_state(&mut self) -> std::collections::BTreeMap<String, Value> {
        let rows = self
            .client
            .query(&format!("SELECT id, email, name, score FROM {} ORDER BY id", self.table), &[])
            .unwrap();
        rows.iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let email: Option<String> = r.get(1);
                let name: Option<String> = r.get(2);
                let score: Option<i32> = r.get(3);
                (json!({"id": id}).to_string(), json!({"id": id, "email": email, "name": name, "score": score}))
            })
            .collect()
    }

    /// How many runs commits to the model's tables caused so far (trigger `change`).
    pub fn change_runs(&mut self) -> i64 {
        self.count(&format!(
            "SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = '{}' AND r.trigger = 'change'",
            self.sync
        ))
    }

    pub fn outbox_rows(&mut self) -> i64 {
        self.count(&format!(
            "SELECT count(*) FROM retl.outbox o JOIN retl.syncs s ON s.id = o.sync_id WHERE s.name = '{}'",
            self.sync
        ))
    }
}

/// Runs `sync` with `wait => true`. A run that fails raises (as dbt needs); this returns its
/// row all the same, so tests can look at how it failed.
pub fn run_sync(client: &mut Client, sync: &str) -> Run {
    match client.query_one(&format!("SELECT {RUN_COLUMNS} FROM retl.run($1, wait => true)"), &[&sync]) {
        Ok(row) => run_from_row(&row),
        Err(e) if e.code().is_some_and(|c| c.code() == "38000" || c.code() == "55000") => last_run_of(client, sync),
        Err(e) => panic!("retl.run: {e}"),
    }
}

/// The latest run of `sync`.
pub fn last_run_of(client: &mut Client, sync: &str) -> Run {
    let row = client
        .query_one(
            &format!(
                "SELECT {} FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = $1 ORDER BY r.id DESC LIMIT 1",
                RUN_COLUMNS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")
            ),
            &[&sync],
        )
        .expect("latest run");
    run_from_row(&row)
}

/// The record keys of the fake's `n`-th request, as JSON text.
pub fn keys_in_request(fake: &FakeWebhook, n: usize) -> std::collections::BTreeSet<String> {
    fake.requests()[n].body.as_ref().expect("a JSON body")["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["key"].to_string())
        .collect()
}

pub fn key(id: i64) -> String {
    json!({"id": id}).to_string()
}

pub const SHORT: Duration = Duration::from_secs(30);

/// Where scripts/cluster.sh writes the server log (next to the data directory), as SQL.
pub const SERVER_LOG: &str = "current_setting('data_directory') || '/../postgres.log'";

/// The whole server log.
pub fn server_log(client: &mut Client) -> String {
    client.query_one(&format!("SELECT pg_read_file({SERVER_LOG})"), &[]).unwrap().get(0)
}

/// Pauses, then drops, the named syncs (in the order given: children before parents) when it
/// goes out of scope, even when the test panicked, so a scheduled sync never keeps running on
/// the shared cluster after its test.
pub struct DropSyncs(pub Vec<String>);

impl Drop for DropSyncs {
    fn drop(&mut self) {
        let Some(mut client) = retl_e2e::cluster::try_connect() else { return };
        for sync in &self.0 {
            let _ = client.execute("SELECT retl.pause($1)", &[sync]);
        }
        for sync in &self.0 {
            let _ = client.execute("SELECT retl.drop_sync($1, if_exists => true)", &[sync]);
        }
    }
}

/// (SQLSTATE, message, detail, hint) of a server error; panics on client-side errors.
pub fn db_error(e: &postgres::Error) -> (String, String, Option<String>, Option<String>) {
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
    (
        db.code().code().to_string(),
        db.message().to_string(),
        db.detail().map(str::to_string),
        db.hint().map(str::to_string),
    )
}

/// The sync's identity map: key `id` -> the destination's id for it.
pub fn identities(client: &mut Client, sync: &str) -> std::collections::BTreeMap<i64, String> {
    client
        .query(
            "SELECT (i.key->>'id')::bigint, i.destination_id FROM retl.identities i JOIN retl.syncs y ON y.id = i.sync_id WHERE y.name = $1",
            &[&sync],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The sync's row errors: (key `id`, http_status, response), by key.
pub fn row_errors(client: &mut Client, sync: &str) -> Vec<(String, Option<i32>, String)> {
    client
        .query(
            "SELECT e.key->>'id', e.http_status, e.response FROM retl.row_errors e JOIN retl.syncs y ON y.id = e.sync_id \
              WHERE y.name = $1 ORDER BY 1",
            &[&sync],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The SQL block that follows `<!-- recipe: name -->` in docs/RECIPES.md (its first ```sql block).
pub fn recipe(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/RECIPES.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = text.find(&format!("<!-- recipe: {name} -->")).unwrap_or_else(|| panic!("no recipe {name}"));
    let block = &text[start..];
    block.split("```sql").nth(1).and_then(|b| b.split("```").next()).expect("a sql block").to_string()
}

/// Every record the fake answered, as (op, key JSON), sorted.
pub fn ops_sent(fake: &FakeWebhook) -> Vec<(String, String)> {
    let mut ops: Vec<(String, String)> = fake
        .requests()
        .iter()
        .flat_map(|r| r.body.clone().unwrap()["records"].as_array().unwrap().clone())
        .map(|rec| (rec["op"].as_str().unwrap().to_string(), rec["key"].to_string()))
        .collect();
    ops.sort();
    ops
}
