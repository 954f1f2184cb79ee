//! The destination of the scale benchmark (`bench/scale.py`, `make bench`): the strict
//! webhook fake built for volume ([`retl_e2e::fake_throttled::ThrottledWebhook`]: it checks
//! every request against the webhook contract and keeps each record as a hash, so 10M rows
//! fit), unthrottled or with a rate limit it enforces itself (429 with Retry-After), plus a
//! statistics endpoint on the next port.
//!
//! Usage: bench-receiver --port P [--rate R] [--max-batch N]
//!   POST http://127.0.0.1:P/hook         the webhook (R requests/s, burst R; default: no limit)
//!   GET  http://127.0.0.1:P+1/stats      totals and per-sync counts as JSON
//!   GET  http://127.0.0.1:P+1/stats?arrivals=SYNC   ... with that sync's arrival times

use retl_e2e::fake_throttled::ThrottledWebhook;
use retl_e2e::http_server::{Header, Response, Server};
use serde_json::{json, Map, Value};
use std::net::TcpListener;
use std::process::exit;
use std::time::Duration;

// The receiver shares the benchmark machine's two cores with the extension, so every
// microsecond it spends per record is one the measured side loses. With the system allocator
// it spent over half its time in malloc and free (a parsed body is a tree of small
// allocations): 28 µs of CPU per record in a 100k-row run, 10-12 µs with mimalloc. What the
// receiver checks and keeps is unchanged.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: bench-receiver --port P [--rate R] [--max-batch N]";

fn main() {
    let (mut port, mut rate, mut max_batch) = (0u16, None::<f64>, 1000usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| fail(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--port" => port = value.parse().unwrap_or_else(|_| fail("--port needs a port number")),
            "--rate" => rate = Some(value.parse().ok().filter(|r: &f64| *r > 0.0).unwrap_or_else(|| fail("--rate must be > 0"))),
            "--max-batch" => max_batch = value.parse().ok().filter(|n| *n > 0).unwrap_or_else(|| fail("--max-batch must be > 0")),
            _ => fail(&format!("unknown argument {arg:?}")),
        }
    }
    if port == 0 || port == u16::MAX {
        fail("--port needs a port number below 65535 (the statistics take the next one)");
    }
    // "Unthrottled": a budget no client on this machine can reach.
    let fake = ThrottledWebhook::start_on(port, rate.unwrap_or(1e9), Duration::from_millis(20), max_batch)
        .unwrap_or_else(|e| fail(&format!("cannot listen on 127.0.0.1:{port}: {e}")));
    let stats = TcpListener::bind(("127.0.0.1", port + 1))
        .and_then(Server::from_listener)
        .unwrap_or_else(|e| fail(&format!("cannot listen on 127.0.0.1:{}: {e}", port + 1)));
    println!("bench-receiver: {} (rate {}), statistics on http://127.0.0.1:{}/stats", fake.url(), rate.map_or("unlimited".into(), |r| r.to_string()), port + 1);
    while let Ok(request) = stats.recv() {
        let arrivals_of = request.url().split_once("?arrivals=").map(|(_, s)| s.to_string());
        let body = statistics(&fake, arrivals_of.as_deref());
        let response = Response::from_string(body.to_string())
            .with_header(Header::from_bytes("Content-Type", "application/json").expect("valid header"));
        let _ = request.respond(response);
    }
}

fn statistics(fake: &ThrottledWebhook, arrivals_of: Option<&str>) -> Value {
    let t = fake.totals();
    let mut syncs = Map::new();
    for (name, c) in fake.per_sync() {
        let held = fake.held(&name);
        let mut s = json!({
            "requests": c.requests, "records": c.records, "creates": c.creates, "updates": c.updates,
            "deletes": c.deletes, "redundant": c.redundant, "absent_deletes": c.absent_deletes,
            "duplicate_inserts": c.duplicate_inserts, "held": held,
        });
        if arrivals_of == Some(name.as_str()) {
            s["arrivals"] = json!(c.arrivals);
        }
        syncs.insert(name, s);
    }
    json!({
        "requests": t.requests, "throttled": t.throttled, "replays": t.replays, "invalid": t.invalid,
        "invalid_reasons": t.invalid_reasons, "max_in_1s": t.max_in_1s, "syncs": syncs,
    })
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-receiver: {msg}\n{USAGE}");
    exit(2)
}
