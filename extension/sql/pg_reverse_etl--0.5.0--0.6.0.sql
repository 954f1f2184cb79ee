-- pg_reverse_etl 0.5.0 -> 0.6.0: row hashes of version 3 (the record hash of the mapped
-- values, not their text: plans take about a third less time). New syncs get it; existing
-- syncs keep the version their snapshot was hashed with, so nothing is sent again.
-- Backups: the catalog tables and their sequences are dumped by pg_dump; sync_sources.relid
-- becomes a regclass and a restored row finds its key columns by name; nothing a restore
-- does is written to the audit log.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.6.0'" to load this file. \quit

ALTER TABLE retl.syncs DROP CONSTRAINT syncs_hash_version_check;
ALTER TABLE retl.syncs ADD CONSTRAINT syncs_hash_version_check CHECK (hash_version IN (1, 2, 3));
-- Postgres 13 has no record hash (hash_record_extended came with 14): new syncs there get 2.
ALTER TABLE retl.syncs ALTER COLUMN hash_version
    SET DEFAULT (CASE WHEN current_setting('server_version_num')::int >= 140000 THEN 3 ELSE 2 END);

-- Backups (backup.sql).
ALTER TABLE retl.sync_sources ALTER COLUMN relid TYPE regclass;

-- Whether CREATE or ALTER EXTENSION pg_reverse_etl ran in this transaction. A restore
-- (pg_restore --single-transaction) does, and then re-creates destinations and loads the
-- catalog tables with their own audit log: nothing it does is a change to log (and entries
-- logged then would collide with the restored ones).
CREATE FUNCTION retl._installing() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT FROM pg_extension e
                    WHERE e.extname = 'pg_reverse_etl'
                      AND e.xmin::text = (pg_current_xact_id_if_assigned()::text::numeric % 4294967296)::text)
$$;

CREATE OR REPLACE FUNCTION retl._audit_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    before jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
    after jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    kind text := CASE TG_TABLE_NAME WHEN 'models' THEN 'model' WHEN 'audiences' THEN 'audience' WHEN 'syncs' THEN 'sync'
                                    WHEN 'destination_policies' THEN 'policy' WHEN 'column_tags' THEN 'column tags' END;
    obj_name text;
    owner text;
BEGIN
    IF TG_OP = 'UPDATE' AND before - '{next_run_at,updated_at}'::text[] = after - '{next_run_at,updated_at}'::text[] THEN
        RETURN NULL;
    END IF;
    IF retl._installing() THEN
        RETURN NULL;
    END IF;
    obj_name := coalesce(after, before) ->> CASE TG_TABLE_NAME WHEN 'destination_policies' THEN 'destination'
                                                           WHEN 'column_tags' THEN 'column_name' ELSE 'name' END;
    IF TG_TABLE_NAME = 'column_tags' THEN
        SELECT m.name || '.' || obj_name, m.owner::text INTO obj_name, owner
          FROM retl.models m WHERE m.id = (coalesce(after, before) ->> 'model_id')::bigint;
    ELSIF TG_TABLE_NAME <> 'destination_policies' THEN
        owner := (coalesce(after, before) ->> 'owner');
    END IF;
    INSERT INTO retl.audit_log (actor, action, object_type, object_name, owner, before, after)
    VALUES (retl._caller()::regrole::text, CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'alter' ELSE 'drop' END,
            kind, obj_name, owner, before, after);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION retl._audit_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c record;
    server_name text;
    owner text;
BEGIN
    IF retl._installing() THEN
        RETURN;
    END IF;
    FOR c IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type IN ('server', 'user mapping') LOOP
        IF c.object_type = 'server' THEN
            SELECT s.srvname, s.srvowner::regrole::text INTO server_name, owner
              FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
             WHERE s.oid = c.objid AND w.fdwname = 'retl';
            CONTINUE WHEN server_name IS NULL;
            INSERT INTO retl.audit_log (actor, action, object_type, object_name, owner, before, after)
            VALUES (retl._caller()::regrole::text, CASE WHEN c.command_tag = 'CREATE SERVER' THEN 'create' ELSE 'alter' END, 'destination',
                    server_name, owner,
                    CASE WHEN c.command_tag <> 'CREATE SERVER' THEN
                        (SELECT a.after FROM retl.audit_log a WHERE a.object_type = 'destination' AND a.object_name = server_name
                          ORDER BY a.id DESC LIMIT 1) END,
                    retl._server_state(c.objid));
        ELSE
            SELECT s.srvname, s.srvowner::regrole::text INTO server_name, owner
              FROM pg_user_mapping um JOIN pg_foreign_server s ON s.oid = um.umserver
              JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
             WHERE um.oid = c.objid AND w.fdwname = 'retl';
            CONTINUE WHEN server_name IS NULL;
            INSERT INTO retl.audit_log (actor, action, object_type, object_name, owner)
            VALUES (retl._caller()::regrole::text, CASE WHEN c.command_tag = 'CREATE USER MAPPING' THEN 'create' ELSE 'alter' END,
                    'user mapping', c.object_identity, owner);
        END IF;
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pg_reverse_etl could not write the audit log for %: %', tg_tag, SQLERRM;
END $$;

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
