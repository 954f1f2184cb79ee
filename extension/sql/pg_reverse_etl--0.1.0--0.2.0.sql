-- pg_reverse_etl 0.1.0 -> 0.2.0: syncs that run by themselves (schedules, after => parents,
-- on change), several workers taking turns, one rate budget per destination shared by all
-- workers, retl.run(wait => true) raising on failure with a timeout, retl.worker_status().
-- Every object below is also in the 0.2.0 install script; the upgrade test checks that an
-- upgraded database and a fresh one have the same catalog.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.2.0'" to load this file. \quit

-- New columns go last, in the order the 0.2.0 install script declares them.
ALTER TABLE retl.syncs
    ADD COLUMN schedule    text NOT NULL DEFAULT 'manual',
    ADD COLUMN time_zone   text NOT NULL DEFAULT 'UTC',
    ADD COLUMN next_run_at timestamptz,
    -- Existing syncs keep hashing rows as 0.1.0 did: their snapshots hold such hashes.
    ADD COLUMN hash_version smallint NOT NULL DEFAULT 1 CHECK (hash_version IN (1, 2));
ALTER TABLE retl.syncs ALTER COLUMN hash_version SET DEFAULT 2;
ALTER TABLE retl.runs ADD COLUMN last_served_at timestamptz;

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
    relid   oid NOT NULL,
    PRIMARY KEY (sync_id, relid)
);
CREATE INDEX sync_sources_relid_idx ON retl.sync_sources (relid);
COMMENT ON TABLE retl.sync_sources IS
  'Base tables each sync''s model depends on (through its views), as found in pg_depend; on-change syncs keep a statement trigger on each.';
GRANT SELECT ON retl.sync_parents, retl.sync_sources TO PUBLIC;

-- Functions implemented in the library.
-- pg_reverse_etl::api::_await_run
CREATE  FUNCTION "_await_run"(
	"sync_id" bigint, /* i64 */
	"timeout_ms" bigint /* Option < i64 > */
) RETURNS bigint /* i64 */
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_await_run_wrapper';

-- pg_reverse_etl::api::_is_cron
CREATE  FUNCTION "_is_cron"(
	"schedule" TEXT /* & str */
) RETURNS bool /* bool */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_is_cron_wrapper';

-- pg_reverse_etl::api::_cron_next
CREATE  FUNCTION "_cron_next"(
	"expr" TEXT, /* & str */
	"after" timestamp /* pgrx :: datum :: Timestamp */
) RETURNS timestamp /* Option < pgrx :: datum :: Timestamp > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_cron_next_wrapper';

-- pg_reverse_etl::api::_worker_slots
CREATE  FUNCTION "_worker_slots"() RETURNS TABLE (
	"worker" INT,  /* i32 */
	"pid" INT,  /* i32 */
	"state" TEXT,  /* String */
	"sync_id" bigint,  /* i64 */
	"run_id" bigint,  /* i64 */
	"since" timestamp with time zone  /* Option < pgrx :: datum :: TimestampWithTimeZone > */
)
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_worker_slots_wrapper';

-- pg_reverse_etl::changes::_on_change
CREATE FUNCTION "_on_change"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_on_change_wrapper';

-- Syncs that run by themselves: schedules (cron, intervals), dependencies between syncs
-- (after => ...), and on-change runs woken by the commits that change a model's base tables.
-- The worker calls retl._schedule_due() and retl._queue_changed(); users never do.

-- 'manual', 'on change', a 5-field cron expression or an interval; returns it normalised.
CREATE FUNCTION retl._check_schedule(sync_name text, schedule text, time_zone text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    norm text := lower(btrim(regexp_replace(coalesce(schedule, ''), '\s+', ' ', 'g')));
    every interval;
BEGIN
    BEGIN
        IF time_zone IS NULL THEN
            RAISE invalid_parameter_value;
        END IF;
        PERFORM now() AT TIME ZONE time_zone;
    EXCEPTION WHEN invalid_parameter_value THEN
        RAISE EXCEPTION 'time zone % of sync % is not recognized', coalesce(retl._q(time_zone), 'NULL'), retl._q(sync_name)
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'Use a name from pg_timezone_names, e.g. ''UTC'' or ''Europe/Paris''.';
    END;
    IF norm IN ('manual', 'on change') THEN
        RETURN norm;
    END IF;
    -- Unknown macros (@fortnightly) go to the cron parser too, for its precise error.
    IF retl._is_cron(norm) OR left(norm, 1) = '@' THEN
        IF retl._cron_next(norm, localtimestamp) IS NULL THEN  -- raises first if malformed
            RAISE EXCEPTION 'cron schedule % of sync % never fires', retl._q(schedule), retl._q(sync_name)
                  USING ERRCODE = 'invalid_parameter_value',
                        HINT = 'Check the day of month against the month, e.g. February has no 30th.';
        END IF;
        RETURN norm;
    END IF;
    BEGIN
        every := norm::interval;
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow THEN
        every := NULL;
    END;
    IF every IS NULL OR norm = '' THEN
        RAISE EXCEPTION 'schedule % of sync % is not valid', coalesce(retl._q(schedule), 'NULL'), retl._q(sync_name)
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'Use ''manual'', ''on change'', a cron expression such as ''*/15 * * * *'' (minute hour day-of-month month day-of-week), or an interval such as ''5 minutes''.';
    END IF;
    IF now() + every < now() + interval '1 second' THEN
        RAISE EXCEPTION 'schedule % of sync % is shorter than 1 second', retl._q(schedule), retl._q(sync_name)
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'For runs as soon as the data changes, use schedule => ''on change''.';
    END IF;
    RETURN norm;
END $$;

-- When a schedule next fires after `after`; NULL for manual and on-change syncs. Cron
-- expressions are evaluated in the sync's time zone with Postgres's own tz database: the
-- result is the first instant after `after` whose local wall-clock time matches. When clocks
-- go back, the repeated local hour matches twice (a run more is harmless: it sends the diff),
-- so both readings of the local time are tried; when they go forward, the skipped local times
-- never occur.
CREATE FUNCTION retl._next_run_at(schedule text, time_zone text, after timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    local_next timestamp;
    best timestamptz;
    candidate timestamptz;
    shift interval;
    offset_now interval;
    offset_later interval;
BEGIN
    IF schedule IN ('manual', 'on change') THEN
        RETURN NULL;
    END IF;
    IF NOT retl._is_cron(schedule) THEN
        RETURN after + schedule::interval;
    END IF;
    local_next := retl._cron_next(schedule, after AT TIME ZONE time_zone);
    IF local_next IS NULL THEN
        RETURN NULL;
    END IF;
    -- AT TIME ZONE reads a repeated local time as the later instant: try the earlier first.
    best := local_next AT TIME ZONE time_zone;
    FOREACH shift IN ARRAY ARRAY[interval '1 hour', interval '30 minutes'] LOOP
        candidate := best - shift;
        IF candidate > after AND candidate AT TIME ZONE time_zone = local_next THEN
            best := candidate;
            EXIT;
        END IF;
    END LOOP;
    -- Clocks going back within 3 hours: local time will run again from an earlier reading.
    offset_now := (after AT TIME ZONE time_zone) - (after AT TIME ZONE 'UTC');
    offset_later := ((after + interval '3 hours') AT TIME ZONE time_zone) - ((after + interval '3 hours') AT TIME ZONE 'UTC');
    IF offset_later < offset_now THEN
        local_next := retl._cron_next(schedule, (after AT TIME ZONE 'UTC') + offset_later);
        candidate := (local_next - offset_later) AT TIME ZONE 'UTC';
        IF candidate > after AND candidate < best AND candidate AT TIME ZONE time_zone = local_next THEN
            best := candidate;
        END IF;
    END IF;
    RETURN best;
END $$;

-- Replace a sync's parents; refuses unknown syncs and cycles.
CREATE FUNCTION retl._set_parents(child bigint, after text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    child_name text := (SELECT name FROM retl.syncs WHERE id = child);
    missing text;
    cycle text;
BEGIN
    IF after IS NULL THEN
        RETURN;
    END IF;
    SELECT string_agg(retl._q(p), ', ') INTO missing
      FROM unnest(after) p WHERE NOT EXISTS (SELECT 1 FROM retl.syncs s WHERE s.name = p);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'sync % cannot run after %: no such sync', retl._q(child_name), missing
              USING ERRCODE = 'undefined_object';
    END IF;
    IF child_name = ANY (after) THEN
        RAISE EXCEPTION 'sync % cannot run after itself', retl._q(child_name) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A dependency keeps its parent from being dropped: only its owner may create one.
    SELECT string_agg(retl._q(p.name), ', ') INTO missing
      FROM retl.syncs p, retl.syncs c
     WHERE c.id = child AND p.name = ANY (after) AND NOT pg_has_role(c.owner, p.owner, 'MEMBER');
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'sync % cannot run after % of another owner', retl._q(child_name), missing
              USING ERRCODE = 'insufficient_privilege',
                    HINT = 'A sync can only depend on syncs its owner owns (or is a member of the owning role).';
    END IF;
    DELETE FROM retl.sync_parents WHERE sync_id = child;
    INSERT INTO retl.sync_parents (sync_id, parent_id)
    SELECT DISTINCT child, s.id FROM retl.syncs s WHERE s.name = ANY (after);
    -- A cycle: the child is among its own ancestors.
    WITH RECURSIVE ancestors(id, path) AS (
        SELECT parent_id, ARRAY[child, parent_id] FROM retl.sync_parents WHERE sync_id = child
        UNION ALL
        SELECT p.parent_id, a.path || p.parent_id
          FROM ancestors a JOIN retl.sync_parents p ON p.sync_id = a.id
         WHERE NOT p.parent_id = ANY (a.path[2:])
    )
    SELECT string_agg(retl._q(s.name), ' -> ' ORDER BY o) INTO cycle
      FROM (SELECT path FROM ancestors WHERE id = child LIMIT 1) c,
           unnest(c.path) WITH ORDINALITY AS u(sid, o) JOIN retl.syncs s ON s.id = u.sid;
    IF cycle IS NOT NULL THEN
        RAISE EXCEPTION 'sync dependencies would form a cycle: %', cycle
              USING ERRCODE = 'invalid_parameter_value', HINT = 'A sync cannot (indirectly) run after itself.';
    END IF;
END $$;

-- Every table a model or audience view reads, through views of views, from pg_depend; with
-- the partitions and inheritance children of those tables (statements on them fire their
-- own triggers, not the parent's).
CREATE FUNCTION retl._base_tables(view_name text) RETURNS oid[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH RECURSIVE deps(relid) AS (
        SELECT format('retl_models.%I', view_name)::regclass::oid
        UNION
        SELECT x.relid
          FROM deps CROSS JOIN LATERAL (
                SELECT d.refobjid AS relid
                  FROM pg_rewrite r
                  JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                                  AND d.refclassid = 'pg_class'::regclass
                 WHERE r.ev_class = deps.relid AND d.refobjid <> deps.relid
                UNION ALL
                SELECT i.inhrelid FROM pg_inherits i WHERE i.inhparent = deps.relid
          ) x
    )
    SELECT coalesce(array_agg(c.oid ORDER BY c.oid), '{}')
      FROM deps JOIN pg_class c ON c.oid = deps.relid
     WHERE c.relkind IN ('r', 'p')
$$;

-- Record the base tables of a sync's model and keep the change triggers in line.
CREATE FUNCTION retl._refresh_sources(sync_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    source_name text;
BEGIN
    SELECT coalesce(a.name, m.name) INTO source_name
      FROM retl.syncs s JOIN retl.models m ON m.id = s.model_id LEFT JOIN retl.audiences a ON a.id = s.audience_id
     WHERE s.id = _refresh_sources.sync_id;
    DELETE FROM retl.sync_sources src WHERE src.sync_id = _refresh_sources.sync_id;
    INSERT INTO retl.sync_sources (sync_id, relid)
    SELECT _refresh_sources.sync_id, t FROM unnest(retl._base_tables(source_name)) t;
    PERFORM retl._refresh_change_triggers();
END $$;

-- Exactly the base tables of on-change syncs carry the statement trigger retl_on_change.
CREATE FUNCTION retl._refresh_change_triggers() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t oid;
BEGIN
    FOR t IN SELECT DISTINCT src.relid
               FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id
              WHERE s.schedule = 'on change'
                AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = src.relid AND g.tgname = 'retl_on_change')
    LOOP
        EXECUTE format('CREATE TRIGGER retl_on_change AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION retl._on_change()', t::regclass);
    END LOOP;
    FOR t IN SELECT g.tgrelid FROM pg_trigger g
              WHERE g.tgname = 'retl_on_change' AND g.tgfoid = 'retl._on_change()'::regprocedure
                AND NOT EXISTS (SELECT 1 FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id
                                 WHERE s.schedule = 'on change' AND src.relid = g.tgrelid)
    LOOP
        EXECUTE format('DROP TRIGGER retl_on_change ON %s', t::regclass);
    END LOOP;
END $$;

-- Worker: queue the runs whose time has come. A sync with a run still queued or delivering
-- is not started twice; a schedule missed during downtime runs once (next_run_at moves to the
-- next slot after now, not the next missed one).
CREATE FUNCTION retl._schedule_due() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s record;
    queued int := 0;
    n int;
BEGIN
    FOR s IN SELECT id, schedule, time_zone FROM retl.syncs
              WHERE NOT paused AND next_run_at <= now() FOR UPDATE SKIP LOCKED
    LOOP
        IF NOT EXISTS (SELECT 1 FROM retl.runs r WHERE r.sync_id = s.id AND r.status IN ('queued', 'delivering')) THEN
            INSERT INTO retl.runs (sync_id, trigger) VALUES (s.id, 'schedule');
            queued := queued + 1;
        END IF;
        UPDATE retl.syncs SET next_run_at = retl._next_run_at(s.schedule, s.time_zone, now()) WHERE id = s.id;
    END LOOP;
    -- after => [parents]: every parent succeeded since the child's last run (or creation).
    WITH ready AS (
        SELECT c.id FROM retl.syncs c
         WHERE NOT c.paused
           AND EXISTS (SELECT 1 FROM retl.sync_parents p WHERE p.sync_id = c.id)
           AND NOT EXISTS (SELECT 1 FROM retl.runs r WHERE r.sync_id = c.id AND r.status IN ('queued', 'delivering'))
           AND NOT EXISTS (
               SELECT 1 FROM retl.sync_parents p
                WHERE p.sync_id = c.id
                  AND NOT EXISTS (
                      SELECT 1 FROM retl.runs pr
                       WHERE pr.sync_id = p.parent_id AND pr.status IN ('succeeded', 'partial')
                         AND pr.finished_at > coalesce((SELECT max(cr.queued_at) FROM retl.runs cr WHERE cr.sync_id = c.id),
                                                       c.created_at)))
           FOR UPDATE OF c SKIP LOCKED
    )
    INSERT INTO retl.runs (sync_id, trigger) SELECT id, 'after' FROM ready;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN queued + n;
END $$;

-- Worker: queue a run of every on-change sync reading one of `relids` (NULL: of every
-- on-change sync). Changes close together coalesce: a sync with a run queued and not yet
-- started gets no second one; a sync whose run is being planned or delivered (its plan may
-- not see this change) gets one follow-up run.
CREATE FUNCTION retl._queue_changed(relids oid[]) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
BEGIN
    INSERT INTO retl.runs (sync_id, trigger)
    SELECT s.id, 'change' FROM retl.syncs s
     WHERE s.schedule = 'on change' AND NOT s.paused
       AND (relids IS NULL OR EXISTS (SELECT 1 FROM retl.sync_sources src
                                       WHERE src.sync_id = s.id AND src.relid = ANY (relids)))
       AND NOT EXISTS (SELECT 1 FROM retl.runs r
                        WHERE r.sync_id = s.id AND r.status = 'queued' AND r.started_at IS NULL);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Worker: the runs that may be worked on now, the one waiting longest first: per sync only
-- its oldest active run (a sync's runs never overlap), ordered by when each was last served.
CREATE FUNCTION retl._runnable_runs(max_runs int) RETURNS TABLE (run_id bigint, sync_id bigint, status text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT id, sync_id, status FROM (
        SELECT DISTINCT ON (r.sync_id) r.id, r.sync_id, r.status, coalesce(r.last_served_at, r.queued_at) AS turn
          FROM retl.runs r
         WHERE r.status IN ('queued', 'delivering')
         ORDER BY r.sync_id, r.id
    ) oldest
    ORDER BY turn, id
    LIMIT max_runs
$$;

-- When the earliest schedule fires, so an idle worker sleeps exactly until then.
CREATE FUNCTION retl._next_schedule_at() RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT min(next_run_at) FROM retl.syncs WHERE NOT paused
$$;

CREATE FUNCTION retl.worker_status()
RETURNS TABLE (worker int, pid int, state text, sync text, run_id bigint, since timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT w.worker, w.pid, w.state, s.name, nullif(w.run_id, 0), w.since
      FROM retl._worker_slots() w LEFT JOIN retl.syncs s ON s.id = w.sync_id
     ORDER BY w.worker
$$;
COMMENT ON FUNCTION retl.worker_status() IS
  'One row per background worker: its pid, what it is doing (starting, idle, scheduling, planning, delivering, stopped), the sync and run it works on, and since when.';

-- Changed signatures: dropped and created again.
DROP FUNCTION retl.create_sync(text, text, text, text, text, jsonb, boolean);
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
    time_zone   text DEFAULT 'UTC'
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
    schedule := retl._check_schedule(name, schedule, time_zone);
    INSERT INTO retl.syncs (name, model_id, audience_id, destination, mode, mappings, owner, paused,
                            schedule, time_zone, next_run_at)
    VALUES (name, m.id, a.id, destination, mode, mappings, caller, paused,
            schedule, time_zone, retl._next_run_at(schedule, time_zone, now()))
    RETURNING id INTO sync_id;
    PERFORM retl._set_parents(sync_id, after);
    PERFORM retl._refresh_sources(sync_id);
    -- An idle worker sleeps until the earliest schedule it knew of: tell it about this one.
    PERFORM retl._wake_worker_at_commit();
    RETURN sync_id;
END $$;
COMMENT ON FUNCTION retl.create_sync(text, text, text, text, text, jsonb, boolean, text, text[], text) IS
  'Define a sync from a model (or audience) to a destination. mode: insert, update, upsert (default), mirror (also deletes rows that leave the model), delete (the model lists keys to delete). mappings: {"destination_field": "model_column"}, NULL for every column. schedule: manual (default), on change (runs when a commit changes a table the model reads), a 5-field cron expression evaluated in time_zone (default UTC), or an interval such as 5 minutes. after: syncs that must all have succeeded before this one runs. Returns the sync id.';

DROP FUNCTION retl.alter_sync(text, text, text, jsonb, boolean);
CREATE FUNCTION retl.alter_sync(
    name        text,
    destination text DEFAULT NULL,
    mode        text DEFAULT NULL,
    mappings    jsonb DEFAULT NULL,
    reset_mappings boolean DEFAULT false,
    schedule    text DEFAULT NULL,
    after       text[] DEFAULT NULL,
    time_zone   text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs := retl._sync_for_change(name);
    source_name text;
BEGIN
    IF mode IS NOT NULL THEN
        PERFORM retl._check_mode(mode);
    END IF;
    IF destination IS NOT NULL AND destination <> s.destination THEN
        PERFORM retl._check_destination(destination, s.owner);
        -- A new destination holds nothing this sync delivered: start from an empty snapshot.
        DELETE FROM retl.snapshots WHERE sync_id = s.id;
        DELETE FROM retl.outbox WHERE sync_id = s.id;
        DELETE FROM retl.row_errors WHERE sync_id = s.id;
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
           updated_at  = now()
     WHERE id = s.id;
    IF after IS NOT NULL THEN
        -- after => '{}' removes every parent.
        PERFORM retl._set_parents(s.id, after);
    END IF;
    PERFORM retl._refresh_sources(s.id);
    PERFORM retl._wake_worker_at_commit();
END $$;
COMMENT ON FUNCTION retl.alter_sync(text, text, text, jsonb, boolean, text, text[], text) IS
  'Change a sync; arguments left NULL keep their value (reset_mappings => true maps every column again; after => ''{}'' removes every parent). A new destination starts from an empty snapshot.';

CREATE OR REPLACE FUNCTION retl.drop_sync(name text, if_exists boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs;
    children text;
BEGIN
    IF if_exists AND NOT EXISTS (SELECT 1 FROM retl.syncs WHERE syncs.name = drop_sync.name) THEN
        RETURN;
    END IF;
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
    PERFORM retl._refresh_change_triggers();
END $$;
COMMENT ON FUNCTION retl.drop_sync(text, boolean) IS
  'Drop a sync with its snapshot, queue, row errors and run history. Nothing is deleted in the destination.';

CREATE OR REPLACE FUNCTION retl.resume(sync text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs := retl._sync_for_change(sync);
BEGIN
    -- A schedule restarts from now: the slots missed while paused are not made up.
    UPDATE retl.syncs SET paused = false, updated_at = now(),
                          next_run_at = retl._next_run_at(s.schedule, s.time_zone, now())
     WHERE id = s.id;
    PERFORM retl._wake_worker_at_commit();
END $$;

DROP FUNCTION retl.run(text, boolean);
-- retl.run: the one way to start a run by hand (and from dbt post-hooks).

CREATE FUNCTION retl.run(sync text, wait boolean DEFAULT false, timeout interval DEFAULT NULL) RETURNS retl.runs
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
        r := retl._queue_run(sync, 'manual');
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
    run_id := retl._await_run(retl._runnable_sync(sync), timeout_ms);
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
COMMENT ON FUNCTION retl.run(text, boolean, interval) IS
  'Run a sync. wait => false (default): queue the run; the worker starts it when this transaction commits; returns the queued run. wait => true: the worker runs it now and this call returns the finished run, or raises if it failed (SQLSTATE 38000) or did not finish within timeout (57014; the run goes on). The sync itself must be committed.';

REVOKE ALL ON FUNCTION retl._await_run(bigint, bigint) FROM PUBLIC;

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
         WHERE sp.sync_id = s.id)                        AS after
  FROM retl.syncs s
  JOIN retl.models m ON m.id = s.model_id
  LEFT JOIN retl.audiences a ON a.id = s.audience_id
  LEFT JOIN LATERAL (SELECT * FROM retl.runs r WHERE r.sync_id = s.id ORDER BY r.id DESC LIMIT 1) last ON true
  LEFT JOIN LATERAL (SELECT r.finished_at FROM retl.runs r
                      WHERE r.sync_id = s.id AND r.status IN ('succeeded', 'partial')
                      ORDER BY r.id DESC LIMIT 1) ok ON true
  LEFT JOIN LATERAL (SELECT round(avg((r.status IN ('succeeded', 'partial'))::int), 3) AS success_rate
                       FROM (SELECT status FROM retl.runs r
                              WHERE r.sync_id = s.id AND r.status IN ('succeeded', 'partial', 'failed')
                              ORDER BY r.id DESC LIMIT 20) r) recent ON true;
COMMENT ON VIEW retl.sync_status IS
  'One row per sync: last run and its outcome, time since the last successful run, success rate of the last 20 finished runs, rows queued, rows failing, rows in the snapshot.';
GRANT SELECT ON retl.sync_status TO PUBLIC;

-- Syncs defined under 0.1.0: record the tables their models read.
SELECT retl._refresh_sources(id) FROM retl.syncs;
