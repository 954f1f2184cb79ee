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

-- Record the base tables of a sync's model and keep the change triggers in line. When the
-- model is a plain projection of its one table (retl._key_source), also which of the table's
-- columns carry the model key. The sync's change log restarts with "plan the whole model":
-- the sync, its model or its mappings may be new.
CREATE FUNCTION retl._refresh_sources(sync_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    source_name text;
    model_key text[];
    tables oid[];
BEGIN
    SELECT coalesce(a.name, m.name), m.primary_key INTO source_name, model_key
      FROM retl.syncs s JOIN retl.models m ON m.id = s.model_id LEFT JOIN retl.audiences a ON a.id = s.audience_id
     WHERE s.id = _refresh_sources.sync_id;
    tables := retl._base_tables(source_name);
    DELETE FROM retl.sync_sources src WHERE src.sync_id = _refresh_sources.sync_id;
    INSERT INTO retl.sync_sources (sync_id, relid, key_attnums, key_columns)
    SELECT _refresh_sources.sync_id, t, k.attnums, retl._column_names(t, k.attnums)
      FROM unnest(tables) t
      LEFT JOIN retl._key_source(format('retl_models.%I', source_name)::regclass, model_key) k
             ON k.relid = t AND cardinality(tables) = 1;
    DELETE FROM retl.changed_keys c WHERE c.sync_id = _refresh_sources.sync_id;
    INSERT INTO retl.changed_keys (sync_id, key) VALUES (_refresh_sources.sync_id, NULL);
    PERFORM retl._refresh_change_triggers();
END $$;

-- Exactly the base tables of on-change syncs carry the statement trigger retl_on_change, and
-- exactly those whose columns carry such a sync's model key also carry the retl_changed_keys
-- triggers (one per event: Postgres allows transition tables on single-event triggers only).
-- They fire always, also for writes with session_replication_role = replica (logical
-- replication applying changes to a subscriber's tables).
CREATE FUNCTION retl._refresh_change_triggers() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t oid;
    event text;
    transition text;
BEGIN
    -- Only tables that still exist: one dropped with CASCADE leaves its relid in sync_sources
    -- (until the sync is altered or dropped), and must not stop every other sync's triggers.
    FOR t IN SELECT DISTINCT src.relid
               FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id
               JOIN pg_class c ON c.oid = src.relid
              WHERE s.schedule = 'on change'
                AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = src.relid AND g.tgname = 'retl_on_change')
    LOOP
        EXECUTE format('CREATE TRIGGER retl_on_change AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %1$s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION retl._on_change(); '
                       'ALTER TABLE %1$s ENABLE ALWAYS TRIGGER retl_on_change', t::regclass);
    END LOOP;
    FOR t IN SELECT g.tgrelid FROM pg_trigger g
              WHERE g.tgname = 'retl_on_change' AND g.tgfoid = 'retl._on_change()'::regprocedure
                AND NOT EXISTS (SELECT 1 FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id
                                 WHERE s.schedule = 'on change' AND src.relid = g.tgrelid)
    LOOP
        EXECUTE format('DROP TRIGGER retl_on_change ON %s', t::regclass);
    END LOOP;

    -- Each of the four that is missing (also when one was dropped by hand).
    FOR t, event, transition IN
        SELECT DISTINCT src.relid, e.event, e.transition
          FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id
          JOIN pg_class c ON c.oid = src.relid,
               (VALUES ('insert', 'REFERENCING NEW TABLE AS new_rows'),
                       ('update', 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'),
                       ('delete', 'REFERENCING OLD TABLE AS old_rows'),
                       ('truncate', '')) AS e(event, transition)
         WHERE s.schedule = 'on change' AND src.key_attnums IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM pg_trigger g
                            WHERE g.tgrelid = src.relid AND g.tgname = 'retl_changed_keys_' || e.event)
    LOOP
        EXECUTE format('CREATE TRIGGER %1$I AFTER %2$s ON %3$s %4$s FOR EACH STATEMENT EXECUTE FUNCTION retl._log_changed_keys(); '
                       'ALTER TABLE %3$s ENABLE ALWAYS TRIGGER %1$I',
                       'retl_changed_keys_' || event, upper(event), t::regclass, transition);
    END LOOP;
    FOR t IN SELECT DISTINCT g.tgrelid FROM pg_trigger g
              WHERE g.tgname LIKE 'retl\_changed\_keys\_%' AND g.tgfoid = 'retl._log_changed_keys()'::regprocedure
                AND NOT EXISTS (SELECT 1 FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id
                                 WHERE s.schedule = 'on change' AND src.key_attnums IS NOT NULL AND src.relid = g.tgrelid)
    LOOP
        FOR event IN SELECT g.tgname FROM pg_trigger g
                      WHERE g.tgrelid = t AND g.tgfoid = 'retl._log_changed_keys()'::regprocedure
        LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', event, t::regclass);
        END LOOP;
    END LOOP;
END $$;

-- A statement changed a table whose columns carry the key of on-change syncs' models: log the
-- keys it touched (old and new values), for the next run to plan only those. Runs in the
-- user's transaction, so the log commits or rolls back with the change itself. "Plan the whole
-- model" (a NULL key) instead after a TRUNCATE, for a paused sync (it may stay paused long),
-- when a key value is NULL (the planner then refuses the model), and for statements touching
-- more than retl._changed_keys_limit() rows (one whole-model plan is cheaper than that many keys).
CREATE FUNCTION retl._log_changed_keys() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
    images jsonb[];
BEGIN
    -- Static SQL only (plans are cached per table): this runs after every statement on the
    -- table. Each branch names only the transition tables its trigger has.
    IF TG_OP = 'DELETE' THEN
        SELECT count(*) INTO n FROM old_rows;
    ELSIF TG_OP <> 'TRUNCATE' THEN
        SELECT count(*) INTO n FROM new_rows;
    END IF;
    IF n <= retl._changed_keys_limit() THEN
        IF TG_OP = 'INSERT' THEN
            images := ARRAY(SELECT to_jsonb(r) FROM new_rows r);
        ELSIF TG_OP = 'DELETE' THEN
            images := ARRAY(SELECT to_jsonb(r) FROM old_rows r);
        ELSE
            images := ARRAY(SELECT to_jsonb(r) FROM new_rows r UNION ALL SELECT to_jsonb(r) FROM old_rows r);
        END IF;
    END IF;
    -- Per sync whose key this table carries: the key object of every old and new row image
    -- (NULL when a key value is NULL), or one NULL ("plan the whole model") when there are no
    -- images or the sync is paused and none is logged yet.
    INSERT INTO retl.changed_keys (sync_id, key)
    SELECT DISTINCT s.sync_id, CASE WHEN s.whole OR k.has_null THEN NULL ELSE k.key END
      FROM (SELECT src.sync_id, src.key_columns, m.primary_key, (images IS NULL OR sy.paused) AS whole
              FROM retl.sync_sources src
              JOIN retl.syncs sy ON sy.id = src.sync_id
              JOIN retl.models m ON m.id = sy.model_id
             WHERE src.relid = TG_RELID AND src.key_columns IS NOT NULL AND sy.schedule = 'on change') s
      LEFT JOIN LATERAL unnest(CASE WHEN NOT s.whole THEN images END) AS t(j) ON true
      LEFT JOIN LATERAL (SELECT jsonb_object_agg(c.name, t.j -> c.col) AS key,
                                bool_or(coalesce(t.j -> c.col, 'null') = 'null') AS has_null
                           FROM unnest(s.primary_key, s.key_columns) AS c(name, col)) k ON NOT s.whole
     WHERE (s.whole OR t.j IS NOT NULL)  -- a statement that touched no row logs nothing
       AND NOT (s.whole AND EXISTS (SELECT 1 FROM retl.changed_keys c WHERE c.sync_id = s.sync_id AND c.key IS NULL));
    RETURN NULL;
END $$;

-- Beyond this many keys (touched by one statement, or waiting for one plan) a run plans the
-- whole model instead.
CREATE FUNCTION retl._changed_keys_limit() RETURNS int
LANGUAGE sql IMMUTABLE AS 'SELECT 10000';

-- Worker, at the start of every plan: take the sync's change log. Returns the keys to plan
-- (those logged, with those still in the outbox or rejected, which a key-only plan must plan
-- again) as a jsonb array, or NULL when the whole model must be planned: the run was not
-- caused by a change, the log says so, there are too many keys, or the model (source_name,
-- with key model_key, as the planner loaded the sync) is no longer the projection of the
-- table whose triggers logged them.
CREATE FUNCTION retl._take_changed_keys(sync_id bigint, source_name text, model_key text[], changed_keys_only boolean)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    traced boolean;
    whole boolean;
    n bigint;
    keys jsonb;
    renamed int;
BEGIN
    -- A traced column was renamed: since then the trigger read the key under its old name
    -- (NULL, or another column's value if names were swapped), so this plan covers the whole
    -- model; the trigger reads the new name from now on.
    UPDATE retl.sync_sources src SET key_columns = retl._column_names(src.relid, src.key_attnums)
     WHERE src.sync_id = _take_changed_keys.sync_id AND src.key_attnums IS NOT NULL
       AND src.key_columns IS DISTINCT FROM retl._column_names(src.relid, src.key_attnums);
    GET DIAGNOSTICS renamed = ROW_COUNT;
    IF NOT changed_keys_only OR renamed > 0 THEN
        DELETE FROM retl.changed_keys c WHERE c.sync_id = _take_changed_keys.sync_id;
        RETURN NULL;
    END IF;
    WITH taken AS (DELETE FROM retl.changed_keys c WHERE c.sync_id = _take_changed_keys.sync_id RETURNING c.key),
         wanted AS (SELECT key FROM taken
                    UNION ALL SELECT o.key FROM retl.outbox o WHERE o.sync_id = _take_changed_keys.sync_id
                    UNION ALL SELECT e.key FROM retl.row_errors e WHERE e.sync_id = _take_changed_keys.sync_id)
    SELECT coalesce(bool_or(key IS NULL), false), count(DISTINCT key), coalesce(jsonb_agg(DISTINCT key) FILTER (WHERE key IS NOT NULL), '[]')
      INTO whole, n, keys FROM wanted;
    IF whole OR n > retl._changed_keys_limit() THEN
        RETURN NULL;
    END IF;
    -- The model still traces to the table columns the log was written for, and all four
    -- triggers that write it are there and fire always (a dropped or disabled one would have
    -- left changes out of the log).
    SELECT EXISTS (SELECT 1 FROM retl.sync_sources src
                     JOIN retl._key_source(format('retl_models.%I', source_name)::regclass, model_key) k
                       ON k.relid = src.relid AND k.attnums = src.key_attnums
                    WHERE src.sync_id = _take_changed_keys.sync_id
                      AND (SELECT count(*) FROM pg_trigger g
                            WHERE g.tgrelid = src.relid AND g.tgfoid = 'retl._log_changed_keys()'::regprocedure
                              AND g.tgenabled = 'A') = 4)
      INTO traced;
    RETURN CASE WHEN traced THEN keys END;
END $$;

-- The names of a table's columns, by attribute number, in that order.
CREATE FUNCTION retl._column_names(relid oid, attnums int2[]) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(a.attname::text ORDER BY n.ord)
      FROM unnest(attnums) WITH ORDINALITY AS n(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = relid AND a.attnum = n.attnum
$$;

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
