//! Backups: pg_dump and pg_restore carry syncs with their snapshots and history into a fresh
//! cluster, and the restored syncs go on from where they were: nothing is sent again, and an
//! on-change sync plans only the keys a commit touched (its key column found again by name,
//! though the restore gave it another number).
//!
//! The test runs its own scratch cluster (scripts/cluster.sh on a free port, in a directory of
//! its own): the source of the dump, then wiped and started afresh as the restore's target.
mod common;
use common::*;
use postgres::{Client, Config, NoTls};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const PGBIN: &str = "/usr/lib/postgresql/15/bin";

/// A cluster of scripts/cluster.sh in `dir`, listening on 127.0.0.1:`port`; stopped and
/// removed when dropped.
struct ScratchCluster {
    dir: PathBuf,
    port: u16,
}

impl ScratchCluster {
    fn start(dir: &Path, port: u16) -> ScratchCluster {
        let cluster = ScratchCluster { dir: dir.to_path_buf(), port };
        cluster.script("start");
        cluster
    }

    fn script(&self, action: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh");
        let out = Command::new(script)
            .arg(action)
            .env("RETL_RUN_DIR", &self.dir)
            .env("PGPORT", self.port.to_string())
            .output()
            .expect("scripts/cluster.sh");
        assert!(out.status.success(), "cluster.sh {action}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn remove(&self) {
        self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn client(&self) -> Client {
        let password = std::env::var("PGPASSWORD").unwrap_or_else(|_| "retl-dev".into());
        let mut cfg = Config::new();
        cfg.host("127.0.0.1").port(self.port).user("postgres").password(password).dbname("postgres");
        cfg.connect(NoTls).expect("connect to the scratch cluster")
    }

    /// Runs a client program (pg_dump, pg_restore, psql) against this cluster.
    fn tool(&self, program: &str, args: &[&str]) -> Output {
        Command::new(Path::new(PGBIN).join(program))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .env("PGPASSWORD", std::env::var("PGPASSWORD").unwrap_or_else(|_| "retl-dev".into()))
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        self.remove();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What a restore must keep, as text rows: sync definitions, snapshots, run history, sync
/// sources, the audit log.
fn state(c: &mut Client) -> Vec<String> {
    let queries = [
        "SELECT name, uid::text, mode, schedule, hash_version::text FROM retl.syncs ORDER BY name",
        "SELECT s.name, n.key::text, encode(n.hash, 'hex'), n.delivered_at::text FROM retl.snapshots n JOIN retl.syncs s ON s.id = n.sync_id ORDER BY 1, 2",
        "SELECT id::text, trigger, status, planned_inserts::text, delivered::text, finished_at::text FROM retl.runs ORDER BY id",
        "SELECT run_id::text, batch_no::text, records::text, acknowledged::text FROM retl.batches ORDER BY 1, 2",
        "SELECT id::text, actor, action, object_type, object_name FROM retl.audit_log ORDER BY id",
    ];
    let mut rows = Vec::new();
    for sql in queries {
        for row in c.query(sql, &[]).unwrap() {
            let fields: Vec<String> = (0..row.len()).map(|i| row.get::<_, Option<String>>(i).unwrap_or_default()).collect();
            rows.push(fields.join(" | "));
        }
    }
    rows
}

#[test]
fn a_restored_cluster_keeps_syncs_snapshots_and_history_and_sends_nothing_again() {
    let fake = FakeWebhook::start();
    let dir = std::env::temp_dir().join(format!("retl-backup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = free_port();
    let source = ScratchCluster::start(&dir, port);
    let mut c = source.client();
    // The key column is the table's second, until a restore re-creates the table without the
    // dropped first one.
    c.batch_execute(&format!(
        "CREATE EXTENSION pg_reverse_etl;
         CREATE TABLE customers (junk int, id bigint PRIMARY KEY, email text, score int);
         ALTER TABLE customers DROP COLUMN junk;
         INSERT INTO customers SELECT i, 'u' || i || '@example.com', i FROM generate_series(1, 5) i;
         SELECT retl.create_model(name => 'customers', query => 'SELECT id, email, score FROM customers');
         CREATE SERVER hook FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
         SELECT retl.create_sync(name => 'mirror', model => 'customers', destination => 'hook', mode => 'mirror');
         SELECT retl.create_sync(name => 'live', model => 'customers', destination => 'hook', mode => 'upsert',
                                 schedule => 'on change');",
        url = fake.url()
    ))
    .unwrap();
    let run = run_sync(&mut c, "mirror");
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 5), "{run:?}");
    let run = run_sync(&mut c, "live");
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 5), "{run:?}");
    let sources: (String, Vec<i16>) = {
        let row = c.query_one("SELECT relid::text, key_attnums FROM retl.sync_sources JOIN retl.syncs s ON s.id = sync_id WHERE s.name = 'live'", &[]).unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(sources, ("customers".to_string(), vec![2]));
    let before = state(&mut c);
    assert_eq!(before.iter().filter(|r| r.starts_with("mirror | {")).count(), 5, "{before:#?}");
    drop(c);

    // The backup: roles, then the database.
    let globals = source.tool("pg_dumpall", &["--globals-only"]);
    assert!(globals.status.success(), "{}", String::from_utf8_lossy(&globals.stderr));
    let dump = dir.with_extension("dump");
    let out = source.tool("pg_dump", &["-Fc", "-d", "postgres", "-f", dump.to_str().unwrap()]);
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    let globals_file = dir.with_extension("globals.sql");
    std::fs::write(&globals_file, &globals.stdout).unwrap();
    drop(source);

    // A fresh cluster (same port, new data directory): roles (the one that exists already is
    // an error psql reports and goes past), then the database in one transaction.
    let target = ScratchCluster::start(&dir, port);
    target.tool("psql", &["-q", "-d", "postgres", "-f", globals_file.to_str().unwrap()]);
    let out = target.tool("pg_restore", &["--single-transaction", "--exit-on-error", "-d", "postgres", dump.to_str().unwrap()]);
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_file(&dump);
    let _ = std::fs::remove_file(&globals_file);
    let mut c = target.client();
    assert_eq!(state(&mut c), before, "definitions, snapshots, history and the audit log, as they were");
    let row = c.query_one("SELECT relid::text, key_attnums, key_columns FROM retl.sync_sources JOIN retl.syncs s ON s.id = sync_id WHERE s.name = 'live'", &[]).unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, Vec<i16>>(1), row.get::<_, Vec<String>>(2)),
        ("customers".to_string(), vec![1], vec!["id".to_string()]),
        "the key column is found again by name"
    );

    // Nothing is sent again.
    fake.clear_journal();
    let run = run_sync(&mut c, "mirror");
    assert_eq!((run.status.as_str(), run.inserts + run.updates + run.deletes, fake.request_count()), ("succeeded", 0, 0), "{run:?}");
    // A commit wakes the on-change sync, which plans only the key it touched.
    c.batch_execute("UPDATE customers SET score = 99 WHERE id = 2").unwrap();
    wait_until(Duration::from_secs(30), "the on-change run after the restore", || {
        c.query_one(
            "SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
              WHERE s.name = 'live' AND r.trigger = 'change' AND r.status = 'succeeded'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
    });
    let row = c
        .query_one(
            "SELECT r.plan_scope, r.planned_updates, r.delivered FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
              WHERE s.name = 'live' AND r.trigger = 'change'",
            &[],
        )
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), ("changed keys".to_string(), 1, 1));
    assert_eq!(keys_in_request(&fake, 0), [key(2)].into_iter().collect());
    assert_eq!(fake.records()[&key(2)]["score"], 99);
    drop(c);
    drop(target);
}
