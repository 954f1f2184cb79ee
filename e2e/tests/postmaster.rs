//! Postmaster death ends the workers (they sleep with WL_EXIT_ON_PM_DEATH), and the server
//! started again brings them back. This test kills the test cluster's postmaster and starts
//! the cluster again with scripts/cluster.sh, so it must run alone (`make e2e` runs test
//! files one after another).
mod common;
use common::*;
use std::time::{Duration, Instant};

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn postmaster_death_ends_the_workers_and_a_restart_brings_them_back() {
    let mut c = connect();
    ensure_extension(&mut c);
    let postmaster: i32 = c
        .query_one(
            "SELECT split_part(pg_read_file(current_setting('data_directory') || '/postmaster.pid'), E'\\n', 1)::int",
            &[],
        )
        .unwrap()
        .get(0);
    let workers: Vec<i32> = c
        .query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_reverse_etl worker'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(workers.len(), 2);
    drop(c);

    assert_eq!(unsafe { kill(postmaster, 9) }, 0, "kill -9 the postmaster {postmaster}");
    let killed = Instant::now();
    wait_until(Duration::from_secs(5), "the workers to exit", || workers.iter().all(|&p| !alive(p)));
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(2), "the workers outlived the postmaster by {took:?}");

    // Start the cluster again once the dead postmaster is reaped (until then pg_ctl takes its
    // zombie for a running server) and every other backend has noticed and exited.
    wait_until(Duration::from_secs(60), "the postmaster to be reaped", || {
        !std::path::Path::new(&format!("/proc/{postmaster}")).exists()
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster.sh");
    wait_until(Duration::from_secs(60), "the cluster to start again", || {
        std::process::Command::new(script).arg("start").status().map(|s| s.success()).unwrap_or(false)
    });
    let mut c = retl_e2e::cluster::reconnect(Duration::from_secs(60));
    wait_until(Duration::from_secs(30), "both workers to run again", || {
        c.query_one("SELECT count(*) FROM retl.worker_status() WHERE pid <> 0 AND state <> 'stopped'", &[])
            .map(|r| r.get::<_, i64>(0) == 2)
            .unwrap_or(false)
    });
    // And they work.
    let fake = FakeWebhook::start();
    let mut f = Fixture::new(&fake.url(), 2, "upsert", "", None);
    assert_eq!(f.run().delivered, 2);
}
