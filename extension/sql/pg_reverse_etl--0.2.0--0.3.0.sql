-- pg_reverse_etl 0.2.0 -> 0.3.0: on-change runs of a model that is a plain projection of one
-- table plan only the keys that commits touched (retl.changed_keys, logged by the
-- retl_changed_keys triggers), instead of the whole model. runs.plan_scope says which.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.3.0'" to load this file. \quit

ALTER TABLE retl.sync_sources ADD COLUMN key_attnums int2[], ADD COLUMN key_columns text[];
COMMENT ON TABLE retl.sync_sources IS
  'Base tables each sync''s model depends on (through its views), as found in pg_depend; on-change syncs keep a statement trigger on each. key_attnums: the table columns carrying the model key when the model is a plain projection of this table (its on-change runs then plan only the changed keys).';

CREATE TABLE retl.changed_keys (
    sync_id bigint NOT NULL,
    key     jsonb
);
CREATE INDEX changed_keys_sync_idx ON retl.changed_keys (sync_id);
COMMENT ON TABLE retl.changed_keys IS
  'Keys of on-change syncs touched by commits and not yet planned (key NULL: plan the whole model). Written by the retl_changed_keys triggers, consumed by the next run''s plan.';

CREATE TABLE retl.identities (
    sync_id        bigint NOT NULL REFERENCES retl.syncs(id) ON DELETE CASCADE,
    key            jsonb NOT NULL,
    destination_id text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sync_id, key)
);
COMMENT ON TABLE retl.identities IS
  'Identity map: per sync, the destination''s own id for each key it reported one for (e.g. the id a create call returned); given to later requests for that key, removed by an acknowledged delete.';

ALTER TABLE retl.runs ADD COLUMN plan_scope text CHECK (plan_scope IN ('model', 'changed keys'));
UPDATE retl.runs SET plan_scope = 'model' WHERE planned_at IS NOT NULL;
COMMENT ON TABLE retl.runs IS
  'One row per sync run: trigger, status (queued, delivering, succeeded, partial = some rows rejected, failed, cancelled), timings, what was planned (plan_scope: the whole model, or only the changed keys) and what was delivered.';

CREATE  FUNCTION "_key_source"(
	"view" oid, /* pg_sys :: Oid */
	"key_columns" TEXT[] /* Vec < String > */
) RETURNS TABLE (
	"relid" oid,  /* pg_sys :: Oid */
	"attnums" smallint[]  /* Vec < i16 > */
)
STRICT STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_key_source_wrapper';

CREATE OR REPLACE FUNCTION retl._refresh_sources(sync_id bigint) RETURNS void
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

CREATE OR REPLACE FUNCTION retl._refresh_change_triggers() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t oid;
    event text;
    transition text;
BEGIN
    FOR t IN SELECT DISTINCT src.relid
               FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id
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
          FROM retl.sync_sources src JOIN retl.syncs s ON s.id = src.sync_id,
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

CREATE FUNCTION retl._column_names(relid oid, attnums int2[]) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(a.attname::text ORDER BY n.ord)
      FROM unnest(attnums) WITH ORDINALITY AS n(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = relid AND a.attnum = n.attnum
$$;

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

CREATE FUNCTION retl._changed_keys_limit() RETURNS int
LANGUAGE sql IMMUTABLE AS 'SELECT 10000';

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

-- Names the columns it reads from retl.runs (it read them all, and runs has a new one).
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
  LEFT JOIN LATERAL (SELECT r.id, r.status, r.finished_at, r.error, r.delivered, r.api_calls
                      FROM retl.runs r WHERE r.sync_id = s.id ORDER BY r.id DESC LIMIT 1) last ON true
  LEFT JOIN LATERAL (SELECT r.finished_at FROM retl.runs r
                      WHERE r.sync_id = s.id AND r.status IN ('succeeded', 'partial')
                      ORDER BY r.id DESC LIMIT 1) ok ON true
  LEFT JOIN LATERAL (SELECT round(avg((r.status IN ('succeeded', 'partial'))::int), 3) AS success_rate
                       FROM (SELECT status FROM retl.runs r
                              WHERE r.sync_id = s.id AND r.status IN ('succeeded', 'partial', 'failed')
                              ORDER BY r.id DESC LIMIT 20) r) recent ON true;

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
    PERFORM retl._refresh_sources(s.id);
    PERFORM retl._wake_worker_at_commit();
END $$;

COMMENT ON FUNCTION retl.alter_sync(text, text, text, jsonb, boolean, text, text[], text) IS
  'Change a sync; arguments left NULL keep their value (reset_mappings => true maps every column again; after => ''{}'' removes every parent). A new destination starts from an empty snapshot and identity map.';

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
    DELETE FROM retl.changed_keys WHERE sync_id = s.id;
    PERFORM retl._refresh_change_triggers();
END $$;

-- retl_on_change fires always from now on (also for logical replication's writes).
DO $$
DECLARE
    t oid;
BEGIN
    FOR t IN SELECT tgrelid FROM pg_trigger
              WHERE tgname = 'retl_on_change' AND tgfoid = 'retl._on_change()'::regprocedure AND tgenabled = 'O'
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER retl_on_change', t::regclass);
    END LOOP;
END $$;

-- Trace every sync's model now: on-change syncs whose model is a plain projection of one table
-- get their retl_changed_keys triggers; each sync's next plan covers its whole model.
SELECT retl._refresh_sources(id) FROM retl.syncs ORDER BY id;
