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

CREATE FUNCTION retl._has_role(member oid, role_name text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = role_name)
                THEN pg_has_role(member, role_name, 'MEMBER') ELSE false END
$$;

CREATE FUNCTION retl._visible(owner regrole) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = owner)
                THEN pg_has_role(retl._caller(), owner, 'MEMBER') ELSE false END
           OR retl._has_role(retl._caller(), 'retl_viewer')
$$;

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
                      WHERE r.sync_id = s.id AND b.finished_at > now() - interval '1 day') day ON true
 WHERE retl._visible(s.owner);
COMMENT ON VIEW retl.sync_status IS
  'One row per sync: last run and its outcome, time since the last successful run against the freshness SLA (sla_breached), success rate of the last 20 finished runs, rows queued, failing and synced; over the status window (setting retl.status_window, default 1 day): runs, success rate, row-error rate (rejected / sent), delivery latency p50/p99 (plan committed to acknowledgement, per row); API calls and rows sent in the last 24 hours against the destination''s daily_api_quota and daily_row_quota, the API usage the destination last reported, and open alerts. Each user sees the syncs they own; members of retl_viewer see all.';
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
    PERFORM retl._check_policy(sync_id);
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
    PERFORM retl._check_policy(s.id);
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
    s retl.syncs := retl._sync_for_operation(sync);
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

CREATE OR REPLACE FUNCTION retl._check_owner(kind text, name text, owner regrole) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT (pg_has_role(retl._caller(), owner, 'MEMBER') OR retl._has_role(retl._caller(), 'retl_admin')) THEN
        RAISE EXCEPTION 'must be owner of % %', kind, retl._q(name)
              USING ERRCODE = 'insufficient_privilege',
                    DETAIL = format('It belongs to role %s.', owner::text),
                    HINT = 'Members of retl_admin may change every model, audience and sync.';
    END IF;
END $$;

CREATE FUNCTION retl._check_operator(name text, owner regrole) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT (pg_has_role(retl._caller(), owner, 'MEMBER') OR retl._has_role(retl._caller(), 'retl_operator')) THEN
        RAISE EXCEPTION 'must be owner of sync %', retl._q(name)
              USING ERRCODE = 'insufficient_privilege',
                    DETAIL = format('It belongs to role %s.', owner::text),
                    HINT = 'Members of retl_operator may run, pause, resume and retry every sync.';
    END IF;
END $$;

CREATE FUNCTION retl._sync_for_operation(sync_name text) RETURNS retl.syncs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs;
BEGIN
    SELECT * INTO s FROM retl.syncs WHERE name = sync_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sync % does not exist', coalesce(retl._q(sync_name), 'NULL') USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM retl._check_operator(s.name, s.owner);
    RETURN s;
END $$;

CREATE OR REPLACE FUNCTION retl.pause(sync text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs := retl._sync_for_operation(sync);
BEGIN
    UPDATE retl.syncs SET paused = true, updated_at = now() WHERE id = s.id;
END $$;

CREATE OR REPLACE FUNCTION retl.resume(sync text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs := retl._sync_for_operation(sync);
BEGIN
    -- A schedule restarts from now: the slots missed while paused are not made up.
    UPDATE retl.syncs SET paused = false, updated_at = now(),
                          next_run_at = retl._next_run_at(s.schedule, s.time_zone, now())
     WHERE id = s.id;
    PERFORM retl._wake_worker_at_commit();
END $$;

CREATE OR REPLACE FUNCTION retl._runnable_sync(sync text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs;
BEGIN
    SELECT * INTO s FROM retl.syncs WHERE name = sync;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sync % does not exist', coalesce(retl._q(sync), 'NULL') USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM retl._check_operator(s.name, s.owner);
    IF s.paused THEN
        RAISE EXCEPTION 'sync % is paused', retl._q(s.name)
              USING ERRCODE = 'object_not_in_prerequisite_state', HINT = format('Resume it with SELECT retl.resume(%L);', s.name);
    END IF;
    RETURN s.id;
END $$;

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
    s retl.syncs := retl._sync_for_operation(sync);
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
           format('sync %s failed %s in a row; the last one (run %s): %s', retl._q(s.name),
                  CASE WHEN f.n = 1 THEN '1 run' ELSE f.n || ' runs' END, f.last_id, f.last_error),
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
 WHERE al.resolved_at IS NULL AND retl._visible(s.owner);
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

-- Governance (since 0.5.0): roles and what each user sees, PII tags on model columns,
-- per-destination tag policies, the audit log, and forgetting a key.

------------------------------------------------------------------------------------------------
-- Roles
------------------------------------------------------------------------------------------------

-- Cluster-wide roles, created once (another database's extension, or an earlier install, may
-- have made them); DROP EXTENSION leaves them. retl_admin is a member of retl_operator, which
-- is a member of retl_viewer.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'retl_viewer') THEN
        CREATE ROLE retl_viewer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'retl_operator') THEN
        CREATE ROLE retl_operator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'retl_admin') THEN
        CREATE ROLE retl_admin NOLOGIN;
    END IF;
    IF NOT pg_has_role('retl_operator', 'retl_viewer', 'MEMBER') THEN
        GRANT retl_viewer TO retl_operator;
    END IF;
    IF NOT pg_has_role('retl_admin', 'retl_operator', 'MEMBER') THEN
        GRANT retl_operator TO retl_admin;
    END IF;
END $$;

-- Row-level security: everyone may query the catalog tables, and sees the rows of the syncs
-- (models, audiences) they own; retl_viewer's members see all. The workers and the API's
-- SECURITY DEFINER functions run as the extension's owner, a superuser, and see everything.
ALTER TABLE retl.models ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.models FOR SELECT USING (retl._visible(owner));
ALTER TABLE retl.audiences ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.audiences FOR SELECT USING (retl._visible(owner));
ALTER TABLE retl.syncs ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.syncs FOR SELECT USING (retl._visible(owner));
-- The rows of a sync: visible when the sync is (the subquery is itself filtered).
ALTER TABLE retl.sync_parents ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.sync_parents FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));
ALTER TABLE retl.sync_sources ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.sync_sources FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));
ALTER TABLE retl.runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.runs FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));
ALTER TABLE retl.batches ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.batches FOR SELECT USING (EXISTS (SELECT 1 FROM retl.runs r WHERE r.id = run_id));
ALTER TABLE retl.row_errors ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.row_errors FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));
ALTER TABLE retl.alerts ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.alerts FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));

------------------------------------------------------------------------------------------------
-- PII tags
------------------------------------------------------------------------------------------------

CREATE TABLE retl.column_tags (
    model_id    bigint NOT NULL REFERENCES retl.models(id) ON DELETE CASCADE,
    column_name text NOT NULL,
    tags        text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, column_name)
);
COMMENT ON TABLE retl.column_tags IS
  'Tags set with retl.tag_column on model columns (e.g. email, phone, ssn). Tags also come from column comments: see retl.model_column_tags.';
ALTER TABLE retl.column_tags ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.column_tags FOR SELECT USING (EXISTS (SELECT 1 FROM retl.models m WHERE m.id = model_id));

-- Tags written in a comment: [pii: email] or [pii: email, phone] (case-insensitive).
CREATE FUNCTION retl._comment_tags(comment text) RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(DISTINCT lower(btrim(t)) ORDER BY lower(btrim(t))), '{}')
      FROM regexp_matches(coalesce(comment, ''), '\[\s*pii\s*:\s*([A-Za-z0-9_]+(?:\s*,\s*[A-Za-z0-9_]+)*)\s*\]', 'gi') m,
           unnest(string_to_array(m[1], ',')) t
$$;

-- Every tag of a model's columns and where it comes from: 'retl.tag_column', the comment on
-- the model's own column, or the comment on a column of the same name in a table or view the
-- model reads (what dbt's persist_docs writes).
CREATE FUNCTION retl._model_column_tags(model_id bigint)
RETURNS TABLE (column_name text, tag text, source text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH m AS (SELECT mm.id, to_regclass(format('retl_models.%I', mm.name)) AS view FROM retl.models mm WHERE mm.id = model_id),
         cols AS (SELECT a.attname::text AS column_name, a.attnum FROM m JOIN pg_attribute a ON a.attrelid = m.view
                   WHERE a.attnum > 0 AND NOT a.attisdropped)
    SELECT c.column_name, unnest(t.tags), 'retl.tag_column'
      FROM retl.column_tags t JOIN cols c ON c.column_name = t.column_name WHERE t.model_id = _model_column_tags.model_id
    UNION
    SELECT c.column_name, unnest(retl._comment_tags(col_description(m.view, c.attnum))), 'comment on the model column'
      FROM m, cols c
    UNION
    SELECT c.column_name, unnest(retl._comment_tags(col_description(d.refobjid, d.refobjsubid::int))),
           format('comment on %s.%I', d.refobjid::regclass, a.attname)
      FROM m
      JOIN pg_rewrite r ON r.ev_class = m.view
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                      AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 AND d.refobjid <> m.view
      JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
      JOIN cols c ON c.column_name = a.attname::text
$$;

CREATE VIEW retl.model_column_tags AS
SELECT m.name AS model, t.column_name, t.tag, t.source
  FROM retl.models m CROSS JOIN LATERAL retl._model_column_tags(m.id) t
 WHERE retl._visible(m.owner);
COMMENT ON VIEW retl.model_column_tags IS
  'Every tag on a model column and where it comes from: retl.tag_column, or a column comment containing [pii: tag, ...] on the model''s column or on the column of the same name in a table or view the model reads (dbt persist_docs).';
GRANT SELECT ON retl.model_column_tags TO PUBLIC;

CREATE FUNCTION retl.tag_column(model text, column_name text, tags text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m retl.models;
    bad text;
    clean text[];
BEGIN
    SELECT * INTO m FROM retl.models WHERE name = tag_column.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model % does not exist', retl._q(model) USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM retl._check_owner('model', m.name, m.owner);
    IF NOT column_name = ANY (retl._model_columns(m.name)) THEN
        RAISE EXCEPTION 'column % is not in model %', retl._q(column_name), retl._q(m.name)
              USING ERRCODE = 'undefined_column',
                    DETAIL = format('The model has columns: %s.', array_to_string(retl._model_columns(m.name), ', '));
    END IF;
    SELECT string_agg(coalesce(retl._q(t), 'NULL'), ', ') INTO bad FROM unnest(tags) t WHERE t IS NULL OR lower(t) !~ '^[a-z][a-z0-9_]{0,62}$';
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'tag % is not valid', bad
              USING ERRCODE = 'invalid_parameter_value', HINT = 'Tags are words of letters, digits and underscores, e.g. email, phone, ssn.';
    END IF;
    SELECT coalesce(array_agg(DISTINCT lower(t) ORDER BY lower(t)), '{}') INTO clean FROM unnest(tags) t;
    IF clean = '{}' THEN
        DELETE FROM retl.column_tags t WHERE t.model_id = m.id AND t.column_name = tag_column.column_name;
    ELSE
        INSERT INTO retl.column_tags (model_id, column_name, tags) VALUES (m.id, column_name, clean)
        ON CONFLICT ON CONSTRAINT column_tags_pkey DO UPDATE SET tags = excluded.tags, updated_at = now();
    END IF;
END $$;
COMMENT ON FUNCTION retl.tag_column(text, text, text[]) IS
  'Set the tags of a model column (e.g. tags => ''{email}''); ''{}'' removes them. Tags in column comments ([pii: email]) count too. Syncs sending a column with a tag its destination''s policy does not allow are refused.';

------------------------------------------------------------------------------------------------
-- Destination policies
------------------------------------------------------------------------------------------------

CREATE TABLE retl.destination_policies (
    destination text PRIMARY KEY,
    allow_tags  text[],
    block_tags  text[] NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE retl.destination_policies IS
  'Which tagged columns may go to a destination (destination ''*'': every destination without its own policy). block_tags: never sent; allow_tags (when set): only columns whose tags are all in it are sent. Untagged columns are always allowed.';

CREATE FUNCTION retl.set_policy(destination text, allow text[] DEFAULT NULL, block text[] DEFAULT '{}') RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    server_owner oid;
    breaking text;
BEGIN
    IF destination IS DISTINCT FROM '*' THEN
        SELECT s.srvowner INTO server_owner FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
         WHERE s.srvname = set_policy.destination AND w.fdwname = 'retl';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'destination % does not exist', coalesce(retl._q(destination), 'NULL')
                  USING ERRCODE = 'undefined_object', HINT = 'Name a retl foreign server, or ''*'' for every destination without its own policy.';
        END IF;
    END IF;
    IF NOT (retl._has_role(retl._caller(), 'retl_admin')
            OR (server_owner IS NOT NULL AND pg_has_role(retl._caller(), server_owner, 'MEMBER'))) THEN
        RAISE EXCEPTION 'permission denied to set the policy of destination %', retl._q(destination)
              USING ERRCODE = 'insufficient_privilege', HINT = 'Members of retl_admin, and the destination''s owner, may set it.';
    END IF;
    INSERT INTO retl.destination_policies (destination, allow_tags, block_tags)
    VALUES (destination, (SELECT array_agg(DISTINCT lower(t) ORDER BY lower(t)) FROM unnest(allow) t),
            coalesce((SELECT array_agg(DISTINCT lower(t) ORDER BY lower(t)) FROM unnest(block) t), '{}'))
    ON CONFLICT ON CONSTRAINT destination_policies_pkey
    DO UPDATE SET allow_tags = excluded.allow_tags, block_tags = excluded.block_tags, updated_at = now();
    -- Syncs the new policy refuses: their next plans fail until they or the policy change.
    SELECT string_agg(retl._q(s.name), ', ' ORDER BY s.name) INTO breaking
      FROM retl.syncs s WHERE retl._policy_violation(s.id) IS NOT NULL;
    IF breaking IS NOT NULL THEN
        RAISE WARNING 'syncs that now send columns the policies do not allow: %', breaking
              USING HINT = 'Their runs fail until their mappings or the policy change; see retl.policy_violations.';
    END IF;
END $$;
COMMENT ON FUNCTION retl.set_policy(text, text[], text[]) IS
  'Set which tagged columns may be sent to a destination (''*'': to every destination without its own policy): block => tags never sent, allow => when set, the only tags that may be sent. Members of retl_admin and the destination''s owner may set it.';

CREATE FUNCTION retl.drop_policy(destination text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT (retl._has_role(retl._caller(), 'retl_admin')
            OR EXISTS (SELECT 1 FROM pg_foreign_server s WHERE s.srvname = destination AND pg_has_role(retl._caller(), s.srvowner, 'MEMBER'))) THEN
        RAISE EXCEPTION 'permission denied to drop the policy of destination %', retl._q(destination)
              USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM retl.destination_policies p WHERE p.destination = drop_policy.destination;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'destination % has no policy', retl._q(destination) USING ERRCODE = 'undefined_object';
    END IF;
END $$;
COMMENT ON FUNCTION retl.drop_policy(text) IS 'Remove a destination''s policy (the ''*'' policy, if any, then applies to it).';

-- Why the sync may not send what it sends, or NULL: its tagged columns (the key and the
-- mapped columns, or every column without mappings; a delete sync sends only its key) that
-- the policy of its destination (else the '*' policy) does not allow.
CREATE FUNCTION retl._policy_violation(sync_id bigint) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH s AS (SELECT sy.id, sy.name, sy.destination, sy.mode, sy.mappings, sy.model_id, m.primary_key
                 FROM retl.syncs sy JOIN retl.models m ON m.id = sy.model_id WHERE sy.id = _policy_violation.sync_id),
         policy AS (SELECT p.destination, p.allow_tags, p.block_tags
                      FROM retl.destination_policies p, s
                     WHERE p.destination IN (s.destination, '*')
                     ORDER BY p.destination = '*' LIMIT 1),
         sent AS (SELECT unnest(s.primary_key) AS column_name FROM s
                  UNION SELECT v.value #>> '{}' FROM s, jsonb_each(s.mappings) v WHERE s.mode <> 'delete'
                  UNION SELECT c.column_name FROM s, retl._model_column_tags(s.model_id) c
                   WHERE s.mappings IS NULL AND s.mode <> 'delete'),
         refused AS (SELECT t.column_name, t.tag
                       FROM s, policy p, retl._model_column_tags(s.model_id) t
                      WHERE t.column_name IN (SELECT column_name FROM sent)
                        AND (t.tag = ANY (p.block_tags) OR (p.allow_tags IS NOT NULL AND NOT t.tag = ANY (p.allow_tags))))
    SELECT format('sync %s would send columns that %s does not allow: %s', retl._q(s.name),
                  CASE WHEN p.destination = '*' THEN 'the default policy (''*'')'
                       ELSE format('the policy of destination %s', retl._q(s.destination)) END,
                  (SELECT string_agg(format('%s (tagged %s)', retl._q(r.column_name), r.tags), ', ' ORDER BY r.column_name)
                     FROM (SELECT column_name, string_agg(DISTINCT tag, ', ') AS tags FROM refused GROUP BY column_name) r))
      FROM s, policy p
     WHERE EXISTS (SELECT 1 FROM refused)
$$;

CREATE FUNCTION retl._check_policy(sync_id bigint) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    problem text := retl._policy_violation(sync_id);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem
              USING ERRCODE = 'insufficient_privilege',
                    HINT = 'Leave those columns out of the mappings, or change the policy with retl.set_policy(destination => ..., allow => ..., block => ...).';
    END IF;
END $$;

CREATE VIEW retl.policy_violations AS
SELECT s.name AS sync, s.destination, v.problem
  FROM retl.syncs s CROSS JOIN LATERAL (SELECT retl._policy_violation(s.id) AS problem) v
 WHERE retl._visible(s.owner) AND v.problem IS NOT NULL;
COMMENT ON VIEW retl.policy_violations IS
  'Syncs that would send tagged columns their destination''s policy does not allow (after a policy, tag or model change); their runs fail until fixed.';
GRANT SELECT ON retl.policy_violations TO PUBLIC;

------------------------------------------------------------------------------------------------
-- Audit log
------------------------------------------------------------------------------------------------

CREATE TABLE retl.audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The role that made the change (through the API: its caller) and the session's login role.
    actor       text NOT NULL,
    session_role text NOT NULL DEFAULT session_user,
    action      text NOT NULL CHECK (action IN ('create', 'alter', 'drop', 'forget')),
    object_type text NOT NULL,
    object_name text NOT NULL,
    -- Who may read the entry besides retl_viewer: the object's owner.
    owner       text,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_log_object_idx ON retl.audit_log (object_type, object_name, id);
COMMENT ON TABLE retl.audit_log IS
  'Every change to models, audiences, syncs (including pause and resume), column tags, destination policies, retl destinations (servers: their options) and their user mappings (that they changed, never their options): who, when, the object before and after. retl.forget leaves an entry without the key.';
ALTER TABLE retl.audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.audit_log FOR SELECT
    USING (retl._has_role(retl._caller(), 'retl_viewer')
           OR (owner IS NOT NULL AND EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = owner)
               AND pg_has_role(retl._caller(), owner, 'MEMBER')));

-- Row changes of the catalog tables. Sync updates that only move its schedule (next_run_at)
-- are the workers' bookkeeping, not changes.
CREATE FUNCTION retl._audit_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    before jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
    after jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    kind text := CASE TG_TABLE_NAME WHEN 'models' THEN 'model' WHEN 'audiences' THEN 'audience' WHEN 'syncs' THEN 'sync'
                                    WHEN 'destination_policies' THEN 'policy' WHEN 'column_tags' THEN 'column tags' END;
    obj_name text;
    owner text;
BEGIN
    IF TG_OP = 'UPDATE' AND before - '{next_run_at,updated_at}'::text[] = after - '{next_run_at,updated_at}'::text[] THEN
        RETURN NULL;
    END IF;
    obj_name := coalesce(after, before) ->> CASE TG_TABLE_NAME WHEN 'destination_policies' THEN 'destination'
                                                           WHEN 'column_tags' THEN 'column_name' ELSE 'name' END;
    IF TG_TABLE_NAME = 'column_tags' THEN
        SELECT m.name || '.' || obj_name, m.owner::text INTO obj_name, owner
          FROM retl.models m WHERE m.id = (coalesce(after, before) ->> 'model_id')::bigint;
    ELSIF TG_TABLE_NAME <> 'destination_policies' THEN
        owner := (coalesce(after, before) ->> 'owner');
    END IF;
    INSERT INTO retl.audit_log (actor, action, object_type, object_name, owner, before, after)
    VALUES (retl._caller()::regrole::text, CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'alter' ELSE 'drop' END,
            kind, obj_name, owner, before, after);
    RETURN NULL;
END $$;

CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.models FOR EACH ROW EXECUTE FUNCTION retl._audit_row();
CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.audiences FOR EACH ROW EXECUTE FUNCTION retl._audit_row();
CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.syncs FOR EACH ROW EXECUTE FUNCTION retl._audit_row();
CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.destination_policies FOR EACH ROW EXECUTE FUNCTION retl._audit_row();
CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.column_tags FOR EACH ROW EXECUTE FUNCTION retl._audit_row();

-- A retl destination as the audit log shows it: its options (no secrets: those are in user
-- mappings) and owner.
CREATE FUNCTION retl._server_state(server oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object('options', coalesce((SELECT jsonb_object_agg(o.option_name, o.option_value)
                                                     FROM pg_options_to_table(s.srvoptions) o), '{}'),
                              'owner', s.srvowner::regrole::text)
      FROM pg_foreign_server s WHERE s.oid = server
$$;

-- CREATE and ALTER of retl servers and of user mappings for them. Never fails the user's
-- command: a problem is a WARNING.
CREATE FUNCTION retl._audit_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c record;
    server_name text;
    owner text;
BEGIN
    FOR c IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type IN ('server', 'user mapping') LOOP
        IF c.object_type = 'server' THEN
            SELECT s.srvname, s.srvowner::regrole::text INTO server_name, owner
              FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
             WHERE s.oid = c.objid AND w.fdwname = 'retl';
            CONTINUE WHEN server_name IS NULL;
            INSERT INTO retl.audit_log (actor, action, object_type, object_name, owner, before, after)
            VALUES (retl._caller()::regrole::text, CASE WHEN c.command_tag = 'CREATE SERVER' THEN 'create' ELSE 'alter' END, 'destination',
                    server_name, owner,
                    CASE WHEN c.command_tag <> 'CREATE SERVER' THEN
                        (SELECT a.after FROM retl.audit_log a WHERE a.object_type = 'destination' AND a.object_name = server_name
                          ORDER BY a.id DESC LIMIT 1) END,
                    retl._server_state(c.objid));
        ELSE
            SELECT s.srvname, s.srvowner::regrole::text INTO server_name, owner
              FROM pg_user_mapping um JOIN pg_foreign_server s ON s.oid = um.umserver
              JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
             WHERE um.oid = c.objid AND w.fdwname = 'retl';
            CONTINUE WHEN server_name IS NULL;
            INSERT INTO retl.audit_log (actor, action, object_type, object_name, owner)
            VALUES (retl._caller()::regrole::text, CASE WHEN c.command_tag = 'CREATE USER MAPPING' THEN 'create' ELSE 'alter' END,
                    'user mapping', c.object_identity, owner);
        END IF;
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pg_reverse_etl could not write the audit log for %: %', tg_tag, SQLERRM;
END $$;

CREATE FUNCTION retl._audit_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    last record;
BEGIN
    FOR d IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type IN ('server', 'user mapping') LOOP
        -- Ours if the log knows it as a destination (the catalogs no longer have it).
        SELECT a.after, a.owner INTO last FROM retl.audit_log a
         WHERE a.object_type = 'destination'
           AND a.object_name = CASE WHEN d.object_type = 'server' THEN d.object_identity
                                    ELSE substring(d.object_identity FROM ' on server (.*)$') END
         ORDER BY a.id DESC LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        INSERT INTO retl.audit_log (actor, action, object_type, object_name, owner, before)
        VALUES (retl._caller()::regrole::text, 'drop', CASE WHEN d.object_type = 'server' THEN 'destination' ELSE 'user mapping' END,
                d.object_identity, last.owner, CASE WHEN d.object_type = 'server' THEN last.after END);
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pg_reverse_etl could not write the audit log for %: %', tg_tag, SQLERRM;
END $$;

CREATE EVENT TRIGGER retl_audit_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE SERVER', 'ALTER SERVER', 'CREATE USER MAPPING', 'ALTER USER MAPPING')
    EXECUTE FUNCTION retl._audit_ddl();
CREATE EVENT TRIGGER retl_audit_drop ON sql_drop
    WHEN TAG IN ('DROP SERVER', 'DROP USER MAPPING', 'DROP OWNED')
    EXECUTE FUNCTION retl._audit_drop();

------------------------------------------------------------------------------------------------
-- Forgetting a key
------------------------------------------------------------------------------------------------

CREATE FUNCTION retl.forget(key jsonb, model text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sync_ids bigint[];
    texts text[];
    n bigint;
    total bigint := 0;
BEGIN
    IF NOT retl._has_role(retl._caller(), 'retl_admin') THEN
        RAISE EXCEPTION 'permission denied to forget keys'
              USING ERRCODE = 'insufficient_privilege', HINT = 'Members of retl_admin may run retl.forget.';
    END IF;
    IF key IS NULL OR jsonb_typeof(key) <> 'object' OR key = '{}' THEN
        RAISE EXCEPTION 'key must be a JSON object of key columns, got %', coalesce(key::text, 'NULL')
              USING ERRCODE = 'invalid_parameter_value', HINT = 'E.g. ''{"email": "ada@example.com"}''.';
    END IF;
    IF model IS NOT NULL AND NOT EXISTS (SELECT 1 FROM retl.models m WHERE m.name = forget.model) THEN
        RAISE EXCEPTION 'model % does not exist', retl._q(model) USING ERRCODE = 'undefined_object';
    END IF;
    -- The syncs whose model key has exactly these columns.
    SELECT coalesce(array_agg(s.id), '{}') INTO sync_ids
      FROM retl.syncs s JOIN retl.models m ON m.id = s.model_id
     WHERE (forget.model IS NULL OR m.name = forget.model)
       AND (SELECT array_agg(k ORDER BY k) FROM unnest(m.primary_key) k) = (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(key) k);
    DELETE FROM retl.snapshots t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    DELETE FROM retl.outbox t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    DELETE FROM retl.row_errors t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    DELETE FROM retl.identities t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    DELETE FROM retl.changed_keys t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    -- Logs: the key as JSON (both spellings) and its text values, wherever an error or alert
    -- message quoted them.
    texts := ARRAY[key::text, replace(replace(key::text, '": ', '":'), ', "', ',"')]
             || ARRAY(SELECT v.value #>> '{}' FROM jsonb_each(key) v WHERE jsonb_typeof(v.value) = 'string' AND length(v.value #>> '{}') >= 3);
    UPDATE retl.runs r SET error = retl._scrub(r.error, texts)
     WHERE r.sync_id = ANY (sync_ids) AND r.error IS NOT NULL AND retl._scrub(r.error, texts) <> r.error;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    UPDATE retl.batches b SET error = retl._scrub(b.error, texts)
      FROM retl.runs r WHERE r.id = b.run_id AND r.sync_id = ANY (sync_ids)
       AND b.error IS NOT NULL AND retl._scrub(b.error, texts) <> b.error;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    UPDATE retl.alerts a SET message = retl._scrub(a.message, texts), details = retl._scrub(a.details::text, texts)::jsonb
     WHERE a.sync_id = ANY (sync_ids) AND retl._scrub(a.message || a.details::text, texts) <> a.message || a.details::text;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    INSERT INTO retl.audit_log (actor, action, object_type, object_name, after)
    VALUES (retl._caller()::regrole::text, 'forget', 'key', coalesce(model, '*'),
            jsonb_build_object('syncs', cardinality(sync_ids), 'rows', total));
    RETURN total;
END $$;
COMMENT ON FUNCTION retl.forget(jsonb, text) IS
  'Right to be forgotten: remove a key (e.g. ''{"email": "ada@example.com"}'') from the snapshot, queue, row errors, identity map and change log of every sync whose model has that key (or of model''s syncs), and blank it out of run, batch and alert messages; the audit log records that it happened, not the key. Erasing it in the destinations is a delete sync''s job (see docs/RECIPES.md). Members of retl_admin only. Returns how many rows were removed or scrubbed.';

CREATE FUNCTION retl._scrub(message text, texts text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY texts LOOP
        message := replace(message, t, '[forgotten]');
    END LOOP;
    RETURN message;
END $$;

------------------------------------------------------------------------------------------------
-- What retl_viewer reads
------------------------------------------------------------------------------------------------

GRANT SELECT ON retl.models, retl.audiences, retl.syncs, retl.sync_parents, retl.sync_sources, retl.runs, retl.batches,
                retl.row_errors, retl.alerts, retl.column_tags, retl.destination_policies, retl.audit_log TO retl_viewer;
GRANT SELECT ON retl.column_tags TO PUBLIC;
GRANT SELECT ON retl.destination_policies TO PUBLIC;
GRANT SELECT ON retl.audit_log TO PUBLIC;
