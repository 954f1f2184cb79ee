-- pg_reverse_etl 0.10.0 -> 0.11.0: the outbox's one index is its primary key on
-- (sync_id, run_id, id); the index on sync_id alone is gone (measured for 0.11.0, see
-- docs/BENCHMARKS.md); drop_sync waits for a worker's step on the sync. Queued rows and
-- snapshots are kept.
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
    -- Wait for the worker planning or delivering the sync to end its step (a plan, or a
    -- window of batches), and keep the workers off it until this commits: they hold this
    -- lock while they work on a sync (worker.rs, pick_run). Without it the drop deleted the
    -- rows a batch in flight was about to record, or deadlocked with the recording. Taken
    -- before the sync's row is locked, which the worker's statements need too.
    PERFORM pg_advisory_xact_lock(1380275276, syncs.id::int4) FROM retl.syncs WHERE syncs.name = drop_sync.name;
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
