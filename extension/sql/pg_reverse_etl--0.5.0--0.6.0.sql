-- pg_reverse_etl 0.5.0 -> 0.6.0: row hashes of version 3 (the record hash of the mapped
-- values, not their text: plans take about a third less time). New syncs get it; existing
-- syncs keep the version their snapshot was hashed with, so nothing is sent again.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.6.0'" to load this file. \quit

ALTER TABLE retl.syncs DROP CONSTRAINT syncs_hash_version_check;
ALTER TABLE retl.syncs ADD CONSTRAINT syncs_hash_version_check CHECK (hash_version IN (1, 2, 3));
-- Postgres 13 has no record hash (hash_record_extended came with 14): new syncs there get 2.
ALTER TABLE retl.syncs ALTER COLUMN hash_version
    SET DEFAULT (CASE WHEN current_setting('server_version_num')::int >= 140000 THEN 3 ELSE 2 END);
