{#- SQL literals for values that come from model configs, vars or the database: never
    concatenated as they are. Strings are quoted like Postgres's quote_literal() does
    (quotes doubled; with a backslash, an E'' literal with backslashes doubled, so the value
    is the same whatever standard_conforming_strings says). -#}

{% macro _literal(value) -%}
  {%- if value is none -%}
    NULL
  {%- else -%}
    {%- set text = value | string -%}
    {%- if '\\' in text -%}
      E'{{ text | replace("\\", "\\\\") | replace("'", "''") }}'
    {%- else -%}
      '{{ text | replace("'", "''") }}'
    {%- endif -%}
  {%- endif -%}
{%- endmacro %}

{#- A literal cast to `type`: booleans as true/false, everything else as text that Postgres
    parses (and refuses) as the type. -#}
{% macro _typed_literal(value, type) -%}
  {%- if value is none -%}
    NULL::{{ type }}
  {%- elif type == 'jsonb' -%}
    {{ pg_reverse_etl._literal(tojson(value)) }}::jsonb
  {%- elif type == 'text[]' -%}
    {{ pg_reverse_etl._text_array(value) }}
  {%- elif value is sameas true or value is sameas false -%}
    {{ 'true' if value else 'false' }}::{{ type }}
  {%- else -%}
    {{ pg_reverse_etl._literal(value) }}::{{ type }}
  {%- endif -%}
{%- endmacro %}

{% macro _text_array(values) -%}
  {%- if values is string -%}
    {%- set values = [values] -%}
  {%- endif -%}
  ARRAY[{%- for v in values -%}{{ pg_reverse_etl._literal(v) }}{{ ", " if not loop.last }}{%- endfor -%}]::text[]
{%- endmacro %}
