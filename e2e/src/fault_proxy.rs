//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1, put between the extension and a fake
//! destination: faults the fakes cannot produce themselves (reset connections, answers cut
//! short or replaced after the destination applied the request, a destination that accepts
//! a request and then hangs, storms of 5xx or 429).
//!
//! Requests are read one at a time from each client connection (Content-Length bodies, as
//! the extension sends), and each is forwarded on a fresh upstream connection with
//! `Connection: close`, so a fault applies to exactly one request whatever the client's
//! connection reuse.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What happens to one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The connection is reset as soon as the request is read: the destination never sees it.
    ResetBeforeForwarding,
    /// The destination applies the request, then the connection is reset without an answer.
    ResetAfterForwarding,
    /// The destination applies the request; only the first half of its answer arrives.
    TruncateAnswer,
    /// The destination applies the request; its answer's body is replaced by this one (with
    /// correct framing): malformed JSON, or results for only part of the batch.
    ReplaceBody(String),
    /// The destination applies the request, and the connection then stays open without an
    /// answer for this long.
    HangAfterForwarding(Duration),
}

struct Storm {
    status: u16,
    retry_after: Option<String>,
    until: Instant,
}

#[derive(Default)]
struct State {
    faults: VecDeque<Fault>,
    storm: Option<Storm>,
    /// (when, what) for every request: "forwarded", a fault's name, or "storm 503".
    log: Vec<(Instant, String)>,
}

pub struct FaultProxy {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Proxies to `upstream` (`http://127.0.0.1:PORT/...`; only host and port are used).
    pub fn start(upstream: &str) -> FaultProxy {
        let authority = upstream.trim_start_matches("http://").split('/').next().unwrap_or_default().to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("fault proxy: bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, halt) = (state.clone(), stop.clone());
        std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let (st, upstream, halt) = (st.clone(), authority.clone(), halt.clone());
                            std::thread::spawn(move || serve(client, &upstream, &st, &halt));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                        Err(_) => break,
                    }
                }
            })
            .unwrap();
        FaultProxy { port, state, stop }
    }

    /// The proxy's URL for `path` (e.g. "/hook").
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Faults for the next requests, in arrival order; requests beyond them are forwarded.
    pub fn script(&self, faults: Vec<Fault>) {
        self.state.lock().unwrap().faults.extend(faults);
    }

    /// For `duration` from now, every request is answered with `status` (and Retry-After)
    /// without reaching the destination.
    pub fn storm(&self, status: u16, retry_after: Option<&str>, duration: Duration) {
        self.state.lock().unwrap().storm =
            Some(Storm { status, retry_after: retry_after.map(str::to_string), until: Instant::now() + duration });
    }

    /// What happened to each request so far, in arrival order.
    pub fn log(&self) -> Vec<(Instant, String)> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(mut client: TcpStream, upstream: &str, state: &Mutex<State>, stop: &AtomicBool) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buffered = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(request) = read_message(&mut client, &mut buffered) else { return };
        let (fault, storm) = {
            let mut st = state.lock().unwrap();
            let storm = st.storm.as_ref().filter(|s| Instant::now() < s.until).map(|s| (s.status, s.retry_after.clone()));
            let fault = if storm.is_some() { None } else { st.faults.pop_front() };
            let what = match (&storm, &fault) {
                (Some((status, _)), _) => format!("storm {status}"),
                (None, Some(fault)) => format!("{fault:?}"),
                (None, None) => "forwarded".to_string(),
            };
            st.log.push((Instant::now(), what));
            (fault, storm)
        };
        if let Some((status, retry_after)) = storm {
            let body = format!("{{\"error\":\"storm {status}\"}}");
            let retry = retry_after.map(|r| format!("Retry-After: {r}\r\n")).unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 {status} Storm\r\nContent-Type: application/json\r\n{retry}Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if client.write_all(answer.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        if fault == Some(Fault::ResetBeforeForwarding) {
            reset(client);
            return;
        }
        let Some(answer) = forward(upstream, &request) else {
            reset(client);
            return;
        };
        match fault {
            None | Some(Fault::ResetBeforeForwarding) => {
                if client.write_all(&answer).is_err() {
                    return;
                }
            }
            Some(Fault::ResetAfterForwarding) => {
                reset(client);
                return;
            }
            Some(Fault::TruncateAnswer) => {
                let _ = client.write_all(&answer[..answer.len() / 2]);
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::ReplaceBody(body)) => {
                let head_end = find(&answer, b"\r\n\r\n").unwrap_or(answer.len());
                let status_line = String::from_utf8_lossy(&answer[..head_end]).lines().next().unwrap_or_default().to_string();
                let replaced = format!(
                    "{status_line}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if client.write_all(replaced.as_bytes()).is_err() {
                    return;
                }
            }
            Some(Fault::HangAfterForwarding(hang)) => {
                let until = Instant::now() + hang;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
        }
    }
}

/// Sends `request` on a fresh connection with `Connection: close` and returns the whole answer.
fn forward(upstream: &str, request: &[u8]) -> Option<Vec<u8>> {
    let mut conn = TcpStream::connect(upstream).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let head_end = find(request, b"\r\n\r\n")?;
    let mut out = request[..head_end].to_vec();
    out.extend_from_slice(b"\r\nConnection: close");
    out.extend_from_slice(&request[head_end..]);
    conn.write_all(&out).ok()?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

/// Reads one request (head and Content-Length body) from `stream`; None at end of stream.
fn read_message(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = find(buffered, b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buffered.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffered[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    while buffered.len() < head_end + length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buffered.extend_from_slice(&chunk[..n]);
    }
    Some(buffered.drain(..head_end + length).collect())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Closes with a TCP reset (SO_LINGER 0) rather than an orderly FIN.
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Linger {
        l_onoff: i32,
        l_linger: i32,
    }
    extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, value: *const std::ffi::c_void, len: u32) -> i32;
    }
    const SOL_SOCKET: i32 = 1;
    const SO_LINGER: i32 = 13;
    let linger = Linger { l_onoff: 1, l_linger: 0 };
    unsafe {
        setsockopt(
            stream.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            &linger as *const Linger as *const std::ffi::c_void,
            std::mem::size_of::<Linger>() as u32,
        );
    }
    drop(stream);
}
