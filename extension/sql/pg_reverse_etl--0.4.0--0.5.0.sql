-- pg_reverse_etl 0.4.0 -> 0.5.0: safeguards and observability.
-- Plans check safeguards before anything is queued (row cap, mass-delete guard with the
-- empty-model case, schema contract, the destination's daily_row_quota and each sync's share;
-- existing syncs get the defaults: max_delete_percent 50, alert_after_failures 3), and may
-- leave NULL fields out (nulls 'keep'). retl.run takes allow_mass_delete and
-- allow_schema_change; retl.retry_failed and retl.discard_failed; alerts (retl.alerts,
-- NOTIFY retl_alerts, an alert destination); sync_status gains window rates, latency
-- percentiles, usage against daily quotas and the freshness SLA; retl.metrics for
-- postgres_exporter; runs older than retl.history_retention are purged.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.5.0'" to load this file. \quit

ALTER TABLE retl.syncs
    ADD COLUMN max_rows             bigint,
    ADD COLUMN max_delete_percent   numeric DEFAULT 50,
    ADD COLUMN max_delete_rows      bigint,
    ADD COLUMN quota_share          numeric NOT NULL DEFAULT 1,
    ADD COLUMN nulls                text NOT NULL DEFAULT 'send',
    ADD COLUMN freshness            interval,
    ADD COLUMN alert_after_failures int NOT NULL DEFAULT 3,
    ADD COLUMN alert_row_error_rate numeric,
    ADD COLUMN alert_count_change_percent numeric,
    ADD COLUMN alert_queue_depth    bigint,
    ADD COLUMN alert_destination    text;

ALTER TABLE retl.runs
    ADD COLUMN allow_mass_delete   boolean NOT NULL DEFAULT false,
    ADD COLUMN allow_schema_change boolean NOT NULL DEFAULT false,
    ADD COLUMN model_columns       jsonb;

ALTER TABLE retl.row_errors ADD COLUMN hash bytea;

CREATE TABLE retl.alerts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sync_id     bigint NOT NULL REFERENCES retl.syncs(id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('failed_runs', 'freshness', 'row_error_rate', 'row_count_change', 'queue_depth')),
    message     text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}',
    run_id      bigint,
    raised_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    resolved_at timestamptz,
    -- Delivery to the alert destination: when it was sent, or why it could not be.
    sent_at     timestamptz,
    send_error  text
);
CREATE UNIQUE INDEX alerts_open_idx ON retl.alerts (sync_id, kind) WHERE resolved_at IS NULL;
CREATE INDEX alerts_sync_idx ON retl.alerts (sync_id, id DESC);
COMMENT ON TABLE retl.alerts IS
  'Alerts: failed_runs (alert_after_failures failed runs in a row), freshness (no successful run within the sync''s freshness SLA), row_error_rate (a run rejected more than alert_row_error_rate of its rows), row_count_change (the model''s row count moved by more than alert_count_change_percent since the run before), queue_depth (more than alert_queue_depth rows queued). Open while the condition holds (resolved_at NULL); each raise and resolution is a NOTIFY on channel retl_alerts; sent_at: when it went to the alert destination.';
GRANT SELECT ON retl.alerts TO PUBLIC;

CREATE FUNCTION retl._server_option(server text, option text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT o.option_value FROM pg_foreign_server s, pg_options_to_table(s.srvoptions) o
     WHERE s.srvname = server AND o.option_name = option
$$;

CREATE FUNCTION retl._status_window() RETURNS interval
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(nullif(current_setting('retl.status_window', true), ''), '1d')::interval
$$;

CREATE FUNCTION retl._window_stats(sync_id bigint, status_window interval)
RETURNS TABLE (window_runs bigint, window_success_rate numeric, window_row_error_rate numeric,
               latency_p50 interval, latency_p99 interval)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH finished AS (SELECT r.status FROM retl.runs r
                       WHERE r.sync_id = _window_stats.sync_id AND r.finished_at > now() - status_window
                         AND r.status IN ('succeeded', 'partial', 'failed')),
         sent AS (SELECT b.finished_at - r.planned_at AS latency, b.acknowledged, b.rejected
                    FROM retl.runs r JOIN retl.batches b ON b.run_id = r.id
                   WHERE r.sync_id = _window_stats.sync_id AND b.finished_at > now() - status_window),
         ranked AS (SELECT latency, sum(acknowledged) OVER (ORDER BY latency) AS upto, sum(acknowledged) OVER () AS total
                      FROM sent WHERE acknowledged > 0)
    SELECT (SELECT count(*) FROM finished),
           (SELECT round(avg((status <> 'failed')::int), 3) FROM finished),
           (SELECT round(sum(rejected)::numeric / nullif(sum(acknowledged + rejected), 0), 4) FROM sent),
           (SELECT min(latency) FROM ranked WHERE upto >= 0.5 * total),
           (SELECT min(latency) FROM ranked WHERE upto >= 0.99 * total)
$$;

CREATE OR REPLACE VIEW retl.sync_status AS
SELECT s.name                                            AS sync,
       coalesce(a.name, m.name)                          AS source,
       s.destination,
       s.mode,
       s.paused,
       last.id                                           AS last_run_id,
       last.status                                       AS last_status,
       last.finished_at                                  AS last_finished_at,
       last.error                                        AS last_error,
       ok.finished_at                                    AS last_success_at,
       now() - ok.finished_at                            AS freshness_lag,
       (SELECT count(*) FROM retl.runs r WHERE r.sync_id = s.id)                 AS runs,
       recent.success_rate,
       (SELECT count(*) FROM retl.outbox o WHERE o.sync_id = s.id)               AS queue_depth,
       (SELECT count(*) FROM retl.row_errors e WHERE e.sync_id = s.id)           AS failing_rows,
       (SELECT count(*) FROM retl.snapshots sn WHERE sn.sync_id = s.id)          AS rows_synced,
       last.delivered                                    AS last_delivered,
       last.api_calls                                    AS last_api_calls,
       s.schedule,
       s.next_run_at,
       (SELECT array_agg(p.name ORDER BY p.name) FROM retl.sync_parents sp JOIN retl.syncs p ON p.id = sp.parent_id
         WHERE sp.sync_id = s.id)                        AS after,
       (SELECT r.api_usage FROM retl.runs r WHERE r.sync_id = s.id AND r.api_usage IS NOT NULL
         ORDER BY r.id DESC LIMIT 1)                     AS api_usage,
       -- Since 0.5.0.
       s.freshness                                       AS freshness_sla,
       coalesce(now() - coalesce(ok.finished_at, s.created_at) > s.freshness, false) AS sla_breached,
       w.window_runs,
       w.window_success_rate,
       w.window_row_error_rate,
       w.latency_p50                                     AS delivery_latency_p50,
       w.latency_p99                                     AS delivery_latency_p99,
       day.api_calls                                     AS api_calls_24h,
       retl._server_option(s.destination, 'daily_api_quota')::bigint AS daily_api_quota,
       day.rows                                          AS rows_24h,
       retl._server_option(s.destination, 'daily_row_quota')::bigint AS daily_row_quota,
       (SELECT count(*) FROM retl.alerts al WHERE al.sync_id = s.id AND al.resolved_at IS NULL) AS open_alerts
  FROM retl.syncs s
  JOIN retl.models m ON m.id = s.model_id
  LEFT JOIN retl.audiences a ON a.id = s.audience_id
  LEFT JOIN LATERAL (SELECT r.id, r.status, r.finished_at, r.error, r.delivered, r.api_calls
                      FROM retl.runs r WHERE r.sync_id = s.id ORDER BY r.id DESC LIMIT 1) last ON true
  LEFT JOIN LATERAL (SELECT r.finished_at FROM retl.runs r
                      WHERE r.sync_id = s.id AND r.status IN ('succeeded', 'partial')
                      ORDER BY r.id DESC LIMIT 1) ok ON true
  LEFT JOIN LATERAL (SELECT round(avg((r.status IN ('succeeded', 'partial'))::int), 3) AS success_rate
                       FROM (SELECT status FROM retl.runs r
                              WHERE r.sync_id = s.id AND r.status IN ('succeeded', 'partial', 'failed')
                              ORDER BY r.id DESC LIMIT 20) r) recent ON true
  LEFT JOIN LATERAL retl._window_stats(s.id, retl._status_window()) w ON true
  LEFT JOIN LATERAL (SELECT coalesce(sum(b.api_calls), 0)::bigint AS api_calls,
                            coalesce(sum(b.acknowledged + b.rejected), 0)::bigint AS rows
                       FROM retl.runs r JOIN retl.batches b ON b.run_id = r.id
                      WHERE r.sync_id = s.id AND b.finished_at > now() - interval '1 day') day ON true;
COMMENT ON VIEW retl.sync_status IS
  'One row per sync: last run and its outcome, time since the last successful run against the freshness SLA (sla_breached), success rate of the last 20 finished runs, rows queued, failing and synced; over the status window (setting retl.status_window, default 1 day): runs, success rate, row-error rate (rejected / sent), delivery latency p50/p99 (plan committed to acknowledgement, per row); API calls and rows sent in the last 24 hours against the destination''s daily_api_quota and daily_row_quota, the API usage the destination last reported, and open alerts.';
GRANT SELECT ON retl.sync_status TO PUBLIC;

DROP FUNCTION retl.create_sync(text, text, text, text, text, jsonb, boolean, text, text[], text);
CREATE FUNCTION retl.create_sync(
    name        text,
    destination text,
    model       text DEFAULT NULL,
    audience    text DEFAULT NULL,
    mode        text DEFAULT 'upsert',
    mappings    jsonb DEFAULT NULL,
    paused      boolean DEFAULT false,
    schedule    text DEFAULT 'manual',
    after       text[] DEFAULT NULL,
    time_zone   text DEFAULT 'UTC',
    max_rows    bigint DEFAULT NULL,
    max_delete_percent numeric DEFAULT 50,
    max_delete_rows bigint DEFAULT NULL,
    quota_share numeric DEFAULT 1,
    nulls       text DEFAULT 'send',
    freshness   interval DEFAULT NULL,
    alert_after_failures int DEFAULT 3,
    alert_row_error_rate numeric DEFAULT NULL,
    alert_count_change_percent numeric DEFAULT NULL,
    alert_queue_depth bigint DEFAULT NULL,
    alert_destination text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := retl._caller();
    m retl.models;
    a retl.audiences;
    source_name text;
    sync_id bigint;
BEGIN
    PERFORM retl._check_name('sync', name);
    IF EXISTS (SELECT 1 FROM retl.syncs s WHERE s.name = create_sync.name) THEN
        RAISE EXCEPTION 'sync % already exists', retl._q(name)
              USING ERRCODE = 'duplicate_object', HINT = 'Change it with retl.alter_sync, or drop it with retl.drop_sync.';
    END IF;
    IF (model IS NULL) = (audience IS NULL) THEN
        RAISE EXCEPTION 'sync % needs exactly one of model or audience', retl._q(name)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF audience IS NOT NULL THEN
        SELECT * INTO a FROM retl.audiences WHERE audiences.name = create_sync.audience;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'audience % does not exist', retl._q(audience) USING ERRCODE = 'undefined_object';
        END IF;
        SELECT * INTO m FROM retl.models WHERE id = a.model_id;
        source_name := a.name;
    ELSE
        SELECT * INTO m FROM retl.models WHERE models.name = create_sync.model;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'model % does not exist', retl._q(model) USING ERRCODE = 'undefined_object';
        END IF;
        source_name := m.name;
    END IF;
    PERFORM retl._check_mode(mode);
    PERFORM retl._check_destination(destination, caller);
    IF NOT has_table_privilege(caller, format('retl_models.%I', source_name), 'SELECT') THEN
        RAISE EXCEPTION 'permission denied for % %', CASE WHEN a.id IS NULL THEN 'model' ELSE 'audience' END, retl._q(source_name)
              USING ERRCODE = 'insufficient_privilege',
                    HINT = format('Its owner can run: GRANT SELECT ON retl_models.%I TO %I;', source_name, caller::text);
    END IF;
    PERFORM retl._check_mappings(name, source_name, mappings);
    PERFORM retl._check_destination_fields(name, destination, caller, retl._sync_fields(mode, mappings, source_name),
                                           m.primary_key);
    schedule := retl._check_schedule(name, schedule, time_zone);
    INSERT INTO retl.syncs (name, model_id, audience_id, destination, mode, mappings, owner, paused,
                            schedule, time_zone, next_run_at,
                            max_rows, max_delete_percent, max_delete_rows, quota_share, nulls, freshness,
                            alert_after_failures, alert_row_error_rate, alert_count_change_percent,
                            alert_queue_depth, alert_destination)
    VALUES (name, m.id, a.id, destination, mode, mappings, caller, paused,
            schedule, time_zone, retl._next_run_at(schedule, time_zone, now()),
            max_rows, max_delete_percent, max_delete_rows, coalesce(quota_share, 1), coalesce(nulls, 'send'), freshness,
            coalesce(alert_after_failures, 0), alert_row_error_rate, alert_count_change_percent,
            alert_queue_depth, alert_destination)
    RETURNING id INTO sync_id;
    PERFORM retl._check_sync_settings(sync_id);
    PERFORM retl._set_parents(sync_id, after);
    PERFORM retl._refresh_sources(sync_id);
    -- An idle worker sleeps until the earliest schedule it knew of: tell it about this one.
    PERFORM retl._wake_worker_at_commit();
    RETURN sync_id;
END $$;
COMMENT ON FUNCTION retl.create_sync(text, text, text, text, text, jsonb, boolean, text, text[], text, bigint, numeric, bigint, numeric, text, interval, int, numeric, numeric, bigint, text) IS
  'Define a sync from a model (or audience) to a destination. mode: insert, update, upsert (default), mirror (also deletes rows that leave the model), delete (the model lists keys to delete). mappings: {"destination_field": "model_column"}, NULL for every column. schedule: manual (default), on change (runs when a commit changes a table the model reads), a 5-field cron expression evaluated in time_zone (default UTC), or an interval such as 5 minutes. after: syncs that must all have succeeded before this one runs. Safeguards, checked by every plan before anything is queued (a refused plan is a failed run): max_rows (changes per run), max_delete_percent (default 50: a mirror run may delete at most this share of what the sync delivered; an empty model is always refused) and max_delete_rows (mirror and delete runs), quota_share (of the destination''s daily_row_quota); nulls: send (default) or keep (NULL fields are left out, never overwriting a destination value). Alerts (retl.alerts): freshness SLA, alert_after_failures (default 3, 0: never), alert_row_error_rate (0..1), alert_count_change_percent, alert_queue_depth, alert_destination (a slack or webhook destination). Returns the sync id.';

DROP FUNCTION retl.alter_sync(text, text, text, jsonb, boolean, text, text[], text);
CREATE FUNCTION retl.alter_sync(
    name        text,
    destination text DEFAULT NULL,
    mode        text DEFAULT NULL,
    mappings    jsonb DEFAULT NULL,
    reset_mappings boolean DEFAULT false,
    schedule    text DEFAULT NULL,
    after       text[] DEFAULT NULL,
    time_zone   text DEFAULT NULL,
    max_rows    bigint DEFAULT NULL,
    max_delete_percent numeric DEFAULT NULL,
    max_delete_rows bigint DEFAULT NULL,
    quota_share numeric DEFAULT NULL,
    nulls       text DEFAULT NULL,
    freshness   interval DEFAULT NULL,
    alert_after_failures int DEFAULT NULL,
    alert_row_error_rate numeric DEFAULT NULL,
    alert_count_change_percent numeric DEFAULT NULL,
    alert_queue_depth bigint DEFAULT NULL,
    alert_destination text DEFAULT NULL,
    reset       text[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs := retl._sync_for_change(name);
    source_name text;
    unknown text;
BEGIN
    SELECT string_agg(retl._q(r), ', ') INTO unknown
      FROM unnest(reset) r
     WHERE r IS NULL OR r NOT IN ('max_rows', 'max_delete_percent', 'max_delete_rows', 'quota_share', 'nulls', 'freshness',
                                  'alert_after_failures', 'alert_row_error_rate', 'alert_count_change_percent',
                                  'alert_queue_depth', 'alert_destination');
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'alter_sync cannot reset %', unknown
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'reset takes the names of safeguard and alert settings: max_rows, max_delete_percent, max_delete_rows, quota_share, nulls, freshness, alert_after_failures, alert_row_error_rate, alert_count_change_percent, alert_queue_depth, alert_destination.';
    END IF;
    IF mode IS NOT NULL THEN
        PERFORM retl._check_mode(mode);
    END IF;
    IF destination IS NOT NULL AND destination <> s.destination THEN
        PERFORM retl._check_destination(destination, s.owner);
        -- A new destination holds nothing this sync delivered: start from an empty snapshot.
        DELETE FROM retl.snapshots WHERE sync_id = s.id;
        DELETE FROM retl.outbox WHERE sync_id = s.id;
        DELETE FROM retl.row_errors WHERE sync_id = s.id;
        DELETE FROM retl.identities WHERE sync_id = s.id;
    END IF;
    SELECT coalesce(a.name, m.name) INTO source_name
      FROM retl.models m LEFT JOIN retl.audiences a ON a.id = s.audience_id WHERE m.id = s.model_id;
    IF mappings IS NOT NULL THEN
        PERFORM retl._check_mappings(s.name, source_name, mappings);
    END IF;
    IF schedule IS NOT NULL OR time_zone IS NOT NULL THEN
        schedule := retl._check_schedule(s.name, coalesce(schedule, s.schedule), coalesce(time_zone, s.time_zone));
        time_zone := coalesce(time_zone, s.time_zone);
    END IF;
    UPDATE retl.syncs
       SET destination = coalesce(alter_sync.destination, syncs.destination),
           mode        = coalesce(alter_sync.mode, syncs.mode),
           mappings    = CASE WHEN reset_mappings THEN NULL ELSE coalesce(alter_sync.mappings, syncs.mappings) END,
           schedule    = coalesce(alter_sync.schedule, syncs.schedule),
           time_zone   = coalesce(alter_sync.time_zone, syncs.time_zone),
           next_run_at = CASE WHEN alter_sync.schedule IS NULL THEN syncs.next_run_at
                              ELSE retl._next_run_at(alter_sync.schedule, alter_sync.time_zone, now()) END,
           max_rows    = CASE WHEN 'max_rows' = ANY (reset) THEN NULL ELSE coalesce(alter_sync.max_rows, syncs.max_rows) END,
           max_delete_percent = CASE WHEN 'max_delete_percent' = ANY (reset) THEN 50
                                     ELSE coalesce(alter_sync.max_delete_percent, syncs.max_delete_percent) END,
           max_delete_rows = CASE WHEN 'max_delete_rows' = ANY (reset) THEN NULL
                                  ELSE coalesce(alter_sync.max_delete_rows, syncs.max_delete_rows) END,
           quota_share = CASE WHEN 'quota_share' = ANY (reset) THEN 1 ELSE coalesce(alter_sync.quota_share, syncs.quota_share) END,
           nulls       = CASE WHEN 'nulls' = ANY (reset) THEN 'send' ELSE coalesce(alter_sync.nulls, syncs.nulls) END,
           freshness   = CASE WHEN 'freshness' = ANY (reset) THEN NULL ELSE coalesce(alter_sync.freshness, syncs.freshness) END,
           alert_after_failures = CASE WHEN 'alert_after_failures' = ANY (reset) THEN 3
                                       ELSE coalesce(alter_sync.alert_after_failures, syncs.alert_after_failures) END,
           alert_row_error_rate = CASE WHEN 'alert_row_error_rate' = ANY (reset) THEN NULL
                                       ELSE coalesce(alter_sync.alert_row_error_rate, syncs.alert_row_error_rate) END,
           alert_count_change_percent = CASE WHEN 'alert_count_change_percent' = ANY (reset) THEN NULL
                                             ELSE coalesce(alter_sync.alert_count_change_percent, syncs.alert_count_change_percent) END,
           alert_queue_depth = CASE WHEN 'alert_queue_depth' = ANY (reset) THEN NULL
                                    ELSE coalesce(alter_sync.alert_queue_depth, syncs.alert_queue_depth) END,
           alert_destination = CASE WHEN 'alert_destination' = ANY (reset) THEN NULL
                                    ELSE coalesce(alter_sync.alert_destination, syncs.alert_destination) END,
           updated_at  = now()
     WHERE id = s.id;
    PERFORM retl._check_sync_settings(s.id);
    IF after IS NOT NULL THEN
        -- after => '{}' removes every parent.
        PERFORM retl._set_parents(s.id, after);
    END IF;
    IF alter_sync.destination IS NOT NULL OR alter_sync.mappings IS NOT NULL OR reset_mappings OR alter_sync.mode IS NOT NULL THEN
        SELECT * INTO s FROM retl.syncs WHERE id = s.id;
        PERFORM retl._check_destination_fields(s.name, s.destination, s.owner, retl._sync_fields(s.mode, s.mappings, source_name),
                                               (SELECT m.primary_key FROM retl.models m WHERE m.id = s.model_id));
    END IF;
    PERFORM retl._refresh_sources(s.id);
    PERFORM retl._wake_worker_at_commit();
END $$;
COMMENT ON FUNCTION retl.alter_sync(text, text, text, jsonb, boolean, text, text[], text, bigint, numeric, bigint, numeric, text, interval, int, numeric, numeric, bigint, text, text[]) IS
  'Change a sync; arguments left NULL keep their value (reset_mappings => true maps every column again; after => ''{}'' removes every parent; reset => ''{max_rows, freshness}'' puts safeguard and alert settings back to their defaults). A new destination starts from an empty snapshot and identity map.';

DROP FUNCTION retl._queue_run(text, text);
CREATE FUNCTION retl._queue_run(sync text, trigger text, allow_mass_delete boolean, allow_schema_change boolean)
RETURNS retl.runs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs := retl._sync_for_change(sync);
    r retl.runs;
BEGIN
    IF s.paused THEN
        RAISE EXCEPTION 'sync % is paused', retl._q(s.name)
              USING ERRCODE = 'object_not_in_prerequisite_state', HINT = format('Resume it with SELECT retl.resume(%L);', s.name);
    END IF;
    INSERT INTO retl.runs (sync_id, trigger, allow_mass_delete, allow_schema_change)
    VALUES (s.id, trigger, coalesce(allow_mass_delete, false), coalesce(allow_schema_change, false)) RETURNING * INTO r;
    RETURN r;
END $$;

DROP FUNCTION retl.run(text, boolean, interval);
DROP FUNCTION retl._await_run(bigint, bigint);
CREATE  FUNCTION "_await_run"(
	"sync_id" bigint, /* i64 */
	"timeout_ms" bigint, /* Option < i64 > */
	"allow_mass_delete" bool, /* bool */
	"allow_schema_change" bool /* bool */
) RETURNS bigint /* i64 */
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_await_run_wrapper';
REVOKE ALL ON FUNCTION retl._await_run(bigint, bigint, boolean, boolean) FROM PUBLIC;

CREATE FUNCTION retl.run(sync text, wait boolean DEFAULT false, timeout interval DEFAULT NULL,
                         allow_mass_delete boolean DEFAULT false, allow_schema_change boolean DEFAULT false)
RETURNS retl.runs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r retl.runs;
    run_id bigint;
    timeout_ms bigint;
BEGIN
    PERFORM retl._check_worker_database();
    IF NOT wait THEN
        IF timeout IS NOT NULL THEN
            RAISE EXCEPTION 'retl.run: timeout needs wait => true' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- The run row commits with the caller's transaction; the worker is woken at commit.
        r := retl._queue_run(sync, 'manual', allow_mass_delete, allow_schema_change);
        PERFORM retl._wake_worker_at_commit();
        RETURN r;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'retl.run(wait => true) needs the READ COMMITTED isolation level'
              USING ERRCODE = 'object_not_in_prerequisite_state',
                    DETAIL = format('This transaction is %s, so it could not see the finished run.', current_setting('transaction_isolation'));
    END IF;
    IF timeout IS NOT NULL THEN
        IF timeout <= interval '0' THEN
            RAISE EXCEPTION 'retl.run: timeout must be positive, got %', timeout USING ERRCODE = 'invalid_parameter_value';
        END IF;
        timeout_ms := ceil(extract(epoch FROM timeout) * 1000)::bigint;
    END IF;
    -- The worker creates and commits the run row itself, so it can finish while we wait.
    run_id := retl._await_run(retl._runnable_sync(sync), timeout_ms, coalesce(allow_mass_delete, false),
                              coalesce(allow_schema_change, false));
    -- A new statement, so a new snapshot: it sees the run the worker committed meanwhile.
    r := retl._run_summary(run_id);
    IF r.id IS NULL THEN
        RAISE EXCEPTION 'run % of sync % is gone: the sync was dropped while it ran', run_id, retl._q(sync)
              USING ERRCODE = 'undefined_object';
    END IF;
    -- A failed run fails the caller (a dbt post-hook fails its model); partial runs (some rows
    -- rejected, listed in retl.row_errors) do not.
    IF r.status = 'failed' THEN
        RAISE EXCEPTION 'run % of sync % failed: %', r.id, retl._q(sync), coalesce(r.error, 'no error recorded')
              USING ERRCODE = 'external_routine_exception',
                    DETAIL = format('planned %s, delivered %s, rejected %s, %s API calls',
                                    r.planned_inserts + r.planned_updates + r.planned_deletes, r.delivered, r.failed, r.api_calls),
                    HINT = 'See SELECT * FROM retl.runs WHERE id = ' || r.id || ' and retl.batches for that run.';
    ELSIF r.status = 'cancelled' THEN
        RAISE EXCEPTION 'run % of sync % was cancelled: %', r.id, retl._q(sync), coalesce(r.error, 'no reason recorded')
              USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN r;
END $$;
COMMENT ON FUNCTION retl.run(text, boolean, interval, boolean, boolean) IS
  'Run a sync. wait => false (default): queue the run; the worker starts it when this transaction commits; returns the queued run. wait => true: the worker runs it now and this call returns the finished run, or raises if it failed (SQLSTATE 38000) or did not finish within timeout (57014; the run goes on). The sync itself must be committed. allow_mass_delete => true lets this run pass the mass-delete guard (max_delete_percent, max_delete_rows, an empty model); allow_schema_change => true accepts a mapped column that changed type or disappeared since the last successful run.';

-- Operating syncs (since 0.5.0): safeguard and alert settings, retrying and discarding
-- rejected rows, alerts, history retention, and the metrics view for postgres_exporter.

------------------------------------------------------------------------------------------------
-- Settings
------------------------------------------------------------------------------------------------

-- The safeguard and alert settings of a sync as stored (create_sync and alter_sync call it
-- after writing them, so a refusal rolls the whole call back).
CREATE FUNCTION retl._check_sync_settings(sync_id bigint) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs;
    problem text;
    hint text;
    alert_type text;
BEGIN
    SELECT * INTO s FROM retl.syncs WHERE id = sync_id;
    IF s.max_rows IS NOT NULL AND s.max_rows < 1 THEN
        problem := format('max_rows must be at least 1, got %s', s.max_rows);
        hint := 'Leave it NULL (reset => ''{max_rows}'') for no cap on the changes per run.';
    ELSIF s.max_delete_percent IS NOT NULL AND NOT (s.max_delete_percent BETWEEN 0 AND 100) THEN
        problem := format('max_delete_percent must be between 0 and 100, got %s', s.max_delete_percent);
        hint := '100 turns the percentage guard off; one run may still delete more with retl.run(..., allow_mass_delete => true).';
    ELSIF s.max_delete_rows IS NOT NULL AND s.max_delete_rows < 0 THEN
        problem := format('max_delete_rows must not be negative, got %s', s.max_delete_rows);
        hint := 'Leave it NULL for no cap on the rows one run deletes.';
    ELSIF NOT (s.quota_share > 0 AND s.quota_share <= 1) THEN
        problem := format('quota_share must be greater than 0 and at most 1, got %s', s.quota_share);
        hint := 'It is the part of the destination''s daily_row_quota this sync may use, e.g. 0.25.';
    ELSIF s.nulls NOT IN ('send', 'keep') THEN
        problem := format('nulls must be ''send'' or ''keep'', got %L', s.nulls);
        hint := '''keep'' leaves NULL fields out of payloads, so a value in the destination is never overwritten with null.';
    ELSIF s.freshness IS NOT NULL AND s.freshness <= interval '0' THEN
        problem := format('freshness must be a positive interval, got %s', s.freshness);
        hint := 'The longest the destination may go without a successful run, e.g. ''2 hours''.';
    ELSIF s.alert_after_failures < 0 THEN
        problem := format('alert_after_failures must not be negative, got %s', s.alert_after_failures);
        hint := '0 turns the alert off.';
    ELSIF s.alert_row_error_rate IS NOT NULL AND NOT (s.alert_row_error_rate BETWEEN 0 AND 1) THEN
        problem := format('alert_row_error_rate must be between 0 and 1, got %s', s.alert_row_error_rate);
        hint := 'It is the share of a run''s rows the destination rejected, e.g. 0.05 for 5%.';
    ELSIF s.alert_count_change_percent IS NOT NULL AND NOT (s.alert_count_change_percent BETWEEN 0 AND 1e9) THEN
        problem := format('alert_count_change_percent must not be negative, got %s', s.alert_count_change_percent);
        hint := 'E.g. 20 alerts when the model''s row count moves by more than 20% from one run to the next.';
    ELSIF s.alert_queue_depth IS NOT NULL AND s.alert_queue_depth < 1 THEN
        problem := format('alert_queue_depth must be at least 1, got %s', s.alert_queue_depth);
        hint := 'It is the number of queued rows above which the sync raises an alert.';
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'sync %: %', retl._q(s.name), problem USING ERRCODE = 'invalid_parameter_value', HINT = hint;
    END IF;
    IF s.alert_destination IS NOT NULL THEN
        PERFORM retl._check_destination(s.alert_destination, s.owner);
        alert_type := retl._server_option(s.alert_destination, 'type');
        IF alert_type NOT IN ('slack', 'webhook') THEN
            RAISE EXCEPTION 'alert destination % of sync % is of type %', retl._q(s.alert_destination), retl._q(s.name), retl._q(alert_type)
                  USING ERRCODE = 'invalid_parameter_value',
                        HINT = 'Alerts go to a destination of type ''slack'' (a message per alert) or ''webhook'' (a JSON record per alert).';
        END IF;
    END IF;
END $$;

-- Top-level fields of a payload without those that are null (sync setting nulls => 'keep').
CREATE FUNCTION retl._without_nulls(payload jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_object_agg(f.key, f.value), '{}') FROM jsonb_each(payload) f WHERE jsonb_typeof(f.value) <> 'null'
$$;

------------------------------------------------------------------------------------------------
-- Rejected rows
------------------------------------------------------------------------------------------------

CREATE FUNCTION retl.retry_failed(sync text) RETURNS retl.runs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r retl.runs;
BEGIN
    PERFORM retl._check_worker_database();
    -- A run with trigger 'retry' plans only the keys in retl.row_errors (plan.rs).
    r := retl._queue_run(sync, 'retry', false, false);
    PERFORM retl._wake_worker_at_commit();
    RETURN r;
END $$;
COMMENT ON FUNCTION retl.retry_failed(text) IS
  'Queue a run that sends again only the rows of the sync the destination rejected (retl.row_errors), as they are in the model now; returns the queued run. Every run retries them too; this one touches nothing else.';

CREATE FUNCTION retl.discard_failed(sync text, keys jsonb DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs := retl._sync_for_change(sync);
    missing text;
    discarded bigint;
BEGIN
    IF keys IS NOT NULL AND jsonb_typeof(keys) <> 'array' THEN
        RAISE EXCEPTION 'keys must be a JSON array of key objects, got %', keys
              USING ERRCODE = 'invalid_parameter_value', HINT = 'E.g. ''[{"id": 42}]''; NULL discards every rejected row.';
    END IF;
    SELECT string_agg(k.value::text, ', ') INTO missing
      FROM jsonb_array_elements(keys) k
     WHERE NOT EXISTS (SELECT 1 FROM retl.row_errors e WHERE e.sync_id = s.id AND e.key = k.value);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'sync % has no rejected row with key %', retl._q(s.name), missing
              USING ERRCODE = 'undefined_object', HINT = format('See SELECT key FROM retl.row_errors WHERE sync_id = %s;', s.id);
    END IF;
    -- The snapshot takes the rejected version as if delivered (a rejected delete as done), so
    -- the row is sent again only once it changes in the model. Rows rejected before 0.5.0
    -- have no hash: they are only removed, and the next run tries them again.
    WITH gone AS (DELETE FROM retl.row_errors e
                   WHERE e.sync_id = s.id AND (keys IS NULL OR e.key IN (SELECT k.value FROM jsonb_array_elements(keys) k))
                  RETURNING e.key, e.op, e.hash),
         kept AS (INSERT INTO retl.snapshots (sync_id, key, hash)
                  SELECT s.id, g.key, g.hash FROM gone g
                   WHERE g.hash IS NOT NULL AND (g.op <> 'delete' OR s.mode = 'delete')
                  ON CONFLICT (sync_id, key) DO UPDATE SET hash = excluded.hash, delivered_at = now()
                  RETURNING 1),
         dropped AS (DELETE FROM retl.snapshots sn USING gone g
                      WHERE g.hash IS NOT NULL AND g.op = 'delete' AND s.mode <> 'delete'
                        AND sn.sync_id = s.id AND sn.key = g.key
                     RETURNING 1)
    SELECT count(*) INTO discarded FROM gone;
    RETURN discarded;
END $$;
COMMENT ON FUNCTION retl.discard_failed(text, jsonb) IS
  'Stop retrying rejected rows of a sync: keys is a JSON array of key objects (e.g. ''[{"id": 42}]''), NULL for all. The rows leave retl.row_errors and are sent again only once they change in the model. Returns how many were discarded.';

------------------------------------------------------------------------------------------------
-- Alerts
------------------------------------------------------------------------------------------------

-- Every alert condition that holds now, one row per sync and kind.
CREATE FUNCTION retl._alert_conditions()
RETURNS TABLE (sync_id bigint, kind text, message text, details jsonb, run_id bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    -- failed_runs: the last alert_after_failures finished runs all failed.
    SELECT s.id, 'failed_runs',
           format('sync %s failed %s runs in a row; the last one (run %s): %s', retl._q(s.name), f.n, f.last_id, f.last_error),
           jsonb_build_object('failed_runs', f.n, 'last_error', f.last_error), f.last_id
      FROM retl.syncs s
      CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE x.status = 'failed') AS n, count(*) AS total,
                                 max(x.id) AS last_id, (array_agg(x.error ORDER BY x.id DESC))[1] AS last_error
                            FROM (SELECT r.id, r.status, r.error FROM retl.runs r
                                   WHERE r.sync_id = s.id AND r.status IN ('succeeded', 'partial', 'failed')
                                   ORDER BY r.id DESC LIMIT s.alert_after_failures) x) f
     WHERE s.alert_after_failures > 0 AND f.n = s.alert_after_failures
    UNION ALL
    -- freshness: no successful run within the SLA (since creation, for a sync that never
    -- succeeded). Paused syncs are left alone: someone stopped them on purpose.
    SELECT s.id, 'freshness',
           CASE WHEN ok.at IS NULL
                THEN format('sync %s has not succeeded since it was created %s ago, beyond its freshness SLA of %s',
                            retl._q(s.name), date_trunc('second', now() - s.created_at), s.freshness)
                ELSE format('sync %s last succeeded %s ago (at %s), beyond its freshness SLA of %s',
                            retl._q(s.name), date_trunc('second', now() - ok.at), ok.at, s.freshness) END,
           jsonb_build_object('last_success_at', ok.at, 'freshness', s.freshness::text), NULL::bigint
      FROM retl.syncs s
      LEFT JOIN LATERAL (SELECT max(r.finished_at) AS at FROM retl.runs r
                          WHERE r.sync_id = s.id AND r.status IN ('succeeded', 'partial')) ok ON true
     WHERE s.freshness IS NOT NULL AND NOT s.paused AND now() - coalesce(ok.at, s.created_at) > s.freshness
    UNION ALL
    -- row_error_rate: the last finished run that sent rows had too many of them rejected.
    SELECT s.id, 'row_error_rate',
           format('run %s of sync %s: the destination rejected %s of %s rows (%s%%), above alert_row_error_rate %s',
                  e.id, retl._q(s.name), e.failed, e.failed + e.delivered,
                  round(100.0 * e.failed / (e.failed + e.delivered), 1), s.alert_row_error_rate),
           jsonb_build_object('rejected', e.failed, 'sent', e.failed + e.delivered), e.id
      FROM retl.syncs s
      CROSS JOIN LATERAL (SELECT r.id, r.failed, r.delivered FROM retl.runs r
                           WHERE r.sync_id = s.id AND r.finished_at IS NOT NULL AND r.failed + r.delivered > 0
                           ORDER BY r.id DESC LIMIT 1) e
     WHERE s.alert_row_error_rate IS NOT NULL AND e.failed::numeric / (e.failed + e.delivered) > s.alert_row_error_rate
    UNION ALL
    -- row_count_change: the model's row count moved too much between the last two plans of
    -- the whole model.
    SELECT s.id, 'row_count_change',
           format('the model of sync %s returned %s rows in run %s, %s than the %s of run %s (%s%%, above alert_count_change_percent %s)',
                  retl._q(s.name), c.now_rows, c.now_id, CASE WHEN c.now_rows > c.before_rows THEN 'more' ELSE 'fewer' END,
                  c.before_rows, c.before_id,
                  CASE WHEN c.before_rows = 0 THEN 'new' ELSE round(100.0 * (c.now_rows - c.before_rows) / c.before_rows, 1)::text END,
                  s.alert_count_change_percent),
           jsonb_build_object('rows', c.now_rows, 'rows_before', c.before_rows), c.now_id
      FROM retl.syncs s
      CROSS JOIN LATERAL (SELECT (array_agg(x.id ORDER BY x.id DESC))[1] AS now_id,
                                 (array_agg(x.rows_in_model ORDER BY x.id DESC))[1] AS now_rows,
                                 (array_agg(x.id ORDER BY x.id DESC))[2] AS before_id,
                                 (array_agg(x.rows_in_model ORDER BY x.id DESC))[2] AS before_rows
                            FROM (SELECT r.id, r.rows_in_model FROM retl.runs r
                                   WHERE r.sync_id = s.id AND r.rows_in_model IS NOT NULL
                                   ORDER BY r.id DESC LIMIT 2) x) c
     WHERE s.alert_count_change_percent IS NOT NULL AND c.before_rows IS NOT NULL
       AND ((c.before_rows = 0 AND c.now_rows > 0)
            OR (c.before_rows > 0 AND abs(c.now_rows - c.before_rows) * 100.0 / c.before_rows > s.alert_count_change_percent))
    UNION ALL
    -- queue_depth: more rows queued than the high-water mark (counted up to it, then exactly).
    SELECT s.id, 'queue_depth',
           format('sync %s has %s rows queued, above alert_queue_depth %s',
                  retl._q(s.name), (SELECT count(*) FROM retl.outbox o WHERE o.sync_id = s.id), s.alert_queue_depth),
           jsonb_build_object('alert_queue_depth', s.alert_queue_depth), NULL::bigint
      FROM retl.syncs s
     WHERE s.alert_queue_depth IS NOT NULL
       AND (SELECT count(*) FROM (SELECT 1 FROM retl.outbox o WHERE o.sync_id = s.id LIMIT s.alert_queue_depth + 1) q) > s.alert_queue_depth
$$;

-- Workers, every few seconds: raise the alerts whose condition started to hold, resolve those
-- whose condition cleared, and announce both on channel retl_alerts (delivered at commit).
-- Returns how many were raised.
CREATE FUNCTION retl._evaluate_alerts() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a record;
    raised int := 0;
BEGIN
    FOR a IN WITH holding AS (SELECT * FROM retl._alert_conditions()),
                  resolved AS (UPDATE retl.alerts al SET resolved_at = clock_timestamp()
                                WHERE al.resolved_at IS NULL
                                  AND NOT EXISTS (SELECT 1 FROM holding h WHERE h.sync_id = al.sync_id AND h.kind = al.kind)
                               RETURNING al.id, 'resolved' AS state),
                  new AS (INSERT INTO retl.alerts (sync_id, kind, message, details, run_id)
                          SELECT h.sync_id, h.kind, h.message, h.details, h.run_id FROM holding h
                          ON CONFLICT (sync_id, kind) WHERE resolved_at IS NULL DO NOTHING
                          RETURNING id, 'raised' AS state)
             SELECT * FROM resolved UNION ALL SELECT * FROM new ORDER BY 1
    LOOP
        PERFORM retl._notify_alert(a.id, a.state);
        raised := raised + (a.state = 'raised')::int;
    END LOOP;
    RETURN raised;
END $$;

-- NOTIFY retl_alerts with the alert as JSON: id, sync, kind, state (raised or resolved),
-- message, raised_at, resolved_at.
CREATE FUNCTION retl._notify_alert(alert_id bigint, state text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('retl_alerts', json_build_object('id', al.id, 'sync', s.name, 'kind', al.kind, 'state', state,
                                                      'message', left(al.message, 7000), 'raised_at', al.raised_at,
                                                      'resolved_at', al.resolved_at)::text)
      FROM retl.alerts al JOIN retl.syncs s ON s.id = al.sync_id
     WHERE al.id = alert_id
$$;

-- Workers: alerts raised and not yet sent to their sync's alert destination (or the default
-- one, setting retl.alert_destination), oldest first.
CREATE FUNCTION retl._alerts_to_send(default_destination text, max_alerts int)
RETURNS TABLE (alert_id bigint, destination text, sync text, kind text, message text, raised_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT al.id, coalesce(s.alert_destination, nullif(default_destination, '')), s.name, al.kind, al.message, al.raised_at
      FROM retl.alerts al JOIN retl.syncs s ON s.id = al.sync_id
     WHERE al.sent_at IS NULL AND al.send_error IS NULL
       AND coalesce(s.alert_destination, nullif(default_destination, '')) IS NOT NULL
     ORDER BY al.id
     LIMIT max_alerts
$$;

CREATE VIEW retl.open_alerts AS
SELECT s.name AS sync, al.kind, al.message, al.raised_at, al.run_id, al.sent_at, al.send_error
  FROM retl.alerts al JOIN retl.syncs s ON s.id = al.sync_id
 WHERE al.resolved_at IS NULL;
COMMENT ON VIEW retl.open_alerts IS 'The alerts open now (their condition still holds), with when they were sent to the alert destination.';
GRANT SELECT ON retl.open_alerts TO PUBLIC;

------------------------------------------------------------------------------------------------
-- Retention
------------------------------------------------------------------------------------------------

-- Workers, about once a minute: delete runs (with their batches) and resolved alerts older
-- than `retention`. A sync's latest run and latest successful run are kept whatever their
-- age: they hold its last outcome, its freshness and its schema contract.
CREATE FUNCTION retl._purge_history(retention interval) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    runs_deleted bigint;
BEGIN
    IF retention IS NULL OR retention <= interval '0' THEN
        RETURN 0;
    END IF;
    DELETE FROM retl.runs r
     WHERE r.finished_at < now() - retention
       AND r.id <> (SELECT max(l.id) FROM retl.runs l WHERE l.sync_id = r.sync_id)
       AND r.id IS DISTINCT FROM (SELECT max(l.id) FROM retl.runs l
                                   WHERE l.sync_id = r.sync_id AND l.status IN ('succeeded', 'partial'));
    GET DIAGNOSTICS runs_deleted = ROW_COUNT;
    DELETE FROM retl.alerts al WHERE al.resolved_at < now() - retention;
    RETURN runs_deleted;
END $$;

------------------------------------------------------------------------------------------------
-- Metrics
------------------------------------------------------------------------------------------------

CREATE VIEW retl.metrics AS
SELECT st.sync,
       st.destination,
       st.mode,
       st.paused::int                                                     AS paused,
       (st.last_status IN ('succeeded', 'partial'))::int                  AS last_run_ok,
       (st.last_status = 'failed')::int                                   AS last_run_failed,
       extract(epoch FROM st.freshness_lag)::float8                       AS freshness_lag_seconds,
       extract(epoch FROM st.freshness_sla)::float8                       AS freshness_sla_seconds,
       st.sla_breached::int                                               AS sla_breached,
       st.queue_depth,
       st.failing_rows,
       st.rows_synced,
       st.window_runs,
       st.window_success_rate::float8                                     AS window_success_rate,
       st.window_row_error_rate::float8                                   AS window_row_error_rate,
       extract(epoch FROM st.delivery_latency_p50)::float8                AS delivery_latency_p50_seconds,
       extract(epoch FROM st.delivery_latency_p99)::float8                AS delivery_latency_p99_seconds,
       st.api_calls_24h,
       st.daily_api_quota,
       st.rows_24h,
       st.daily_row_quota,
       st.open_alerts,
       t.runs_total,
       t.runs_failed_total,
       t.rows_delivered_total,
       t.rows_rejected_total,
       t.api_calls_total
  FROM retl.sync_status st
  JOIN retl.syncs s ON s.name = st.sync
  CROSS JOIN LATERAL (SELECT count(*) AS runs_total, count(*) FILTER (WHERE r.status = 'failed') AS runs_failed_total,
                             coalesce(sum(r.delivered), 0)::bigint AS rows_delivered_total,
                             coalesce(sum(r.failed), 0)::bigint AS rows_rejected_total,
                             coalesce(sum(r.api_calls), 0)::bigint AS api_calls_total
                        FROM retl.runs r WHERE r.sync_id = s.id) t;
COMMENT ON VIEW retl.metrics IS
  'One row per sync, every value a number, for Prometheus (postgres_exporter: contrib/postgres_exporter/queries.yaml in the repository). Totals (*_total) count the runs kept in retl.runs (see retl.history_retention).';
GRANT SELECT ON retl.metrics TO PUBLIC;
