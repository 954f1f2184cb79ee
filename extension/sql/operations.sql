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
