//! retl-overhead: what the on-change triggers cost the statements that write a model's table.
//!
//! For three set-ups of the same 10,000-row table — no sync; an on-change sync whose model's
//! key cannot be traced (only the `retl_on_change` wake-up trigger); an on-change sync of a
//! plain projection (also the four `retl_changed_keys` triggers, which log every touched key)
//! — it times single-row UPDATEs and 1,000-row UPDATEs inside a transaction that is rolled
//! back (so no run is ever started and the worker does not compete for the CPU), and reports
//! the median cost per statement over `--rounds` rounds. The commit, which a real write also
//! pays (WAL flush), is not included: the figures are the triggers' own cost.
//!
//! Usage: `retl-overhead [--rounds 7] [--json FILE]`. Connects like retl-bench. Creates its
//! objects under unique names and drops them at the end. Exit status 2 on an error.

use postgres::Client;
use retl_e2e::cluster::{try_connect, unique};
use serde_json::json;
use std::path::PathBuf;
use std::process::exit;

const SINGLE_ROW_STATEMENTS: i64 = 2000;
const BULK_STATEMENTS: i64 = 20;
const BULK_ROWS: i64 = 1000;

type R<T> = Result<T, String>;

fn main() {
    let mut rounds = 7usize;
    let mut json_path: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or_else(|| usage()),
            "--json" => json_path = Some(args.next().map(PathBuf::from).unwrap_or_else(|| usage())),
            _ => usage(),
        }
    }
    if let Err(e) = run(rounds, json_path) {
        eprintln!("retl-overhead: {e}");
        exit(2);
    }
}

fn db_message(e: &postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
}

fn usage() -> ! {
    eprintln!("usage: retl-overhead [--rounds 7] [--json FILE]");
    exit(2)
}

struct Names {
    table: String,
    server: String,
    syncs: Vec<String>,
    models: Vec<String>,
}

impl Drop for Names {
    fn drop(&mut self) {
        let Some(mut c) = try_connect() else { return };
        for s in &self.syncs {
            let _ = c.execute("SELECT retl.drop_sync($1, if_exists => true)", &[s]);
        }
        for m in &self.models {
            let _ = c.execute("SELECT retl.drop_model($1, if_exists => true)", &[m]);
        }
        let _ = c.batch_execute(&format!("DROP SERVER IF EXISTS {} CASCADE; DROP TABLE IF EXISTS {}", self.server, self.table));
    }
}

/// Median microseconds per statement of `statements` UPDATEs of `rows` rows each, in a
/// transaction that is rolled back.
fn measure(c: &mut Client, table: &str, statements: i64, rows: i64, rounds: usize) -> R<f64> {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut tx = c.transaction().map_err(|e| e.to_string())?;
        let micros: f64 = tx
            // A function in pg_temp is only found schema-qualified.
            .query_one(&format!("SELECT pg_temp.retl_overhead_loop('{table}', {statements}, {rows})"), &[])
            .map_err(|e| db_message(&e))?
            .get(0);
        tx.rollback().map_err(|e| e.to_string())?;
        samples.push(micros / statements as f64);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples[samples.len() / 2])
}

fn run(rounds: usize, json_path: Option<PathBuf>) -> R<()> {
    let mut c = try_connect().ok_or("cannot connect to Postgres (is the cluster running? make cluster)")?;
    let base = unique("overhead");
    let mut names = Names { table: format!("{base}_t"), server: format!("{base}_d"), syncs: vec![], models: vec![] };
    let sql = |c: &mut Client, s: &str| c.batch_execute(s).map_err(|e| format!("{s}: {}", db_message(&e)));
    sql(
        &mut c,
        &format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, val bigint NOT NULL, email text NOT NULL, name text NOT NULL);
             INSERT INTO {t} SELECT i, 0, 'user' || i || '@example.com', 'Person ' || i FROM generate_series(1, 10000) i;
             ANALYZE {t};
             CREATE SERVER {d} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url 'http://127.0.0.1:9/unused');
             CREATE OR REPLACE FUNCTION pg_temp.retl_overhead_loop(t regclass, statements bigint, rows bigint) RETURNS float8
             LANGUAGE plpgsql AS $$
             DECLARE started timestamptz := clock_timestamp();
             BEGIN
                 FOR i IN 0 .. statements - 1 LOOP
                     EXECUTE format('UPDATE %s SET val = val + 1 WHERE id > $1 AND id <= $1 + $2', t)
                       USING (i * rows) % 10000, rows;
                 END LOOP;
                 RETURN extract(epoch FROM clock_timestamp() - started) * 1e6;
             END $$;",
            t = names.table,
            d = names.server
        ),
    )?;
    let mut results = Vec::new();
    // (set-up, the model's query after SELECT ... FROM <table>): each replaces the one before.
    let setups = [
        ("no sync", None),
        ("on change, untraced model", Some(" OFFSET 0")),
        ("on change, traced model (key log)", Some("")),
    ];
    for (n, (setup, tail)) in setups.into_iter().enumerate() {
        if let Some(tail) = tail {
            let (m, s) = (format!("{base}_{n}_m"), format!("{base}_{n}_s"));
            let previous = names.syncs.last().map_or(String::new(), |p| format!("SELECT retl.drop_sync('{p}');"));
            names.models.push(m.clone());
            names.syncs.push(s.clone());
            sql(
                &mut c,
                &format!(
                    "{previous}
                     SELECT retl.create_model(name => '{m}', query => 'SELECT id, val, email, name FROM {t}{tail}', primary_key => '{{id}}');
                     SELECT retl.create_sync(name => '{s}', model => '{m}', destination => '{d}', schedule => 'on change');",
                    t = names.table,
                    d = names.server
                ),
            )?;
        }
        let single = measure(&mut c, &names.table, SINGLE_ROW_STATEMENTS, 1, rounds)?;
        let bulk = measure(&mut c, &names.table, BULK_STATEMENTS, BULK_ROWS, rounds)?;
        results.push((setup, single, bulk));
    }

    let (base_single, base_bulk) = (results[0].1, results[0].2);
    println!("=== retl-overhead: cost of the on-change triggers per UPDATE statement (median of {rounds} rounds, no commit) ===");
    println!("{:<36} {:>18} {:>22}", "set-up", "1-row UPDATE", "1,000-row UPDATE");
    for (setup, single, bulk) in &results {
        println!(
            "{setup:<36} {single:>9.1} µs ({:>4.1}x) {bulk:>11.0} µs ({:>4.1}x)",
            single / base_single,
            bulk / base_bulk
        );
    }
    if let Some(path) = json_path {
        let line = json!({
            "benchmark": "on_change_trigger_overhead",
            "rounds": rounds,
            "results": results.iter().map(|(setup, single, bulk)| json!({
                "setup": setup, "single_row_update_us": (single * 10.0).round() / 10.0,
                "bulk_1000_row_update_us": bulk.round(),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, format!("{line}\n")).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
