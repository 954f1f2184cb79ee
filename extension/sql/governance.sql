-- Governance (since 0.5.0): roles and what each user sees, PII tags on model columns,
-- per-destination tag policies, the audit log, and forgetting a key.

------------------------------------------------------------------------------------------------
-- Roles
------------------------------------------------------------------------------------------------

-- Cluster-wide roles, created once (another database's extension, or an earlier install, may
-- have made them); DROP EXTENSION leaves them. retl_admin is a member of retl_operator, which
-- is a member of retl_viewer.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'retl_viewer') THEN
        CREATE ROLE retl_viewer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'retl_operator') THEN
        CREATE ROLE retl_operator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'retl_admin') THEN
        CREATE ROLE retl_admin NOLOGIN;
    END IF;
    IF NOT pg_has_role('retl_operator', 'retl_viewer', 'MEMBER') THEN
        GRANT retl_viewer TO retl_operator;
    END IF;
    IF NOT pg_has_role('retl_admin', 'retl_operator', 'MEMBER') THEN
        GRANT retl_operator TO retl_admin;
    END IF;
END $$;

-- Row-level security: everyone may query the catalog tables, and sees the rows of the syncs
-- (models, audiences) they own; retl_viewer's members see all. The workers and the API's
-- SECURITY DEFINER functions run as the extension's owner, a superuser, and see everything.
ALTER TABLE retl.models ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.models FOR SELECT USING (retl._visible(owner));
ALTER TABLE retl.audiences ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.audiences FOR SELECT USING (retl._visible(owner));
ALTER TABLE retl.syncs ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.syncs FOR SELECT USING (retl._visible(owner));
-- The rows of a sync: visible when the sync is (the subquery is itself filtered).
ALTER TABLE retl.sync_parents ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.sync_parents FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));
ALTER TABLE retl.sync_sources ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.sync_sources FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));
ALTER TABLE retl.runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.runs FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));
ALTER TABLE retl.batches ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.batches FOR SELECT USING (EXISTS (SELECT 1 FROM retl.runs r WHERE r.id = run_id));
ALTER TABLE retl.row_errors ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.row_errors FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));
ALTER TABLE retl.alerts ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.alerts FOR SELECT USING (EXISTS (SELECT 1 FROM retl.syncs s WHERE s.id = sync_id));

------------------------------------------------------------------------------------------------
-- PII tags
------------------------------------------------------------------------------------------------

CREATE TABLE retl.column_tags (
    model_id    bigint NOT NULL REFERENCES retl.models(id) ON DELETE CASCADE,
    column_name text NOT NULL,
    tags        text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, column_name)
);
COMMENT ON TABLE retl.column_tags IS
  'Tags set with retl.tag_column on model columns (e.g. email, phone, ssn). Tags also come from column comments: see retl.model_column_tags.';
ALTER TABLE retl.column_tags ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.column_tags FOR SELECT USING (EXISTS (SELECT 1 FROM retl.models m WHERE m.id = model_id));

-- Tags written in a comment: [pii: email] or [pii: email, phone] (case-insensitive).
CREATE FUNCTION retl._comment_tags(comment text) RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(DISTINCT lower(btrim(t)) ORDER BY lower(btrim(t))), '{}')
      FROM regexp_matches(coalesce(comment, ''), '\[\s*pii\s*:\s*([A-Za-z0-9_]+(?:\s*,\s*[A-Za-z0-9_]+)*)\s*\]', 'gi') m,
           unnest(string_to_array(m[1], ',')) t
$$;

-- Every tag of a model's columns and where it comes from: 'retl.tag_column', the comment on
-- the model's own column, or the comment on a column of the same name in a table or view the
-- model reads (what dbt's persist_docs writes).
CREATE FUNCTION retl._model_column_tags(model_id bigint)
RETURNS TABLE (column_name text, tag text, source text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH m AS (SELECT mm.id, to_regclass(format('retl_models.%I', mm.name)) AS view FROM retl.models mm WHERE mm.id = model_id),
         cols AS (SELECT a.attname::text AS column_name, a.attnum FROM m JOIN pg_attribute a ON a.attrelid = m.view
                   WHERE a.attnum > 0 AND NOT a.attisdropped)
    SELECT c.column_name, unnest(t.tags), 'retl.tag_column'
      FROM retl.column_tags t JOIN cols c ON c.column_name = t.column_name WHERE t.model_id = _model_column_tags.model_id
    UNION
    SELECT c.column_name, unnest(retl._comment_tags(col_description(m.view, c.attnum))), 'comment on the model column'
      FROM m, cols c
    UNION
    SELECT c.column_name, unnest(retl._comment_tags(col_description(d.refobjid, d.refobjsubid::int))),
           format('comment on %s.%I', d.refobjid::regclass, a.attname)
      FROM m
      JOIN pg_rewrite r ON r.ev_class = m.view
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                      AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 AND d.refobjid <> m.view
      JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
      JOIN cols c ON c.column_name = a.attname::text
$$;

CREATE VIEW retl.model_column_tags AS
SELECT m.name AS model, t.column_name, t.tag, t.source
  FROM retl.models m CROSS JOIN LATERAL retl._model_column_tags(m.id) t
 WHERE retl._visible(m.owner);
COMMENT ON VIEW retl.model_column_tags IS
  'Every tag on a model column and where it comes from: retl.tag_column, or a column comment containing [pii: tag, ...] on the model''s column or on the column of the same name in a table or view the model reads (dbt persist_docs).';
GRANT SELECT ON retl.model_column_tags TO PUBLIC;

CREATE FUNCTION retl.tag_column(model text, column_name text, tags text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m retl.models;
    bad text;
    clean text[];
BEGIN
    SELECT * INTO m FROM retl.models WHERE name = tag_column.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model % does not exist', retl._q(model) USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM retl._check_owner('model', m.name, m.owner);
    IF NOT column_name = ANY (retl._model_columns(m.name)) THEN
        RAISE EXCEPTION 'column % is not in model %', retl._q(column_name), retl._q(m.name)
              USING ERRCODE = 'undefined_column',
                    DETAIL = format('The model has columns: %s.', array_to_string(retl._model_columns(m.name), ', '));
    END IF;
    SELECT string_agg(coalesce(retl._q(t), 'NULL'), ', ') INTO bad FROM unnest(tags) t WHERE t IS NULL OR lower(t) !~ '^[a-z][a-z0-9_]{0,62}$';
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'tag % is not valid', bad
              USING ERRCODE = 'invalid_parameter_value', HINT = 'Tags are words of letters, digits and underscores, e.g. email, phone, ssn.';
    END IF;
    SELECT coalesce(array_agg(DISTINCT lower(t) ORDER BY lower(t)), '{}') INTO clean FROM unnest(tags) t;
    IF clean = '{}' THEN
        DELETE FROM retl.column_tags t WHERE t.model_id = m.id AND t.column_name = tag_column.column_name;
    ELSE
        INSERT INTO retl.column_tags (model_id, column_name, tags) VALUES (m.id, column_name, clean)
        ON CONFLICT ON CONSTRAINT column_tags_pkey DO UPDATE SET tags = excluded.tags, updated_at = now();
    END IF;
END $$;
COMMENT ON FUNCTION retl.tag_column(text, text, text[]) IS
  'Set the tags of a model column (e.g. tags => ''{email}''); ''{}'' removes them. Tags in column comments ([pii: email]) count too. Syncs sending a column with a tag its destination''s policy does not allow are refused.';

------------------------------------------------------------------------------------------------
-- Destination policies
------------------------------------------------------------------------------------------------

CREATE TABLE retl.destination_policies (
    destination text PRIMARY KEY,
    allow_tags  text[],
    block_tags  text[] NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE retl.destination_policies IS
  'Which tagged columns may go to a destination (destination ''*'': every destination without its own policy). block_tags: never sent; allow_tags (when set): only columns whose tags are all in it are sent. Untagged columns are always allowed.';

CREATE FUNCTION retl.set_policy(destination text, allow text[] DEFAULT NULL, block text[] DEFAULT '{}') RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    server_owner oid;
    breaking text;
BEGIN
    IF destination IS DISTINCT FROM '*' THEN
        SELECT s.srvowner INTO server_owner FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
         WHERE s.srvname = set_policy.destination AND w.fdwname = 'retl';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'destination % does not exist', coalesce(retl._q(destination), 'NULL')
                  USING ERRCODE = 'undefined_object', HINT = 'Name a retl foreign server, or ''*'' for every destination without its own policy.';
        END IF;
    END IF;
    IF NOT (retl._has_role(retl._caller(), 'retl_admin')
            OR (server_owner IS NOT NULL AND pg_has_role(retl._caller(), server_owner, 'MEMBER'))) THEN
        RAISE EXCEPTION 'permission denied to set the policy of destination %', retl._q(destination)
              USING ERRCODE = 'insufficient_privilege', HINT = 'Members of retl_admin, and the destination''s owner, may set it.';
    END IF;
    INSERT INTO retl.destination_policies (destination, allow_tags, block_tags)
    VALUES (destination, (SELECT array_agg(DISTINCT lower(t) ORDER BY lower(t)) FROM unnest(allow) t),
            coalesce((SELECT array_agg(DISTINCT lower(t) ORDER BY lower(t)) FROM unnest(block) t), '{}'))
    ON CONFLICT ON CONSTRAINT destination_policies_pkey
    DO UPDATE SET allow_tags = excluded.allow_tags, block_tags = excluded.block_tags, updated_at = now();
    -- Syncs the new policy refuses: their next plans fail until they or the policy change.
    SELECT string_agg(retl._q(s.name), ', ' ORDER BY s.name) INTO breaking
      FROM retl.syncs s WHERE retl._policy_violation(s.id) IS NOT NULL;
    IF breaking IS NOT NULL THEN
        RAISE WARNING 'syncs that now send columns the policies do not allow: %', breaking
              USING HINT = 'Their runs fail until their mappings or the policy change; see retl.policy_violations.';
    END IF;
END $$;
COMMENT ON FUNCTION retl.set_policy(text, text[], text[]) IS
  'Set which tagged columns may be sent to a destination (''*'': to every destination without its own policy): block => tags never sent, allow => when set, the only tags that may be sent. Members of retl_admin and the destination''s owner may set it.';

CREATE FUNCTION retl.drop_policy(destination text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT (retl._has_role(retl._caller(), 'retl_admin')
            OR EXISTS (SELECT 1 FROM pg_foreign_server s WHERE s.srvname = destination AND pg_has_role(retl._caller(), s.srvowner, 'MEMBER'))) THEN
        RAISE EXCEPTION 'permission denied to drop the policy of destination %', retl._q(destination)
              USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM retl.destination_policies p WHERE p.destination = drop_policy.destination;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'destination % has no policy', retl._q(destination) USING ERRCODE = 'undefined_object';
    END IF;
END $$;
COMMENT ON FUNCTION retl.drop_policy(text) IS 'Remove a destination''s policy (the ''*'' policy, if any, then applies to it).';

-- Why the sync may not send what it sends, or NULL: its tagged columns (the key and the
-- mapped columns, or every column without mappings; a delete sync sends only its key) that
-- the policy of its destination (else the '*' policy) does not allow.
CREATE FUNCTION retl._policy_violation(sync_id bigint) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH s AS (SELECT sy.id, sy.name, sy.destination, sy.mode, sy.mappings, sy.model_id, m.primary_key
                 FROM retl.syncs sy JOIN retl.models m ON m.id = sy.model_id WHERE sy.id = _policy_violation.sync_id),
         policy AS (SELECT p.destination, p.allow_tags, p.block_tags
                      FROM retl.destination_policies p, s
                     WHERE p.destination IN (s.destination, '*')
                     ORDER BY p.destination = '*' LIMIT 1),
         sent AS (SELECT unnest(s.primary_key) AS column_name FROM s
                  UNION SELECT v.value #>> '{}' FROM s, jsonb_each(s.mappings) v WHERE s.mode <> 'delete'
                  UNION SELECT c.column_name FROM s, retl._model_column_tags(s.model_id) c
                   WHERE s.mappings IS NULL AND s.mode <> 'delete'),
         refused AS (SELECT t.column_name, t.tag
                       FROM s, policy p, retl._model_column_tags(s.model_id) t
                      WHERE t.column_name IN (SELECT column_name FROM sent)
                        AND (t.tag = ANY (p.block_tags) OR (p.allow_tags IS NOT NULL AND NOT t.tag = ANY (p.allow_tags))))
    SELECT format('sync %s would send columns that %s does not allow: %s', retl._q(s.name),
                  CASE WHEN p.destination = '*' THEN 'the default policy (''*'')'
                       ELSE format('the policy of destination %s', retl._q(s.destination)) END,
                  (SELECT string_agg(format('%s (tagged %s)', retl._q(r.column_name), r.tags), ', ' ORDER BY r.column_name)
                     FROM (SELECT column_name, string_agg(DISTINCT tag, ', ') AS tags FROM refused GROUP BY column_name) r))
      FROM s, policy p
     WHERE EXISTS (SELECT 1 FROM refused)
$$;

CREATE FUNCTION retl._check_policy(sync_id bigint) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    problem text := retl._policy_violation(sync_id);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem
              USING ERRCODE = 'insufficient_privilege',
                    HINT = 'Leave those columns out of the mappings, or change the policy with retl.set_policy(destination => ..., allow => ..., block => ...).';
    END IF;
END $$;

CREATE VIEW retl.policy_violations AS
SELECT s.name AS sync, s.destination, v.problem
  FROM retl.syncs s CROSS JOIN LATERAL (SELECT retl._policy_violation(s.id) AS problem) v
 WHERE retl._visible(s.owner) AND v.problem IS NOT NULL;
COMMENT ON VIEW retl.policy_violations IS
  'Syncs that would send tagged columns their destination''s policy does not allow (after a policy, tag or model change); their runs fail until fixed.';
GRANT SELECT ON retl.policy_violations TO PUBLIC;

------------------------------------------------------------------------------------------------
-- Audit log
------------------------------------------------------------------------------------------------

CREATE TABLE retl.audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The role that made the change (through the API: its caller) and the session's login role.
    actor       text NOT NULL,
    session_role text NOT NULL DEFAULT session_user,
    action      text NOT NULL CHECK (action IN ('create', 'alter', 'drop', 'forget')),
    object_type text NOT NULL,
    object_name text NOT NULL,
    -- Who may read the entry besides retl_viewer: the object's owner.
    owner       text,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_log_object_idx ON retl.audit_log (object_type, object_name, id);
COMMENT ON TABLE retl.audit_log IS
  'Every change to models, audiences, syncs (including pause and resume), column tags, destination policies, retl destinations (servers: their options) and their user mappings (that they changed, never their options): who, when, the object before and after. retl.forget leaves an entry without the key.';
ALTER TABLE retl.audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON retl.audit_log FOR SELECT
    USING (retl._has_role(retl._caller(), 'retl_viewer')
           OR (owner IS NOT NULL AND EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = owner)
               AND pg_has_role(retl._caller(), owner, 'MEMBER')));

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

-- Row changes of the catalog tables. Sync updates that only move its schedule (next_run_at)
-- are the workers' bookkeeping, not changes.
CREATE FUNCTION retl._audit_row() RETURNS trigger
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

CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.models FOR EACH ROW EXECUTE FUNCTION retl._audit_row();
CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.audiences FOR EACH ROW EXECUTE FUNCTION retl._audit_row();
CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.syncs FOR EACH ROW EXECUTE FUNCTION retl._audit_row();
CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.destination_policies FOR EACH ROW EXECUTE FUNCTION retl._audit_row();
CREATE TRIGGER retl_audit AFTER INSERT OR UPDATE OR DELETE ON retl.column_tags FOR EACH ROW EXECUTE FUNCTION retl._audit_row();

-- A retl destination as the audit log shows it: its options (no secrets: those are in user
-- mappings) and owner.
CREATE FUNCTION retl._server_state(server oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object('options', coalesce((SELECT jsonb_object_agg(o.option_name, o.option_value)
                                                     FROM pg_options_to_table(s.srvoptions) o), '{}'),
                              'owner', s.srvowner::regrole::text)
      FROM pg_foreign_server s WHERE s.oid = server
$$;

-- CREATE and ALTER of retl servers and of user mappings for them. Never fails the user's
-- command: a problem is a WARNING.
CREATE FUNCTION retl._audit_ddl() RETURNS event_trigger
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

CREATE FUNCTION retl._audit_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    last record;
BEGIN
    FOR d IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type IN ('server', 'user mapping') LOOP
        -- Ours if the log knows it as a destination (the catalogs no longer have it).
        SELECT a.after, a.owner INTO last FROM retl.audit_log a
         WHERE a.object_type = 'destination'
           AND a.object_name = CASE WHEN d.object_type = 'server' THEN d.object_identity
                                    ELSE substring(d.object_identity FROM ' on server (.*)$') END
         ORDER BY a.id DESC LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        INSERT INTO retl.audit_log (actor, action, object_type, object_name, owner, before)
        VALUES (retl._caller()::regrole::text, 'drop', CASE WHEN d.object_type = 'server' THEN 'destination' ELSE 'user mapping' END,
                d.object_identity, last.owner, CASE WHEN d.object_type = 'server' THEN last.after END);
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pg_reverse_etl could not write the audit log for %: %', tg_tag, SQLERRM;
END $$;

CREATE EVENT TRIGGER retl_audit_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE SERVER', 'ALTER SERVER', 'CREATE USER MAPPING', 'ALTER USER MAPPING')
    EXECUTE FUNCTION retl._audit_ddl();
CREATE EVENT TRIGGER retl_audit_drop ON sql_drop
    WHEN TAG IN ('DROP SERVER', 'DROP USER MAPPING', 'DROP OWNED')
    EXECUTE FUNCTION retl._audit_drop();

------------------------------------------------------------------------------------------------
-- Forgetting a key
------------------------------------------------------------------------------------------------

CREATE FUNCTION retl.forget(key jsonb, model text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sync_ids bigint[];
    texts text[];
    n bigint;
    total bigint := 0;
BEGIN
    IF NOT retl._has_role(retl._caller(), 'retl_admin') THEN
        RAISE EXCEPTION 'permission denied to forget keys'
              USING ERRCODE = 'insufficient_privilege', HINT = 'Members of retl_admin may run retl.forget.';
    END IF;
    IF key IS NULL OR jsonb_typeof(key) <> 'object' OR key = '{}' THEN
        RAISE EXCEPTION 'key must be a JSON object of key columns, got %', coalesce(key::text, 'NULL')
              USING ERRCODE = 'invalid_parameter_value', HINT = 'E.g. ''{"email": "ada@example.com"}''.';
    END IF;
    IF model IS NOT NULL AND NOT EXISTS (SELECT 1 FROM retl.models m WHERE m.name = forget.model) THEN
        RAISE EXCEPTION 'model % does not exist', retl._q(model) USING ERRCODE = 'undefined_object';
    END IF;
    -- The syncs whose model key has exactly these columns.
    SELECT coalesce(array_agg(s.id), '{}') INTO sync_ids
      FROM retl.syncs s JOIN retl.models m ON m.id = s.model_id
     WHERE (forget.model IS NULL OR m.name = forget.model)
       AND (SELECT array_agg(k ORDER BY k) FROM unnest(m.primary_key) k) = (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(key) k);
    DELETE FROM retl.snapshots t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    DELETE FROM retl.outbox t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    DELETE FROM retl.row_errors t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    DELETE FROM retl.identities t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    DELETE FROM retl.changed_keys t WHERE t.sync_id = ANY (sync_ids) AND t.key = forget.key;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    -- Logs: the key as JSON (both spellings) and its text values, wherever an error or alert
    -- message quoted them.
    texts := ARRAY[key::text, replace(replace(key::text, '": ', '":'), ', "', ',"')]
             || ARRAY(SELECT v.value #>> '{}' FROM jsonb_each(key) v WHERE jsonb_typeof(v.value) = 'string' AND length(v.value #>> '{}') >= 3);
    UPDATE retl.runs r SET error = retl._scrub(r.error, texts)
     WHERE r.sync_id = ANY (sync_ids) AND r.error IS NOT NULL AND retl._scrub(r.error, texts) <> r.error;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    UPDATE retl.batches b SET error = retl._scrub(b.error, texts)
      FROM retl.runs r WHERE r.id = b.run_id AND r.sync_id = ANY (sync_ids)
       AND b.error IS NOT NULL AND retl._scrub(b.error, texts) <> b.error;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    UPDATE retl.alerts a SET message = retl._scrub(a.message, texts), details = retl._scrub(a.details::text, texts)::jsonb
     WHERE a.sync_id = ANY (sync_ids) AND retl._scrub(a.message || a.details::text, texts) <> a.message || a.details::text;
    GET DIAGNOSTICS n = ROW_COUNT; total := total + n;
    INSERT INTO retl.audit_log (actor, action, object_type, object_name, after)
    VALUES (retl._caller()::regrole::text, 'forget', 'key', coalesce(model, '*'),
            jsonb_build_object('syncs', cardinality(sync_ids), 'rows', total));
    RETURN total;
END $$;
COMMENT ON FUNCTION retl.forget(jsonb, text) IS
  'Right to be forgotten: remove a key (e.g. ''{"email": "ada@example.com"}'') from the snapshot, queue, row errors, identity map and change log of every sync whose model has that key (or of model''s syncs), and blank it out of run, batch and alert messages; the audit log records that it happened, not the key. Erasing it in the destinations is a delete sync''s job (see docs/RECIPES.md). Members of retl_admin only. Returns how many rows were removed or scrubbed.';

CREATE FUNCTION retl._scrub(message text, texts text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY texts LOOP
        message := replace(message, t, '[forgotten]');
    END LOOP;
    RETURN message;
END $$;

------------------------------------------------------------------------------------------------
-- What retl_viewer reads
------------------------------------------------------------------------------------------------

GRANT SELECT ON retl.models, retl.audiences, retl.syncs, retl.sync_parents, retl.sync_sources, retl.runs, retl.batches,
                retl.row_errors, retl.alerts, retl.column_tags, retl.destination_policies, retl.audit_log TO retl_viewer;
GRANT SELECT ON retl.column_tags TO PUBLIC;
GRANT SELECT ON retl.destination_policies TO PUBLIC;
GRANT SELECT ON retl.audit_log TO PUBLIC;
