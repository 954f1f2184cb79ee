//! Local webhook receiver for the `make run` demo: the strict fake destination on a
//! fixed port, logging one line per request, plus `GET /_records` and `GET /_requests`.
//!
//! Usage: webhook-receiver [--port 8787] [--token T]

use retl_e2e::{FakeWebhook, RecordedRequest};
use std::io::Write;
use std::process::exit;

const USAGE: &str = "usage: webhook-receiver [--port 8787] [--token T]";

fn main() {
    let mut port: u16 = 8787;
    let mut token = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => match args.next().and_then(|p| p.parse().ok()) {
                Some(p) => port = p,
                None => fail("--port needs a port number"),
            },
            "--token" => match args.next() {
                Some(t) => token = Some(t),
                None => fail("--token needs a value"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument {other:?}")),
        }
    }

    let mut builder = FakeWebhook::builder()
        .port(port)
        .inspection_endpoints(true)
        .on_request(log_line);
    if let Some(t) = &token {
        builder = builder.token(t.clone());
    }
    let fake = builder
        .try_start()
        .unwrap_or_else(|e| fail(&format!("cannot listen on 127.0.0.1:{port}: {e}")));
    println!(
        "webhook-receiver listening on {} ({}); GET /_records, GET /_requests",
        fake.url(),
        if token.is_some() {
            "bearer token required"
        } else {
            "no token"
        }
    );
    let _ = std::io::stdout().flush();
    // Serve until killed; the default SIGINT/SIGTERM handling ends the process.
    loop {
        std::thread::park();
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("webhook-receiver: {msg}\n{USAGE}");
    exit(2)
}

/// `POST /hook idempotency-key=ab12cd34… 3 records: upsert {"id":1}, upsert {"id":2}, … -> 200`
fn log_line(r: &RecordedRequest) {
    let mut line = format!("{} {}", r.method, r.path);
    if let Some(k) = r.header("idempotency-key") {
        let short: String = k.chars().take(8).collect();
        let ellipsis = if short.len() < k.len() { "…" } else { "" };
        line += &format!(" idempotency-key={short}{ellipsis}");
    }
    if let Some(records) = r
        .body
        .as_ref()
        .and_then(|b| b.get("records"))
        .and_then(|v| v.as_array())
    {
        let shown: Vec<String> = records
            .iter()
            .take(3)
            .map(|rec| format!("{} {}", rec["op"].as_str().unwrap_or("?"), rec["key"]))
            .collect();
        let more = if records.len() > shown.len() {
            ", …"
        } else {
            ""
        };
        line += &format!(" {} records: {}{more}", records.len(), shown.join(", "));
    }
    line += &format!(" -> {}", r.status);
    if r.replayed {
        line += " (replay)";
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
