//! The HTTP/1.1 server under the fake destinations: one thread per connection (keep-alive
//! honoured, one request at a time per connection), every request read whole and handed over a
//! channel in arrival order to whichever thread calls [`Server::recv`].
//!
//! Why not tiny_http, which the fakes used before: its connection pool (tiny_http 0.12's
//! `TaskPool`) counts a thread that was already woken for one connection as still idle, so a
//! second connection arriving a moment later is queued behind it instead of getting a thread of
//! its own, and waits until some keep-alive connection closes. Clients saw requests go
//! unanswered for their whole 30-s timeout (a rare failure of the end-to-end tests). Measured
//! against tiny_http 0.12 with three idle keep-alive connections open: two new connections at
//! once left one request unanswered in 79 of 100 tries. The unit test
//! `new_connections_are_served_while_others_stay_open` is that scenario; a thread per
//! connection cannot starve.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Limits on what a client may send; past them the request is answered 400/413 and the
/// connection closed (real APIs refuse such requests too).
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// An idle keep-alive connection is closed after this long (hyper's pool keeps them 90 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

enum Message {
    Request(Request),
    Unblock,
}

/// A listening server. Dropping it stops accepting and closes every open connection.
pub struct Server {
    incoming: Mutex<Receiver<Message>>,
    unblocker: Sender<Message>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    stopping: AtomicBool,
    /// A handle on every open connection, to shut it down when the server is dropped; each
    /// connection's thread removes its own when it ends.
    connections: Mutex<HashMap<u64, TcpStream>>,
}

impl Shared {
    fn connections(&self) -> std::sync::MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Server {
    /// Serves connections accepted on `listener`.
    pub fn from_listener(listener: TcpListener) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared { stopping: AtomicBool::new(false), connections: Mutex::new(HashMap::new()) });
        let acceptor = {
            let (tx, shared) = (tx.clone(), shared.clone());
            std::thread::Builder::new().name("http-accept".into()).spawn(move || accept_loop(listener, tx, shared))?
        };
        Ok(Server { incoming: Mutex::new(rx), unblocker: tx, addr, shared, acceptor: Some(acceptor) })
    }

    /// The next request; an error once [`Server::unblock`] was called (after the requests
    /// queued before it).
    pub fn recv(&self) -> io::Result<Request> {
        let incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        match incoming.recv() {
            Ok(Message::Request(request)) => Ok(request),
            Ok(Message::Unblock) | Err(_) => Err(io::Error::new(io::ErrorKind::Interrupted, "server unblocked")),
        }
    }

    /// The next request within `timeout`, or `None`.
    pub fn recv_timeout(&self, timeout: Duration) -> io::Result<Option<Request>> {
        let incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        match incoming.recv_timeout(timeout) {
            Ok(Message::Request(request)) => Ok(Some(request)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Ok(Message::Unblock) | Err(RecvTimeoutError::Disconnected) => {
                Err(io::Error::new(io::ErrorKind::Interrupted, "server unblocked"))
            }
        }
    }

    /// Makes one pending or future `recv` return an error.
    pub fn unblock(&self) {
        let _ = self.unblocker.send(Message::Unblock);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor out of `accept`; it sees `stopping` and ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (_, connection) in self.shared.connections().drain() {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, tx: Sender<Message>, shared: Arc<Shared>) {
    for (id, stream) in (0u64..).zip(listener.incoming()) {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else {
            // Out of file descriptors, say: pause rather than spin on the error.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let Ok(handle) = stream.try_clone() else { continue };
        shared.connections().insert(id, handle);
        let (tx, shared) = (tx.clone(), shared.clone());
        let spawned = std::thread::Builder::new().name("http-connection".into()).spawn(move || {
            serve_connection(stream, tx);
            shared.connections().remove(&id);
        });
        if spawned.is_err() {
            // Out of threads: the connection is refused (its stream was moved into the closure
            // that was not run, and is closed with it).
            continue;
        }
    }
}

/// Reads requests off one connection, hands each to the server's channel and writes its
/// response before reading the next. Ends by shutting the connection down.
fn serve_connection(stream: TcpStream, tx: Sender<Message>) {
    let Ok(mut writer) = stream.try_clone() else { return };
    serve_requests(stream, &mut writer, tx);
    let _ = writer.shutdown(Shutdown::Both);
}

fn serve_requests(stream: TcpStream, writer: &mut TcpStream, tx: Sender<Message>) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let mut reader = BufReader::new(stream);
    loop {
        let request = match read_request(&mut reader, writer) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(ReadError::Broken) => return,
            Err(ReadError::Refused(status, why)) => {
                let _ = writer.write_all(&Response::from_string(why).with_status_code(status).to_bytes(false, true));
                return;
            }
        };
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let keep_alive = request.keep_alive;
        let head_only = request.method.as_str() == "HEAD";
        let request = Request { reply: Some(reply_tx), ..request };
        if tx.send(Message::Request(request)).is_err() {
            return;
        }
        // A request dropped without an answer closes its connection: the client sees what it
        // would see from a crashed server.
        let Ok(response) = reply_rx.recv() else { return };
        if writer.write_all(&response.to_bytes(head_only, !keep_alive)).is_err() || !keep_alive {
            return;
        }
    }
}

enum ReadError {
    /// The connection failed, timed out or ended in the middle of a request.
    Broken,
    /// The request breaks HTTP/1.1; answered with this status and text.
    Refused(u16, String),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Broken
    }
}

fn refused(status: u16, why: impl Into<String>) -> ReadError {
    ReadError::Refused(status, why.into())
}

/// One request, body included; `None` when the client closed the connection between requests.
fn read_request(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) -> Result<Option<Request>, ReadError> {
    let mut head_bytes = 0;
    let request_line = loop {
        match read_line(reader, &mut head_bytes)? {
            None => return Ok(None),
            // RFC 9112 2.2: a server should ignore empty lines before the request line.
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(url), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(refused(400, format!("malformed request line {request_line:?}")));
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(refused(505, format!("unsupported HTTP version {version:?}"))),
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) || !url.starts_with('/') {
        return Err(refused(400, format!("malformed request line {request_line:?}")));
    }
    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(reader, &mut head_bytes)? else {
            return Err(ReadError::Broken);
        };
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(refused(400, format!("malformed header line {line:?}")));
        };
        let header = Header::from_bytes(name, value.trim()).map_err(|_| refused(400, format!("malformed header line {line:?}")))?;
        headers.push(header);
    }
    let header = |name: &str| headers.iter().find(|h| h.field.equiv(name)).map(|h| h.value.to_ascii_lowercase());
    let connection = header("Connection").unwrap_or_default();
    let keep_alive = if http10 { connection.contains("keep-alive") } else { !connection.contains("close") };
    if header("Expect").as_deref() == Some("100-continue") {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = match (header("Transfer-Encoding"), header("Content-Length")) {
        (Some(te), None) if te == "chunked" => read_chunked(reader)?,
        (Some(te), _) => return Err(refused(400, format!("unsupported Transfer-Encoding {te:?} (with Content-Length or not chunked)"))),
        (None, Some(length)) => {
            let length: usize = length.parse().map_err(|_| refused(400, format!("malformed Content-Length {length:?}")))?;
            if length > MAX_BODY_BYTES {
                return Err(refused(413, format!("body of {length} bytes is over {MAX_BODY_BYTES}")));
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body)?;
            body
        }
        (None, None) => Vec::new(),
    };
    Ok(Some(Request {
        method: Method(method.to_string()),
        url: url.to_string(),
        headers,
        body: Cursor::new(body),
        keep_alive,
        reply: None,
    }))
}

/// A CRLF-terminated line without its CRLF (a bare LF is accepted, as RFC 9112 allows); `None`
/// at a clean end of stream before any byte of the line.
fn read_line(reader: &mut BufReader<TcpStream>, head_bytes: &mut usize) -> Result<Option<String>, ReadError> {
    let mut line = Vec::new();
    let limit = (MAX_HEAD_BYTES - *head_bytes) as u64 + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', &mut line)?;
    *head_bytes += n;
    if n == 0 {
        return Ok(None);
    }
    if *head_bytes > MAX_HEAD_BYTES {
        return Err(refused(431, format!("request head over {MAX_HEAD_BYTES} bytes")));
    }
    if line.pop() != Some(b'\n') {
        return Err(ReadError::Broken);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map(Some).map_err(|_| refused(400, "request head is not UTF-8"))
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    let mut head_bytes = 0;
    loop {
        let Some(size_line) = read_line(reader, &mut head_bytes)? else {
            return Err(ReadError::Broken);
        };
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| refused(400, format!("malformed chunk size {size_line:?}")))?;
        if body.len() + size > MAX_BODY_BYTES {
            return Err(refused(413, format!("body over {MAX_BODY_BYTES} bytes")));
        }
        if size == 0 {
            // Trailer fields, then the final empty line.
            while read_line(reader, &mut head_bytes)?.is_some_and(|l| !l.is_empty()) {}
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(refused(400, "chunk not followed by CRLF"));
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A request method, as sent (`GET`, `POST`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Method(String);

impl Method {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A header field name, compared case-insensitively.
#[derive(Clone, Debug)]
pub struct HeaderField(String);

impl HeaderField {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn equiv(&self, name: &str) -> bool {
        self.0.eq_ignore_ascii_case(name)
    }
}

#[derive(Clone, Debug)]
pub struct Header {
    pub field: HeaderField,
    pub value: String,
}

impl Header {
    /// A header from a token name and a value of visible ASCII and spaces; `Err` otherwise.
    #[allow(clippy::result_unit_err)]
    pub fn from_bytes(name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<Header, ()> {
        let (name, value) = (name.as_ref(), value.as_ref());
        if name.is_empty() || !name.iter().copied().all(is_token_byte) {
            return Err(());
        }
        if !value.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)) {
            return Err(());
        }
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| ());
        Ok(Header { field: HeaderField(text(name)?), value: text(value)? })
    }
}

/// A request read whole. Answer it with [`Request::respond`]; one dropped unanswered closes its
/// connection.
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<Header>,
    body: Cursor<Vec<u8>>,
    keep_alive: bool,
    reply: Option<SyncSender<Response>>,
}

impl Request {
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request target: path and query, as sent.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The body (already read from the connection).
    pub fn as_reader(&mut self) -> &mut dyn Read {
        &mut self.body
    }

    /// The body's bytes not yet read, taken without a copy (a large body is a few hundred
    /// kilobytes for the benchmark's receiver).
    pub fn take_body(&mut self) -> Vec<u8> {
        let position = self.body.position() as usize;
        let mut body = std::mem::take(self.body.get_mut());
        body.drain(..position.min(body.len()));
        body
    }

    pub fn respond(mut self, response: Response) -> io::Result<()> {
        let reply = self.reply.take().ok_or_else(|| io::Error::other("request has no connection"))?;
        reply.send(response).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

/// A response: status, headers and a body of known length (always sent with Content-Length).
pub struct Response {
    status: u16,
    headers: Vec<Header>,
    body: Vec<u8>,
}

impl Response {
    /// 200 with `text/plain; charset=UTF-8` unless a Content-Type header replaces it.
    pub fn from_string(body: impl Into<String>) -> Response {
        Response {
            status: 200,
            headers: vec![Header::from_bytes("Content-Type", "text/plain; charset=UTF-8").expect("valid header")],
            body: body.into().into_bytes(),
        }
    }

    pub fn with_status_code(mut self, status: u16) -> Response {
        self.status = status;
        self
    }

    pub fn with_header(mut self, header: Header) -> Response {
        self.add_header(header);
        self
    }

    /// Adds a header; a Content-Type replaces the current one. Content-Length, Connection and
    /// Transfer-Encoding are the server's to set and are ignored.
    pub fn add_header(&mut self, header: Header) {
        if ["Content-Length", "Connection", "Transfer-Encoding"].iter().any(|n| header.field.equiv(n)) {
            return;
        }
        if header.field.equiv("Content-Type") {
            self.headers.retain(|h| !h.field.equiv("Content-Type"));
        }
        self.headers.push(header);
    }

    fn to_bytes(&self, head_only: bool, close: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status)).into_bytes();
        for h in &self.headers {
            out.extend_from_slice(format!("{}: {}\r\n", h.field.as_str(), h.value).as_bytes());
        }
        out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        207 => "Multi-Status",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn bound() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    fn echo_server() -> (Arc<Server>, SocketAddr) {
        let (listener, addr) = bound();
        let server = Arc::new(Server::from_listener(listener).unwrap());
        let s = server.clone();
        std::thread::spawn(move || {
            while let Ok(mut request) = s.recv() {
                let mut body = String::new();
                request.as_reader().read_to_string(&mut body).unwrap();
                let text = format!("{} {} {}", request.method(), request.url(), body);
                let _ = request.respond(Response::from_string(text));
            }
        });
        (server, addr)
    }

    fn send(stream: &mut TcpStream, raw: &str) {
        stream.write_all(raw.as_bytes()).unwrap();
    }

    /// Reads one response; its status line and body.
    fn answer(stream: &TcpStream) -> Option<(String, String)> {
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).ok().filter(|&n| n > 0)?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).ok().filter(|&n| n > 0)?;
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        Some((status.trim_end().to_string(), String::from_utf8(body).unwrap()))
    }

    /// The failure tiny_http had: with connections held open (keep-alive, idle), new
    /// connections arriving together must still each be answered at once.
    #[test]
    fn new_connections_are_served_while_others_stay_open() {
        for _ in 0..10 {
            let (_server, addr) = echo_server();
            let mut held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
            for s in &mut held {
                send(s, "GET /held HTTP/1.1\r\nHost: x\r\n\r\n");
                assert_eq!(answer(s).unwrap().1, "GET /held ");
            }
            let mut fresh: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
            let started = Instant::now();
            for s in &mut fresh {
                send(s, "GET /fresh HTTP/1.1\r\nHost: x\r\n\r\n");
            }
            for s in &fresh {
                assert_eq!(answer(s).expect("answered within 2 s").1, "GET /fresh ");
            }
            assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        }
    }

    #[test]
    fn keep_alive_bodies_and_chunked() {
        let (_server, addr) = echo_server();
        let mut s = TcpStream::connect(addr).unwrap();
        send(&mut s, "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(answer(&s).unwrap(), ("HTTP/1.1 200 OK".into(), "POST /a hello".into()));
        send(&mut s, "PUT /b?x=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext\r\nde\r\n0\r\n\r\n");
        assert_eq!(answer(&s).unwrap().1, "PUT /b?x=1 abcde");
        send(&mut s, "DELETE /c HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(answer(&s).unwrap().1, "DELETE /c ");
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed after Connection: close");
    }

    #[test]
    fn malformed_requests_are_refused() {
        let (_server, addr) = echo_server();
        for (raw, status) in [
            ("GET /\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            ("GET / HTTP/2.0\r\n\r\n", "HTTP/1.1 505 HTTP Version Not Supported"),
            ("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            ("GET / HTTP/1.1\r\nno colon\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ] {
            let mut s = TcpStream::connect(addr).unwrap();
            send(&mut s, raw);
            assert_eq!(answer(&s).unwrap().0, status, "{raw:?}");
        }
    }

    #[test]
    fn unanswered_request_closes_its_connection_and_unblock_ends_recv() {
        let (listener, addr) = bound();
        let server = Server::from_listener(listener).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        send(&mut s, "GET / HTTP/1.1\r\n\r\n");
        drop(server.recv().unwrap());
        assert!(answer(&s).is_none());
        server.unblock();
        assert!(server.recv().is_err());
        assert!(server.recv_timeout(Duration::from_millis(10)).unwrap().is_none());
    }

    #[test]
    fn headers() {
        assert!(Header::from_bytes("Idempotency-Key", "abc-1").is_ok());
        assert!(Header::from_bytes("Bad Name", "x").is_err());
        assert!(Header::from_bytes("X", "a\r\nInjected: 1").is_err());
        let response = Response::from_string("{}")
            .with_header(Header::from_bytes("content-type", "application/json").unwrap())
            .with_header(Header::from_bytes("Connection", "keep-alive").unwrap())
            .with_status_code(429);
        let text = String::from_utf8(response.to_bytes(false, false)).unwrap();
        assert_eq!(text, "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nContent-Length: 2\r\n\r\n{}");
    }
}
