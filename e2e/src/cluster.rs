//! Helpers for end-to-end tests against the Postgres cluster the Makefile starts
//! (extension preloaded). Connection settings come from the usual libpq variables.

use postgres::{Client, Config, NoTls};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The connection settings [`connect_as`] uses, for a caller that needs more (a notice
/// callback, say).
pub fn config(user: &str, password: &str) -> Config {
    let port = env_or("PGPORT", "28815");
    let port: u16 = port
        .parse()
        .unwrap_or_else(|_| panic!("PGPORT is not a port number: {port:?}"));
    let mut cfg = Config::new();
    cfg.host(&env_or("PGHOST", "127.0.0.1"))
        .port(port)
        .user(user)
        .password(password)
        .dbname(&env_or("PGDATABASE", "postgres"))
        .application_name("retl-e2e")
        .connect_timeout(Duration::from_secs(10));
    cfg
}

/// Connects as `PGUSER`/`PGPASSWORD` (defaults: postgres / retl-dev on 127.0.0.1:28815).
pub fn connect() -> Client {
    connect_as(
        &env_or("PGUSER", "postgres"),
        &env_or("PGPASSWORD", "retl-dev"),
    )
}

/// Like [`connect`], to another database of the same cluster.
pub fn connect_db(dbname: &str) -> Client {
    let mut cfg = config(&env_or("PGUSER", "postgres"), &env_or("PGPASSWORD", "retl-dev"));
    cfg.dbname(dbname);
    cfg.connect(NoTls).unwrap_or_else(|e| panic!("cannot connect to database {dbname}: {e}"))
}

/// Like [`connect`], but `None` while the server is not accepting connections (e.g. during
/// crash recovery).
pub fn try_connect() -> Option<Client> {
    config(&env_or("PGUSER", "postgres"), &env_or("PGPASSWORD", "retl-dev"))
        .connect(NoTls)
        .ok()
}

/// Waits (up to `timeout`) until the server accepts connections again, e.g. after a crash
/// restart, and connects.
pub fn reconnect(timeout: Duration) -> Client {
    let mut client = None;
    wait_until(timeout, "the server to accept connections again", || {
        client = try_connect();
        client.is_some()
    });
    client.expect("connected")
}

/// Connects as another role, same host, port and database as [`connect`].
pub fn connect_as(user: &str, password: &str) -> Client {
    let cfg = config(user, password);
    cfg.connect(NoTls).unwrap_or_else(|e| {
        panic!(
            "cannot connect to Postgres as {user} at {:?}:{:?} ({e}); is the test cluster running (make)?",
            cfg.get_hosts(),
            cfg.get_ports()
        )
    })
}

/// A fresh lower-case identifier: `prefix` + pid + per-process counter + a short time
/// component, so names from parallel tests and from earlier runs on the same cluster do
/// not collide. Characters outside `[a-z0-9_]` in `prefix` become `_`; at most 63 bytes.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut name: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        name.insert(0, '_');
    }
    let suffix = format!("_{}_{n}_{}", std::process::id(), millis % 1_000_000);
    // Postgres truncates identifiers at 63 bytes; cut the prefix, never the unique part.
    name.truncate(63usize.saturating_sub(suffix.len()));
    name + &suffix
}

/// Polls `f` every 20 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (SQLSTATE code, message) of a server error; ("", display text) for client-side errors.
pub fn error_text(e: &postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_string(), db.message().to_string()),
        None => (String::new(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_valid_and_distinct() {
        let a = unique("Sync-A");
        let b = unique("Sync-A");
        assert_ne!(a, b);
        assert!(a.starts_with("sync_a_"), "{a}");
        assert!(unique("9x").starts_with("_9x_"));
        let long = unique(&"p".repeat(100));
        assert!(long.len() <= 63);
        for n in [&a, &long] {
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{n}"
            );
        }
    }

    #[test]
    fn wait_until_returns_and_times_out() {
        let mut calls = 0;
        wait_until(Duration::from_secs(1), "third call", || {
            calls += 1;
            calls == 3
        });
        let r =
            std::panic::catch_unwind(|| wait_until(Duration::from_millis(50), "never", || false));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("never"), "{msg}");
    }
}
