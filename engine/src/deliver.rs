//! Sends batches to a destination: concurrency, rate limit, retries with backoff, and a
//! per-record account of what happened. Runs inside the worker's current-thread runtime, so
//! batches are futures polled by one task (no spawn, no Send) and share state via Cell/RefCell.

use crate::backoff::backoff_delay;
use crate::connector::{
    idempotency_key, redact_all, ApiUsage, BatchContext, Destination, HttpRequest, HttpResponse, RecordResult, ResponseOutcome,
};
use crate::oauth::Auth;
use crate::options::DestinationConfig;
use crate::ratelimit::RateBudget;
use crate::record::OutboxRecord;
use crate::host_policy::{GuardedResolver, HostPolicy, HostRefused};
use futures_util::stream::{self, Peekable, Stream, StreamExt};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First retry waits about this long; later ones double it.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(200);
/// How often a waiting batch, or one with a request in flight, checks whether it should stop:
/// the worker must be gone within a second of SIGTERM.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Most lookups in a row for one batch (Intercom needs two: the conflicting contact's id, then
/// unarchiving it).
const MAX_RESOLUTIONS: u32 = 4;
/// Runtime turns [`InOrder::send`] gives the connections to write out the requests it starts.
const SEND_TURNS: usize = 8;
/// Why a batch stopped when the worker was asked to.
const SHUTTING_DOWN: &str = "stopped: worker shutting down";

#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryLimits {
    pub max_concurrency: usize,
    pub timeout: Duration,
    pub max_retries: u32,
    pub retry_base: Duration,
    pub max_backoff: Duration,
}

impl DeliveryLimits {
    pub fn from_config(cfg: &DestinationConfig) -> Self {
        DeliveryLimits {
            max_concurrency: cfg.max_concurrency,
            timeout: cfg.timeout,
            max_retries: cfg.max_retries,
            retry_base: DEFAULT_RETRY_BASE,
            max_backoff: cfg.max_backoff,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub id: i64,
    pub status: Option<u16>,
    pub message: String,
    /// Requests that included this record.
    pub attempts: u32,
}

/// What became of one batch. Every record ends up in exactly one of acked/rejected/unresolved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchReport {
    pub acked: Vec<i64>,
    /// Of the acknowledged records, those the destination named an id for.
    pub destination_ids: Vec<(i64, String)>,
    pub rejected: Vec<Rejection>,
    /// Neither accepted nor refused (retries exhausted, stopped, fatal error): send again later.
    pub unresolved: Vec<i64>,
    pub api_calls: u32,
    /// The latest API usage the destination reported (see `Destination::usage`).
    pub api_usage: Option<ApiUsage>,
    pub error: Option<String>,
    /// Requests that got no answer at all (timeouts, refused or reset connections), even if a
    /// retry then succeeded: worth a line in the server log, since nothing else records them.
    pub transport_failures: Vec<String>,
    /// The destination said nothing more will work in this run.
    pub fatal: bool,
}

pub struct Deliverer {
    client: Http,
}

/// The HTTP client and the hosts it may reach: every request goes through [`send`].
pub(crate) struct Http {
    client: reqwest::Client,
    policy: Arc<HostPolicy>,
}

/// What a delivery is for and the rules it keeps: everything its batches share but their
/// progress (see [`Deliverer::start`]).
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub dest: &'a dyn Destination,
    pub limits: &'a DeliveryLimits,
    /// The destination's rate limit (`None` = unlimited), possibly shared with other workers.
    pub budget: Option<&'a dyn RateBudget>,
    /// The sync's name, as connectors show it to the destination (a template's `sync`, a
    /// batch body's `sync`).
    pub sync_name: &'a str,
    /// Identifies this incarnation of the sync in idempotency keys: a sync dropped and
    /// re-created under the same name starts its run and record ids over, and must not
    /// collide with keys the destination still remembers.
    pub key_scope: &'a str,
    pub run_id: i64,
    pub auth: &'a Auth,
    /// Once it returns true, every batch stops within about `STOP_POLL`.
    pub should_stop: &'a dyn Fn() -> bool,
}

/// One delivery's shared state (see [`Deliverer::start`]).
struct Run<'a> {
    client: &'a Http,
    job: Job<'a>,
    /// Set by the first batch that gets a fatal answer, so the others stop too.
    fatal: Cell<bool>,
    /// Why the token could not be refreshed, once that was tried and failed.
    refresh_failure: RefCell<Option<String>>,
}

impl Deliverer {
    /// A deliverer that may reach every host but the refused addresses (see `host_policy`).
    pub fn new(timeout: Duration) -> Result<Self, String> {
        Self::with_policy(timeout, HostPolicy::default())
    }

    /// A deliverer that reaches only the hosts `policy` allows. TLS certificates are always
    /// verified (against the Mozilla roots bundled with rustls).
    pub fn with_policy(timeout: Duration, policy: HostPolicy) -> Result<Self, String> {
        let policy = Arc::new(policy);
        reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            // A redirect could carry the bearer token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(crate::USER_AGENT)
            .dns_resolver(Arc::new(GuardedResolver(policy.clone())))
            .build()
            .map(|client| Deliverer { client: Http { client, policy } })
            .map_err(|e| format!("could not create the HTTP client: {e}"))
    }

    /// Delivers `batches` (each at most `job.dest.max_batch_size()` records) and returns one
    /// report per batch, in the same order: [`start`](Self::start), with no batches added.
    pub async fn deliver(&self, job: Job<'_>, batches: Vec<Vec<OutboxRecord>>) -> Vec<BatchReport> {
        let mut delivery = self.start(job, batches);
        delivery.close();
        let mut reports = Vec::new();
        while let Some(report) = delivery.next().await {
            reports.push(report);
        }
        reports
    }

    /// Starts delivering `batches` (each at most `job.dest.max_batch_size()` records), at most
    /// `job.limits.max_concurrency` at a time, and hands their reports over one by one, in order.
    /// More batches can be added as it goes ([`InOrder::push`]) until it is closed.
    ///
    /// This lets the worker record each batch as soon as it and those before it are done,
    /// and read the next rows of the outbox, while the destination works on the batches after
    /// it. Recorded only once a whole window of batches was answered, with the next window
    /// read only then, the worker sat idle during the requests and the destination during the
    /// recording: about a quarter of a 1M-row delivery was the worker waiting.
    ///
    /// Requests progress only while the caller awaits [`InOrder::next`] or [`InOrder::send`];
    /// in between, those in flight are with the destination, and their answers wait in the
    /// socket. A request whose timeout passes meanwhile counts as timed out (its records go
    /// again, under the same idempotency key): recording a batch takes milliseconds, timeouts
    /// are seconds.
    ///
    /// Once `job.should_stop` returns true, every batch stops within about `STOP_POLL`, abandoning
    /// a request in flight: its records are reported unresolved and sent again after restart
    /// under the same idempotency key, so a request that did reach the destination is harmless.
    pub fn start<'a>(&'a self, job: Job<'a>, batches: Vec<Vec<OutboxRecord>>) -> InOrder<'a> {
        let limits = job.limits;
        let run = Rc::new(Run {
            client: &self.client,
            job,
            fatal: Cell::new(false),
            refresh_failure: RefCell::new(None),
        });
        let queue = Rc::new(RefCell::new(Queue { unsent: batches.into(), closed: false, sent: 0 }));
        let source = queue.clone();
        // Batches are recorded in order, each overwriting the run's usage: each report carries
        // the latest reading so far, which need not be its own when requests overlapped.
        let mut latest: Option<ApiUsage> = None;
        let reports = stream::poll_fn(move |_| {
            let mut queue = source.borrow_mut();
            match queue.unsent.pop_front() {
                Some(batch) => {
                    queue.sent += 1;
                    Poll::Ready(Some(batch))
                }
                None if queue.closed => Poll::Ready(None),
                // Not a wait for an event: the caller adds batches or closes the queue before it
                // asks for a report that only they could give (see InOrder::next).
                None => Poll::Pending,
            }
        })
        .map(move |batch| {
            let run = run.clone();
            async move { run.batch(batch).await }
        })
        .buffered(limits.max_concurrency.max(1))
        .map(move |mut report| {
            if let Some(usage) = report.api_usage.take() {
                ApiUsage::keep_latest(&mut latest, usage);
            }
            report.api_usage.clone_from(&latest);
            report
        });
        let reports: Pin<Box<dyn Stream<Item = BatchReport> + 'a>> = Box::pin(reports);
        InOrder { reports: Box::pin(reports.peekable()), queue, reported: 0 }
    }
}

/// The batches of a delivery not yet started.
struct Queue {
    unsent: VecDeque<Vec<OutboxRecord>>,
    /// No more batches will be added.
    closed: bool,
    /// Batches started so far.
    sent: usize,
}

/// A delivery under way (see [`Deliverer::start`]).
pub struct InOrder<'a> {
    reports: Pin<Box<Peekable<Pin<Box<dyn Stream<Item = BatchReport> + 'a>>>>>,
    queue: Rc<RefCell<Queue>>,
    /// Reports handed over so far.
    reported: usize,
}

impl InOrder<'_> {
    /// The next batch's report, in the order the batches were given; `None` after the last
    /// one once the delivery is closed.
    pub async fn next(&mut self) -> Option<BatchReport> {
        {
            let mut queue = self.queue.borrow_mut();
            if queue.unsent.is_empty() && queue.sent == self.reported {
                // Nothing in flight and nothing to send: no report can come but from a batch
                // added later, which cannot happen while the caller waits here.
                queue.closed = true;
            }
        }
        let report = self.reports.next().await;
        self.reported += usize::from(report.is_some());
        report
    }

    /// Starts the batches that now fit in flight and lets them write their requests out, so
    /// that the destination works on them while the caller records a batch: left alone, they
    /// would leave only when the caller next asks for a report.
    pub async fn send(&mut self) {
        // Each turn polls the batches in flight (a request connecting, or handing its request to
        // a pooled connection) and then, yielding, the connections' tasks and sockets, without
        // blocking. A pooled connection writes a request in a turn or two; a new one needs a
        // few more to connect first.
        for _ in 0..SEND_TURNS {
            std::future::poll_fn(|cx| {
                let _ = self.reports.as_mut().poll_peek(cx);
                Poll::Ready(())
            })
            .await;
            tokio::task::yield_now().await;
        }
    }

    /// Adds a batch, delivered after those given before it.
    pub fn push(&mut self, batch: Vec<OutboxRecord>) {
        let mut queue = self.queue.borrow_mut();
        assert!(!queue.closed, "a batch added to a closed delivery");
        queue.unsent.push_back(batch);
    }

    /// No more batches: once those given are reported, `next` returns `None`.
    pub fn close(&mut self) {
        self.queue.borrow_mut().closed = true;
    }

    /// Batches given and not yet started.
    pub fn unsent(&self) -> usize {
        self.queue.borrow().unsent.len()
    }

    /// Whether no more batches can be added.
    pub fn is_closed(&self) -> bool {
        self.queue.borrow().closed
    }
}

impl Run<'_> {
    async fn batch(&self, mut pending: Vec<OutboxRecord>) -> BatchReport {
        let mut report = BatchReport::default();
        let mut last_error = String::new();
        // Lookups in a row (a connector resolving a record's destination id, then sending it):
        // bounded, so a destination that keeps answering with another id cannot loop forever.
        let mut resolutions = 0;
        pending.retain(|record| match self.job.dest.precheck(record) {
            Ok(()) if self.job.dest.skip(record) => {
                report.acked.push(record.id);
                false
            }
            Ok(()) => true,
            Err(message) => {
                report.rejected.push(Rejection { id: record.id, status: None, message, attempts: 0 });
                false
            }
        });
        while !pending.is_empty() {
            if let Err(reason) = self.ready_credentials().await {
                report.fatal = true;
                return self.give_up(report, &pending, reason);
            }
            if let Err(reason) = self.take_token().await {
                return self.give_up(report, &pending, reason);
            }
            let ctx = BatchContext {
                sync_name: self.job.sync_name,
                run_id: self.job.run_id,
                idempotency_key: idempotency_key(self.job.key_scope, self.job.run_id, &pending),
            };
            let generation = self.job.auth.generation();
            let token = self.job.auth.token();
            let request = match self.job.dest.build_request(&ctx, &pending, token.as_deref()) {
                Ok(request) => request,
                Err(message) => {
                    let message = self.redact(&message);
                    report.rejected.extend(pending.iter().map(|record| Rejection {
                        id: record.id,
                        status: None,
                        message: message.clone(),
                        attempts: report.api_calls,
                    }));
                    return report;
                }
            };
            report.api_calls += 1;
            let sent = self.unless_stopped(send(self.client, request, self.job.limits.timeout));
            let outcome = match sent.await {
                Err(reason) => return self.give_up(report, &pending, reason),
                Ok(Err(SendError::Refused(message))) => {
                    self.fatal.set(true);
                    report.fatal = true;
                    return self.give_up(report, &pending, message);
                }
                Ok(Ok(response)) => {
                    if let Some(usage) = self.job.dest.usage(&response) {
                        ApiUsage::keep_latest(&mut report.api_usage, usage);
                    }
                    self.job.dest.classify(&pending, &response)
                }
                Ok(Err(SendError::Failed(message))) => {
                    if report.transport_failures.len() < 5 {
                        report.transport_failures.push(self.redact(&message));
                    }
                    ResponseOutcome::Transient { status: None, retry_after: None, message }
                }
            };
            let outcome = match outcome {
                // Refused credentials may just be an expired OAuth token, whatever the connector.
                ResponseOutcome::Fatal { status: Some(401), message } if self.job.auth.has_client() => ResponseOutcome::Expired { message },
                other => other,
            };
            let retry_after = match outcome {
                ResponseOutcome::PerRecord(results) if results.len() == pending.len() => {
                    let mut retry = Vec::new();
                    let mut resolved = Vec::new();
                    for (record, result) in pending.into_iter().zip(results) {
                        let Some((mut record, result)) = self.book(&mut report, record, result) else { continue };
                        match result {
                            RecordResult::Retry { message } => {
                                if retry.is_empty() {
                                    last_error = format!("record {}: {message}", record.id);
                                }
                                retry.push(record);
                            }
                            RecordResult::Resolved(destination_id) => {
                                record.destination_id = Some(destination_id);
                                resolved.push(record);
                            }
                            _ => unreachable!("book() keeps acknowledgements and rejections"),
                        }
                    }
                    if !resolved.is_empty() {
                        // Looked up: send those again at once. Records whose lookup must be
                        // retried wait for the next run (they would not share a request).
                        report.unresolved.extend(retry.iter().map(|r| r.id));
                        if !retry.is_empty() {
                            report.error.get_or_insert_with(|| self.redact(&last_error));
                        }
                        resolutions += 1;
                        if resolutions > MAX_RESOLUTIONS {
                            let message = format!("{} connector kept resolving destination ids ({MAX_RESOLUTIONS} times)", self.job.dest.kind());
                            return self.give_up(report, &resolved, message);
                        }
                        pending = resolved;
                        continue;
                    }
                    pending = retry;
                    None
                }
                ResponseOutcome::PerRecord(results) => {
                    last_error = format!(
                        "{} connector returned {} results for {} records",
                        self.job.dest.kind(),
                        results.len(),
                        pending.len()
                    );
                    None
                }
                ResponseOutcome::Transient {
                    retry_after, message, ..
                } => {
                    last_error = message;
                    retry_after
                }
                ResponseOutcome::Fatal { message, .. } => {
                    self.fatal.set(true);
                    report.fatal = true;
                    return self.give_up(report, &pending, message);
                }
                ResponseOutcome::Expired { message } => {
                    // Another batch may have refreshed the token meanwhile; else refresh it now
                    // (once per delivery). The request is then sent again at once: the refused
                    // one did nothing, so it is not counted as a retry.
                    if self.job.auth.generation() == generation && self.job.auth.can_refresh() {
                        // A failure is kept in refresh_failure and reported below.
                        let _ = self.refresh().await;
                    }
                    while self.job.auth.is_refreshing() {
                        if let Err(reason) = self.pause(STOP_POLL).await {
                            return self.give_up(report, &pending, reason);
                        }
                    }
                    if self.job.auth.generation() != generation {
                        continue;
                    }
                    self.fatal.set(true);
                    report.fatal = true;
                    let why = match (self.refresh_failure.borrow().clone(), self.job.auth.has_client()) {
                        (Some(failure), _) => failure,
                        // Refreshed already, and the new token is refused too.
                        (None, true) => message,
                        (None, false) => format!("{message} (no OAuth client_id/client_secret in the user mapping to refresh it)"),
                    };
                    return self.give_up(report, &pending, why);
                }
            };
            if pending.is_empty() {
                break;
            }
            let retries = report.api_calls - 1;
            if retries >= self.job.limits.max_retries {
                let attempts = report.api_calls;
                let plural = if attempts == 1 { "" } else { "s" };
                return self.give_up(
                    report,
                    &pending,
                    format!("gave up after {attempts} attempt{plural}: {last_error}"),
                );
            }
            let max_backoff = self.job.limits.max_backoff;
            let backoff = backoff_delay(retries, self.job.limits.retry_base, max_backoff);
            let wait = backoff.max(retry_after.unwrap_or_default());
            if wait > max_backoff {
                // The destination asks for more patience than configured: leave the rows for the
                // next run instead of holding the worker.
                let message = format!(
                    "Retry-After {} exceeds max_backoff {}: {last_error}",
                    show(wait),
                    show(max_backoff)
                );
                return self.give_up(report, &pending, message);
            }
            if let Err(reason) = self.pause(wait).await {
                return self.give_up(report, &pending, reason);
            }
        }
        report
    }

    /// Books an acknowledgement (with the destination's id, if any) or a rejection in the
    /// report; gives back the record with any other outcome for the caller to handle.
    fn book(&self, report: &mut BatchReport, record: OutboxRecord, result: RecordResult) -> Option<(OutboxRecord, RecordResult)> {
        match result {
            RecordResult::Ack => report.acked.push(record.id),
            RecordResult::AckWithId(destination_id) => {
                report.acked.push(record.id);
                report.destination_ids.push((record.id, destination_id));
            }
            RecordResult::Rejected { status, message } => report.rejected.push(Rejection {
                id: record.id,
                status,
                message: self.redact(&message),
                attempts: report.api_calls,
            }),
            other => return Some((record, other)),
        }
        None
    }

    fn give_up(&self, mut report: BatchReport, pending: &[OutboxRecord], error: String) -> BatchReport {
        report.unresolved.extend(pending.iter().map(|r| r.id));
        report.error = Some(self.redact(&error));
        report
    }

    fn redact(&self, text: &str) -> String {
        redact_all(text, &self.job.auth.secrets())
    }

    /// Waits out another batch's token refresh, and gets a first token when the user mapping
    /// holds only OAuth client credentials.
    async fn ready_credentials(&self) -> Result<(), String> {
        while self.job.auth.is_refreshing() {
            self.pause(STOP_POLL).await?;
        }
        if self.job.auth.token().is_none() && self.job.auth.can_refresh() {
            self.refresh().await?;
        }
        match self.refresh_failure.borrow().as_ref() {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    /// The delivery's one token refresh. A failure is kept so every batch reports it.
    async fn refresh(&self) -> Result<(), String> {
        let Some(request) = self.job.auth.begin_refresh() else {
            return Err("no refresh possible".into());
        };
        let answer = match self.unless_stopped(send(self.client, request, self.job.limits.timeout)).await {
            Ok(answer) => answer.map_err(String::from),
            Err(reason) => Err(reason),
        };
        let outcome = self.job.auth.finish_refresh(answer).map_err(|e| self.redact(&e));
        if let Err(failure) = &outcome {
            self.refresh_failure.replace(Some(failure.clone()));
        }
        outcome
    }

    /// Why this batch must not send another request, if it must not.
    fn stop_reason(&self) -> Option<String> {
        if self.fatal.get() {
            Some("stopped: another batch failed fatally".into())
        } else if (self.job.should_stop)() {
            Some(SHUTTING_DOWN.into())
        } else {
            None
        }
    }

    /// Sleeps `wait`, waking every `STOP_POLL` to honour a stop.
    async fn pause(&self, wait: Duration) -> Result<(), String> {
        let end = Instant::now() + wait;
        loop {
            if let Some(reason) = self.stop_reason() {
                return Err(reason);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            tokio::time::sleep(left.min(STOP_POLL)).await;
        }
    }

    /// Runs `work` (a request) unless the worker is told to stop first, in which case `work`
    /// is dropped, which aborts the request. A fatal answer to another batch does not abort it:
    /// its outcome is still worth recording.
    async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Result<T, String> {
        let stop_requested = async {
            while !(self.job.should_stop)() {
                tokio::time::sleep(STOP_POLL).await;
            }
        };
        tokio::select! {
            // A reply that is already in when the stop comes is kept.
            biased;
            done = work => Ok(done),
            () = stop_requested => Err(SHUTTING_DOWN.into()),
        }
    }

    /// Takes one request's worth of the rate budget, waiting as told. `try_acquire` holds
    /// nothing across the await, so concurrent batches interleave safely.
    async fn take_token(&self) -> Result<(), String> {
        if let Some(budget) = self.job.budget {
            while let Err(wait) = budget.try_acquire() {
                self.pause(wait).await?;
            }
        }
        self.stop_reason().map_or(Ok(()), Err)
    }
}

/// Why a request got no answer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SendError {
    /// The host is not one we may reach: no retry will change that.
    Refused(String),
    /// Timeouts, refused or reset connections, TLS failures: worth retrying.
    Failed(String),
}

impl From<SendError> for String {
    fn from(error: SendError) -> String {
        match error {
            SendError::Refused(message) | SendError::Failed(message) => message,
        }
    }
}

async fn send(http: &Http, req: HttpRequest, timeout: Duration) -> Result<HttpResponse, SendError> {
    if let Err(refused) = http.policy.check_url(&req.url) {
        return Err(SendError::Refused(format!("request refused: {refused}")));
    }
    let mut builder = http.client.request(req.method, &req.url).timeout(timeout).body(req.body);
    for (name, value) in &req.headers {
        builder = builder.header(name, value);
    }
    let failed = |e: reqwest::Error| transport_error(e, timeout);
    let response = builder.send().await.map_err(failed)?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let body = response.bytes().await.map_err(failed)?.to_vec();
    Ok(HttpResponse { status, headers, body })
}

/// The error chain without the URL (it may hold secrets in its query string).
fn transport_error(error: reqwest::Error, timeout: Duration) -> SendError {
    if error.is_timeout() {
        return SendError::Failed(format!("request failed: timed out after {}", show(timeout)));
    }
    let error = error.without_url();
    let mut message = format!("request failed: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<HostRefused>() {
            return SendError::Refused(format!("request refused: {refused}"));
        }
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    SendError::Failed(message)
}

/// "30s" for whole seconds, else "1500ms".
fn show(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

mod bulk;
mod fields;

#[cfg(test)]
mod tests;
