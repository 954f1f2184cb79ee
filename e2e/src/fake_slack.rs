//! A strict local fake of the two ways a Slack destination connector posts messages:
//!
//! * **incoming webhooks** — `POST /services/{secret_path}` with a JSON body; the secret path
//!   names the channel, no credentials are sent. Slack answers them in plain text: `ok` (200),
//!   or an error code with a 4xx status (`invalid_payload`, `no_text`, `msg_too_long`,
//!   `invalid_blocks` 400; `no_service`, `channel_not_found` 404; `channel_is_archived` 410;
//!   `rate_limited` 429);
//! * **the Web API method `chat.postMessage`** — `POST /api/chat.postMessage` with
//!   `Authorization: Bearer <bot token>` and a JSON (or, as Slack also accepts, form-encoded)
//!   body. Slack answers Web API errors with HTTP 200 and `{"ok": false, "error": ...}`; only
//!   rate limiting (429, `ratelimited`) and unknown methods (404, `unknown_method`) change the
//!   status.
//!
//! Strictness: a request the real service would refuse is refused here too, with Slack's error
//! codes — a lenient fake would let connector bugs through the end-to-end tests. Messages need
//! non-empty `text`, `blocks` or `attachments`; `text` may hold at most 40 000 characters
//! (`msg_too_long`); webhook bodies may only carry the members an incoming webhook knows; the
//! channel must exist and not be archived; the bot token must be the one given to
//! [`FakeSlack::start`] and not revoked. Rate limiting is scriptable
//! ([`FakeSlack::throttle_next`]) and Slack's "about one message per second per channel, short
//! bursts allowed" limit can be enforced ([`FakeSlack::enforce_channel_rate`]): a token bucket
//! per channel holding 2 messages and refilled at 1 per second, shared by both paths. Every
//! request, refused or not, is journaled in [`FakeSlack::calls`] with its final status.
//!
//! Not modelled: Web API arguments in the query string (GET), `not_in_channel` (the bot may post
//! everywhere), threads (`thread_ts` must only be a string), message updates and deletes, and
//! Block Kit beyond "each block is an object with a `type`, at most 50 blocks". A request that
//! needs them is refused rather than answered wrongly.

use crate::http_util::{form_fields, request_header, FakeServer};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use crate::http_server::{Header, Request, Response};

/// Slack's limit on a message's `text`, in characters.
const MAX_TEXT: usize = 40_000;
/// Block Kit's limit on the blocks of one message.
const MAX_BLOCKS: usize = 50;
/// Slack's limit on the attachments of one message.
const MAX_ATTACHMENTS: usize = 100;
/// Messages a channel's bucket holds when full (the burst Slack tolerates).
const CHANNEL_BURST: f64 = 2.0;
/// Messages per second the channel's bucket refills with.
const CHANNEL_RATE: f64 = 1.0;
/// The top-level members an incoming-webhook payload may carry.
const WEBHOOK_MEMBERS: [&str; 10] = [
    "text",
    "blocks",
    "attachments",
    "mrkdwn",
    "unfurl_links",
    "unfurl_media",
    "thread_ts",
    "username",
    "icon_emoji",
    "icon_url",
];

/// One request as the fake saw and answered it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The request target as sent (path and query).
    pub path: String,
    pub status: u16,
    /// The body as JSON; a form-encoded body as an object of its (string) fields; `None` when
    /// it is neither.
    pub body: Option<Value>,
    /// The `Authorization` header's value as sent.
    pub authorization: Option<String>,
}

/// A message posted to a channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The channel id.
    pub channel: String,
    /// The message's `text` ("" when it was posted with blocks or attachments only).
    pub text: String,
    /// Slack's message timestamp, unique across the fake: `seconds.micros`.
    pub ts: String,
    /// `"webhook"` or `"api"`.
    pub via: String,
}

struct Channel {
    name: String,
    archived: bool,
}

/// A channel's rate-limit bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct State {
    /// Channels by id.
    channels: HashMap<String, Channel>,
    /// Webhook secret path -> channel id.
    webhooks: HashMap<String, String>,
    messages: Vec<Message>,
    calls: Vec<Call>,
    throttle_next: usize,
    channel_rate: bool,
    buckets: HashMap<String, Bucket>,
    token_revoked: bool,
    /// The last `ts` handed out, in microseconds since the epoch.
    last_ts: u128,
}

impl State {
    /// The id of the channel `channel` names: an id, or a name with or without '#'.
    fn resolve(&self, channel: &str) -> Option<String> {
        if let Some(name) = channel.strip_prefix('#') {
            return self.by_name(name);
        }
        if self.channels.contains_key(channel) {
            return Some(channel.to_string());
        }
        self.by_name(channel)
    }

    fn by_name(&self, name: &str) -> Option<String> {
        self.channels
            .iter()
            .find(|(_, c)| c.name == name)
            .map(|(id, _)| id.clone())
    }

    /// Takes one message from the channel's bucket; false when rate limiting is on and the
    /// bucket is empty.
    fn admit(&mut self, channel: &str) -> bool {
        if !self.channel_rate {
            return true;
        }
        let now = Instant::now();
        let bucket = self.buckets.entry(channel.to_string()).or_insert(Bucket {
            tokens: CHANNEL_BURST,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * CHANNEL_RATE;
        bucket.tokens = (bucket.tokens + refill).min(CHANNEL_BURST);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A new message timestamp, later than every one before.
    fn next_ts(&mut self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        self.last_ts = now.max(self.last_ts + 1);
        format!(
            "{}.{:06}",
            self.last_ts / 1_000_000,
            self.last_ts % 1_000_000
        )
    }

    fn post(&mut self, channel: &str, text: String, via: &str) -> String {
        let ts = self.next_ts();
        self.messages.push(Message {
            channel: channel.to_string(),
            text,
            ts: ts.clone(),
            via: via.to_string(),
        });
        ts
    }
}

pub struct FakeSlack {
    state: Arc<Mutex<State>>,
    server: FakeServer,
}

impl FakeSlack {
    /// Starts the fake on a free local port; `bot_token` (`xoxb-...`) is the token
    /// `chat.postMessage` accepts.
    pub fn start(bot_token: &str) -> FakeSlack {
        let state = Arc::new(Mutex::new(State::default()));
        let token = bot_token.to_string();
        let handler_state = state.clone();
        let server = FakeServer::start("Slack", move |request| {
            serve(request, &handler_state, &token)
        });
        FakeSlack { state, server }
    }

    /// `http://127.0.0.1:PORT`: the Web API lives under `/api/`, webhooks under `/services/`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// A channel `id` (e.g. `C0001`) called `name` (e.g. `sales`, without '#'); adding an
    /// existing id renames it and makes it live again.
    pub fn add_channel(&self, id: &str, name: &str) {
        self.state.lock().unwrap().channels.insert(
            id.to_string(),
            Channel {
                name: name.to_string(),
                archived: false,
            },
        );
    }

    /// Archives the channel: posts to it are refused from now on. Panics on an unknown id.
    pub fn archive_channel(&self, id: &str) {
        let mut st = self.state.lock().unwrap();
        let channel = st
            .channels
            .get_mut(id)
            .unwrap_or_else(|| panic!("fake Slack: no channel {id:?} to archive"));
        channel.archived = true;
    }

    /// An incoming webhook: `POST /services/{secret_path}` posts to `channel_id`. A channel
    /// that does not exist when the webhook is used answers 404 `channel_not_found`.
    pub fn add_webhook(&self, secret_path: &str, channel_id: &str) {
        self.state.lock().unwrap().webhooks.insert(
            secret_path.trim_matches('/').to_string(),
            channel_id.to_string(),
        );
    }

    /// The messages posted to the channel, in posting order.
    pub fn messages(&self, channel_id: &str) -> Vec<Message> {
        let st = self.state.lock().unwrap();
        st.messages
            .iter()
            .filter(|m| m.channel == channel_id)
            .cloned()
            .collect()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// The next `n` requests, whatever they are, get 429 with `Retry-After: 1`.
    pub fn throttle_next(&self, n: usize) {
        self.state.lock().unwrap().throttle_next = n;
    }

    /// Enforces Slack's per-channel posting rate (on) or not (off, the default): each channel
    /// may take a burst of 2 messages, then 1 per second; a message over the rate gets 429
    /// with `Retry-After: 1` and is not posted. Turning it on starts every channel full.
    pub fn enforce_channel_rate(&self, on: bool) {
        let mut st = self.state.lock().unwrap();
        st.channel_rate = on;
        st.buckets.clear();
    }

    /// The bot token is revoked: `chat.postMessage` answers `token_revoked` from now on.
    pub fn revoke_token(&self) {
        self.state.lock().unwrap().token_revoked = true;
    }
}

/// How an answer is shaped: Web API answers are JSON, webhook answers plain text.
enum Answer {
    Api(u16, Value),
    Plain(u16, &'static str),
}

impl Answer {
    fn status(&self) -> u16 {
        match self {
            Answer::Api(status, _) | Answer::Plain(status, _) => *status,
        }
    }
}

fn api_error(error: &str) -> Answer {
    Answer::Api(200, json!({"ok": false, "error": error}))
}

/// The media type of a `Content-Type` value, lower-cased, and its `charset` parameter.
fn media_type(content_type: &str) -> (String, Option<String>) {
    let mut parts = content_type.split(';');
    let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let charset = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("charset"))
        .map(|(_, v)| v.trim().trim_matches('"').to_ascii_lowercase());
    (media, charset)
}

/// The message a payload describes, checked as Slack checks it: its text (`""` when it has
/// only blocks or attachments), or the error code. `type_error` is the code for a known member
/// of the wrong type (webhooks and the Web API differ there).
fn message_text(
    payload: &Map<String, Value>,
    type_error: &'static str,
) -> Result<String, &'static str> {
    let text = match payload.get("text") {
        None | Some(Value::Null) => "",
        Some(Value::String(text)) => text.as_str(),
        Some(_) => return Err(type_error),
    };
    let blocks = match payload.get("blocks") {
        None | Some(Value::Null) => 0,
        Some(Value::Array(blocks)) => {
            let valid = |b: &Value| b.get("type").is_some_and(Value::is_string);
            if blocks.len() > MAX_BLOCKS || !blocks.iter().all(valid) {
                return Err("invalid_blocks");
            }
            blocks.len()
        }
        Some(_) => return Err("invalid_blocks_format"),
    };
    let attachments = match payload.get("attachments") {
        None | Some(Value::Null) => 0,
        Some(Value::Array(attachments)) => {
            if attachments.len() > MAX_ATTACHMENTS {
                return Err("too_many_attachments");
            }
            if !attachments.iter().all(Value::is_object) {
                return Err("invalid_attachments");
            }
            attachments.len()
        }
        Some(_) => return Err("invalid_attachments"),
    };
    if !matches!(
        payload.get("thread_ts"),
        None | Some(Value::Null) | Some(Value::String(_))
    ) {
        return Err(type_error);
    }
    if text.is_empty() && blocks == 0 && attachments == 0 {
        return Err("no_text");
    }
    if text.chars().count() > MAX_TEXT {
        return Err("msg_too_long");
    }
    Ok(text.to_string())
}

/// `POST /services/{secret}`: an incoming webhook.
fn webhook(
    st: &mut State,
    method: &str,
    secret: &str,
    content_type: Option<&str>,
    body: &str,
) -> Answer {
    let Some(channel_id) = st.webhooks.get(secret.trim_end_matches('/')).cloned() else {
        return Answer::Plain(404, "no_service");
    };
    if method != "POST" {
        return Answer::Plain(405, "invalid_method");
    }
    if content_type.map(media_type).map(|(m, _)| m).as_deref() != Some("application/json") {
        return Answer::Plain(400, "invalid_payload");
    }
    let Ok(Value::Object(payload)) = serde_json::from_str::<Value>(body) else {
        return Answer::Plain(400, "invalid_payload");
    };
    if payload
        .keys()
        .any(|k| !WEBHOOK_MEMBERS.contains(&k.as_str()))
    {
        return Answer::Plain(400, "invalid_payload");
    }
    let strings = ["username", "icon_emoji", "icon_url"];
    let bools = ["mrkdwn", "unfurl_links", "unfurl_media"];
    let mistyped = |names: &[&str], ok: fn(&Value) -> bool| {
        names
            .iter()
            .any(|n| payload.get(*n).is_some_and(|v| !v.is_null() && !ok(v)))
    };
    if mistyped(&strings, Value::is_string) || mistyped(&bools, Value::is_boolean) {
        return Answer::Plain(400, "invalid_payload");
    }
    let text = match message_text(&payload, "invalid_payload") {
        Ok(text) => text,
        Err(code @ ("no_text" | "msg_too_long" | "invalid_blocks" | "too_many_attachments")) => {
            return Answer::Plain(400, code)
        }
        Err(_) => return Answer::Plain(400, "invalid_payload"),
    };
    match st.channels.get(&channel_id) {
        None => return Answer::Plain(404, "channel_not_found"),
        Some(channel) if channel.archived => return Answer::Plain(410, "channel_is_archived"),
        Some(_) => {}
    }
    if !st.admit(&channel_id) {
        return Answer::Plain(429, "rate_limited");
    }
    st.post(&channel_id, text, "webhook");
    Answer::Plain(200, "ok")
}

/// The arguments of a Web API call, from a JSON or form-encoded body, or the error code.
fn api_arguments(
    content_type: Option<&str>,
    body: &str,
) -> Result<Map<String, Value>, &'static str> {
    if body.is_empty() {
        return Err("missing_post_type");
    }
    let (media, charset) = content_type.map(media_type).ok_or("invalid_post_type")?;
    if charset.is_some_and(|c| c != "utf-8" && c != "utf8" && c != "iso-8859-1") {
        return Err("invalid_charset");
    }
    match media.as_str() {
        "application/json" => match serde_json::from_str::<Value>(body) {
            Ok(Value::Object(args)) => Ok(args),
            Ok(_) => Err("json_not_object"),
            Err(_) => Err("invalid_json"),
        },
        "application/x-www-form-urlencoded" => {
            let mut args = Map::new();
            for (name, value) in form_fields(body) {
                let value = match name.as_str() {
                    // Structured arguments travel as JSON text in a form.
                    "blocks" => {
                        serde_json::from_str(&value).map_err(|_| "invalid_blocks_format")?
                    }
                    "attachments" => {
                        serde_json::from_str(&value).map_err(|_| "invalid_attachments")?
                    }
                    _ => Value::String(value),
                };
                args.insert(name, value);
            }
            Ok(args)
        }
        _ => Err("invalid_post_type"),
    }
}

/// `/api/{name}`: a Web API call; only `chat.postMessage` is known.
fn api(
    st: &mut State,
    bot_token: &str,
    method: &str,
    name: &str,
    content_type: Option<&str>,
    authorization: Option<&str>,
    body: &str,
) -> Answer {
    if name != "chat.postMessage" {
        return Answer::Api(
            404,
            json!({"ok": false, "error": "unknown_method", "req_method": name}),
        );
    }
    if method != "POST" {
        // Slack also takes arguments in a GET query string; the fake does not model that.
        return Answer::Api(
            405,
            json!({"ok": false, "error": "method_not_supported_by_fake", "supported": "POST"}),
        );
    }
    let args = api_arguments(content_type, body);
    let bearer = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    // A form body may carry the token itself; a JSON body may not.
    let form_token = match (&args, content_type.map(media_type)) {
        (Ok(args), Some((media, _))) if media == "application/x-www-form-urlencoded" => args
            .get("token")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    let Some(token) = bearer.or(form_token) else {
        return api_error("not_authed");
    };
    if token != bot_token {
        return api_error("invalid_auth");
    }
    if st.token_revoked {
        return api_error("token_revoked");
    }
    let args = match args {
        Ok(args) => args,
        Err(code) => return api_error(code),
    };
    let well_formed =
        |n: &String| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !args.keys().all(well_formed) {
        return api_error("invalid_arg_name");
    }
    let channel_id = match args.get("channel") {
        Some(Value::String(channel)) => match st.resolve(channel.trim()) {
            Some(id) => id,
            None => return api_error("channel_not_found"),
        },
        _ => return api_error("channel_not_found"),
    };
    if st.channels[&channel_id].archived {
        return api_error("is_archived");
    }
    let text = match message_text(&args, "invalid_arguments") {
        Ok(text) => text,
        Err(code) => return api_error(code),
    };
    if !st.admit(&channel_id) {
        return Answer::Api(429, json!({"ok": false, "error": "ratelimited"}));
    }
    let ts = st.post(&channel_id, text.clone(), "api");
    Answer::Api(
        200,
        json!({
            "ok": true,
            "channel": channel_id,
            "ts": ts,
            "message": {"type": "message", "text": text, "ts": ts},
        }),
    )
}

fn serve(mut request: Request, state: &Mutex<State>, bot_token: &str) {
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let path = url.split('?').next().unwrap_or("").to_string();
    let mut raw = Vec::new();
    let _ = request.as_reader().read_to_end(&mut raw);
    let body = String::from_utf8_lossy(&raw).into_owned();
    let authorization = request_header(&request, "Authorization");
    let content_type = request_header(&request, "Content-Type");
    let recorded = serde_json::from_str::<Value>(&body).ok().or_else(|| {
        let form = content_type
            .as_deref()
            .is_some_and(|c| media_type(c).0 == "application/x-www-form-urlencoded");
        form.then(|| {
            Value::Object(
                form_fields(&body)
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
            )
        })
    });

    let mut st = state.lock().unwrap();
    let webhook_secret = path.strip_prefix("/services/");
    let api_method = path.strip_prefix("/api/");
    let answer = if st.throttle_next > 0 {
        st.throttle_next -= 1;
        if api_method.is_some() {
            Answer::Api(429, json!({"ok": false, "error": "ratelimited"}))
        } else {
            Answer::Plain(429, "rate_limited")
        }
    } else if let Some(secret) = webhook_secret {
        webhook(&mut st, &method, secret, content_type.as_deref(), &body)
    } else if let Some(name) = api_method {
        api(
            &mut st,
            bot_token,
            &method,
            name,
            content_type.as_deref(),
            authorization.as_deref(),
            &body,
        )
    } else {
        Answer::Plain(404, "not_found")
    };
    let status = answer.status();
    st.calls.push(Call {
        method,
        path: url,
        status,
        body: recorded,
        authorization,
    });
    drop(st);

    let (text, content_type) = match answer {
        Answer::Api(_, value) => (value.to_string(), "application/json; charset=utf-8"),
        Answer::Plain(_, text) => (text.to_string(), "text/plain; charset=utf-8"),
    };
    let mut response = Response::from_string(text)
        .with_status_code(status)
        .with_header(Header::from_bytes("Content-Type", content_type).unwrap());
    if status == 429 {
        response = response.with_header(Header::from_bytes("Retry-After", "1").unwrap());
    }
    let _ = request.respond(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_util::client::{send, Reply};
    use std::time::Duration;

    const TOKEN: &str = "xoxb-1-test";
    const HOOK: &str = "T0001/B0001/XXXXXXXXXXXXXXXXXXXXXXXX";

    /// `127.0.0.1:PORT`, where [`send`] reaches the fake.
    fn addr(fake: &FakeSlack) -> String {
        fake.base_url().trim_start_matches("http://").to_string()
    }

    /// A fake with channels C0001 `sales` and C0002 `ops` and a webhook for C0001.
    fn fake() -> FakeSlack {
        let fake = FakeSlack::start(TOKEN);
        fake.add_channel("C0001", "sales");
        fake.add_channel("C0002", "ops");
        fake.add_webhook(HOOK, "C0001");
        fake
    }

    fn hook_raw(fake: &FakeSlack, secret: &str, content_type: &str, body: &str) -> Reply {
        let path = format!("/services/{secret}");
        send(
            &addr(fake),
            "POST",
            &path,
            &[("Content-Type", content_type)],
            body,
        )
    }

    fn hook(fake: &FakeSlack, body: Value) -> Reply {
        hook_raw(fake, HOOK, "application/json", &body.to_string())
    }

    fn post_as(fake: &FakeSlack, auth: Option<&str>, body: Value) -> Reply {
        let auth = auth.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json; charset=utf-8")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        send(
            &addr(fake),
            "POST",
            "/api/chat.postMessage",
            &headers,
            &body.to_string(),
        )
    }

    fn post(fake: &FakeSlack, body: Value) -> Reply {
        post_as(fake, Some(TOKEN), body)
    }

    fn api_error_of(reply: &Reply) -> String {
        assert_eq!(reply.status, 200, "{}", reply.body);
        let json = reply.json();
        assert_eq!(json["ok"], false, "{json}");
        json["error"].as_str().unwrap().to_string()
    }

    #[test]
    fn webhook_post_is_recorded() {
        let fake = fake();
        let reply = hook(&fake, json!({"text": "hello", "mrkdwn": true}));
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
        let messages = fake.messages("C0001");
        assert_eq!(messages.len(), 1);
        assert_eq!(
            (messages[0].text.as_str(), messages[0].via.as_str()),
            ("hello", "webhook")
        );
        assert!(fake.messages("C0002").is_empty());
        let calls = fake.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].path, format!("/services/{HOOK}"));
        assert_eq!(calls[0].status, 200);
        assert_eq!(calls[0].body.as_ref().unwrap()["text"], "hello");
        assert_eq!(calls[0].authorization, None);
        // Blocks alone are a message too.
        let blocks = json!([{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]);
        assert_eq!(hook(&fake, json!({"blocks": blocks})).status, 200);
        assert_eq!(fake.messages("C0001")[1].text, "");
        fake.clear_calls();
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn webhook_refusals() {
        let fake = fake();
        let cases = [
            (json!({}), 400, "no_text"),
            (json!({"text": ""}), 400, "no_text"),
            (json!({"text": "", "blocks": []}), 400, "no_text"),
            (
                json!({"text": "x", "channel": "#ops"}),
                400,
                "invalid_payload",
            ),
            (json!({"text": 5}), 400, "invalid_payload"),
            (
                json!({"text": "x", "mrkdwn": "yes"}),
                400,
                "invalid_payload",
            ),
            (
                json!({"blocks": [{"text": "no type"}]}),
                400,
                "invalid_blocks",
            ),
            (json!({"text": "y".repeat(40_001)}), 400, "msg_too_long"),
            (json!(["text"]), 400, "invalid_payload"),
        ];
        for (body, status, code) in cases {
            let reply = hook(&fake, body.clone());
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (status, code),
                "{body}"
            );
        }
        assert_eq!(hook(&fake, json!({"text": "y".repeat(40_000)})).status, 200);
        let reply = hook_raw(&fake, HOOK, "text/plain", r#"{"text":"x"}"#);
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (400, "invalid_payload")
        );
        let reply = hook_raw(&fake, HOOK, "application/json", "{not json");
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (400, "invalid_payload")
        );
        let reply = hook_raw(
            &fake,
            "T0001/B0001/WRONG",
            "application/json",
            r#"{"text":"x"}"#,
        );
        assert_eq!((reply.status, reply.body.as_str()), (404, "no_service"));
        assert_eq!(fake.messages("C0001").len(), 1);
        assert_eq!(fake.calls().last().unwrap().status, 404);
    }

    #[test]
    fn webhook_to_archived_or_missing_channel() {
        let fake = fake();
        fake.archive_channel("C0001");
        let reply = hook(&fake, json!({"text": "x"}));
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (410, "channel_is_archived")
        );
        fake.add_webhook("T0001/B0002/YYYYYYYYYYYYYYYYYYYYYYYY", "C9999");
        let reply = hook_raw(
            &fake,
            "T0001/B0002/YYYYYYYYYYYYYYYYYYYYYYYY",
            "application/json",
            r#"{"text":"x"}"#,
        );
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (404, "channel_not_found")
        );
        assert!(fake.messages("C0001").is_empty());
    }

    #[test]
    fn api_post_by_id_and_by_name() {
        let fake = fake();
        let reply = post(&fake, json!({"channel": "C0001", "text": "one"}));
        assert_eq!(reply.status, 200);
        let json = reply.json();
        assert_eq!(json["ok"], true, "{json}");
        assert_eq!(json["channel"], "C0001");
        let ts = json["ts"].as_str().unwrap().to_string();
        let (secs, micros) = ts.split_once('.').unwrap();
        assert!(secs.parse::<u64>().is_ok() && micros.len() == 6, "{ts}");
        assert_eq!(
            json["message"],
            json!({"type": "message", "text": "one", "ts": ts})
        );

        let by_hash = post(&fake, json!({"channel": "#sales", "text": "two"})).json();
        assert_eq!(
            (by_hash["ok"].clone(), by_hash["channel"].clone()),
            (json!(true), json!("C0001"))
        );
        let by_name = post(&fake, json!({"channel": "ops", "text": "three"})).json();
        assert_eq!(by_name["channel"], "C0002");

        let sales = fake.messages("C0001");
        assert_eq!(
            sales.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(sales[0].ts, ts);
        assert!(sales[1].ts > sales[0].ts && sales[1].ts != sales[0].ts);
        assert_eq!(sales[0].via, "api");
        let call = fake.calls()[0].clone();
        assert_eq!(call.authorization.as_deref(), Some("Bearer xoxb-1-test"));
        assert_eq!(call.body.unwrap()["channel"], "C0001");
        assert_eq!(
            (call.method.as_str(), call.path.as_str()),
            ("POST", "/api/chat.postMessage")
        );
    }

    #[test]
    fn api_form_encoded_post_with_token_in_body() {
        let fake = fake();
        let form = "token=xoxb-1-test&channel=%23ops&text=hi+there";
        let headers = [("Content-Type", "application/x-www-form-urlencoded")];
        let reply = send(
            &addr(&fake),
            "POST",
            "/api/chat.postMessage",
            &headers,
            form,
        );
        assert_eq!(reply.json()["ok"], true, "{}", reply.body);
        assert_eq!(fake.messages("C0002")[0].text, "hi there");
        assert_eq!(fake.calls()[0].body.as_ref().unwrap()["text"], "hi there");
    }

    #[test]
    fn api_auth_errors() {
        let fake = fake();
        let body = json!({"channel": "C0001", "text": "x"});
        assert_eq!(
            api_error_of(&post_as(&fake, None, body.clone())),
            "not_authed"
        );
        assert_eq!(
            api_error_of(&post_as(&fake, Some("xoxb-wrong"), body.clone())),
            "invalid_auth"
        );
        fake.revoke_token();
        assert_eq!(api_error_of(&post(&fake, body.clone())), "token_revoked");
        assert_eq!(
            api_error_of(&post_as(&fake, Some("xoxb-wrong"), body)),
            "invalid_auth"
        );
        assert!(fake.messages("C0001").is_empty());
        let calls = fake.calls();
        assert_eq!(calls.len(), 4);
        assert!(calls.iter().all(|c| c.status == 200));
        assert_eq!(calls[0].authorization, None);
        // A webhook needs no token, revoked or not.
        assert_eq!(hook(&fake, json!({"text": "x"})).status, 200);
    }

    #[test]
    fn api_argument_errors() {
        let fake = fake();
        fake.add_channel("C0003", "old");
        fake.archive_channel("C0003");
        let cases = [
            (
                json!({"channel": "C0404", "text": "x"}),
                "channel_not_found",
            ),
            (
                json!({"channel": "#nope", "text": "x"}),
                "channel_not_found",
            ),
            (
                json!({"channel": "#C0001", "text": "x"}),
                "channel_not_found",
            ),
            (json!({"text": "x"}), "channel_not_found"),
            (json!({"channel": "C0003", "text": "x"}), "is_archived"),
            (json!({"channel": "#old", "text": "x"}), "is_archived"),
            (json!({"channel": "C0001"}), "no_text"),
            (json!({"channel": "C0001", "text": ""}), "no_text"),
            (
                json!({"channel": "C0001", "text": "z".repeat(40_001)}),
                "msg_too_long",
            ),
            (json!({"channel": "C0001", "text": 7}), "invalid_arguments"),
            (
                json!({"channel": "C0001", "blocks": [{}]}),
                "invalid_blocks",
            ),
        ];
        for (body, code) in cases {
            assert_eq!(api_error_of(&post(&fake, body.clone())), code, "{body}");
        }
        let headers = [
            ("Authorization", "Bearer xoxb-1-test"),
            ("Content-Type", "application/json"),
        ];
        let reply = send(
            &addr(&fake),
            "POST",
            "/api/chat.postMessage",
            &headers,
            "{oops",
        );
        assert_eq!(api_error_of(&reply), "invalid_json");
        let headers = [
            ("Authorization", "Bearer xoxb-1-test"),
            ("Content-Type", "text/csv"),
        ];
        let reply = send(
            &addr(&fake),
            "POST",
            "/api/chat.postMessage",
            &headers,
            "a,b",
        );
        assert_eq!(api_error_of(&reply), "invalid_post_type");
        let reply = send(&addr(&fake), "POST", "/api/chat.nope", &headers, "a,b");
        assert_eq!(
            (reply.status, reply.json()["error"].clone()),
            (404, json!("unknown_method"))
        );
        assert!(fake.messages("C0001").is_empty());
    }

    #[test]
    fn throttled_requests_get_429_on_both_paths() {
        let fake = fake();
        fake.throttle_next(2);
        let reply = post(&fake, json!({"channel": "C0001", "text": "x"}));
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("Retry-After"), Some("1"));
        assert_eq!(reply.json(), json!({"ok": false, "error": "ratelimited"}));
        let reply = hook(&fake, json!({"text": "x"}));
        assert_eq!((reply.status, reply.body.as_str()), (429, "rate_limited"));
        assert_eq!(reply.header("Retry-After"), Some("1"));
        assert!(fake.messages("C0001").is_empty());
        assert_eq!(
            post(&fake, json!({"channel": "C0001", "text": "x"})).json()["ok"],
            true
        );
        assert_eq!(hook(&fake, json!({"text": "x"})).status, 200);
        let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [429, 429, 200, 200]);
    }

    #[test]
    fn per_channel_rate() {
        let fake = fake();
        fake.enforce_channel_rate(true);
        let msg = |channel: &str| json!({"channel": channel, "text": "x"});
        // A burst of two passes, the third within the second is refused.
        assert_eq!(post(&fake, msg("C0001")).json()["ok"], true);
        assert_eq!(hook(&fake, json!({"text": "x"})).status, 200);
        let reply = post(&fake, msg("C0001"));
        assert_eq!(
            (reply.status, reply.header("Retry-After")),
            (429, Some("1"))
        );
        assert_eq!(reply.json()["error"], "ratelimited");
        let reply = hook(&fake, json!({"text": "x"}));
        assert_eq!((reply.status, reply.body.as_str()), (429, "rate_limited"));
        // Other channels have their own budget.
        assert_eq!(post(&fake, msg("C0002")).json()["ok"], true);
        assert_eq!(fake.messages("C0001").len(), 2);
        // One second later, one more message fits (and only one).
        std::thread::sleep(Duration::from_millis(1_050));
        assert_eq!(post(&fake, msg("C0001")).json()["ok"], true);
        assert_eq!(post(&fake, msg("C0001")).status, 429);
        assert_eq!(fake.messages("C0001").len(), 3);
        // Off: no limit.
        fake.enforce_channel_rate(false);
        for _ in 0..5 {
            assert_eq!(post(&fake, msg("C0001")).json()["ok"], true);
        }
    }
}
