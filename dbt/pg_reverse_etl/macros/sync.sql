{#- pg_reverse_etl.sync(): the post-hook that defines a dbt model's retl model and syncs from
    its config (meta.retl) and runs them. It must run after dbt's COMMIT:

      post_hook={'sql': "{{ pg_reverse_etl.sync() }}", 'transaction': false}

    A model without meta.retl is left alone, so the hook can be set for a whole folder in
    dbt_project.yml. See README.md for the config. -#}

{#- create_sync / alter_sync arguments a sync's config may set, with their SQL types.
    `name`, `destination`, `mode`, `mappings`, `schedule` and `after` are handled apart. -#}
{% macro _sync_settings() -%}
  {{ return({
      'time_zone': 'text',
      'max_rows': 'bigint',
      'max_delete_percent': 'numeric',
      'max_delete_rows': 'bigint',
      'quota_share': 'numeric',
      'nulls': 'text',
      'freshness': 'interval',
      'alert_after_failures': 'integer',
      'alert_row_error_rate': 'numeric',
      'alert_count_change_percent': 'numeric',
      'alert_queue_depth': 'bigint',
      'alert_destination': 'text',
  }) }}
{%- endmacro %}

{#- The settings alter_sync's `reset` puts back to their defaults (time_zone is not one). -#}
{% macro _resettable() -%}
  {{ return(['max_rows', 'max_delete_percent', 'max_delete_rows', 'quota_share', 'nulls', 'freshness',
             'alert_after_failures', 'alert_row_error_rate', 'alert_count_change_percent',
             'alert_queue_depth', 'alert_destination']) }}
{%- endmacro %}

{% macro _sync_keys() -%}
  {{ return(['name', 'destination', 'audience', 'mode', 'mappings', 'schedule', 'after', 'paused', 'run', 'timeout']
            + pg_reverse_etl._sync_settings().keys() | list) }}
{%- endmacro %}

{#- The node's meta.retl (config.meta, or the older top-level meta), or none. -#}
{% macro _retl_config(node) -%}
  {%- set meta = (node.config or {}).get('meta') or {} -%}
  {%- set cfg = meta.get('retl') -%}
  {%- if cfg is none -%}
    {%- set cfg = (node.get('meta') or {}).get('retl') -%}
  {%- endif -%}
  {{ return(cfg) }}
{%- endmacro %}

{% macro _fail(node, message) -%}
  {{ exceptions.raise_compiler_error("pg_reverse_etl: model " ~ node.name ~ ": " ~ message) }}
{%- endmacro %}

{% macro _scalar(sql) -%}
  {%- set result = run_query(sql) -%}
  {{ return(result.columns[0].values()[0] if result.rows | length > 0 else none) }}
{%- endmacro %}

{% macro sync(run=true) -%}
  {%- if execute -%}
    {%- do pg_reverse_etl._sync_node(model, this, run) -%}
  {%- endif -%}
  {#- Nothing is left for dbt to execute: the statements ran above, one by one. -#}
{%- endmacro %}

{% macro _sync_node(node, relation, run) -%}
  {%- set cfg = pg_reverse_etl._retl_config(node) -%}
  {%- if not cfg -%}
    {{ return(none) }}
  {%- endif -%}
  {#- Only the targets listed in the var retl_targets (when set) define and run syncs: a
      developer's build in a dev schema must not repoint the shared syncs at it. -#}
  {%- set targets = var('retl_targets', none) -%}
  {%- if targets is not none and target.name not in ([targets] if targets is string else targets) -%}
    {%- do log("pg_reverse_etl: model " ~ node.name ~ ": target " ~ target.name ~ " is not in retl_targets; syncs left alone", info=true) -%}
    {{ return(none) }}
  {%- endif -%}
  {#- dbt build --empty builds the model with no rows: syncing that would send nothing, or
      (mode mirror) delete everything. -#}
  {%- if flags.EMPTY -%}
    {%- do log("pg_reverse_etl: model " ~ node.name ~ ": built --empty; syncs left alone", info=true) -%}
    {{ return(none) }}
  {%- endif -%}
  {%- if cfg is not mapping -%}
    {%- do pg_reverse_etl._fail(node, "meta.retl must be a mapping, got " ~ cfg) -%}
  {%- endif -%}
  {%- if node.config.get('materialized') in ['ephemeral'] -%}
    {%- do pg_reverse_etl._fail(node, "an ephemeral model is no relation retl could read") -%}
  {%- endif -%}

  {#- dbt's transaction must be committed: the workers that run the sync are other sessions. -#}
  {%- if pg_reverse_etl._scalar("select txid_current_if_assigned() is not null") -%}
    {%- do pg_reverse_etl._fail(node, "pg_reverse_etl.sync() runs inside dbt's transaction, where the workers cannot see the model's rows; make it an after-commit hook: post_hook={'sql': \"{{ pg_reverse_etl.sync() }}\", 'transaction': false}") -%}
  {%- endif -%}

  {%- set retl_model = cfg.get('model', node.name) -%}
  {%- set primary_key = cfg.get('primary_key', node.config.get('unique_key')) -%}
  {%- if not primary_key -%}
    {%- do pg_reverse_etl._fail(node, "meta.retl.primary_key is missing (a list of columns, e.g. ['id'])") -%}
  {%- endif -%}
  {%- if primary_key is string -%}
    {%- set primary_key = [primary_key] -%}
  {%- endif -%}
  {%- set query = adapter.quote(relation.schema) ~ '.' ~ adapter.quote(relation.identifier) -%}
  {%- do pg_reverse_etl._define_model(node, retl_model, query, primary_key) -%}

  {%- for a in cfg.get('audiences', []) -%}
    {%- if a is not mapping or not a.get('name') or not a.get('filter') -%}
      {%- do pg_reverse_etl._fail(node, "every entry of meta.retl.audiences needs a name and a filter, got " ~ a) -%}
    {%- endif -%}
    {%- do pg_reverse_etl._define_audience(node, retl_model, a['name'], a['filter']) -%}
  {%- endfor -%}

  {%- set syncs = cfg.get('syncs', []) -%}
  {%- set ns = namespace(names=[]) -%}
  {%- for s in syncs -%}
    {%- if s is not mapping or not s.get('name') or not s.get('destination') -%}
      {%- do pg_reverse_etl._fail(node, "every entry of meta.retl.syncs needs a name and a destination, got " ~ s) -%}
    {%- endif -%}
    {%- for k in s.keys() -%}
      {%- if k not in pg_reverse_etl._sync_keys() -%}
        {%- do pg_reverse_etl._fail(node, "sync " ~ s['name'] ~ ": unknown setting " ~ k ~ " (known: " ~ pg_reverse_etl._sync_keys() | join(', ') ~ ")") -%}
      {%- endif -%}
    {%- endfor -%}
    {%- do pg_reverse_etl._define_sync(node, retl_model, s) -%}
  {%- endfor -%}

  {#- Make the definitions visible to the workers before asking them to run. -#}
  {%- if pg_reverse_etl._scalar("select txid_current_if_assigned() is not null") -%}
    {%- do run_query("commit") -%}
  {%- endif -%}

  {%- if run -%}
    {%- for s in syncs if s.get('run', true) -%}
      {%- do pg_reverse_etl._run_sync(s['name'], s.get('timeout', var('retl_run_timeout', '30 minutes'))) -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro %}

{#- create_model, or alter_model when the model exists and its definition or view changed
    (dbt's table and view materializations drop the old relation with CASCADE, which takes
    retl's view retl_models.<name> with it; alter_model puts it back and keeps the snapshot). -#}
{% macro _define_model(node, name, query, primary_key) -%}
  {%- set existing = run_query(
        "select m.query = " ~ pg_reverse_etl._literal(query)
        ~ " as same_query, m.primary_key = " ~ pg_reverse_etl._text_array(primary_key)
        ~ " as same_key, to_regclass(format('retl_models.%I', m.name)) is not null as has_view"
        ~ " from retl.models m where m.name = " ~ pg_reverse_etl._literal(name)) -%}
  {%- if existing.rows | length == 0 -%}
    {%- do run_query("select retl.create_model(name => " ~ pg_reverse_etl._literal(name)
          ~ ", query => " ~ pg_reverse_etl._literal(query)
          ~ ", primary_key => " ~ pg_reverse_etl._text_array(primary_key) ~ ")") -%}
    {%- do log("pg_reverse_etl: created model " ~ name ~ " over " ~ query, info=true) -%}
  {%- else -%}
    {%- set row = existing.rows[0] -%}
    {%- if not (row['same_query'] and row['same_key'] and row['has_view']) -%}
      {%- if not pg_reverse_etl._scalar("select to_regprocedure('retl.alter_model(text,text,text[])') is not null") -%}
        {%- do pg_reverse_etl._fail(node, "retl model " ~ name ~ " must be redefined (its view was dropped with the relation dbt replaced, or its query or key changed), which needs retl.alter_model: pg_reverse_etl 0.7.0 or later (ALTER EXTENSION pg_reverse_etl UPDATE)") -%}
      {%- endif -%}
      {%- do run_query("select retl.alter_model(name => " ~ pg_reverse_etl._literal(name)
            ~ ", query => " ~ pg_reverse_etl._literal(query)
            ~ (", primary_key => " ~ pg_reverse_etl._text_array(primary_key) if not row['same_key'] else "")
            ~ ")") -%}
      {%- do log("pg_reverse_etl: redefined model " ~ name ~ " over " ~ query, info=true) -%}
    {%- endif -%}
  {%- endif -%}
{%- endmacro %}

{#- create_audience, or alter_audience when the filter changed. -#}
{% macro _define_audience(node, retl_model, name, filter) -%}
  {%- set L = pg_reverse_etl._literal -%}
  {%- set existing = run_query("select m.name as model, a.filter = " ~ L(filter) ~ " as same_filter"
        ~ " from retl.audiences a join retl.models m on m.id = a.model_id where a.name = " ~ L(name)) -%}
  {%- if existing.rows | length == 0 -%}
    {%- do run_query("select retl.create_audience(name => " ~ L(name) ~ ", model => " ~ L(retl_model) ~ ", filter => " ~ L(filter) ~ ")") -%}
    {%- do log("pg_reverse_etl: created audience " ~ name ~ " (" ~ retl_model ~ " where " ~ filter ~ ")", info=true) -%}
  {%- elif existing.rows[0]['model'] != retl_model -%}
    {%- do pg_reverse_etl._fail(node, "audience " ~ name ~ " exists over model " ~ existing.rows[0]['model'] ~ ", not " ~ retl_model) -%}
  {%- elif not existing.rows[0]['same_filter'] -%}
    {%- do run_query("select retl.alter_audience(name => " ~ L(name) ~ ", filter => " ~ L(filter) ~ ")") -%}
    {%- do log("pg_reverse_etl: altered audience " ~ name ~ ": filter " ~ filter, info=true) -%}
  {%- endif -%}
{%- endmacro %}

{#- create_sync, or alter_sync with only what differs from the config. -#}
{% macro _define_sync(node, retl_model, sync_config) -%}
  {%- set L = pg_reverse_etl._literal -%}
  {#- time_zone left out means UTC (create_sync's default), so removing it puts UTC back. -#}
  {%- set s = {'time_zone': 'UTC'} -%}
  {%- do s.update(sync_config) -%}
  {%- set settings = pg_reverse_etl._sync_settings() -%}
  {%- set mode = s.get('mode', 'upsert') -%}
  {%- set schedule = s.get('schedule', 'manual') -%}
  {%- set mappings = s.get('mappings') -%}
  {%- set audience = s.get('audience') -%}
  {%- set existing = run_query("select m.name as model, a.name as audience from retl.syncs s join retl.models m on m.id = s.model_id"
        ~ " left join retl.audiences a on a.id = s.audience_id where s.name = " ~ L(s['name'])) -%}
  {%- if existing.rows | length == 0 -%}
    {%- set args = [
          "name => " ~ L(s['name']),
          "destination => " ~ L(s['destination']),
          ("audience => " ~ L(audience) if audience else "model => " ~ L(retl_model)),
          "mode => " ~ L(mode),
          "schedule => " ~ L(schedule)] -%}
    {%- if mappings is not none -%}
      {%- do args.append("mappings => " ~ pg_reverse_etl._typed_literal(mappings, 'jsonb')) -%}
    {%- endif -%}
    {%- if s.get('after') is not none -%}
      {%- do args.append("after => " ~ pg_reverse_etl._text_array(s['after'])) -%}
    {%- endif -%}
    {%- if s.get('paused') is not none -%}
      {%- do args.append("paused => " ~ pg_reverse_etl._typed_literal(s['paused'], 'boolean')) -%}
    {%- endif -%}
    {%- for k, type in settings.items() if s.get(k) is not none -%}
      {%- do args.append(k ~ " => " ~ pg_reverse_etl._typed_literal(s[k], type)) -%}
    {%- endfor -%}
    {%- do run_query("select retl.create_sync(" ~ args | join(", ") ~ ")") -%}
    {%- do log("pg_reverse_etl: created sync " ~ s['name'] ~ " (" ~ ("audience " ~ audience if audience else "model " ~ retl_model) ~ " to " ~ s['destination'] ~ ", " ~ mode ~ ")", info=true) -%}
  {%- else -%}
    {%- if existing.rows[0]['model'] != retl_model or existing.rows[0]['audience'] != audience -%}
      {%- do pg_reverse_etl._fail(node, "sync " ~ s['name'] ~ " exists and reads "
            ~ ("audience " ~ existing.rows[0]['audience'] ~ " of " if existing.rows[0]['audience'] else "")
            ~ "model " ~ existing.rows[0]['model'] ~ ", not "
            ~ ("audience " ~ audience ~ " of " if audience else "") ~ "model " ~ retl_model
            ~ " (a sync cannot change what it reads: drop it with retl.drop_sync first)") -%}
    {%- endif -%}
    {#- One row of booleans: which settings differ from the config. -#}
    {%- set checks = [
          "s.destination is distinct from " ~ L(s['destination']) ~ " as destination",
          "s.mode is distinct from " ~ L(mode) ~ " as mode",
          "s.schedule is distinct from " ~ L(schedule) ~ " as schedule",
          "s.mappings is distinct from " ~ pg_reverse_etl._typed_literal(mappings, 'jsonb') ~ " as mappings",
          "coalesce((select array_agg(p.name::text order by p.name) from retl.sync_parents sp join retl.syncs p on p.id = sp.parent_id where sp.sync_id = s.id), '{}') is distinct from "
            ~ "coalesce((select array_agg(x order by x) from unnest(" ~ pg_reverse_etl._text_array(s.get('after') or []) ~ ") x), '{}') as after"] -%}
    {%- for k, type in settings.items() -%}
      {%- if s.get(k) is not none -%}
        {%- do checks.append("s." ~ k ~ " is distinct from " ~ pg_reverse_etl._typed_literal(s[k], type) ~ " as " ~ k) -%}
      {%- elif k in pg_reverse_etl._resettable() -%}
        {#- Left out of the config: back to the default if it is not. -#}
        {%- do checks.append("s." ~ k ~ " is distinct from " ~ {'max_delete_percent': '50::numeric', 'quota_share': '1::numeric', 'nulls': "'send'", 'alert_after_failures': '3'}.get(k, 'NULL') ~ " as " ~ k) -%}
      {%- endif -%}
    {%- endfor -%}
    {%- set diff = run_query("select " ~ checks | join(", ") ~ " from retl.syncs s where s.name = " ~ L(s['name'])).rows[0] -%}
    {%- set args = [] -%}
    {%- set reset = [] -%}
    {%- set changed = [] -%}
    {%- for col in ['destination', 'mode', 'schedule'] if diff[col] -%}
      {%- do args.append(col ~ " => " ~ L(s[col] if col == 'destination' else (mode if col == 'mode' else schedule))) -%}
      {%- do changed.append(col) -%}
    {%- endfor -%}
    {%- if diff['mappings'] -%}
      {%- do args.append("mappings => " ~ pg_reverse_etl._typed_literal(mappings, 'jsonb') if mappings is not none else "reset_mappings => true") -%}
      {%- do changed.append('mappings') -%}
    {%- endif -%}
    {%- if diff['after'] -%}
      {%- do args.append("after => " ~ pg_reverse_etl._text_array(s.get('after') or [])) -%}
      {%- do changed.append('after') -%}
    {%- endif -%}
    {%- for k, type in settings.items() if diff.get(k) -%}
      {%- if s.get(k) is not none -%}
        {%- do args.append(k ~ " => " ~ pg_reverse_etl._typed_literal(s[k], type)) -%}
      {%- else -%}
        {%- do reset.append(k) -%}
      {%- endif -%}
      {%- do changed.append(k) -%}
    {%- endfor -%}
    {%- if reset -%}
      {%- do args.append("reset => " ~ pg_reverse_etl._text_array(reset)) -%}
    {%- endif -%}
    {%- if args -%}
      {%- do run_query("select retl.alter_sync(name => " ~ L(s['name']) ~ ", " ~ args | join(", ") ~ ")") -%}
      {%- do log("pg_reverse_etl: altered sync " ~ s['name'] ~ ": " ~ changed | join(", "), info=true) -%}
    {%- endif -%}
  {%- endif -%}
{%- endmacro %}

{#- retl.run(wait => true): returns the finished run, or raises (38000 failed, 55000 cancelled,
    57014 not finished within the timeout), which fails the dbt model. -#}
{% macro _run_sync(name, timeout) -%}
  {%- set sql = "select id, status, planned_inserts, planned_updates, planned_deletes, delivered, failed, api_calls"
                ~ " from retl.run(sync => " ~ pg_reverse_etl._literal(name) ~ ", wait => true"
                ~ (", timeout => " ~ pg_reverse_etl._typed_literal(timeout, 'interval') if timeout else "") ~ ")" -%}
  {%- set r = run_query(sql).rows[0] -%}
  {%- do log("pg_reverse_etl: sync " ~ name ~ " run " ~ r['id'] ~ " " ~ r['status'] ~ ": "
             ~ r['planned_inserts'] ~ " inserts, " ~ r['planned_updates'] ~ " updates, " ~ r['planned_deletes'] ~ " deletes planned; "
             ~ r['delivered'] ~ " delivered, " ~ r['failed'] ~ " rejected, " ~ r['api_calls'] ~ " API calls", info=true) -%}
{%- endmacro %}

{#- dbt run-operation pg_reverse_etl.run_sync --args '{sync: crm_people}': one run, waited for. -#}
{% macro run_sync(sync, timeout=none) -%}
  {%- do pg_reverse_etl._run_sync(sync, timeout or var('retl_run_timeout', '30 minutes')) -%}
{%- endmacro %}
