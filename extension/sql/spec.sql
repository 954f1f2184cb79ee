-- Changing models and audiences in place, and sync-as-code: retl.apply(spec) makes models,
-- audiences and syncs match a declarative JSON spec; retl.export() writes the current ones as
-- such a spec. Both go through the same public functions a user calls by hand, so every check
-- (ownership, mappings, destination fields, policies, schedules) applies to a spec too.

------------------------------------------------------------------------------------------------
-- Redefining a model's or an audience's view
------------------------------------------------------------------------------------------------

-- The GRANTs on a view other than its owner's own, as statements that give them again: a
-- redefined view is a new object, and must not lose what its owner granted on the old one.
CREATE FUNCTION retl._view_grants(view_name text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(format('GRANT %s ON retl_models.%I TO %s%s', e.privilege_type, view_name,
                                     CASE WHEN e.grantee = 0 THEN 'PUBLIC' ELSE e.grantee::regrole::text END,
                                     CASE WHEN e.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
                              ORDER BY e.grantee, e.privilege_type), '{}')
      FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) e
     WHERE c.oid = to_regclass(format('retl_models.%I', view_name)) AND e.grantee <> c.relowner
$$;

-- After a model or audience changed: the syncs reading it must still find their mapped
-- columns, the destination's fields and key, and pass the destination's policy; their base
-- tables (and on-change triggers) follow the new definition, and their next run plans the
-- whole model. The snapshot stays: the next run sends only what the change changed.
CREATE FUNCTION retl._recheck_syncs(model_id bigint, audience_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s retl.syncs;
    source_name text;
    model_key text[];
BEGIN
    FOR s IN SELECT * FROM retl.syncs x
              WHERE x.model_id = _recheck_syncs.model_id
                AND (_recheck_syncs.audience_id IS NULL OR x.audience_id = _recheck_syncs.audience_id)
              ORDER BY x.id
    LOOP
        SELECT coalesce(a.name, m.name), m.primary_key INTO source_name, model_key
          FROM retl.models m LEFT JOIN retl.audiences a ON a.id = s.audience_id WHERE m.id = s.model_id;
        PERFORM retl._check_mappings(s.name, source_name, s.mappings);
        PERFORM retl._check_destination_fields(s.name, s.destination, s.owner,
                                               retl._sync_fields(s.mode, s.mappings, source_name), model_key);
        PERFORM retl._check_policy(s.id);
        PERFORM retl._refresh_sources(s.id);
    END LOOP;
END $$;

CREATE FUNCTION retl._alter_model(name text, query text, primary_key text[], caller_search_path text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m retl.models;
    new_query text;
    new_key text[];
    select_sql text;
    users text;
    a retl.audiences;
    model_grants text[];
    audience_grants jsonb := '{}';
BEGIN
    SELECT * INTO m FROM retl.models WHERE models.name = _alter_model.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model % does not exist', retl._q(name)
              USING ERRCODE = 'undefined_object', HINT = 'Create it with retl.create_model.';
    END IF;
    PERFORM retl._check_owner('model', m.name, m.owner);
    new_query := coalesce(query, m.query);
    new_key := coalesce(primary_key, m.primary_key);
    IF cardinality(new_key) = 0 THEN
        RAISE EXCEPTION 'model % needs a primary key', retl._q(name)
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'Pass primary_key => ''{id}'' (several columns for a composite key).';
    END IF;
    -- A sync's snapshot, identity map and the destination's records are keyed by the model key.
    IF new_key <> m.primary_key THEN
        SELECT string_agg(retl._q(s.name), ', ' ORDER BY s.name) INTO users FROM retl.syncs s WHERE s.model_id = m.id;
        IF users IS NOT NULL THEN
            RAISE EXCEPTION 'cannot change the primary key of model % while syncs use it', retl._q(m.name)
                  USING ERRCODE = 'object_not_in_prerequisite_state',
                        DETAIL = format('Used by %s, whose snapshots are keyed by (%s).', users, array_to_string(m.primary_key, ', ')),
                        HINT = 'Drop those syncs, change the key, and create them again: they then send every row as new.';
        END IF;
    END IF;
    select_sql := retl._model_select(new_query, caller_search_path);

    -- The audiences' views select from the model's: they go first and come back after. Views
    -- a DROP ... CASCADE already removed (dbt replacing a table does that) are simply made again.
    FOR a IN SELECT * FROM retl.audiences x WHERE x.model_id = m.id ORDER BY x.id LOOP
        audience_grants := audience_grants || jsonb_build_object(a.name, to_jsonb(retl._view_grants(a.name)));
        EXECUTE format('DROP VIEW IF EXISTS retl_models.%I', a.name);
    END LOOP;
    model_grants := retl._view_grants(m.name);
    EXECUTE format('DROP VIEW IF EXISTS retl_models.%I', m.name);
    PERFORM retl._create_view(m.name, select_sql, m.owner, caller_search_path, model_grants);
    PERFORM retl._check_model_key(m.name, new_key);
    PERFORM retl._check_readable(m.name, m.owner);
    FOR a IN SELECT * FROM retl.audiences x WHERE x.model_id = m.id ORDER BY x.id LOOP
        PERFORM retl._create_view(a.name, retl._audience_select(m.name, a.filter), a.owner,
                                  caller_search_path, ARRAY(SELECT jsonb_array_elements_text(audience_grants -> a.name)));
        PERFORM retl._check_readable(a.name, a.owner);
    END LOOP;
    UPDATE retl.models SET query = new_query, primary_key = new_key, updated_at = now() WHERE id = m.id;
    PERFORM retl._recheck_syncs(m.id, NULL);
END $$;

CREATE FUNCTION retl.alter_model(name text, query text DEFAULT NULL, primary_key text[] DEFAULT NULL) RETURNS void
LANGUAGE sql AS $$
    SELECT retl._alter_model(name, query, primary_key, current_setting('search_path'))
$$;
COMMENT ON FUNCTION retl.alter_model(text, text, text[]) IS
  'Redefine a model: query => a new SELECT or table name, primary_key => new key columns (refused while syncs use the model); NULL keeps the current one, so retl.alter_model(''m'') re-creates a view that DROP ... CASCADE removed. Audiences of the model follow; syncs keep their snapshots and send only what the change changed.';

CREATE FUNCTION retl._alter_audience(name text, filter text, caller_search_path text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a retl.audiences;
    model_name text;
    grants text[];
BEGIN
    SELECT * INTO a FROM retl.audiences WHERE audiences.name = _alter_audience.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audience % does not exist', retl._q(name)
              USING ERRCODE = 'undefined_object', HINT = 'Create it with retl.create_audience.';
    END IF;
    PERFORM retl._check_owner('audience', a.name, a.owner);
    filter := coalesce(filter, a.filter);
    PERFORM retl._check_filter(filter);
    SELECT m.name INTO model_name FROM retl.models m WHERE m.id = a.model_id;
    IF to_regclass(format('retl_models.%I', model_name)) IS NULL THEN
        RAISE EXCEPTION 'the view of model % is gone', retl._q(model_name)
              USING ERRCODE = 'undefined_table',
                    HINT = format('Re-create it (and its audiences) with SELECT retl.alter_model(%L);', model_name);
    END IF;
    grants := retl._view_grants(a.name);
    EXECUTE format('DROP VIEW IF EXISTS retl_models.%I', a.name);
    PERFORM retl._create_view(a.name, retl._audience_select(model_name, filter), a.owner,
                              caller_search_path, grants);
    PERFORM retl._check_readable(a.name, a.owner);
    UPDATE retl.audiences SET filter = _alter_audience.filter WHERE id = a.id;
    PERFORM retl._recheck_syncs(a.model_id, a.id);
END $$;

CREATE FUNCTION retl.alter_audience(name text, filter text DEFAULT NULL) RETURNS void
LANGUAGE sql AS $$
    SELECT retl._alter_audience(name, filter, current_setting('search_path'))
$$;
COMMENT ON FUNCTION retl.alter_audience(text, text) IS
  'Change an audience''s filter (NULL keeps it, re-creating the view). Mirror syncs of the audience then delete the rows that left it and add those that joined, at their next run.';

------------------------------------------------------------------------------------------------
-- Specs
------------------------------------------------------------------------------------------------

-- Each key a spec object may hold, with the JSON type its value must have. A null value, or a
-- key left out, means the default.
CREATE FUNCTION retl._spec_keys(kind text) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE kind
        WHEN 'model' THEN '{"query": "string", "primary_key": "array"}'::jsonb
        WHEN 'audience' THEN '{"model": "string", "filter": "string"}'::jsonb
        WHEN 'sync' THEN '{"destination": "string", "model": "string", "audience": "string", "mode": "string",
                           "mappings": "object", "paused": "boolean", "schedule": "string", "after": "array",
                           "time_zone": "string", "max_rows": "number", "max_delete_percent": "number",
                           "max_delete_rows": "number", "quota_share": "number", "nulls": "string", "freshness": "string",
                           "alert_after_failures": "number", "alert_row_error_rate": "number",
                           "alert_count_change_percent": "number", "alert_queue_depth": "number",
                           "alert_destination": "string"}'::jsonb
    END
$$;

-- The spec's section for kind (models, audiences, syncs), checked: an object of objects whose
-- keys are known and whose values have the right JSON types.
CREATE FUNCTION retl._spec_section(spec jsonb, kind text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    section text := kind || 's';
    keys jsonb := retl._spec_keys(kind);
    entry text;
    body jsonb;
    k text;
    v jsonb;
BEGIN
    IF spec -> section IS NULL OR spec -> section = 'null' THEN
        RETURN '{}';
    END IF;
    IF jsonb_typeof(spec -> section) <> 'object' THEN
        RAISE EXCEPTION 'spec: "%" must be an object of % by name, got %', section, section, jsonb_typeof(spec -> section)
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = format('e.g. {"%s": {"name": {...}}}; retl.export() shows the shape.', section);
    END IF;
    FOR entry, body IN SELECT * FROM jsonb_each(spec -> section) LOOP
        IF jsonb_typeof(body) <> 'object' THEN
            RAISE EXCEPTION 'spec: % % must be an object, got %', kind, retl._q(entry), jsonb_typeof(body)
                  USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR k, v IN SELECT * FROM jsonb_each(body) LOOP
            IF NOT keys ? k THEN
                RAISE EXCEPTION 'spec: % % has an unknown key %', kind, retl._q(entry), retl._q(k)
                      USING ERRCODE = 'invalid_parameter_value',
                            HINT = format('A %s takes: %s.', kind, (SELECT string_agg(x, ', ' ORDER BY x) FROM jsonb_object_keys(keys) x));
            END IF;
            IF jsonb_typeof(v) NOT IN ('null', keys ->> k) THEN
                RAISE EXCEPTION 'spec: % % has % of type %, expected %', kind, retl._q(entry), retl._q(k), jsonb_typeof(v), keys ->> k
                      USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF jsonb_typeof(v) = 'array' AND EXISTS (SELECT FROM jsonb_array_elements(v) x WHERE jsonb_typeof(x) <> 'string') THEN
                RAISE EXCEPTION 'spec: % % has % with an element that is not a string', kind, retl._q(entry), retl._q(k)
                      USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
    END LOOP;
    RETURN spec -> section;
END $$;

CREATE FUNCTION retl._spec_array(v jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN v IS NULL OR v = 'null' THEN NULL ELSE ARRAY(SELECT jsonb_array_elements_text(v)) END
$$;

-- The value of a JSON field as text, NULL for a JSON null.
CREATE FUNCTION retl._spec_text(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN v IS NULL OR v = 'null' THEN NULL ELSE v #>> '{}' END
$$;

-- The names of a sync's parents (after => ...), sorted.
CREATE FUNCTION retl._parent_names(sync_name text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ARRAY(SELECT y.name FROM retl.syncs x JOIN retl.sync_parents p ON p.sync_id = x.id
                   JOIN retl.syncs y ON y.id = p.parent_id WHERE x.name = sync_name ORDER BY 1)
$$;

CREATE FUNCTION retl._apply(spec jsonb, prune boolean, dry_run boolean, caller_search_path text)
RETURNS TABLE (o_action text, o_kind text, o_name text, o_detail text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    models jsonb;
    audiences jsonb;
    syncs jsonb;
    actions text[] := '{}';
    entry text;
    body jsonb;
    m retl.models;
    a retl.audiences;
    s retl.syncs;
    current_source text;
    changed text[];
    reset text[];
    want_key text[];
    want_schedule text;
    source_kind text;
    want_after text[];
    dropped boolean;
    cut_links text[] := '{}';
    n int;
    me regrole := retl._caller();
BEGIN
    IF spec IS NULL OR jsonb_typeof(spec) <> 'object' THEN
        RAISE EXCEPTION 'spec must be a JSON object with "models", "audiences" and "syncs"'
              USING ERRCODE = 'invalid_parameter_value', HINT = 'retl.export() returns the current configuration as a spec.';
    END IF;
    SELECT string_agg(retl._q(k), ', ') INTO entry FROM jsonb_object_keys(spec) k WHERE k NOT IN ('models', 'audiences', 'syncs');
    IF entry IS NOT NULL THEN
        RAISE EXCEPTION 'spec has unknown key %', entry
              USING ERRCODE = 'invalid_parameter_value', HINT = 'A spec has "models", "audiences" and "syncs".';
    END IF;
    models := retl._spec_section(spec, 'model');
    audiences := retl._spec_section(spec, 'audience');
    syncs := retl._spec_section(spec, 'sync');
    FOR entry, body IN SELECT * FROM jsonb_each(models) LOOP
        IF retl._spec_text(body -> 'query') IS NULL THEN
            RAISE EXCEPTION 'spec: model % needs "query"', retl._q(entry) USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    FOR entry, body IN SELECT * FROM jsonb_each(audiences) LOOP
        IF retl._spec_text(body -> 'model') IS NULL OR retl._spec_text(body -> 'filter') IS NULL THEN
            RAISE EXCEPTION 'spec: audience % needs "model" and "filter"', retl._q(entry) USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    FOR entry, body IN SELECT * FROM jsonb_each(syncs) LOOP
        IF retl._spec_text(body -> 'destination') IS NULL THEN
            RAISE EXCEPTION 'spec: sync % needs "destination"', retl._q(entry) USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF (retl._spec_text(body -> 'model') IS NULL) = (retl._spec_text(body -> 'audience') IS NULL) THEN
            RAISE EXCEPTION 'spec: sync % needs exactly one of "model" and "audience"', retl._q(entry)
                  USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;

    BEGIN
        -- 1. Pruning: syncs first (children before their parents), then audiences, then models.
        -- Only the caller's own: a spec describes one team's objects, not everyone's in the
        -- database (a superuser's spec does not prune what other roles defined).
        IF prune THEN
            -- Spec syncs get their parents again in step 5; links to syncs about to go go now.
            FOR s IN SELECT x.* FROM retl.syncs x
                      WHERE syncs ? x.name AND x.owner = me
                        AND EXISTS (SELECT FROM retl.sync_parents p JOIN retl.syncs y ON y.id = p.parent_id
                                     WHERE p.sync_id = x.id AND NOT syncs ? y.name)
            LOOP
                PERFORM retl.alter_sync(name => s.name, after => ARRAY(
                    SELECT y.name FROM retl.sync_parents p JOIN retl.syncs y ON y.id = p.parent_id
                     WHERE p.sync_id = s.id AND syncs ? y.name));
                cut_links := cut_links || s.name;
            END LOOP;
            LOOP
                dropped := false;
                FOR s IN SELECT x.* FROM retl.syncs x
                          WHERE NOT syncs ? x.name AND x.owner = me
                            AND NOT EXISTS (SELECT FROM retl.sync_parents p JOIN retl.syncs c ON c.id = p.sync_id
                                             WHERE p.parent_id = x.id AND NOT syncs ? c.name AND c.owner = me)
                          ORDER BY x.name
                LOOP
                    PERFORM retl.drop_sync(s.name);
                    actions := actions || ARRAY['drop', 'sync', s.name, NULL];
                    dropped := true;
                END LOOP;
                EXIT WHEN NOT dropped;
            END LOOP;
            FOR a IN SELECT x.* FROM retl.audiences x WHERE NOT audiences ? x.name AND x.owner = me ORDER BY x.name LOOP
                PERFORM retl.drop_audience(a.name);
                actions := actions || ARRAY['drop', 'audience', a.name, NULL];
            END LOOP;
        END IF;

        -- 2. Models.
        FOR entry, body IN SELECT * FROM jsonb_each(models) ORDER BY 1 LOOP
            want_key := coalesce(retl._spec_array(body -> 'primary_key'), '{id}');
            SELECT * INTO m FROM retl.models x WHERE x.name = entry;
            IF NOT FOUND THEN
                PERFORM retl._create_model(entry, body ->> 'query', want_key, caller_search_path);
                actions := actions || ARRAY['create', 'model', entry, NULL];
            ELSE
                changed := '{}';
                IF m.query <> body ->> 'query' THEN changed := changed || 'query'::text; END IF;
                IF m.primary_key <> want_key THEN changed := changed || 'primary_key'::text; END IF;
                IF changed <> '{}' THEN
                    PERFORM retl._alter_model(entry, body ->> 'query', want_key, caller_search_path);
                    actions := actions || ARRAY['alter', 'model', entry, array_to_string(changed, ', ')];
                END IF;
            END IF;
        END LOOP;
        IF prune THEN
            FOR m IN SELECT x.* FROM retl.models x WHERE NOT models ? x.name AND x.owner = me ORDER BY x.name LOOP
                PERFORM retl.drop_model(m.name);
                actions := actions || ARRAY['drop', 'model', m.name, NULL];
            END LOOP;
        END IF;

        -- 3. Audiences.
        FOR entry, body IN SELECT * FROM jsonb_each(audiences) ORDER BY 1 LOOP
            SELECT * INTO a FROM retl.audiences x WHERE x.name = entry;
            IF NOT FOUND THEN
                PERFORM retl._create_audience(entry, body ->> 'model', body ->> 'filter', caller_search_path);
                actions := actions || ARRAY['create', 'audience', entry, NULL];
            ELSE
                SELECT x.name INTO current_source FROM retl.models x WHERE x.id = a.model_id;
                IF current_source <> body ->> 'model' THEN
                    RAISE EXCEPTION 'spec: audience % is of model %, not %', retl._q(entry), retl._q(current_source), retl._q(body ->> 'model')
                          USING ERRCODE = 'feature_not_supported',
                                HINT = 'An audience cannot move to another model: give the new one another name.';
                END IF;
                IF a.filter <> body ->> 'filter' THEN
                    PERFORM retl._alter_audience(entry, body ->> 'filter', caller_search_path);
                    actions := actions || ARRAY['alter', 'audience', entry, 'filter'];
                END IF;
            END IF;
        END LOOP;

        -- 4. Syncs, without their parents (a parent may come later in the spec).
        FOR entry, body IN SELECT * FROM jsonb_each(syncs) ORDER BY 1 LOOP
            SELECT * INTO s FROM retl.syncs x WHERE x.name = entry;
            IF NOT FOUND THEN
                PERFORM retl.create_sync(
                    name => entry,
                    destination => body ->> 'destination',
                    model => retl._spec_text(body -> 'model'),
                    audience => retl._spec_text(body -> 'audience'),
                    mode => coalesce(retl._spec_text(body -> 'mode'), 'upsert'),
                    mappings => nullif(body -> 'mappings', 'null'),
                    paused => coalesce((body ->> 'paused')::boolean, false),
                    schedule => coalesce(retl._spec_text(body -> 'schedule'), 'manual'),
                    time_zone => coalesce(retl._spec_text(body -> 'time_zone'), 'UTC'),
                    max_rows => (body ->> 'max_rows')::bigint,
                    max_delete_percent => coalesce((body ->> 'max_delete_percent')::numeric, 50),
                    max_delete_rows => (body ->> 'max_delete_rows')::bigint,
                    quota_share => (body ->> 'quota_share')::numeric,
                    nulls => retl._spec_text(body -> 'nulls'),
                    freshness => (body ->> 'freshness')::interval,
                    alert_after_failures => coalesce((body ->> 'alert_after_failures')::int, 3),
                    alert_row_error_rate => (body ->> 'alert_row_error_rate')::numeric,
                    alert_count_change_percent => (body ->> 'alert_count_change_percent')::numeric,
                    alert_queue_depth => (body ->> 'alert_queue_depth')::bigint,
                    alert_destination => retl._spec_text(body -> 'alert_destination'));
                actions := actions || ARRAY['create', 'sync', entry, NULL];
                CONTINUE;
            END IF;
            SELECT coalesce(sa.name, sm.name), CASE WHEN sa.id IS NULL THEN 'model' ELSE 'audience' END
              INTO current_source, source_kind
              FROM retl.models sm LEFT JOIN retl.audiences sa ON sa.id = s.audience_id WHERE sm.id = s.model_id;
            IF retl._spec_text(body -> source_kind) IS DISTINCT FROM current_source THEN
                RAISE EXCEPTION 'spec: sync % reads % %, not %', retl._q(entry), source_kind, retl._q(current_source),
                                coalesce(retl._q(body ->> 'model'), retl._q(body ->> 'audience'))
                      USING ERRCODE = 'feature_not_supported',
                            HINT = 'A sync cannot change its model or audience (its snapshot holds what that one delivered): give the new sync another name, and prune the old one.';
            END IF;
            changed := '{}';
            reset := '{}';
            want_after := coalesce(ARRAY(SELECT x FROM unnest(retl._spec_array(body -> 'after')) x ORDER BY 1), '{}');
            IF want_after <> retl._parent_names(entry) OR entry = ANY (cut_links) THEN
                changed := changed || 'after'::text;  -- set in step 5 (or cut in step 1)
            END IF;
            IF s.destination <> body ->> 'destination' THEN changed := changed || 'destination'::text; END IF;
            IF s.mode <> coalesce(retl._spec_text(body -> 'mode'), 'upsert') THEN changed := changed || 'mode'::text; END IF;
            IF s.mappings IS DISTINCT FROM nullif(body -> 'mappings', 'null') THEN changed := changed || 'mappings'::text; END IF;
            want_schedule := retl._check_schedule(entry, coalesce(retl._spec_text(body -> 'schedule'), 'manual'),
                                                  coalesce(retl._spec_text(body -> 'time_zone'), 'UTC'));
            IF s.schedule <> want_schedule THEN changed := changed || 'schedule'::text; END IF;
            IF s.time_zone <> coalesce(retl._spec_text(body -> 'time_zone'), 'UTC') THEN changed := changed || 'time_zone'::text; END IF;
            IF s.max_rows IS DISTINCT FROM (body ->> 'max_rows')::bigint THEN changed := changed || 'max_rows'::text; END IF;
            -- NULL (set at creation) and 100 both mean no limit on the share.
            IF coalesce(s.max_delete_percent, 100) <> coalesce((body ->> 'max_delete_percent')::numeric, 50) THEN
                changed := changed || 'max_delete_percent'::text;
            END IF;
            IF s.max_delete_rows IS DISTINCT FROM (body ->> 'max_delete_rows')::bigint THEN changed := changed || 'max_delete_rows'::text; END IF;
            IF s.quota_share <> coalesce((body ->> 'quota_share')::numeric, 1) THEN changed := changed || 'quota_share'::text; END IF;
            IF s.nulls <> coalesce(retl._spec_text(body -> 'nulls'), 'send') THEN changed := changed || 'nulls'::text; END IF;
            IF s.freshness IS DISTINCT FROM (body ->> 'freshness')::interval THEN changed := changed || 'freshness'::text; END IF;
            IF s.alert_after_failures <> coalesce((body ->> 'alert_after_failures')::int, 3) THEN
                changed := changed || 'alert_after_failures'::text;
            END IF;
            IF s.alert_row_error_rate IS DISTINCT FROM (body ->> 'alert_row_error_rate')::numeric THEN
                changed := changed || 'alert_row_error_rate'::text;
            END IF;
            IF s.alert_count_change_percent IS DISTINCT FROM (body ->> 'alert_count_change_percent')::numeric THEN
                changed := changed || 'alert_count_change_percent'::text;
            END IF;
            IF s.alert_queue_depth IS DISTINCT FROM (body ->> 'alert_queue_depth')::bigint THEN
                changed := changed || 'alert_queue_depth'::text;
            END IF;
            IF s.alert_destination IS DISTINCT FROM retl._spec_text(body -> 'alert_destination') THEN
                changed := changed || 'alert_destination'::text;
            END IF;
            -- Settings going back to their defaults (or to none) are reset; the rest are set.
            SELECT coalesce(array_agg(c), '{}') INTO reset FROM unnest(changed) c
             WHERE c IN ('max_rows', 'max_delete_percent', 'max_delete_rows', 'quota_share', 'nulls', 'freshness',
                         'alert_after_failures', 'alert_row_error_rate', 'alert_count_change_percent',
                         'alert_queue_depth', 'alert_destination')
               AND retl._spec_text(body -> c) IS NULL;
            IF EXISTS (SELECT FROM unnest(changed) c WHERE c <> 'after') THEN
                PERFORM retl.alter_sync(
                    name => entry,
                    destination => CASE WHEN 'destination' = ANY (changed) THEN body ->> 'destination' END,
                    mode => CASE WHEN 'mode' = ANY (changed) THEN coalesce(retl._spec_text(body -> 'mode'), 'upsert') END,
                    mappings => CASE WHEN 'mappings' = ANY (changed) THEN nullif(body -> 'mappings', 'null') END,
                    reset_mappings => 'mappings' = ANY (changed) AND nullif(body -> 'mappings', 'null') IS NULL,
                    schedule => CASE WHEN 'schedule' = ANY (changed) OR 'time_zone' = ANY (changed) THEN want_schedule END,
                    time_zone => CASE WHEN 'time_zone' = ANY (changed) OR 'schedule' = ANY (changed)
                                      THEN coalesce(retl._spec_text(body -> 'time_zone'), 'UTC') END,
                    max_rows => (body ->> 'max_rows')::bigint,
                    max_delete_percent => (body ->> 'max_delete_percent')::numeric,
                    max_delete_rows => (body ->> 'max_delete_rows')::bigint,
                    quota_share => (body ->> 'quota_share')::numeric,
                    nulls => retl._spec_text(body -> 'nulls'),
                    freshness => (body ->> 'freshness')::interval,
                    alert_after_failures => (body ->> 'alert_after_failures')::int,
                    alert_row_error_rate => (body ->> 'alert_row_error_rate')::numeric,
                    alert_count_change_percent => (body ->> 'alert_count_change_percent')::numeric,
                    alert_queue_depth => (body ->> 'alert_queue_depth')::bigint,
                    alert_destination => retl._spec_text(body -> 'alert_destination'),
                    reset => nullif(reset, '{}'));
            END IF;
            IF s.paused <> coalesce((body ->> 'paused')::boolean, false) THEN
                IF s.paused THEN PERFORM retl.resume(entry); ELSE PERFORM retl.pause(entry); END IF;
                changed := changed || 'paused'::text;
            END IF;
            IF changed <> '{}' THEN
                actions := actions || ARRAY['alter', 'sync', entry, array_to_string(changed, ', ')];
            END IF;
        END LOOP;

        -- 5. Parents: every sync of the spec exists now.
        FOR entry, body IN SELECT * FROM jsonb_each(syncs) ORDER BY 1 LOOP
            want_after := coalesce(ARRAY(SELECT x FROM unnest(retl._spec_array(body -> 'after')) x ORDER BY 1), '{}');
            IF want_after <> retl._parent_names(entry) THEN
                PERFORM retl.alter_sync(name => entry, after => want_after);
            END IF;
        END LOOP;

        IF dry_run THEN
            RAISE EXCEPTION USING ERRCODE = 'RT001';
        END IF;
    EXCEPTION WHEN SQLSTATE 'RT001' THEN
        NULL;  -- a dry run: everything above is undone, what it did is reported
    END;
    FOR n IN 1 .. cardinality(actions) / 4 LOOP
        o_action := actions[4 * n - 3];
        o_kind := actions[4 * n - 2];
        o_name := actions[4 * n - 1];
        o_detail := actions[4 * n];
        RETURN NEXT;
    END LOOP;
END $$;

CREATE FUNCTION retl.apply(spec jsonb, prune boolean DEFAULT false, dry_run boolean DEFAULT false)
RETURNS TABLE (action text, kind text, name text, detail text)
LANGUAGE sql AS $$
    SELECT * FROM retl._apply(spec, prune, dry_run, current_setting('search_path'))
$$;
COMMENT ON FUNCTION retl.apply(jsonb, boolean, boolean) IS
  'Make models, audiences and syncs match a spec {"models": {name: {query, primary_key}}, "audiences": {name: {model, filter}}, "syncs": {name: {destination, model | audience, mode, mappings, schedule, ...}}} (retl.export() writes one): creates what is missing, alters what differs (keys left out mean their defaults), and with prune => true drops the ones you own that the spec does not name. All or nothing; dry_run => true reports without changing anything. Returns one row per change: action (create, alter, drop), kind, name, detail (the settings changed).';

CREATE FUNCTION retl.export() RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object(
        'models', coalesce((SELECT jsonb_object_agg(m.name, jsonb_build_object('query', m.query, 'primary_key', to_jsonb(m.primary_key)))
                              FROM retl.models m WHERE retl._visible(m.owner)), '{}'),
        'audiences', coalesce((SELECT jsonb_object_agg(a.name, jsonb_build_object('model', m.name, 'filter', a.filter))
                                 FROM retl.audiences a JOIN retl.models m ON m.id = a.model_id WHERE retl._visible(a.owner)), '{}'),
        'syncs', coalesce((SELECT jsonb_object_agg(s.name, jsonb_strip_nulls(jsonb_build_object(
                    'destination', s.destination,
                    'model', CASE WHEN a.id IS NULL THEN m.name END,
                    'audience', a.name,
                    'mode', s.mode,
                    'mappings', s.mappings,
                    'paused', CASE WHEN s.paused THEN true END,
                    'schedule', nullif(s.schedule, 'manual'),
                    'time_zone', nullif(s.time_zone, 'UTC'),
                    'after', (SELECT to_jsonb(array_agg(p.name ORDER BY p.name)) FROM retl.sync_parents sp
                                JOIN retl.syncs p ON p.id = sp.parent_id WHERE sp.sync_id = s.id),
                    'max_rows', s.max_rows,
                    'max_delete_percent', CASE WHEN s.max_delete_percent IS NULL THEN 100
                                               WHEN s.max_delete_percent <> 50 THEN s.max_delete_percent END,
                    'max_delete_rows', s.max_delete_rows,
                    'quota_share', nullif(s.quota_share, 1),
                    'nulls', nullif(s.nulls, 'send'),
                    'freshness', s.freshness::text,
                    'alert_after_failures', nullif(s.alert_after_failures, 3),
                    'alert_row_error_rate', s.alert_row_error_rate,
                    'alert_count_change_percent', s.alert_count_change_percent,
                    'alert_queue_depth', s.alert_queue_depth,
                    'alert_destination', s.alert_destination)))
                             FROM retl.syncs s JOIN retl.models m ON m.id = s.model_id
                             LEFT JOIN retl.audiences a ON a.id = s.audience_id
                            WHERE retl._visible(s.owner)), '{}'))
$$;
COMMENT ON FUNCTION retl.export() IS
  'The models, audiences and syncs you can see, as a spec for retl.apply: settings at their defaults are left out, so retl.apply(retl.export()) changes nothing.';
