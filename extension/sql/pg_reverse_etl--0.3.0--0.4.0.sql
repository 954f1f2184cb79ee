-- pg_reverse_etl 0.3.0 -> 0.4.0: HubSpot and Salesforce destinations. Runs record the API
-- usage destinations report (runs.api_usage, shown in sync_status), and create_sync and
-- alter_sync check a sync's fields against the destination (templates locally; HubSpot
-- properties and Salesforce describe through a worker). A table dropped with CASCADE under
-- an on-change sync no longer breaks every other sync's triggers, and a model or audience
-- whose view went with its tables can still be dropped.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.4.0'" to load this file. \quit

ALTER TABLE retl.runs ADD COLUMN api_usage text;
COMMENT ON TABLE retl.runs IS
  'One row per sync run: trigger, status (queued, delivering, succeeded, partial = some rows rejected, failed, cancelled), timings, what was planned (plan_scope: the whole model, or only the changed keys), what was delivered, and the API usage the destination reported (api_usage).';

CREATE  FUNCTION "_check_destination_fields"(
	"sync_name" TEXT, /* & str */
	"destination" TEXT, /* & str */
	"owner" oid, /* pg_sys :: Oid */
	"fields" TEXT[], /* Vec < Option < String > > */
	"key_columns" TEXT[] /* Vec < Option < String > > */
) RETURNS void
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_destination_fields_wrapper';
REVOKE ALL ON FUNCTION retl._check_destination_fields(text, text, oid, text[], text[]) FROM PUBLIC;

CREATE FUNCTION retl._sync_fields(mode text, mappings jsonb, source_name text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN mode = 'delete' THEN '{}'::text[]
                WHEN mappings IS NULL THEN retl._model_columns(source_name)
                ELSE ARRAY(SELECT jsonb_object_keys(mappings) ORDER BY 1) END
$$;

CREATE OR REPLACE FUNCTION retl.create_sync(
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
    PERFORM retl._check_destination_fields(name, destination, caller, retl._sync_fields(mode, mappings, source_name),
                                           m.primary_key);
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

CREATE OR REPLACE FUNCTION retl.alter_sync(
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
           updated_at  = now()
     WHERE id = s.id;
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

CREATE OR REPLACE FUNCTION retl.drop_model(name text, if_exists boolean DEFAULT false) RETURNS void
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

CREATE OR REPLACE FUNCTION retl.drop_audience(name text, if_exists boolean DEFAULT false) RETURNS void
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

CREATE OR REPLACE FUNCTION retl._refresh_change_triggers() RETURNS void
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
         ORDER BY r.id DESC LIMIT 1)                     AS api_usage
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
                              ORDER BY r.id DESC LIMIT 20) r) recent ON true;
COMMENT ON VIEW retl.sync_status IS
  'One row per sync: last run and its outcome, time since the last successful run, success rate of the last 20 finished runs, rows queued, rows failing, rows in the snapshot, and the API usage the destination last reported (e.g. Salesforce api-usage=used/limit).';
