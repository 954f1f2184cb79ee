-- pg_reverse_etl 0.8.0 -> 0.9.0: the outbox's run and the snapshot's sync are checked once per
-- statement instead of once per row (a foreign key's check per row was about a quarter of a
-- plan that writes many rows, and of acknowledging new keys).
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.9.0'" to load this file. \quit

ALTER TABLE retl.outbox DROP CONSTRAINT outbox_run_id_fkey;
ALTER TABLE retl.snapshots DROP CONSTRAINT snapshots_sync_id_fkey;

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
CREATE FUNCTION retl._check_refs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    referenced bigint;
BEGIN
    IF retl._installing() THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'outbox' THEN
        FOR referenced IN SELECT DISTINCT n.run_id FROM new_rows n LOOP
            PERFORM FROM retl.runs r WHERE r.id = referenced FOR KEY SHARE;
            IF NOT FOUND THEN
                RAISE foreign_key_violation USING
                    MESSAGE = format('insert into table "outbox" refers to run %s, which does not exist', referenced),
                    HINT = 'Outbox rows are written by the plan of an existing run; deleting a run deletes its outbox rows.';
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
  'Trigger: the runs of the outbox rows, or the syncs of the snapshot rows, a statement inserted exist (locked FOR KEY SHARE, as by a foreign key check); once per statement.';

CREATE FUNCTION retl._cascade_refs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_TABLE_NAME = 'runs' THEN
        DELETE FROM retl.outbox o USING old_rows d WHERE o.run_id = d.id;
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
