//! Small HTTP helpers shared by the fake servers: the server thread itself ([`FakeServer`]),
//! request headers, percent-decoding, form bodies, and (for their unit tests) a minimal
//! HTTP/1.1 client.

use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use crate::http_server::{Request, Server};

/// An HTTP server ([`crate::http_server`]) on 127.0.0.1 whose requests go, one at a time and in arrival order, to a
/// handler on a thread of its own. Dropping it stops the thread once the requests already
/// received are handled, and waits for that.
pub(crate) struct FakeServer {
    server: Arc<Server>,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Starts on a free port; panics when it cannot. `name` (e.g. `HubSpot`) names the fake
    /// in that panic and its thread (`fake-hubspot`).
    pub(crate) fn start(name: &str, handler: impl FnMut(Request) + Send + 'static) -> FakeServer {
        FakeServer::try_start(name, 0, handler)
            .unwrap_or_else(|e| panic!("fake {name}: cannot start the server: {e}"))
    }

    /// Starts on `port` (0: a free one).
    pub(crate) fn try_start(
        name: &str,
        port: u16,
        mut handler: impl FnMut(Request) + Send + 'static,
    ) -> io::Result<FakeServer> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        let server = Arc::new(Server::from_listener(listener)?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (server, stop) = (server.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("fake-{}", name.to_lowercase().replace(' ', "-")))
                .spawn(move || loop {
                    match server.recv() {
                        Ok(request) => handler(request),
                        // `drop` sets `stop`, then its `unblock` makes `recv` fail once the
                        // requests queued before it are handled.
                        Err(_) if stop.load(Ordering::SeqCst) => return,
                        // An accept error must not end the fake: open connections may go on.
                        Err(_) => {}
                    }
                })?
        };
        Ok(FakeServer {
            server,
            port,
            stop,
            thread: Some(thread),
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The value of the request header `name`, matched case-insensitively (the first one when
/// the header is repeated).
pub(crate) fn request_header(request: &crate::http_server::Request, name: &str) -> Option<String> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

/// `%XX` escapes decoded to bytes and the result read as UTF-8 (invalid sequences become
/// U+FFFD); `+` is a space when `plus_is_space` (form bodies) and kept as is otherwise (paths).
/// A `%` not followed by two hex digits is kept literally, as lenient form decoders do.
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The fields of an `application/x-www-form-urlencoded` text, in order and repeats included:
/// `a=1&b=x%20y+z&&c` → [("a","1"), ("b","x y z"), ("c","")]. Empty pairs are skipped; a
/// pair without `=` has an empty value.
pub(crate) fn form_fields(form: &str) -> Vec<(String, String)> {
    form.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// A minimal HTTP/1.1 client for the fakes' unit tests: one request per connection, the
/// response read to EOF.
#[cfg(test)]
pub(crate) mod client {
    use serde_json::Value;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub(crate) struct Reply {
        pub(crate) status: u16,
        pub(crate) headers: Vec<(String, String)>,
        pub(crate) body: String,
    }

    impl Reply {
        /// The body as JSON; panics (showing the body) when it is not.
        pub(crate) fn json(&self) -> Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
        }

        /// The first response header called `name`, matched case-insensitively.
        pub(crate) fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Sends one request to `addr` (`127.0.0.1:PORT`, also used as the `Host` header) with
    /// `Connection: close` and `Content-Length`, then the given headers and body.
    pub(crate) fn send(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response head");
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }
}
