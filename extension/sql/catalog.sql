-- pg_reverse_etl catalog: the tables a DBA queries, and the SQL API that edits them.
--
-- Everything lives in schema `retl`; model and audience views live in `retl_models` so that
-- Postgres itself tracks what each model depends on and whose privileges it runs with.
-- Functions that change the catalog are SECURITY DEFINER with a fixed search_path and check
-- the caller (retl._caller(), the role that called them) themselves.

CREATE SCHEMA retl_models;
COMMENT ON SCHEMA retl_models IS
  'pg_reverse_etl: one view per model and audience; each view is owned by the role that defined it.';
GRANT USAGE ON SCHEMA retl_models TO PUBLIC;
GRANT USAGE ON SCHEMA retl TO PUBLIC;

CREATE FOREIGN DATA WRAPPER retl VALIDATOR retl._fdw_validator;
COMMENT ON FOREIGN DATA WRAPPER retl IS
  'pg_reverse_etl destinations: CREATE SERVER name FOREIGN DATA WRAPPER retl OPTIONS (type ''webhook'', url ''...''); credentials go in a USER MAPPING (token or token_env).';

------------------------------------------------------------------------------------------------
-- Tables
------------------------------------------------------------------------------------------------

CREATE TABLE retl.models (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    query       text NOT NULL,
    primary_key text[] NOT NULL,
    owner       regrole NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE retl.models IS
  'Models: a query returning one row per entity, with its primary key. The query is also the view retl_models.<name>.';

CREATE TABLE retl.audiences (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    model_id   bigint NOT NULL REFERENCES retl.models(id),
    filter     text NOT NULL,
    owner      regrole NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE retl.audiences IS
  'Audiences: a named filter over a model, kept as the view retl_models.<name>.';

CREATE TABLE retl.syncs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    model_id    bigint NOT NULL REFERENCES retl.models(id),
    audience_id bigint REFERENCES retl.audiences(id),
    destination text NOT NULL,
    mode        text NOT NULL CHECK (mode IN ('insert', 'update', 'upsert', 'mirror', 'delete')),
    mappings    jsonb,
    owner       regrole NOT NULL,
    paused      boolean NOT NULL DEFAULT false,
    -- Scopes idempotency keys: a sync re-created under the same name restarts its run ids.
    uid         uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- Since 0.2.0 (added last, in the order the upgrade script adds them). When the sync runs
    -- by itself: 'manual', 'on change', a cron expression (in time_zone) or an interval.
    schedule    text NOT NULL DEFAULT 'manual',
    time_zone   text NOT NULL DEFAULT 'UTC',
    next_run_at timestamptz,
    -- How the planner hashes rows (plan.rs): 4 (fingerprints: a key identity and a field
    -- hash, computed in Rust, which lets a whole model be planned in one pass; since 0.8.0),
    -- 3 (the values' record hash, since 0.6.0), 2 (row text, since 0.2.0) or 1 (jsonb text).
    -- A sync keeps the version it was created with: its snapshot holds such hashes.
    hash_version smallint NOT NULL DEFAULT 4
        CHECK (hash_version IN (1, 2, 3, 4)),
    -- Since 0.5.0. Safeguards every plan checks before it queues anything (plan.rs): at most
    -- max_rows changes per run; a mirror plan may delete at most max_delete_percent of what
    -- the sync delivered, a mirror or delete plan at most max_delete_rows rows, and a mirror
    -- sync's model may not come back empty, unless the run allows it (retl.run(...,
    -- allow_mass_delete => true)); quota_share: the part of the destination's daily_row_quota
    -- this sync may use. nulls 'keep' leaves NULL fields out of payloads, so a value in the
    -- destination is never overwritten with null. Checked by retl._check_sync_settings.
    max_rows             bigint,
    max_delete_percent   numeric DEFAULT 50,
    max_delete_rows      bigint,
    quota_share          numeric NOT NULL DEFAULT 1,
    nulls                text NOT NULL DEFAULT 'send',
    -- Alerts (retl.alerts, retl._evaluate_alerts): the freshness SLA (time since the last
    -- successful run), failed runs in a row (0: never), rejected share of a run's rows,
    -- change of the model's row count between runs (percent), rows queued; and the
    -- destination alerts are also sent to (a slack or webhook destination).
    freshness            interval,
    alert_after_failures int NOT NULL DEFAULT 3,
    alert_row_error_rate numeric,
    alert_count_change_percent numeric,
    alert_queue_depth    bigint,
    alert_destination    text
);
COMMENT ON TABLE retl.syncs IS
  'Syncs: a model or audience pushed to a destination (a retl foreign server) in a mode, with field mappings {"destination_field": "model_column"} (NULL: every model column under its own name).';

-- after => [parents]: the sync runs when every parent has succeeded since its own last run.
CREATE TABLE retl.sync_parents (
    sync_id   bigint NOT NULL REFERENCES retl.syncs(id) ON DELETE CASCADE,
    parent_id bigint NOT NULL REFERENCES retl.syncs(id),
    PRIMARY KEY (sync_id, parent_id),
    CHECK (sync_id <> parent_id)
);
CREATE INDEX sync_parents_parent_idx ON retl.sync_parents (parent_id);
COMMENT ON TABLE retl.sync_parents IS
  'Dependencies between syncs (after => ...): a sync with parents runs once all of them have succeeded since its own last run.';

-- The base tables a sync's model reads, from Postgres's own dependency catalog; a commit that
-- changes one of them wakes the worker for the sync's ''on change'' schedule.
CREATE TABLE retl.sync_sources (
    sync_id bigint NOT NULL REFERENCES retl.syncs(id) ON DELETE CASCADE,
    -- regclass (since 0.6.0): a dump holds the table's name, so a restore finds it again.
    relid   regclass NOT NULL,
    PRIMARY KEY (sync_id, relid),
    -- When the model is a plain projection of this one table: the table's columns (attribute
    -- numbers, which survive renames) that carry the model key, in key order. An on-change
    -- sync then logs the keys each commit touches and plans only those (retl.changed_keys).
    key_attnums int2[],
    -- Their names, for the trigger that logs the keys (refreshed by the next plan after a
    -- rename: until then the trigger logs "plan the whole model").
    key_columns text[]
);
CREATE INDEX sync_sources_relid_idx ON retl.sync_sources (relid);
COMMENT ON TABLE retl.sync_sources IS
  'Base tables each sync''s model depends on (through its views), as found in pg_depend; on-change syncs keep a statement trigger on each. key_attnums: the table columns carrying the model key when the model is a plain projection of this table (its on-change runs then plan only the changed keys).';

-- The keys of an on-change sync's model that commits have touched since its last plan, logged
-- by the statement trigger retl_changed_keys on the model's table (only for models that are a
-- plain projection of one table). A NULL key means "plan the whole model" (a TRUNCATE, a
-- statement touching very many rows, a NULL key value, a new or altered sync). No unique index
-- and no foreign key on purpose: concurrent writers of the same key must not wait for each
-- other, and a user's statement must not lock the sync row. drop_sync clears a sync's rows.
CREATE TABLE retl.changed_keys (
    sync_id bigint NOT NULL,
    key     jsonb
);
CREATE INDEX changed_keys_sync_idx ON retl.changed_keys (sync_id);
COMMENT ON TABLE retl.changed_keys IS
  'Keys of on-change syncs touched by commits and not yet planned (key NULL: plan the whole model). Written by the retl_changed_keys triggers, consumed by the next run''s plan.';

CREATE TABLE retl.runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sync_id          bigint NOT NULL REFERENCES retl.syncs(id) ON DELETE CASCADE,
    trigger          text NOT NULL DEFAULT 'manual',
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'delivering', 'succeeded', 'partial', 'failed', 'cancelled')),
    queued_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at       timestamptz,
    planned_at       timestamptz,
    finished_at      timestamptz,
    rows_in_model    bigint,
    planned_inserts  bigint NOT NULL DEFAULT 0,
    planned_updates  bigint NOT NULL DEFAULT 0,
    planned_deletes  bigint NOT NULL DEFAULT 0,
    delivered        bigint NOT NULL DEFAULT 0,
    failed           bigint NOT NULL DEFAULT 0,
    api_calls        bigint NOT NULL DEFAULT 0,
    error            text,
    -- When a worker last delivered a slice of this run: runs take turns by it (fair share).
    last_served_at   timestamptz,
    -- What the plan diffed: the whole model, or only the keys commits touched (on-change runs
    -- of a model that is a plain projection of one table; rows_in_model is then NULL).
    plan_scope       text CHECK (plan_scope IN ('model', 'changed keys')),
    -- The destination's own account of API usage, as last reported during this run (e.g.
    -- Salesforce's Sforce-Limit-Info 'api-usage=25/15000').
    api_usage        text,
    -- Since 0.5.0: the safeguards this run may pass (retl.run(..., allow_mass_delete => true,
    -- allow_schema_change => true)), and the model columns its plan read with their types
    -- ({"column": "type"}): the schema contract of the next runs once this one succeeded.
    allow_mass_delete   boolean NOT NULL DEFAULT false,
    allow_schema_change boolean NOT NULL DEFAULT false,
    model_columns       jsonb
);
CREATE INDEX runs_sync_id_idx ON retl.runs (sync_id, id DESC);
CREATE INDEX runs_pending_idx ON retl.runs (id) WHERE status IN ('queued', 'delivering');
COMMENT ON TABLE retl.runs IS
  'One row per sync run: trigger, status (queued, delivering, succeeded, partial = some rows rejected, failed, cancelled), timings, what was planned (plan_scope: the whole model, or only the changed keys), what was delivered, and the API usage the destination reported (api_usage).';

CREATE TABLE retl.batches (
    run_id      bigint NOT NULL REFERENCES retl.runs(id) ON DELETE CASCADE,
    batch_no    int NOT NULL,
    records     int NOT NULL,
    acknowledged int NOT NULL,
    rejected    int NOT NULL,
    unresolved  int NOT NULL,
    api_calls   int NOT NULL,
    error       text,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, batch_no)
);
COMMENT ON TABLE retl.batches IS
  'One row per delivered batch: how many records it held, were acknowledged, rejected per record, or left for the next run.';

-- The snapshot: what this sync has delivered and the destination acknowledged.
CREATE TABLE retl.snapshots (
    -- Its sync, checked once per statement rather than per row (see retl._check_refs below).
    sync_id      bigint NOT NULL,
    key          jsonb NOT NULL,
    hash         bytea NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sync_id, key)
)
-- Room on every page for new versions of its rows: an acknowledged change rewrites hash and
-- delivered_at, which no index holds, so with room on the page the new version is a
-- heap-only tuple and the primary key (jsonb keys, costly to compare) is not touched. Packed
-- full, each changed row also went into the index: 100k changed rows of a 1M-row snapshot took
-- 3.6-4.3 s to acknowledge packed against 1.7-1.9 s with this (measured for 0.10.0). A packed
-- snapshot grows to the same size after its first large update anyway.
WITH (fillfactor = 90);
COMMENT ON TABLE retl.snapshots IS
  'Per sync, every key the destination acknowledged and a hash of the mapped fields it holds (with hash version 4, also of the key: its fingerprint); the next plan diffs the model against it.';

-- The outbox: the current plan of a sync, row by row, until delivered.
CREATE TABLE retl.outbox (
    -- Unique with its run (the primary key below): rows are found by run, in id order.
    id       bigint GENERATED ALWAYS AS IDENTITY,
    -- The run's sync: the first column of the primary key, for the lookups by sync (the
    -- planner's, the status views', erasure). Checked with the run (retl._check_refs below).
    sync_id  bigint NOT NULL,
    -- Its run, checked once per statement rather than per row (see retl._check_refs below).
    run_id   bigint NOT NULL,
    op       text NOT NULL CHECK (op IN ('insert', 'update', 'upsert', 'delete')),
    key      jsonb NOT NULL,
    payload  jsonb,
    hash     bytea NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    -- The one index, for every lookup: a sync's rows, a run's rows in id order (the delivery's
    -- reads) and rows by run and id (its acknowledgements). Every index costs a plan that
    -- writes 100k rows 0.15-0.3 s: the outbox had three until 0.10.0, two until 0.11.0, when
    -- the one on sync_id alone went (measured for 0.10.0 and 0.11.0).
    PRIMARY KEY (sync_id, run_id, id)
);
COMMENT ON TABLE retl.outbox IS
  'Changes planned and not yet acknowledged by the destination. A row leaves it when acknowledged (snapshot advanced) or rejected (moved to retl.row_errors).';

-- The outbox's run and the snapshot's sync, kept as foreign keys with ON DELETE CASCADE would
-- keep them, but checked once per statement instead of once per row. A plan writes its new and
-- changed rows to the outbox, and each acknowledged batch its new keys to the snapshot: up to
-- millions of rows a run, every one of one run and sync. A foreign key's check of each row (a
-- query locking the referenced row) cost about 10 µs, a quarter of a 1M-row model's plan with
-- 10% of it changed (measured for 0.9.0). These checks lock each referenced row once, as a
-- foreign key's check does (FOR KEY SHARE: a concurrent delete of it waits, or the insert
-- fails), and deleting runs or syncs deletes their rows.
--
-- Not checked while the extension is being created or updated in the same transaction: that
-- is a restore (pg_restore --single-transaction, see "Backups"), which loads the tables' rows
-- from one consistent dump. pg_dump orders an extension's tables' data by their foreign keys
-- and their names: today other tables' foreign keys still put runs and syncs first, but
-- nothing in these two references does any more.
--
-- A statement that inserted nothing has nothing to check: every acknowledged batch's upsert
-- of the snapshot fires the trigger, and once the snapshot holds the sync's keys it inserts
-- none. Without the early return, each such firing still ran the restore check and its query:
-- delivering 100k changed rows of a 1M-row model took 1.73 s instead of 1.65 s (medians of
-- ten runs each, alternating; measured for 0.12.0).
CREATE FUNCTION retl._check_refs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    referenced bigint;
    claimed bigint;
    actual bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows) THEN
        RETURN NULL;
    END IF;
    IF retl._installing() THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'outbox' THEN
        FOR referenced, claimed IN SELECT DISTINCT n.run_id, n.sync_id FROM new_rows n LOOP
            SELECT r.sync_id INTO actual FROM retl.runs r WHERE r.id = referenced FOR KEY SHARE;
            IF NOT FOUND THEN
                RAISE foreign_key_violation USING
                    MESSAGE = format('insert into table "outbox" refers to run %s, which does not exist', referenced),
                    HINT = 'Outbox rows are written by the plan of an existing run; deleting a run deletes its outbox rows.';
            ELSIF actual <> claimed THEN
                -- Rows are found by sync, run and id: one filed under another sync is lost.
                RAISE foreign_key_violation USING
                    MESSAGE = format('insert into table "outbox" files a row of run %s under sync %s, but run %s is of sync %s',
                                     referenced, claimed, referenced, actual),
                    HINT = 'An outbox row''s sync_id is the sync of its run.';
            END IF;
        END LOOP;
    ELSE
        FOR referenced IN SELECT DISTINCT n.sync_id FROM new_rows n LOOP
            PERFORM FROM retl.syncs s WHERE s.id = referenced FOR KEY SHARE;
            IF NOT FOUND THEN
                RAISE foreign_key_violation USING
                    MESSAGE = format('insert into table "snapshots" refers to sync %s, which does not exist', referenced),
                    HINT = 'Snapshot rows belong to an existing sync; dropping a sync deletes its snapshot.';
            END IF;
        END LOOP;
    END IF;
    RETURN NULL;
END $$;
COMMENT ON FUNCTION retl._check_refs() IS
  'Trigger: the runs of the outbox rows (each of the row''s sync), or the syncs of the snapshot rows, a statement inserted exist (locked FOR KEY SHARE, as by a foreign key check); once per statement.';

CREATE FUNCTION retl._cascade_refs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_TABLE_NAME = 'runs' THEN
        DELETE FROM retl.outbox o USING old_rows d WHERE o.sync_id = d.sync_id AND o.run_id = d.id;
    ELSE
        DELETE FROM retl.snapshots s USING old_rows d WHERE s.sync_id = d.id;
    END IF;
    RETURN NULL;
END $$;
COMMENT ON FUNCTION retl._cascade_refs() IS
  'Trigger: deleting runs deletes their outbox rows, deleting syncs their snapshot rows (as ON DELETE CASCADE, once per statement).';

-- Neither reference ever changes; an UPDATE that tried would escape the checks above.
CREATE FUNCTION retl._refuse_reference_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE feature_not_supported USING
        MESSAGE = format('the %s of a row of retl.%s cannot change', TG_ARGV[0], TG_TABLE_NAME),
        HINT = 'Delete the row and insert it again.';
END $$;
COMMENT ON FUNCTION retl._refuse_reference_change() IS
  'Trigger: refuses an UPDATE of the run of an outbox row or of the sync of a snapshot row (checked only when inserted).';

CREATE TRIGGER outbox_run_exists AFTER INSERT ON retl.outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION retl._check_refs();
CREATE TRIGGER snapshots_sync_exists AFTER INSERT ON retl.snapshots
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION retl._check_refs();
CREATE TRIGGER outbox_run_fixed BEFORE UPDATE OF run_id ON retl.outbox
    FOR EACH ROW WHEN (OLD.run_id IS DISTINCT FROM NEW.run_id) EXECUTE FUNCTION retl._refuse_reference_change('run');
CREATE TRIGGER snapshots_sync_fixed BEFORE UPDATE OF sync_id ON retl.snapshots
    FOR EACH ROW WHEN (OLD.sync_id IS DISTINCT FROM NEW.sync_id) EXECUTE FUNCTION retl._refuse_reference_change('sync');
CREATE TRIGGER runs_cascade_to_outbox AFTER DELETE ON retl.runs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION retl._cascade_refs();
CREATE TRIGGER syncs_cascade_to_snapshots AFTER DELETE ON retl.syncs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION retl._cascade_refs();

-- The identity map: the destination's own id for a key, when its connector reports one (for
-- the generic HTTP connector, the server option result_id). Later requests for the key get it
-- (templates: destination_id); an acknowledged delete removes it.
CREATE TABLE retl.identities (
    sync_id        bigint NOT NULL REFERENCES retl.syncs(id) ON DELETE CASCADE,
    key            jsonb NOT NULL,
    destination_id text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sync_id, key)
);
COMMENT ON TABLE retl.identities IS
  'Identity map: per sync, the destination''s own id for each key it reported one for (e.g. the id a create call returned); given to later requests for that key, removed by an acknowledged delete.';

CREATE TABLE retl.row_errors (
    sync_id         bigint NOT NULL REFERENCES retl.syncs(id) ON DELETE CASCADE,
    key             jsonb NOT NULL,
    run_id          bigint NOT NULL,
    op              text NOT NULL,
    payload         jsonb,
    http_status     int,
    response        text NOT NULL,
    attempts        int NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sync_id, key),
    -- Since 0.5.0: the hash of the rejected version; retl.discard_failed records it in the
    -- snapshot, so the row is sent again only once it changes.
    hash            bytea
);
COMMENT ON TABLE retl.row_errors IS
  'Rows the destination rejected (permanent per-record errors) and that are still failing: retried on every run, removed once delivered. attempts counts the runs in which the row failed.';

GRANT SELECT ON retl.models, retl.audiences, retl.syncs, retl.sync_parents, retl.sync_sources, retl.runs, retl.batches, retl.row_errors TO PUBLIC;

------------------------------------------------------------------------------------------------
-- Status
------------------------------------------------------------------------------------------------

-- Whether `member` is a member of the role named `role_name` (false when no such role: a DBA
-- may have dropped one of the retl_* roles).
CREATE FUNCTION retl._has_role(member oid, role_name text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = role_name)
                THEN pg_has_role(member, role_name, 'MEMBER') ELSE false END
$$;

-- Whether the caller may see an object of `owner`: its owner's members and retl_viewer's
-- (retl_operator and retl_admin are members of retl_viewer). The row-level security of the
-- catalog tables and the status views use it.
CREATE FUNCTION retl._visible(owner regrole) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = owner)
                THEN pg_has_role(retl._caller(), owner, 'MEMBER') ELSE false END
           OR retl._has_role(retl._caller(), 'retl_viewer')
$$;

-- Alerts (since 0.5.0): one row per time a condition started to hold for a sync; open while
-- it holds (resolved_at NULL), resolved by the first evaluation that finds it cleared.
-- Raised and resolved by retl._evaluate_alerts (workers, every few seconds), announced with
-- NOTIFY retl_alerts, and sent to the sync's alert destination when it has one.
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

-- A destination's server option, as text (NULL when not set). Server options hold no
-- secrets (credentials live in user mappings).
CREATE FUNCTION retl._server_option(server text, option text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT o.option_value FROM pg_foreign_server s, pg_options_to_table(s.srvoptions) o
     WHERE s.srvname = server AND o.option_name = option
$$;

-- The window retl.sync_status computes rates and latencies over (setting retl.status_window).
CREATE FUNCTION retl._status_window() RETURNS interval
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(nullif(current_setting('retl.status_window', true), ''), '1d')::interval
$$;

-- One sync's runs and deliveries over the last `status_window`: finished runs, the share of
-- them that succeeded, the share of rows sent that the destination rejected, and the delivery
-- latency of rows (from the plan that queued them to the batch the destination acknowledged),
-- median and 99th percentile.
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

CREATE VIEW retl.sync_status AS
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

------------------------------------------------------------------------------------------------
-- Internal helpers
------------------------------------------------------------------------------------------------

-- An identifier as Postgres's own messages show one: in double quotes.
CREATE FUNCTION retl._q(name text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN name IS NULL THEN 'NULL' ELSE '"' || replace(name, '"', '""') || '"' END
$$;

CREATE FUNCTION retl._check_name(kind text, name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF name IS NULL OR name !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION '% name % is not valid', kind, coalesce(retl._q(name), 'NULL')
              USING ERRCODE = 'invalid_name',
                    HINT = 'Use 1 to 63 lower-case letters, digits and underscores, starting with a letter or underscore.';
    END IF;
END $$;

-- Raise unless the caller owns (or is a member of the owner of) the object, or is a member
-- of retl_admin.
CREATE FUNCTION retl._check_owner(kind text, name text, owner regrole) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT (pg_has_role(retl._caller(), owner, 'MEMBER') OR retl._has_role(retl._caller(), 'retl_admin')) THEN
        RAISE EXCEPTION 'must be owner of % %', kind, retl._q(name)
              USING ERRCODE = 'insufficient_privilege',
                    DETAIL = format('It belongs to role %s.', owner::text),
                    HINT = 'Members of retl_admin may change every model, audience and sync.';
    END IF;
END $$;

-- Raise unless the caller may operate the sync (run, pause, resume, retry, discard): its
-- owner's members, retl_operator's and retl_admin's.
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

CREATE FUNCTION retl._model_columns(view_name text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}')
      FROM pg_attribute a
     WHERE a.attrelid = format('retl_models.%I', view_name)::regclass
       AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- Mapped columns must exist in the model; returns the model columns the sync reads.
CREATE FUNCTION retl._check_mappings(sync_name text, source_name text, mappings jsonb) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cols text[] := retl._model_columns(source_name);
    field text;
    col jsonb;
BEGIN
    IF mappings IS NULL THEN
        RETURN;
    END IF;
    IF jsonb_typeof(mappings) <> 'object' OR mappings = '{}' THEN
        RAISE EXCEPTION 'mappings of sync % must be a non-empty JSON object', retl._q(sync_name)
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'Map destination fields to model columns, e.g. ''{"email": "email", "full_name": "name"}''.';
    END IF;
    FOR field, col IN SELECT * FROM jsonb_each(mappings) LOOP
        IF jsonb_typeof(col) <> 'string' THEN
            RAISE EXCEPTION 'mapping for destination field % must name a model column as a string, got %', retl._q(field), col
                  USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT (col #>> '{}') = ANY (cols) THEN
            RAISE EXCEPTION 'mapped column % is not in model %', retl._q(col #>> '{}'), retl._q(source_name)
                  USING ERRCODE = 'undefined_column',
                        DETAIL = format('The model has columns: %s.', array_to_string(cols, ', ')),
                        HINT = format('Fix the mapping for destination field %s, or add the column to the model.', retl._q(field));
        END IF;
    END LOOP;
END $$;

-- The destination fields a sync writes: the mappings' keys, else every model column (none
-- for a delete sync, which sends keys only).
CREATE FUNCTION retl._sync_fields(mode text, mappings jsonb, source_name text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN mode = 'delete' THEN '{}'::text[]
                WHEN mappings IS NULL THEN retl._model_columns(source_name)
                ELSE ARRAY(SELECT jsonb_object_keys(mappings) ORDER BY 1) END
$$;

------------------------------------------------------------------------------------------------
-- Models and audiences
------------------------------------------------------------------------------------------------

-- The SELECT a model's view is made of: a query as it is (after the parser's checks), or for
-- the name of a table or view (resolved with the caller's search_path) SELECT * from it.
CREATE FUNCTION retl._model_select(query text, caller_search_path text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    relation regclass;
BEGIN
    IF query ~ '^\s*("([^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)(\s*\.\s*("([^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*))?\s*$' THEN
        PERFORM set_config('search_path', caller_search_path, true);
        relation := to_regclass(query);
        PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
        IF relation IS NULL THEN
            RAISE EXCEPTION 'relation % does not exist', retl._q(btrim(query))
                  USING ERRCODE = 'undefined_table', HINT = 'Pass the name of a table or view, or a SELECT query.';
        END IF;
        RETURN format('SELECT * FROM %s', relation::text);
    END IF;
    RETURN retl._check_query(query);
END $$;

-- (Re)create the view retl_models.<view_name> as select_sql, owned by owner, resolving names
-- with the caller's search_path, and give again the grants listed.
CREATE FUNCTION retl._create_view(view_name text, select_sql text, owner regrole, caller_search_path text,
                                  grants text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g text;
BEGIN
    PERFORM set_config('search_path', caller_search_path, true);
    BEGIN
        EXECUTE format('CREATE VIEW retl_models.%I AS %s', view_name, select_sql);
    EXCEPTION WHEN OTHERS THEN
        PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
        RAISE;
    END;
    PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
    EXECUTE format('ALTER VIEW retl_models.%I OWNER TO %I', view_name, owner::text);
    FOREACH g IN ARRAY grants LOOP
        EXECUTE g;
    END LOOP;
END $$;

-- An audience's view: its model's rows that pass its filter.
CREATE FUNCTION retl._audience_select(model_name text, filter text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format(E'SELECT * FROM retl_models.%I WHERE (%s\n)', model_name, filter)
$$;

-- The key columns of a model must be columns of its view, each named once.
CREATE FUNCTION retl._check_model_key(name text, primary_key text[]) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cols text[] := retl._model_columns(name);
    k text;
BEGIN
    FOREACH k IN ARRAY primary_key LOOP
        IF NOT k = ANY (cols) THEN
            RAISE EXCEPTION 'primary key column % is not in model %', retl._q(k), retl._q(name)
                  USING ERRCODE = 'undefined_column', DETAIL = format('The model has columns: %s.', array_to_string(cols, ', '));
        END IF;
    END LOOP;
    IF cardinality(primary_key) <> (SELECT count(DISTINCT x) FROM unnest(primary_key) x) THEN
        RAISE EXCEPTION 'primary key of model % lists a column twice', retl._q(name) USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

CREATE FUNCTION retl._create_model(name text, query text, primary_key text[], caller_search_path text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := retl._caller();
    select_sql text;
    model_id bigint;
BEGIN
    PERFORM retl._check_name('model', name);
    IF EXISTS (SELECT 1 FROM retl.models m WHERE m.name = _create_model.name)
       OR EXISTS (SELECT 1 FROM retl.audiences a WHERE a.name = _create_model.name) THEN
        RAISE EXCEPTION 'model % already exists', retl._q(name)
              USING ERRCODE = 'duplicate_object', HINT = 'Drop it first with retl.drop_model, or pick another name.';
    END IF;
    IF primary_key IS NULL OR cardinality(primary_key) = 0 THEN
        RAISE EXCEPTION 'model % needs a primary key', retl._q(name)
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'Pass primary_key => ''{id}'' (several columns for a composite key).';
    END IF;
    select_sql := retl._model_select(query, caller_search_path);
    PERFORM retl._create_view(name, select_sql, caller, caller_search_path);
    PERFORM retl._check_model_key(name, primary_key);
    -- The caller must be able to read what the model reads: checked now, as the caller.
    PERFORM retl._check_readable(name, caller);
    INSERT INTO retl.models (name, query, primary_key, owner)
    VALUES (name, query, primary_key, caller)
    RETURNING id INTO model_id;
    RETURN model_id;
END $$;

CREATE FUNCTION retl.create_model(name text, query text, primary_key text[] DEFAULT '{id}')
RETURNS bigint
LANGUAGE sql AS $$
    SELECT retl._create_model(name, query, primary_key, current_setting('search_path'))
$$;
COMMENT ON FUNCTION retl.create_model(text, text, text[]) IS
  'Define a model: query => a SELECT or the name of a table or view, primary_key => its key column(s). Kept as the view retl_models.<name>, owned by you. Returns the model id.';

CREATE FUNCTION retl.drop_model(name text, if_exists boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m retl.models;
    users text;
BEGIN
    SELECT * INTO m FROM retl.models WHERE models.name = drop_model.name FOR UPDATE;
    IF NOT FOUND THEN
        IF if_exists THEN RETURN; END IF;
        RAISE EXCEPTION 'model % does not exist', retl._q(name) USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM retl._check_owner('model', m.name, m.owner);
    SELECT string_agg(retl._q(s.name), ', ') INTO users FROM retl.syncs s WHERE s.model_id = m.id;
    IF users IS NULL THEN
        SELECT string_agg(retl._q(a.name), ', ') INTO users FROM retl.audiences a WHERE a.model_id = m.id;
    END IF;
    IF users IS NOT NULL THEN
        RAISE EXCEPTION 'model % is still used by %', retl._q(m.name), users
              USING ERRCODE = 'dependent_objects_still_exist', HINT = 'Drop those syncs and audiences first.';
    END IF;
    -- IF EXISTS: dropping the model's tables with CASCADE took the view with them.
    EXECUTE format('DROP VIEW IF EXISTS retl_models.%I', m.name);
    DELETE FROM retl.models WHERE id = m.id;
END $$;
COMMENT ON FUNCTION retl.drop_model(text, boolean) IS 'Drop a model that no sync or audience uses.';

CREATE FUNCTION retl._create_audience(name text, model text, filter text, caller_search_path text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := retl._caller();
    m retl.models;
    audience_id bigint;
BEGIN
    PERFORM retl._check_name('audience', name);
    SELECT * INTO m FROM retl.models WHERE models.name = _create_audience.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model % does not exist', retl._q(model) USING ERRCODE = 'undefined_object';
    END IF;
    IF EXISTS (SELECT 1 FROM retl.models x WHERE x.name = _create_audience.name)
       OR EXISTS (SELECT 1 FROM retl.audiences a WHERE a.name = _create_audience.name) THEN
        RAISE EXCEPTION 'audience % already exists (models and audiences share names)', retl._q(name)
              USING ERRCODE = 'duplicate_object';
    END IF;
    PERFORM retl._check_filter(filter);
    PERFORM retl._create_view(name, retl._audience_select(m.name, filter), caller, caller_search_path);
    PERFORM retl._check_readable(name, caller);
    INSERT INTO retl.audiences (name, model_id, filter, owner)
    VALUES (name, m.id, filter, caller)
    RETURNING id INTO audience_id;
    RETURN audience_id;
END $$;

CREATE FUNCTION retl.create_audience(name text, model text, filter text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT retl._create_audience(name, model, filter, current_setting('search_path'))
$$;
COMMENT ON FUNCTION retl.create_audience(text, text, text) IS
  'Define an audience: the rows of a model matching filter (a boolean SQL expression over its columns, e.g. ''churn_risk > 0.7''). Returns the audience id.';

CREATE FUNCTION retl.drop_audience(name text, if_exists boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a retl.audiences;
    users text;
BEGIN
    SELECT * INTO a FROM retl.audiences WHERE audiences.name = drop_audience.name FOR UPDATE;
    IF NOT FOUND THEN
        IF if_exists THEN RETURN; END IF;
        RAISE EXCEPTION 'audience % does not exist', retl._q(name) USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM retl._check_owner('audience', a.name, a.owner);
    SELECT string_agg(retl._q(s.name), ', ') INTO users FROM retl.syncs s WHERE s.audience_id = a.id;
    IF users IS NOT NULL THEN
        RAISE EXCEPTION 'audience % is still used by %', retl._q(a.name), users
              USING ERRCODE = 'dependent_objects_still_exist', HINT = 'Drop those syncs first.';
    END IF;
    -- IF EXISTS: dropping the model's tables with CASCADE took the view with them.
    EXECUTE format('DROP VIEW IF EXISTS retl_models.%I', a.name);
    DELETE FROM retl.audiences WHERE id = a.id;
END $$;
COMMENT ON FUNCTION retl.drop_audience(text, boolean) IS 'Drop an audience that no sync uses.';

------------------------------------------------------------------------------------------------
-- Syncs
------------------------------------------------------------------------------------------------

CREATE FUNCTION retl._check_destination(destination text, caller regrole) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    wrapper name;
BEGIN
    SELECT w.fdwname INTO wrapper
      FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
     WHERE s.srvname = destination;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'destination % does not exist', retl._q(destination)
              USING ERRCODE = 'undefined_object',
                    HINT = 'Create it with CREATE SERVER ... FOREIGN DATA WRAPPER retl OPTIONS (type ''webhook'', url ''...'').';
    END IF;
    IF wrapper <> 'retl' THEN
        RAISE EXCEPTION 'server % is not a retl destination (it uses foreign-data wrapper %)', retl._q(destination), wrapper
              USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT has_server_privilege(caller, destination, 'USAGE') THEN
        RAISE EXCEPTION 'permission denied for destination %', retl._q(destination)
              USING ERRCODE = 'insufficient_privilege',
                    HINT = format('A superuser or the server owner can run: GRANT USAGE ON FOREIGN SERVER %I TO %I;', destination, caller::text);
    END IF;
END $$;

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

CREATE FUNCTION retl._check_mode(mode text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF mode IS NULL OR mode NOT IN ('insert', 'update', 'upsert', 'mirror', 'delete') THEN
        RAISE EXCEPTION 'unknown sync mode %', coalesce(retl._q(mode), 'NULL')
              USING ERRCODE = 'invalid_parameter_value', HINT = 'Use one of: insert, update, upsert, mirror, delete.';
    END IF;
END $$;

CREATE FUNCTION retl._sync_for_change(sync_name text) RETURNS retl.syncs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs;
BEGIN
    SELECT * INTO s FROM retl.syncs WHERE name = sync_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sync % does not exist', coalesce(retl._q(sync_name), 'NULL') USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM retl._check_owner('sync', s.name, s.owner);
    RETURN s;
END $$;

-- _sync_for_change for operations (run, pause, resume, retry, discard): operators may too.
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

-- Wait until no worker works on sync `sync_id`, and keep the workers off it until this
-- transaction ends. A worker holds the sync's advisory key (namespace 1380275276, "RETL", and
-- the sync's id: worker.rs, pick_run) for one step on it: a plan, or a window of batches sent
-- and recorded. Statements that delete a sync's rows take it first, before they lock the
-- sync's row (the worker's statements need that row too): otherwise they deleted the rows a
-- batch in flight was about to record, or deadlocked with the recording.
CREATE FUNCTION retl._wait_for_worker(sync_id bigint) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_advisory_xact_lock(1380275276, sync_id::int4)
$$;
COMMENT ON FUNCTION retl._wait_for_worker(bigint) IS
  'Waits for a worker''s step on the sync (a plan, or a window of batches) to end, and keeps the workers off it until the transaction ends.';

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
    s retl.syncs;
    source_name text;
    unknown text;
BEGIN
    -- A new destination empties the sync's snapshot and queue: first wait for a worker's step
    -- on the sync (before the row lock, see retl._wait_for_worker).
    IF alter_sync.destination IS NOT NULL THEN
        PERFORM retl._wait_for_worker(syncs.id) FROM retl.syncs
          WHERE syncs.name = alter_sync.name AND syncs.destination <> alter_sync.destination;
    END IF;
    s := retl._sync_for_change(name);
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
  'Change a sync; arguments left NULL keep their value (reset_mappings => true maps every column again; after => ''{}'' removes every parent; reset => ''{max_rows, freshness}'' puts safeguard and alert settings back to their defaults). A new destination starts from an empty snapshot and identity map, after a worker planning or delivering the sync has ended its current step.';

CREATE FUNCTION retl.drop_sync(name text, if_exists boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs;
    children text;
BEGIN
    IF if_exists AND NOT EXISTS (SELECT 1 FROM retl.syncs WHERE syncs.name = drop_sync.name) THEN
        RETURN;
    END IF;
    -- Wait for a worker's step on the sync, before the row lock (see retl._wait_for_worker).
    PERFORM retl._wait_for_worker(syncs.id) FROM retl.syncs WHERE syncs.name = drop_sync.name;
    s := retl._sync_for_change(name);
    SELECT string_agg(retl._q(c.name), ', ' ORDER BY c.name) INTO children
      FROM retl.sync_parents p JOIN retl.syncs c ON c.id = p.sync_id WHERE p.parent_id = s.id;
    IF children IS NOT NULL THEN
        RAISE EXCEPTION 'sync % is still a parent of %', retl._q(s.name), children
              USING ERRCODE = 'dependent_objects_still_exist',
                    HINT = 'Drop those syncs first, or remove the dependency with retl.alter_sync(name => ..., after => ''{}'').';
    END IF;
    -- Runs, batches, snapshot, outbox, row errors and sources go with it (ON DELETE CASCADE).
    DELETE FROM retl.syncs WHERE id = s.id;
    DELETE FROM retl.changed_keys WHERE sync_id = s.id;
    PERFORM retl._refresh_change_triggers();
END $$;
COMMENT ON FUNCTION retl.drop_sync(text, boolean) IS
  'Drop a sync with its snapshot, queue, row errors and run history. Nothing is deleted in the destination. Waits for a worker planning or delivering the sync to end its current step.';

CREATE FUNCTION retl.pause(sync text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs := retl._sync_for_operation(sync);
BEGIN
    UPDATE retl.syncs SET paused = true, updated_at = now() WHERE id = s.id;
END $$;
COMMENT ON FUNCTION retl.pause(text) IS
  'Pause a sync: queued runs are cancelled and a delivering run stops after its current batches; what is queued stays queued.';

CREATE FUNCTION retl.resume(sync text) RETURNS void
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
COMMENT ON FUNCTION retl.resume(text) IS 'Resume a paused sync.';

-- Used by retl.run: checks the caller may run the sync, queues the run row, returns it.
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

-- Used by retl.run(wait => true): checks the caller may run the sync, returns its id.
-- No row lock here (unlike _sync_for_change): the worker inserts the run, whose foreign key
-- needs a share lock on this very row while we wait for it.
CREATE FUNCTION retl._runnable_sync(sync text) RETURNS bigint
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

CREATE FUNCTION retl._run_summary(run_id bigint) RETURNS retl.runs
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM retl.runs WHERE id = run_id
$$;
