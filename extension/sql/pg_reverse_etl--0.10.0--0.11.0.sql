-- pg_reverse_etl 0.10.0 -> 0.11.0: the outbox's one index is its primary key on
-- (sync_id, run_id, id); the index on sync_id alone is gone (measured for 0.11.0, see
-- docs/BENCHMARKS.md). drop_sync, and alter_sync to a new destination, wait for a worker's
-- step on the sync. Queued rows and snapshots are kept.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.11.0'" to load this file. \quit

-- Rows queued now (usually none: update between runs) carry their run's sync, as 0.10.0
-- wrote them (the update only makes sure); the check below holds them to it from now on.
-- The key is rebuilt over them.
UPDATE retl.outbox o SET sync_id = r.sync_id FROM retl.runs r WHERE r.id = o.run_id AND o.sync_id <> r.sync_id;
ALTER TABLE retl.outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE retl.outbox ADD PRIMARY KEY (sync_id, run_id, id);
DROP INDEX retl.outbox_sync_idx;

-- An outbox row must be filed under its run's sync, where every lookup now finds it.
CREATE OR REPLACE FUNCTION retl._check_refs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    referenced bigint;
    claimed bigint;
    actual bigint;
BEGIN
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

-- A deleted run's rows, found by the new key.
CREATE OR REPLACE FUNCTION retl._cascade_refs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_TABLE_NAME = 'runs' THEN
        DELETE FROM retl.outbox o USING old_rows d WHERE o.sync_id = d.sync_id AND o.run_id = d.id;
    ELSE
        DELETE FROM retl.snapshots s USING old_rows d WHERE s.sync_id = d.id;
    END IF;
    RETURN NULL;
END $$;

-- The wait drop_sync and alter_sync take (below).
CREATE FUNCTION retl._wait_for_worker(sync_id bigint) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_advisory_xact_lock(1380275276, sync_id::int4)
$$;
COMMENT ON FUNCTION retl._wait_for_worker(bigint) IS
  'Waits for a worker''s step on the sync (a plan, or a window of batches) to end, and keeps the workers off it until the transaction ends.';

-- Waits for the worker on the sync instead of deleting rows from under its batch.
CREATE OR REPLACE FUNCTION retl.drop_sync(name text, if_exists boolean DEFAULT false) RETURNS void
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

-- A new destination empties the snapshot and queue: after the worker's step, as drop_sync.
CREATE OR REPLACE FUNCTION retl.alter_sync(
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
