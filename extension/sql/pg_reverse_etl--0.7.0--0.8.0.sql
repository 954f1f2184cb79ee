-- pg_reverse_etl 0.7.0 -> 0.8.0: fingerprints (hash version 4). New syncs get them, and with
-- them the one-pass plan of a whole model (one_pass.rs): the snapshot's fingerprints are read
-- into memory and the model is streamed once, so that only new and changed rows are written.
-- Existing syncs keep the version their snapshot was hashed with, so nothing is sent again.
\echo Use "ALTER EXTENSION pg_reverse_etl UPDATE TO '0.8.0'" to load this file. \quit

ALTER TABLE retl.syncs DROP CONSTRAINT syncs_hash_version_check;
ALTER TABLE retl.syncs ADD CONSTRAINT syncs_hash_version_check CHECK (hash_version IN (1, 2, 3, 4));
ALTER TABLE retl.syncs ALTER COLUMN hash_version SET DEFAULT 4;

-- pg_reverse_etl::fingerprint::_fingerprint
CREATE FUNCTION retl."_fingerprint"(
	"row" anyelement, /* pgrx::datum::anyelement::AnyElement */
	"key_columns" INT, /* i32 */
	"signature" TEXT /* &str */
) RETURNS bytea /* alloc::vec::Vec<u8> */
STABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_fingerprint_wrapper';

-- An outbox row's sync is its run's: the run's foreign key is the one checked (a second check
-- per queued row cost a third of writing it).
ALTER TABLE retl.outbox DROP CONSTRAINT outbox_sync_id_fkey;

COMMENT ON TABLE retl.snapshots IS
  'Per sync, every key the destination acknowledged and a hash of the mapped fields it holds (with hash version 4, also of the key: its fingerprint); the next plan diffs the model against it.';
