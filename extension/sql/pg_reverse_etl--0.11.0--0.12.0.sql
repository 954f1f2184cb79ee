-- pg_reverse_etl 0.11.0 -> 0.12.0: the reference checks of the outbox and the snapshot return
-- at once from a statement that inserted no rows (each acknowledged batch's upsert of the
-- snapshot, once it holds the sync's keys). Nothing else changes; queued rows and snapshots
-- are kept, and the update can run while syncs deliver.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.12.0'" to load this file. \quit

CREATE OR REPLACE FUNCTION retl._check_refs() RETURNS trigger
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
