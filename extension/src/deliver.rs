//! Deliver: send a run's outbox to its destination one window of batches at a time (a
//! slice; runs take turns between slices), and record each batch's outcome in its own short
//! transaction: acknowledged rows advance the snapshot and leave the outbox, rejected rows move
//! to retl.row_errors, unresolved rows stay for the next run.

use crate::destination;
use crate::plan::{self, Mode, SyncDef};
use crate::settings;
use crate::shared;
use crate::transaction::{report_activity, transaction};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use retl_engine::connector::{self, Destination, Salesforce};
use retl_engine::deliver::{BatchReport, DeliveryLimits, InOrder, Job};
use retl_engine::ratelimit::{LocalBucket, RateBudget, SharedGcra, TokenBucket};
use retl_engine::record::{Op, OutboxRecord};
use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// What the worker keeps between slices.
#[derive(Default)]
pub struct Deliveries {
    /// Per-process budgets, only for destinations that found no free shared slot.
    local_budgets: HashMap<u32, (f64, LocalBucket)>,
    /// Per run this worker is delivering: the last outbox id of its previous window. Each
    /// window starts after it instead of at the run's first outbox row, because the rows
    /// delivered before stay in the index as dead tuples until vacuum can remove them, and it
    /// cannot while any transaction older than the run is open (a `retl.run(wait => true)`
    /// waiting for this very run is one): starting at the front made every window read all of
    /// them again, so a run of n rows cost O(n²). Safe because a window leaves nothing behind
    /// when the run goes on: every row was acknowledged (gone) or rejected (moved to
    /// row_errors); an unresolved row fails the run. Lost on a restart: the next window then
    /// starts at the front, which is only slower.
    cursors: HashMap<i64, i64>,
}

/// Forget cursors past this many runs (those of runs that ended on an error path).
const MAX_CURSORS: usize = 1000;

/// Upserts one Bulk API job takes at most (Salesforce's limit is 150 MB of CSV per job).
const BULK_WINDOW: i64 = 100_000;

/// How long a slice goes on reading more windows of its run: the next window is read and its
/// requests sent while the worker records the batches before it (see Deliverer::start), so
/// the longer a slice, the less of it is spent waiting for a first answer. Then the run goes
/// back in line behind the other runs, and a drop_sync, alter_sync or paused sync waits no
/// longer than this and the requests in flight.
const SLICE_TIME: Duration = Duration::from_millis(500);

impl Deliveries {
    /// Deliver a slice of run `run_id` (windows of batch_size x max_concurrency rows, for about
    /// SLICE_TIME), and close the run when it is over: every planned row acknowledged or
    /// rejected, or the run failed. While rows remain it stays `delivering` and goes back in
    /// line (also when the worker is shutting down: it resumes after a restart).
    pub fn slice(&mut self, runtime: &tokio::runtime::Runtime, run_id: i64) {
        let loaded = transaction(|| {
            Spi::connect(|client| {
                let sync_id = plan::sync_id_of_run(client, run_id)?;
                let sync = plan::load_sync_by_id(client, sync_id).ok_or("sync vanished")?;
                let dest = destination::load(client, &sync.destination, sync.owner).map_err(|e| e.to_string())?;
                let batch_no: i32 = client
                    .select("SELECT coalesce(max(batch_no), 0) FROM retl.batches WHERE run_id = $1", Some(1), &[run_id.into()])
                    .and_then(|t| t.first().get_one())
                    .map_err(|e| e.to_string())?
                    .unwrap_or(0);
                // The destination fields the sync writes: its mappings' keys, or every column.
                let fields: Vec<String> = match &sync.mappings {
                    Some(mappings) => mappings.iter().map(|(field, _)| field.clone()).collect(),
                    None => client
                        .select("SELECT unnest(retl._model_columns($1))", None, &[sync.source.clone().into()])
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .filter_map(|row| row.get::<String>(1).ok().flatten())
                        .collect(),
                };
                Ok((sync, dest, batch_no, fields))
            })
        });
        let (sync, dest, batch_no, fields) = match loaded {
            Ok(v) => v,
            Err(message) => {
                finish_run(run_id, Some(&message), false);
                return;
            }
        };
        let connector = connector::for_sync(&dest.config, &fields);
        let batch_size = dest.config.batch_size.min(connector.max_batch_size()).max(1);
        let limits = DeliveryLimits::from_config(&dest.config);
        let deliverer = match crate::settings::deliverer(dest.config.timeout) {
            Ok(d) => d,
            Err(message) => {
                finish_run(run_id, Some(&message), false);
                return;
            }
        };
        // A large run to Salesforce goes through one Bulk API job for its upserts first.
        let bulk = dest.config.salesforce.as_ref().filter(|o| o.bulk_threshold.is_some()).map(|o| Salesforce::new(&dest.config.url, o));
        let bulk_threshold = dest.config.salesforce.as_ref().and_then(|o| o.bulk_threshold).unwrap_or(usize::MAX) as i64;
        let use_bulk = bulk.is_some() && transaction(|| Ok(upserts_waiting(sync.id, run_id, bulk_threshold))).unwrap_or(false);
        // A window: one Bulk API job, or one round of requests (max_concurrency batches).
        let window = if use_bulk { BULK_WINDOW } else { (batch_size * limits.max_concurrency) as i64 };
        // A Bulk window takes upserts only and leaves the deletes behind it: no cursor then.
        let after = if use_bulk { 0 } else { self.cursors.remove(&run_id).unwrap_or(0) };
        let mut next = transaction(|| Ok(load_window(&sync, run_id, window, use_bulk, after)));
        if after > 0 && next.as_ref().is_ok_and(|(_, records)| records.is_empty()) {
            // Nothing after the cursor: the run is over. One look from the front costs little
            // and would catch a row left behind all the same.
            next = transaction(|| Ok(load_window(&sync, run_id, window, use_bulk, 0)));
        }
        let (paused, records) = match next {
            Ok(v) => v,
            Err(message) => {
                finish_run(run_id, Some(&message), false);
                return;
            }
        };
        if paused {
            finish_run(run_id, Some("sync was paused"), true);
            return;
        }
        if records.is_empty() {
            finish_run(run_id, None, false);
            return;
        }
        report_delivering(&sync, run_id, records.len());
        let shared_state = dest.config.rate_limit.and_then(|_| shared::rate_state(dest.server));
        let shared_budget;
        let budget: Option<&dyn RateBudget> = match (dest.config.rate_limit, shared_state) {
            (None, _) => None,
            (Some(rate), Some(tat)) => {
                shared_budget = SharedGcra::new(tat, rate, rate.max(1.0));
                Some(&shared_budget)
            }
            (Some(rate), None) => {
                let entry = self.local_budgets.entry(dest.server.to_u32());
                let budget = entry.or_insert_with(|| (rate, LocalBucket::new(TokenBucket::per_second(rate))));
                if budget.0 != rate {
                    // ALTER SERVER changed the rate: start a budget at the new one.
                    *budget = (rate, LocalBucket::new(TokenBucket::per_second(rate)));
                }
                Some(&budget.1)
            }
        };
        let auth = dest.auth(sync.owner);
        let job = Job {
            dest: connector.as_ref(),
            limits: &limits,
            budget,
            sync_name: &sync.name,
            key_scope: &sync.uid,
            run_id,
            auth: &auth,
            should_stop: &shared::shutdown_requested,
        };
        let mut recorder = Recorder { sync: &sync, run_id, batch_no, run_error: None };
        // Whether the run has rows left for another slice, and where they start.
        let (goes_on, last_id) = match (&bulk, use_bulk) {
            (Some(sf), true) => {
                let size = records.len();
                let report = runtime.block_on(deliverer.deliver_bulk(sf, job, records));
                recorder.record(size, &report);
                // After a bulk window, the run goes on (deletes, the rest) in the next slice.
                (true, None)
            }
            _ => {
                let mut rounds = Rounds::new(&sync, run_id, window, batch_size, connector.as_ref(), after);
                let mut delivery = deliverer.start(job, Vec::new());
                rounds.add(&mut delivery, records);
                let started = Instant::now();
                while let Some(report) = runtime.block_on(delivery.next()) {
                    if delivery.unsent() == 0 && !delivery.is_closed() {
                        // Every batch read is under way: read the next round now, while they
                        // are in flight, unless the slice has had its time or the run is failing.
                        let go_on = rounds.more
                            && started.elapsed() < SLICE_TIME
                            && recorder.run_error.is_none()
                            && !report.fatal
                            && report.unresolved.is_empty()
                            && !shared::shutdown_requested();
                        let added = go_on
                            && rounds.read_next(&mut delivery).unwrap_or_else(|message| {
                                recorder.run_error.get_or_insert(message);
                                false
                            });
                        if !added {
                            delivery.close();
                        }
                    }
                    runtime.block_on(delivery.send());
                    recorder.record(rounds.sizes.pop_front().unwrap_or_default(), &report);
                }
                (rounds.more, Some(rounds.last_id))
            }
        };
        dest.keep_refreshed(sync.owner, &auth);
        let run_error = recorder.run_error;
        if shared::shutdown_requested() {
            // What was acknowledged is recorded; the rest stays queued for the restarted worker.
            return;
        }
        if run_error.is_some() || !goes_on {
            finish_run(run_id, run_error.as_deref(), false);
        } else if let Some(last_id) = last_id {
            if self.cursors.len() >= MAX_CURSORS {
                self.cursors.clear();
            }
            self.cursors.insert(run_id, last_id);
        }
    }
}

/// Reads a run's outbox for a slice, a window at a time after the rows already read, and adds
/// each window's batches to the delivery.
struct Rounds<'a> {
    sync: &'a SyncDef,
    run_id: i64,
    window: i64,
    batch_size: usize,
    connector: &'a dyn Destination,
    /// The sizes of the batches added and not yet recorded, in order.
    sizes: VecDeque<usize>,
    /// The last outbox id read.
    last_id: i64,
    /// Whether the run may have rows after `last_id`: the last read filled its window (or
    /// found the sync paused, which the next slice then reports).
    more: bool,
}

impl<'a> Rounds<'a> {
    fn new(sync: &'a SyncDef, run_id: i64, window: i64, batch_size: usize, connector: &'a dyn Destination, after: i64) -> Self {
        Rounds { sync, run_id, window, batch_size, connector, sizes: VecDeque::new(), last_id: after, more: false }
    }

    /// Adds a window's rows (read in id order) to the delivery, in batches.
    fn add(&mut self, delivery: &mut InOrder, records: Vec<OutboxRecord>) {
        self.more = records.len() as i64 == self.window;
        self.last_id = records.iter().map(|r| r.id).max().unwrap_or(self.last_id);
        for batch in connector::batches(self.connector, records, self.batch_size) {
            self.sizes.push_back(batch.len());
            delivery.push(batch);
        }
    }

    /// Reads the next window and adds it; false if there was none to add.
    fn read_next(&mut self, delivery: &mut InOrder) -> Result<bool, String> {
        let (paused, records) = transaction(|| Ok(load_window(self.sync, self.run_id, self.window, false, self.last_id)))?;
        if paused {
            // The run goes back in line; its next slice finds the sync paused and cancels it.
            return Ok(false);
        }
        if records.is_empty() {
            self.more = false;
            return Ok(false);
        }
        report_delivering(self.sync, self.run_id, records.len());
        self.add(delivery, records);
        Ok(true)
    }
}

/// What pg_stat_activity shows while a window of `rows` rows is delivered.
fn report_delivering(sync: &SyncDef, run_id: i64, rows: usize) {
    report_activity(&format!("retl: sync {} run {run_id}: delivering {rows} rows to {}", sync.name, sync.destination));
}

/// Records a slice's batches in turn, numbering them after the run's earlier ones.
struct Recorder<'a> {
    sync: &'a SyncDef,
    run_id: i64,
    /// The last batch number used.
    batch_no: i32,
    /// Why the run fails, from the first batch that says so.
    run_error: Option<String>,
}

impl Recorder<'_> {
    fn record(&mut self, size: usize, report: &BatchReport) {
        self.batch_no += 1;
        let (sync, run_id, batch_no) = (self.sync, self.run_id, self.batch_no);
        for failure in &report.transport_failures {
            log!("pg_reverse_etl: sync {} run {run_id} batch {batch_no}: a request to {} got no answer: {failure}", sync.name, sync.destination);
        }
        if let Err(message) = record_batch(sync, run_id, batch_no, size, report) {
            self.run_error.get_or_insert(format!("could not record batch {batch_no}: {message}"));
        }
        if report.fatal || !report.unresolved.is_empty() {
            self.run_error.get_or_insert_with(|| report.error.clone().unwrap_or_else(|| "delivery failed".into()));
        }
    }
}

/// The first `window` rows of the run's outbox after id `after` (acknowledged and rejected
/// rows have left it), and whether the sync has been paused meanwhile; marks the run as served
/// now (fair share).
fn load_window(sync: &SyncDef, run_id: i64, window: i64, upserts_only: bool, after: i64) -> (bool, Vec<OutboxRecord>) {
    Spi::connect_mut(|client| {
        let paused = client
            .select("SELECT paused FROM retl.syncs WHERE id = $1", Some(1), &[sync.id.into()])
            .unwrap_or_else(|e| error!("{e}"))
            .into_iter()
            .next()
            .map(|row| row.get::<bool>(1).ok().flatten().unwrap_or(false))
            // A dropped sync stops like a paused one.
            .unwrap_or(true);
        client
            .update("UPDATE retl.runs SET last_served_at = clock_timestamp() WHERE id = $1", None, &[run_id.into()])
            .unwrap_or_else(|e| error!("{e}"));
        // The window must be read in id order along the (sync_id, run_id, id) index, whatever the
        // statistics say: a freshly filled outbox has none until autovacuum analyzes it, and
        // the planner then sorted every remaining row of the run for each window (0.8 s per
        // window with 300k rows left).
        for setting in ["SET LOCAL enable_sort = off", "SET LOCAL enable_bitmapscan = off"] {
            client.update(setting, None, &[]).unwrap_or_else(|e| error!("{e}"));
        }
        let table = client
            .select(
                "SELECT o.id, o.op, o.key::text, o.payload::text, i.destination_id \
                   FROM retl.outbox o \
                   LEFT JOIN retl.identities i ON i.sync_id = o.sync_id AND i.key = o.key \
                  WHERE o.sync_id = $5 AND o.run_id = $1 AND o.id > $4 AND NOT ($3 AND o.op = 'delete') ORDER BY o.id LIMIT $2",
                None,
                &[run_id.into(), window.into(), upserts_only.into(), after.into(), sync.id.into()],
            )
            .unwrap_or_else(|e| error!("{e}"));
        let parse = |s: String| serde_json::from_str(&s).unwrap_or(serde_json::Value::Null);
        let records = table
            .into_iter()
            .map(|row| OutboxRecord {
                id: row.get::<i64>(1).ok().flatten().unwrap_or_default(),
                op: Op::from_str(&row.get::<String>(2).ok().flatten().unwrap_or_default()).unwrap_or(Op::Upsert),
                key: row.get::<String>(3).ok().flatten().map(parse).unwrap_or_default(),
                fields: row.get::<String>(4).ok().flatten().map(parse),
                destination_id: row.get::<String>(5).ok().flatten(),
            })
            .collect();
        (paused, records)
    })
}

/// Whether at least `threshold` rows other than deletes wait in the run's outbox.
fn upserts_waiting(sync_id: i64, run_id: i64, threshold: i64) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT count(*) >= $2 FROM (SELECT 1 FROM retl.outbox WHERE sync_id = $3 AND run_id = $1 AND op <> 'delete' LIMIT $2) w",
        &[run_id.into(), threshold.into(), sync_id.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Apply one batch's outcome in one transaction.
fn record_batch(sync: &SyncDef, run_id: i64, batch_no: i32, size: usize, report: &BatchReport) -> Result<(), String> {
    let erasing = sync.mode == Mode::Delete;
    let outcome = transaction(|| {
        Spi::connect_mut(|client| {
            let acked = report.acked.clone();
            // The outbox's primary key is (sync_id, run_id, id). Its rows are looked up by their ids and
            // also by the ids' range (here and below): a range is always a condition of the
            // index scan, whereas the planner may turn a list of ids into a filter over every
            // row the run has left (it did, with the statistics of a freshly filled outbox:
            // 30 ms instead of 2 ms per 1000 rows).
            let (lo, hi) = id_range(&acked);
            // Ids the destination named go to the identity map first (the outbox rows that
            // carry their keys are deleted just below).
            if !report.destination_ids.is_empty() {
                let (ids, destination_ids): (Vec<i64>, Vec<String>) = report.destination_ids.iter().cloned().unzip();
                let (named_lo, named_hi) = id_range(&ids);
                client
                    .update(
                        "INSERT INTO retl.identities (sync_id, key, destination_id) \
                         SELECT o.sync_id, o.key, d.destination_id \
                           FROM unnest($1::bigint[], $2::text[]) AS d(id, destination_id) JOIN retl.outbox o ON o.sync_id = $6 AND o.run_id = $3 AND o.id BETWEEN $4 AND $5 AND o.id = d.id \
                          WHERE o.op <> 'delete' \
                         ON CONFLICT (sync_id, key) DO UPDATE \
                         SET destination_id = excluded.destination_id, updated_at = now()",
                        None,
                        &[ids.into(), destination_ids.into(), run_id.into(), named_lo.into(), named_hi.into(), sync.id.into()],
                    )
                    .map_err(|e| e.to_string())?;
            }
            // Acknowledged: advance the snapshot (a mirror delete removes the key; a delete-mode
            // tombstone records it as erased), leave the outbox, clear any old row error, and
            // forget the destination id of a deleted key. Row errors are looked up only when the
            // sync has any (a one-time check): probing for each acknowledged key took 0.6 ms of
            // the statement's 9 ms per 1000 rows, with none to find.
            client
                .update(
                    "WITH acked AS (DELETE FROM retl.outbox WHERE sync_id = $6 AND run_id = $3 AND id BETWEEN $4 AND $5 AND id = ANY($1) \
                                    RETURNING sync_id, op, key, hash), \
                          kept AS (INSERT INTO retl.snapshots (sync_id, key, hash, delivered_at) \
                                   SELECT sync_id, key, hash, now() FROM acked WHERE op <> 'delete' OR $2 \
                                   ON CONFLICT (sync_id, key) DO UPDATE \
                                   SET hash = excluded.hash, delivered_at = excluded.delivered_at RETURNING 1), \
                          gone AS (DELETE FROM retl.snapshots s USING acked a \
                                   WHERE a.op = 'delete' AND NOT $2 AND s.sync_id = a.sync_id AND s.key = a.key RETURNING 1), \
                          healed AS (DELETE FROM retl.row_errors e USING acked a \
                                   WHERE e.sync_id = a.sync_id AND e.key = a.key \
                                     AND EXISTS (SELECT FROM retl.row_errors WHERE sync_id = $6) RETURNING 1), \
                          forgotten AS (DELETE FROM retl.identities i USING acked a \
                                   WHERE a.op = 'delete' AND i.sync_id = a.sync_id AND i.key = a.key RETURNING 1) \
                     SELECT (SELECT count(*) FROM kept) + (SELECT count(*) FROM gone) + (SELECT count(*) FROM healed)",
                    None,
                    &[acked.into(), erasing.into(), run_id.into(), lo.into(), hi.into(), sync.id.into()],
                )
                .map_err(|e| e.to_string())?;
            if !report.rejected.is_empty() {
                let ids: Vec<i64> = report.rejected.iter().map(|r| r.id).collect();
                let (rejected_lo, rejected_hi) = id_range(&ids);
                let statuses: Vec<Option<i32>> = report.rejected.iter().map(|r| r.status.map(i32::from)).collect();
                let messages: Vec<String> = report.rejected.iter().map(|r| r.message.clone()).collect();
                client
                    .update(
                        "WITH rejected AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[]) AS r(id, http_status, response)), \
                              moved AS (DELETE FROM retl.outbox o USING rejected r \
                                        WHERE o.sync_id = $7 AND o.run_id = $4 AND o.id BETWEEN $5 AND $6 AND o.id = r.id \
                                        RETURNING o.sync_id, o.key, o.run_id, o.op, o.payload, o.hash, r.http_status, r.response) \
                         INSERT INTO retl.row_errors (sync_id, key, run_id, op, payload, hash, http_status, response) \
                         SELECT sync_id, key, run_id, op, payload, hash, http_status, response FROM moved \
                         ON CONFLICT (sync_id, key) DO UPDATE \
                         SET run_id = excluded.run_id, op = excluded.op, payload = excluded.payload, hash = excluded.hash, \
                             http_status = excluded.http_status, response = excluded.response, \
                             attempts = retl.row_errors.attempts + 1, last_failed_at = now()",
                        None,
                        &[
                            ids.into(),
                            statuses.into(),
                            messages.into(),
                            run_id.into(),
                            rejected_lo.into(),
                            rejected_hi.into(),
                            sync.id.into(),
                        ],
                    )
                    .map_err(|e| e.to_string())?;
            }
            if !report.unresolved.is_empty() {
                let (unresolved_lo, unresolved_hi) = id_range(&report.unresolved);
                client
                    .update(
                        "UPDATE retl.outbox SET attempts = attempts + 1 \
                          WHERE sync_id = $5 AND run_id = $2 AND id BETWEEN $3 AND $4 AND id = ANY($1)",
                        None,
                        &[
                            report.unresolved.clone().into(),
                            run_id.into(),
                            unresolved_lo.into(),
                            unresolved_hi.into(),
                            sync.id.into(),
                        ],
                    )
                    .map_err(|e| e.to_string())?;
            }
            client
                .update(
                    "INSERT INTO retl.batches (run_id, batch_no, records, acknowledged, rejected, unresolved, api_calls, error) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    None,
                    &[
                        run_id.into(),
                        batch_no.into(),
                        (size as i32).into(),
                        (report.acked.len() as i32).into(),
                        (report.rejected.len() as i32).into(),
                        (report.unresolved.len() as i32).into(),
                        (report.api_calls as i32).into(),
                        report.error.clone().into(),
                    ],
                )
                .map_err(|e| e.to_string())?;
            client
                .update(
                    "UPDATE retl.runs SET delivered = delivered + $2, failed = failed + $3, api_calls = api_calls + $4, \
                                          api_usage = coalesce($5, api_usage) WHERE id = $1",
                    None,
                    &[
                        run_id.into(),
                        (report.acked.len() as i64).into(),
                        (report.rejected.len() as i64).into(),
                        (report.api_calls as i64).into(),
                        report.api_usage.as_ref().map(|usage| usage.shown.clone()).into(),
                    ],
                )
                .map_err(|e| e.to_string())?;
            Ok(())
        })
    });
    if let Err(message) = &outcome {
        // The rows stay in the outbox and the run fails: the next run plans them again.
        log!("pg_reverse_etl: could not record batch {batch_no} of run {run_id}: {message}");
    }
    outcome
}

/// The smallest and largest of `ids` (an empty range when there are none).
fn id_range(ids: &[i64]) -> (i64, i64) {
    (ids.iter().copied().min().unwrap_or(1), ids.iter().copied().max().unwrap_or(0))
}

/// Close a run: failed with `error`, cancelled, partial (some rows rejected) or succeeded.
pub fn finish_run(run_id: i64, error: Option<&str>, cancelled: bool) {
    let result = transaction(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE retl.runs SET \
                       status = CASE WHEN $3 THEN 'cancelled' WHEN $2::text IS NOT NULL THEN 'failed' \
                                     WHEN failed > 0 THEN 'partial' ELSE 'succeeded' END, \
                       error = $2, started_at = coalesce(started_at, clock_timestamp()), finished_at = clock_timestamp() \
                     WHERE id = $1",
                    None,
                    &[run_id.into(), error.into(), cancelled.into()],
                )
                .map_err(|e| e.to_string())?;
            log_finished_run(client, run_id);
            Ok(())
        })
    });
    if let Err(message) = result {
        log!("pg_reverse_etl: could not close run {run_id}: {message}");
    }
}

/// With `retl.log_runs` on, one server-log line per finished run.
pub fn log_finished_run(client: &SpiClient, run_id: i64) {
    if !settings::LOG_RUNS.get() {
        return;
    }
    let line = client
        .select(
            "SELECT format('pg_reverse_etl: run %s of sync %s %s: %s delivered, %s rejected, %s API calls%s', \
                           r.id, s.name, r.status, r.delivered, r.failed, r.api_calls, ': ' || r.error) \
               FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE r.id = $1",
            Some(1),
            &[run_id.into()],
        )
        .ok()
        .and_then(|t| if t.is_empty() { None } else { t.first().get_one::<String>().ok().flatten() });
    if let Some(line) = line {
        log!("{line}");
    }
}
