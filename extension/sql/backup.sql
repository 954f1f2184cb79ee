-- Backups: pg_dump dumps the catalog tables' rows (definitions, snapshots, queues, run
-- history, row errors, identities, alerts, the audit log) and their identity sequences, so a
-- pg_restore into a fresh database brings syncs back with what they delivered, and their next
-- runs send only what changed. Restore with --single-transaction: the workers then see the
-- restored state whole, never syncs without their snapshots.

-- One call per statement: each call updates the extension's catalog row.
SELECT pg_catalog.pg_extension_config_dump('retl.models', '');
SELECT pg_catalog.pg_extension_config_dump('retl.audiences', '');
SELECT pg_catalog.pg_extension_config_dump('retl.syncs', '');
SELECT pg_catalog.pg_extension_config_dump('retl.sync_parents', '');
SELECT pg_catalog.pg_extension_config_dump('retl.sync_sources', '');
SELECT pg_catalog.pg_extension_config_dump('retl.changed_keys', '');
SELECT pg_catalog.pg_extension_config_dump('retl.runs', '');
SELECT pg_catalog.pg_extension_config_dump('retl.batches', '');
SELECT pg_catalog.pg_extension_config_dump('retl.snapshots', '');
SELECT pg_catalog.pg_extension_config_dump('retl.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('retl.identities', '');
SELECT pg_catalog.pg_extension_config_dump('retl.row_errors', '');
SELECT pg_catalog.pg_extension_config_dump('retl.alerts', '');
SELECT pg_catalog.pg_extension_config_dump('retl.column_tags', '');
SELECT pg_catalog.pg_extension_config_dump('retl.destination_policies', '');
SELECT pg_catalog.pg_extension_config_dump('retl.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('retl.models_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('retl.audiences_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('retl.syncs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('retl.runs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('retl.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('retl.alerts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('retl.audit_log_id_seq', '');

-- A restored sync_sources row names its table (relid is a regclass), but the numbers of the
-- key columns may differ from where it was dumped (a restore does not re-create dropped
-- columns): they are found again by name, and a name that is gone (a rename not yet seen by a
-- plan) leaves the model untraced, so it is planned whole (until the sync is altered).
CREATE FUNCTION retl._restore_sync_source() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found int2[];
BEGIN
    IF NEW.key_columns IS NULL OR NOT retl._installing() THEN
        RETURN NEW;
    END IF;
    found := ARRAY(SELECT a.attnum FROM unnest(NEW.key_columns) WITH ORDINALITY k(name, i)
                     JOIN pg_attribute a ON a.attrelid = NEW.relid AND a.attname = k.name AND NOT a.attisdropped
                    ORDER BY k.i);
    IF cardinality(found) = cardinality(NEW.key_columns) THEN
        NEW.key_attnums := found;
    ELSE
        NEW.key_attnums := NULL;
        NEW.key_columns := NULL;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER retl_restore BEFORE INSERT ON retl.sync_sources
    FOR EACH ROW EXECUTE FUNCTION retl._restore_sync_source();
