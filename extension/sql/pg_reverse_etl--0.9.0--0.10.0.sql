-- pg_reverse_etl 0.9.0 -> 0.10.0: cheaper writes of the outbox and the snapshot (measured for
-- 0.10.0, see docs/BENCHMARKS.md). Queued rows and snapshots are kept.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.10.0'" to load this file. \quit

-- Room on every page of the snapshot for new versions of its rows: an acknowledged change then
-- rewrites the row on its page without a new entry in the primary key (jsonb keys, costly to
-- compare). Pages written from now on keep the room; the ones there fill up as rows change.
ALTER TABLE retl.snapshots SET (fillfactor = 90);

-- One index where the outbox had two for the same reads: a run's rows in id order, and the
-- acknowledged ones by run and id. Every index costs a plan that writes 100k rows about
-- 0.25-0.3 s. Rebuilt over the rows queued now (usually none: update between runs).
ALTER TABLE retl.outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE retl.outbox ADD PRIMARY KEY (run_id, id);
DROP INDEX retl.outbox_run_idx;
