//! Drives one Salesforce Bulk API 2.0 upsert job for a large run: create, upload, close,
//! poll, read results. Every step takes the rate budget, honours a stop, and may refresh an
//! expired token once; a step that fails leaves every record unresolved (sent again by the next
//! run: upserts by external id are idempotent), and an open job is aborted.

use super::{send, BatchReport, Deliverer, Job, Run, STOP_POLL};
use crate::connector::salesforce::bulk::{BulkError, JobState};
use crate::connector::{HttpRequest, HttpResponse, RecordResult, Salesforce};
use crate::record::OutboxRecord;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// A job still running after this long is left to Salesforce and its rows to the next run.
const MAX_JOB_WAIT: Duration = Duration::from_secs(1800);

impl Deliverer {
    /// Delivers `records` (upserts only) in one Bulk API job; one report for all of them.
    /// `job`'s destination and key scope are not used: the job is `sf`'s, and Bulk API jobs
    /// take no idempotency keys.
    pub async fn deliver_bulk(&self, sf: &Salesforce, job: Job<'_>, records: Vec<OutboxRecord>) -> BatchReport {
        let run = Run {
            client: &self.client,
            job: Job { dest: sf, key_scope: "", ..job },
            fatal: Cell::new(false),
            refresh_failure: RefCell::new(None),
        };
        let mut report = BatchReport::default();
        let mut job = None;
        match run.bulk_job(sf, &records, &mut report, &mut job).await {
            Ok(results) => {
                for (record, result) in records.into_iter().zip(results) {
                    match run.book(&mut report, record, result) {
                        Some((record, RecordResult::Retry { message })) => {
                            report.error.get_or_insert(message);
                            report.unresolved.push(record.id);
                        }
                        Some((record, _)) => report.unresolved.push(record.id),
                        None => {}
                    }
                }
                report
            }
            Err(error) => {
                if let Some(job) = job.filter(|_| !(run.job.should_stop)()) {
                    // Best effort: a job we give up on should not linger open in the org.
                    let _ = run.step(&mut report, |t| sf.bulk_set_state(&job, "Aborted", t)).await;
                }
                report.fatal = report.fatal || run.fatal.get();
                run.give_up(report, &records, error)
            }
        }
    }
}

impl Run<'_> {
    async fn bulk_job(
        &self,
        sf: &Salesforce,
        records: &[OutboxRecord],
        report: &mut BatchReport,
        job: &mut Option<String>,
    ) -> Result<Vec<RecordResult>, String> {
        let text = |e: BulkError| e.to_string();
        let csv = sf.bulk_csv(records).map_err(text)?;
        let created = self.step(report, |t| sf.bulk_create(t)).await?;
        let id = sf.bulk_job_id(&created).map_err(text)?;
        *job = Some(id.clone());
        let uploaded = self.step(report, |t| sf.bulk_upload(&id, csv.clone(), t)).await?;
        if !(200..300).contains(&uploaded.status) {
            return Err(format!("Bulk API job {id}: upload refused: {}", crate::connector::describe(&uploaded, 300)));
        }
        let closed = self.step(report, |t| sf.bulk_set_state(&id, "UploadComplete", t)).await?;
        sf.bulk_job_state(&id, &closed).map_err(text)?;
        let started = Instant::now();
        loop {
            let polled = self.step(report, |t| sf.bulk_state(&id, t)).await?;
            match sf.bulk_job_state(&id, &polled).map_err(text)? {
                JobState::Complete => break,
                JobState::Ended { state, message } => {
                    *job = None;
                    return Err(BulkError::JobFailed { id, state, message }.to_string());
                }
                JobState::Running if started.elapsed() > MAX_JOB_WAIT => {
                    *job = None;
                    return Err(format!(
                        "Bulk API job {id} still running after {} s: left to Salesforce, its rows are sent again next run",
                        MAX_JOB_WAIT.as_secs()
                    ));
                }
                JobState::Running => self.pause(sf.options().bulk_poll.max(STOP_POLL)).await?,
            }
        }
        *job = None;
        let successful = self.step(report, |t| sf.bulk_results(&id, true, t)).await?;
        let failed = self.step(report, |t| sf.bulk_results(&id, false, t)).await?;
        for answer in [&successful, &failed] {
            if !(200..300).contains(&answer.status) {
                return Err(format!("Bulk API job {id}: results refused: {}", crate::connector::describe(answer, 300)));
            }
        }
        sf.bulk_outcome(records, &successful.body, &failed.body).map_err(text)
    }

    /// Sends one job request (built afresh with the current token), refreshing an expired
    /// token once; an answer is returned whatever its status, except 401 and transport errors.
    async fn step(&self, report: &mut BatchReport, build: impl Fn(Option<&str>) -> HttpRequest) -> Result<HttpResponse, String> {
        self.ready_credentials().await?;
        loop {
            self.take_token().await?;
            let generation = self.job.auth.generation();
            report.api_calls += 1;
            let answer = self.unless_stopped(send(self.client, build(self.job.auth.token().as_deref()), self.job.limits.timeout)).await?.map_err(String::from)?;
            if let Some(usage) = crate::connector::salesforce::usage(&answer) {
                crate::connector::ApiUsage::keep_latest(&mut report.api_usage, usage);
            }
            if answer.status != 401 {
                return Ok(answer);
            }
            if self.job.auth.can_refresh() {
                let _ = self.refresh().await;
            }
            if self.job.auth.generation() == generation {
                self.fatal.set(true);
                report.fatal = true;
                return Err(self.refresh_failure.borrow().clone().unwrap_or_else(|| {
                    "Salesforce rejected the session (HTTP 401) and there is no OAuth client_id/client_secret in the \
                     user mapping to refresh it"
                        .into()
                }));
            }
        }
    }
}
