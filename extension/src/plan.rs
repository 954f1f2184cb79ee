//! Plan: run the model as the sync owner, hash each row's mapped fields, diff against the
//! sync's snapshot with one set-based SQL statement, and queue the changes in the outbox —
//! all in the caller's transaction, so a refusal queues nothing.

use crate::errors::RetlError;
use crate::identity;
use crate::safeguards::{self, Allowed, Planned, Safeguards};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal, SpiClient};
use std::ffi::{CStr, CString};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Insert,
    Update,
    Upsert,
    Mirror,
    Delete,
}

impl Mode {
    fn parse(s: &str) -> Mode {
        match s {
            "insert" => Mode::Insert,
            "update" => Mode::Update,
            "upsert" => Mode::Upsert,
            "mirror" => Mode::Mirror,
            _ => Mode::Delete,
        }
    }

    /// Which diff rows this mode sends, and with which op.
    fn op_sql(self) -> (&'static str, &'static str) {
        match self {
            Mode::Insert => ("change = 'new'", "'insert'"),
            Mode::Update => ("change <> 'gone'", "'update'"),
            Mode::Upsert => ("change <> 'gone'", "'upsert'"),
            Mode::Mirror => ("true", "CASE WHEN change = 'gone' THEN 'delete' ELSE 'upsert' END"),
            // A tombstone model: every listed key not yet erased is deleted.
            Mode::Delete => ("change = 'new'", "'delete'"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SyncDef {
    pub id: i64,
    pub name: String,
    pub mode: Mode,
    pub source: String,
    pub primary_key: Vec<String>,
    /// (destination field, model column); None: every column under its own name.
    pub mappings: Option<Vec<(String, String)>>,
    pub owner: pg_sys::Oid,
    pub destination: String,
    pub paused: bool,
    /// This incarnation of the sync (idempotency keys are scoped by it).
    pub uid: String,
    /// How row hashes are computed (see `materialize_select`); kept per sync because its snapshot
    /// holds hashes of that kind.
    pub hash_version: i16,
    pub guards: Safeguards,
    /// The model's bytea columns: sent base64-encoded (JSON has no bytes). Known once the
    /// model's columns are read for a plan or preview ([`SyncDef::with_column_types`]).
    pub binary_columns: Vec<String>,
    /// The model's columns that hashes of version 3 take by their value; the others by their
    /// text (see [`hashed_by_value`]). Known with `binary_columns`.
    pub value_hashed_columns: Vec<String>,
}

impl SyncDef {
    /// This sync with what the types of `columns` (name -> type, as
    /// `safeguards::model_columns` reads them) decide noted: bytea columns, and the columns
    /// hashed by their value.
    fn with_column_types(&self, columns: &serde_json::Map<String, serde_json::Value>) -> SyncDef {
        let with_type = |keep: fn(&str) -> bool| {
            columns.iter().filter(|(_, ty)| keep(ty.as_str().unwrap_or(""))).map(|(col, _)| col.clone()).collect()
        };
        SyncDef {
            binary_columns: with_type(|ty| ty == "bytea"),
            value_hashed_columns: with_type(hashed_by_value),
            ..self.clone()
        }
    }
}

/// Whether hashes of version 3 take a column of this type (as `format_type` names it) by its
/// value: the type's own 64-bit hash, which is cheap. That is exact only where equal values
/// are written the same in a payload; the exceptions kept are numeric's trailing zeros (1.0
/// and 1.00: the same number) and float's -0. Any other type, such as interval ('1 day' equals
/// '24 hours'), citext, enums (a renamed label), json (no hash at all), arrays and composites,
/// is hashed by its text, and so are the text types themselves, under the "C" collation (under
/// a nondeterministic one, 'a' and 'A' would hash the same).
fn hashed_by_value(format_type: &str) -> bool {
    // Type modifiers do not matter: numeric(10,2), character varying(20), timestamp(3) with time zone.
    let mut name = String::with_capacity(format_type.len());
    let mut depth = 0;
    for c in format_type.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 => name.push(c),
            _ => {}
        }
    }
    matches!(
        name.as_str(),
        "smallint"
            | "integer"
            | "bigint"
            | "boolean"
            | "date"
            | "timestamp without time zone"
            | "timestamp with time zone"
            | "uuid"
            | "bytea"
            | "real"
            | "double precision"
            | "numeric"
            | "jsonb"
    )
}

const SYNC_COLUMNS: &str = "s.id, s.name, s.mode, coalesce(a.name, m.name), m.primary_key, \
     s.mappings::text, s.owner::oid, s.destination, s.paused, s.uid::text, s.hash_version, \
     s.max_rows, s.max_delete_percent::float8, s.max_delete_rows, s.quota_share::float8, s.nulls = 'keep' \
     FROM retl.syncs s JOIN retl.models m ON m.id = s.model_id \
     LEFT JOIN retl.audiences a ON a.id = s.audience_id";

pub fn load_sync_by_id(client: &SpiClient, id: i64) -> Option<SyncDef> {
    let sql = format!("SELECT {SYNC_COLUMNS} WHERE s.id = $1");
    load_sync(client, &sql, &[id.into()])
}

pub fn load_sync_by_name(client: &SpiClient, name: &str) -> Option<SyncDef> {
    let sql = format!("SELECT {SYNC_COLUMNS} WHERE s.name = $1");
    load_sync(client, &sql, &[name.into()])
}

fn load_sync(client: &SpiClient, sql: &str, args: &[pgrx::datum::DatumWithOid]) -> Option<SyncDef> {
    let table = client.select(sql, Some(1), args).unwrap_or_else(|e| error!("{e}"));
    let row = table.into_iter().next()?;
    let get_text = |i: usize| row.get::<String>(i).ok().flatten().unwrap_or_default();
    let mappings = row.get::<String>(6).ok().flatten().map(|text| retl_engine::mapping::parse_mappings(&text));
    Some(SyncDef {
        id: row.get::<i64>(1).ok().flatten().unwrap_or_default(),
        name: get_text(2),
        mode: Mode::parse(&get_text(3)),
        source: get_text(4),
        primary_key: row.get::<Vec<String>>(5).ok().flatten().unwrap_or_default(),
        mappings,
        owner: row.get::<pg_sys::Oid>(7).ok().flatten().unwrap_or(pg_sys::InvalidOid),
        destination: get_text(8),
        paused: row.get::<bool>(9).ok().flatten().unwrap_or(false),
        uid: get_text(10),
        hash_version: row.get::<i16>(11).ok().flatten().unwrap_or(1),
        guards: Safeguards {
            max_rows: row.get::<i64>(12).ok().flatten(),
            max_delete_percent: row.get::<f64>(13).ok().flatten(),
            max_delete_rows: row.get::<i64>(14).ok().flatten(),
            quota_share: row.get::<f64>(15).ok().flatten().unwrap_or(1.0),
            keep_nulls_out: row.get::<bool>(16).ok().flatten().unwrap_or(false),
        },
        binary_columns: Vec::new(),
        value_hashed_columns: Vec::new(),
    })
}

/// The sync a run belongs to; an error once the run is gone (its sync was dropped).
pub fn sync_id_of_run(client: &SpiClient, run_id: i64) -> Result<i64, String> {
    client
        .select("SELECT sync_id FROM retl.runs WHERE id = $1", Some(1), &[run_id.into()])
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .and_then(|row| row.get::<i64>(1).ok().flatten())
        .ok_or_else(|| format!("run {run_id} was deleted (its sync was dropped)"))
}

/// The schema contract: every mapped column must still be in the model. Returns the model's
/// columns.
fn check_columns(client: &SpiClient, sync: &SyncDef) -> Result<Vec<String>, RetlError> {
    let columns: Vec<String> = client
        .select("SELECT retl._model_columns($1)", Some(1), &[sync.source.as_str().into()])
        .and_then(|t| t.first().get_one::<Vec<String>>())
        .unwrap_or_else(|e| error!("{e}"))
        .unwrap_or_default();
    let wanted = sync
        .primary_key
        .iter()
        .chain(sync.mappings.iter().flatten().map(|(_, col)| col));
    for col in wanted {
        if !columns.contains(col) {
            return Err(RetlError::MissingColumn {
                column: col.clone(),
                model: sync.source.clone(),
                columns: columns.join(", "),
            });
        }
    }
    Ok(columns)
}

/// `jsonb_build_object('field', <prefix>column, ...)` (chunked), bytea columns base64-encoded.
fn build_object_from(sync: &SyncDef, pairs: &[(String, String)], prefix: &str) -> String {
    retl_engine::mapping::build_object_sql(pairs, "", |s| quote_literal(s), |col| column_value(sync, prefix, col))
}

fn build_object(sync: &SyncDef, pairs: &[(String, String)]) -> String {
    build_object_from(sync, pairs, "m.")
}

/// The settings payloads and row hashes are computed under, whatever the session's: intervals
/// in ISO 8601 (`P1Y2M3DT4H5M6.5S`), dates in ISO, floats in their shortest exact form. These
/// only change how values are written, never how a model's query reads its input. The time
/// zone is the server's (what workers run with), so a preview in a session with another
/// TimeZone shows what a run sends, and `current_date` in a model means the same in both.
const OUTPUT_SETTINGS: &[(&CStr, &CStr)] = &[
    (c"IntervalStyle", c"iso_8601"),
    // The output style only: the input order (MDY, DMY, YMD) a model's literals use is kept.
    (c"DateStyle", c"ISO"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
];

/// Runs `f` under [`OUTPUT_SETTINGS`] and the server's TimeZone, restoring the caller's
/// settings afterwards.
pub fn with_output_settings<R>(f: impl FnOnce() -> R) -> R {
    let time_zone = server_setting(c"TimeZone");
    let settings: Vec<(&CStr, &CStr)> =
        OUTPUT_SETTINGS.iter().copied().chain(time_zone.as_deref().map(|tz| (c"TimeZone", tz))).collect();
    with_settings(&settings, f)
}

/// Runs `f`, which plans a model's query, as the sync's owner; in a worker, also with `jit` as
/// the server has it (the worker's session turns it off for its own statements, see worker.rs;
/// a model is the user's query, planned as a session of theirs would plan it).
pub fn as_model_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let jit = if unsafe { pg_sys::IsBackgroundWorker } { server_setting(c"jit") } else { None };
    let settings: Vec<(&CStr, &CStr)> = jit.as_deref().map(|jit| (c"jit", jit)).into_iter().collect();
    with_settings(&settings, || identity::as_role(owner, f))
}

/// A setting's value as the server has it (its reset value, whatever this session set).
fn server_setting(name: &CStr) -> Option<CString> {
    let value = unsafe { pg_sys::GetConfigOptionResetString(name.as_ptr()) };
    (!value.is_null()).then(|| unsafe { CStr::from_ptr(value) }.to_owned())
}

/// Runs `f` with `settings` in force, restoring the caller's afterwards (an error restores
/// them with the transaction's abort).
fn with_settings<R>(settings: &[(&CStr, &CStr)], f: impl FnOnce() -> R) -> R {
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    for (name, value) in settings {
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
    }
    let out = f();
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    out
}

/// A model column as it goes into a payload: its value, or for bytea its base64 text (without
/// the line breaks `encode` puts every 76 characters).
fn column_value(sync: &SyncDef, prefix: &str, col: &str) -> String {
    let value = format!("{prefix}{}", quote_identifier(col));
    if sync.binary_columns.iter().any(|c| c == col) {
        format!("translate(encode({value}, 'base64'), E'\\n', '')")
    } else {
        value
    }
}

/// The whole model row `row` as a payload (`to_jsonb`), bytea columns base64-encoded.
fn whole_row_payload(sync: &SyncDef, row: &str, prefix: &str) -> String {
    if sync.binary_columns.is_empty() {
        return format!("to_jsonb({row})");
    }
    let binary: Vec<(String, String)> = sync.binary_columns.iter().map(|c| (c.clone(), c.clone())).collect();
    format!("(to_jsonb({row}) || {})", build_object_from(sync, &binary, prefix))
}

/// Hashes of version 3 hash the mapped values (see [`value_hash_sql`]); those of version 2
/// (syncs created before 0.6.0) the mapped values' row text, prefixed by the field names (so a
/// renamed destination field or model column changes them). Both are cheaper than building
/// every row's jsonb payload, which these versions build for changed rows only, so the plan
/// carries the model row. Version 1 (syncs created before 0.2.0) hashes the jsonb payload's
/// text. Delete mode hashes the key in all of them.
fn carries_model_row(sync: &SyncDef) -> bool {
    sync.hash_version >= 2 && sync.mode != Mode::Delete
}

/// The record key (`{"col": value, ...}` over the primary key) and "some key column is NULL",
/// as SQL over the model row `m`.
fn key_sql(sync: &SyncDef) -> (String, String) {
    (key_object_sql(sync, "m."), key_null_sql(sync))
}

/// The record key over the model columns written `<prefix>column`.
fn key_object_sql(sync: &SyncDef, prefix: &str) -> String {
    let pairs: Vec<(String, String)> = sync.primary_key.iter().map(|k| (k.clone(), k.clone())).collect();
    retl_engine::mapping::build_object_sql(&pairs, prefix, |s| quote_literal(s), |s| quote_identifier(s))
}

/// The record key and the payload as SQL over the model columns written `<prefix>column`
/// (`whole_row`: the model row, for syncs without mappings), and what the FROM list needs for
/// them: nothing, or a LATERAL subquery (see [`named_row_payload_sql`]).
pub(crate) fn key_and_payload_sql(sync: &SyncDef, prefix: &str, whole_row: &str) -> (String, String, String) {
    let (payload, lateral) = match &sync.mappings {
        None => (whole_row_payload(sync, whole_row, prefix), String::new()),
        Some(pairs) => named_row_payload_sql(sync, pairs, prefix)
            .unwrap_or_else(|| (build_object_from(sync, pairs, prefix), String::new())),
    };
    (key_object_sql(sync, prefix), payload, lateral)
}

/// The alias of the row [`named_row_payload_sql`] names after the destination fields.
const PAYLOAD_ROW: &str = "retl_payload_row";

/// Fields a payload row may have: a select list takes at most 1664 entries.
const MAX_PAYLOAD_ROW_FIELDS: usize = 1600;

/// A mapped payload as `to_jsonb` of a row whose columns are named after the destination
/// fields: a LATERAL subquery to append to the FROM list, and the payload over it. Both
/// `to_jsonb` of a row and `jsonb_build_object` turn each value into jsonb the same way (by
/// its type, through the same conversion), so the payloads are the same; but
/// `jsonb_build_object` looks every argument's type up again on every row (by hand, 100k rows
/// of 11 fields on Postgres 15: 7.6 to 11.5 µs a row, against 5.5 to 9 µs this way; medians
/// 9.1 and 6.3 µs). None when some field cannot name a column (empty, or longer than a
/// Postgres name, which would be cut) or there are too many: then `jsonb_build_object` builds
/// it.
fn named_row_payload_sql(sync: &SyncDef, pairs: &[(String, String)], prefix: &str) -> Option<(String, String)> {
    let nameable = |field: &str| !field.is_empty() && field.len() < pg_sys::NAMEDATALEN as usize;
    if pairs.is_empty() || pairs.len() > MAX_PAYLOAD_ROW_FIELDS || !pairs.iter().all(|(field, _)| nameable(field)) {
        return None;
    }
    let columns = pairs
        .iter()
        .map(|(field, col)| format!("{} AS {}", column_value(sync, prefix, col), quote_identifier(field)))
        .collect::<Vec<_>>()
        .join(", ");
    // `.*`: a bare alias would name a model column of that name, if there were one.
    Some((format!("to_jsonb({PAYLOAD_ROW}.*)"), format!(" CROSS JOIN LATERAL (SELECT {columns}) AS {PAYLOAD_ROW}")))
}

fn key_null_sql(sync: &SyncDef) -> String {
    sync.primary_key
        .iter()
        .map(|k| format!("m.{} IS NULL", quote_identifier(k)))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// Which model rows a plan diffs against the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole model.
    Model,
    /// Only these keys (a jsonb array of key objects): the keys commits touched since the
    /// last plan, for a model that is a plain projection of one table (see key_source.rs).
    Keys(String),
}

impl Scope {
    pub fn name(&self) -> &'static str {
        match self {
            Scope::Model => "model",
            Scope::Keys(_) => "changed keys",
        }
    }
}

/// `WHERE`: the model row's key is in the jsonb array $1. The comparison is on the key columns
/// typed as the model has them, so the table's index on those columns finds the rows.
fn keys_filter(sync: &SyncDef) -> String {
    let columns = |prefix: &str| {
        sync.primary_key.iter().map(|k| format!("{prefix}{}", quote_identifier(k))).collect::<Vec<_>>().join(", ")
    };
    format!(
        " WHERE ({}) IN (SELECT {} FROM jsonb_array_elements($1::jsonb) e, \
                          jsonb_populate_record(NULL::retl_models.{}, e.value) p)",
        columns("m."),
        columns("p."),
        quote_identifier(&sync.source)
    )
}

/// The SELECT that materialises the model rows passing `filter` (SQL after `FROM ... m`):
/// (key, key_is_null, payload, hash, r), where versions 2 and 3 keep the model row `r` and
/// leave `payload` to the diff.
fn materialize_select(sync: &SyncDef, columns: &[String], filter: &str) -> String {
    if !carries_model_row(sync) {
        return materialize_v1_select(sync, filter);
    }
    let (key, key_null) = key_sql(sync);
    let hash = match sync.hash_version {
        4.. => fingerprint_sql(sync, columns),
        3 => value_hash_sql(sync, columns),
        _ => row_text_hash_sql(sync, columns),
    };
    format!(
        "SELECT {key} AS key, ({key_null}) AS key_is_null, NULL::jsonb AS payload, {hash} AS hash, m AS r \
           FROM retl_models.{source} m{filter}",
        source = quote_identifier(&sync.source),
    )
}

/// A hash of version 2: blake3 of the mapped values' row text, prefixed by the field names.
fn row_text_hash_sql(sync: &SyncDef, columns: &[String]) -> String {
    // bytea goes out base64-encoded since 0.6.0: rows with bytea delivered before (as hex
    // text) hash differently, so they are sent once more in the new form.
    let binary = if sync.binary_columns.is_empty() { "" } else { "b64" };
    let (signature, row) = match &sync.mappings {
        None => (format!("v2{binary}:{}|", columns.join(",")), "m".to_string()),
        Some(pairs) => (
            format!(
                "v2{binary}:{}|",
                pairs.iter().map(|(field, col)| format!("{field}={col}")).collect::<Vec<_>>().join(",")
            ),
            format!(
                "ROW({})",
                pairs.iter().map(|(_, col)| format!("m.{}", quote_identifier(col))).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    format!("retl._row_hash({} || ({row})::text)", quote_literal(&signature))
}

/// A hash of version 3: the 64-bit hash Postgres computes for a record (each field by its
/// type's hash function) of the mapped values, as 8 bytes. The fields are typed values, or
/// their text where the value would hide a change (see [`hashed_by_value`]); the seed is a hash
/// of the field names, so that a renamed destination field or model column changes them.
/// Compared with version 2 this skips rendering every row as text, about a third of a plan's
/// time on the benchmark's model.
fn value_hash_sql(sync: &SyncDef, columns: &[String]) -> String {
    let (hashed, signature): (Vec<&String>, String) = match &sync.mappings {
        None => (columns.iter().collect(), format!("v3:{}", columns.join(","))),
        Some(pairs) => (
            pairs.iter().map(|(_, col)| col).collect(),
            format!("v3:{}", pairs.iter().map(|(field, col)| format!("{field}={col}")).collect::<Vec<_>>().join(",")),
        ),
    };
    let fields = hashed
        .iter()
        .map(|col| {
            let value = format!("m.{}", quote_identifier(col));
            if sync.value_hashed_columns.contains(col) {
                value
            } else {
                format!("({value})::text COLLATE \"C\"")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("int8send(hash_record_extended(ROW({fields}), hashtextextended({}, 0)))", quote_literal(&signature))
}

/// The model columns a fingerprint (version 4) hashes as fields, and their signature: the
/// field names, which seed the hash (see [`value_hash_sql`]).
pub(crate) fn fingerprint_fields(sync: &SyncDef, columns: &[String]) -> (Vec<String>, String) {
    match &sync.mappings {
        None => (columns.to_vec(), format!("v4:{}", columns.join(","))),
        Some(pairs) => (
            pairs.iter().map(|(_, col)| col.clone()).collect(),
            format!("v4:{}", pairs.iter().map(|(field, col)| format!("{field}={col}")).collect::<Vec<_>>().join(",")),
        ),
    }
}

/// A fingerprint (version 4, fingerprint.rs) in SQL: the same bytes the one-pass plan
/// computes in Rust, for plans of changed keys and previews.
fn fingerprint_sql(sync: &SyncDef, columns: &[String]) -> String {
    let (fields, signature) = fingerprint_fields(sync, columns);
    let values = sync
        .primary_key
        .iter()
        .chain(&fields)
        .map(|col| format!("m.{}", quote_identifier(col)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("retl._fingerprint(ROW({values}), {}, {})", sync.primary_key.len(), quote_literal(&signature))
}

fn materialize_v1_select(sync: &SyncDef, filter: &str) -> String {
    let (key, key_null) = key_sql(sync);
    let payload = match (&sync.mode, &sync.mappings) {
        (Mode::Delete, _) => "NULL::jsonb".to_string(),
        (_, None) => whole_row_payload(sync, "m.*", "m."),
        (_, Some(pairs)) => build_object(sync, pairs),
    };
    // The hash covers what the destination holds: the payload, or in delete mode the key.
    let hashed = if sync.mode == Mode::Delete { "key" } else { "payload" };
    format!(
        "SELECT key, key_is_null, payload, retl._row_hash({hashed}::text) AS hash \
           FROM (SELECT {key} AS key, ({key_null}) AS key_is_null, {payload} AS payload \
                   FROM retl_models.{source} m{filter}) p",
        source = quote_identifier(&sync.source),
    )
}

/// The diff of pg_temp.retl_plan against the snapshot of sync $1, restricted to what the
/// mode sends: (change, op, key, payload, hash).
///
/// With `Scope::Keys` ($3) only the snapshot rows of those keys and of the materialised rows
/// take part: a key absent from both the model and the snapshot is no change.
fn diff_sql(sync: &SyncDef, scope: &Scope) -> String {
    let (filter, op) = sync.mode.op_sql();
    let snapshot = match scope {
        Scope::Model => "SELECT key, hash FROM retl.snapshots WHERE sync_id = $1",
        // One primary-key probe per key (OFFSET 0 keeps the planner from turning this into a
        // join, which stale statistics of a freshly loaded snapshot make a scan of all of it).
        Scope::Keys(_) => {
            "SELECT sn.key, sn.hash \
               FROM (SELECT e.value AS key FROM jsonb_array_elements($3::jsonb) e \
                     UNION SELECT key FROM pg_temp.retl_plan) k, \
                    LATERAL (SELECT key, hash FROM retl.snapshots \
                              WHERE sync_id = $1 AND key = k.key OFFSET 0) sn"
        }
    };
    // Version 2 carries the model row and builds payloads here, for the changed rows only;
    // version 1 carries the payload it built for every row.
    let (carried, payload) = if carries_model_row(sync) {
        let built = match &sync.mappings {
            None => whole_row_payload(sync, "d.r", "(d.r)."),
            Some(pairs) => build_object_from(sync, pairs, "(d.r)."),
        };
        ("r", format!("CASE WHEN change = 'gone' THEN NULL ELSE {built} END"))
    } else {
        ("payload", "d.payload".to_string())
    };
    format!(
        "WITH m AS (SELECT key, {carried}, hash FROM pg_temp.retl_plan), \
              s AS ({snapshot}), \
              d AS (SELECT CASE WHEN s.key IS NULL THEN 'new' WHEN m.key IS NULL THEN 'gone' ELSE 'changed' END AS change, \
                           coalesce(m.key, s.key) AS key, m.{carried}, coalesce(m.hash, s.hash) AS hash \
                      FROM m FULL JOIN s ON m.key = s.key \
                     WHERE m.key IS NULL OR s.key IS NULL OR m.hash <> s.hash) \
         SELECT change, {op} AS op, key, {payload} AS payload, hash FROM d WHERE {filter}"
    )
}

/// Drop this session's plan table if there is one (`DROP TABLE IF EXISTS` would print a
/// NOTICE in sessions that have no temporary schema yet).
fn drop_plan_table(client: &mut SpiClient) -> Result<(), pgrx::spi::SpiError> {
    let exists = client
        .select("SELECT to_regclass('pg_temp.retl_plan') IS NOT NULL", Some(1), &[])?
        .first()
        .get_one::<bool>()?
        .unwrap_or(false);
    if exists {
        client.update("DROP TABLE pg_temp.retl_plan", None, &[])?;
    }
    Ok(())
}

/// Materialise the model (the rows in `scope`) as the sync owner and refuse NULL or duplicate
/// keys. Restricted to some keys, the check still sees every row carrying one of them.
fn materialize(client: &mut SpiClient, sync: &SyncDef, scope: &Scope) -> Result<i64, RetlError> {
    let columns = check_columns(client, sync)?;
    let materialized = as_model_owner(sync.owner, || {
        drop_plan_table(client)?;
        let filled = match scope {
            Scope::Model => {
                let select = materialize_select(sync, &columns, "");
                client.update(&format!("CREATE TEMP TABLE retl_plan ON COMMIT DROP AS {select}"), None, &[])?
            }
            Scope::Keys(keys) => {
                // CREATE TABLE AS takes no parameters: create it empty, then fill it.
                let select = materialize_select(sync, &columns, &keys_filter(sync));
                client.update(
                    &format!("CREATE TEMP TABLE retl_plan ON COMMIT DROP AS {} WITH NO DATA", materialize_select(sync, &columns, "")),
                    None,
                    &[],
                )?;
                client.update(&format!("INSERT INTO pg_temp.retl_plan {select}"), None, &[keys.as_str().into()])?
            }
        };
        Ok::<_, pgrx::spi::SpiError>(filled.len() as i64)
    })
    .unwrap_or_else(|e| error!("{e}"));
    // The proof costs catalog lookups (about 2 ms): worth it for a whole model, not for the few
    // rows of the changed keys, which the check below counts in no time.
    if *scope == Scope::Model && key_is_unique(client, sync) {
        return Ok(materialized);
    }

    // One pass: rows, NULL keys, and duplicate keys (how many, the worst, how often).
    let stats = client
        .select(
            "SELECT sum(n)::bigint, (sum(n) FILTER (WHERE key_is_null))::bigint, count(*) FILTER (WHERE n > 1), \
                    (array_agg(key::text ORDER BY n DESC, key) FILTER (WHERE n > 1))[1], max(n) \
               FROM (SELECT key, bool_or(key_is_null) AS key_is_null, count(*) AS n \
                       FROM pg_temp.retl_plan GROUP BY key) k",
            Some(1),
            &[],
        )
        .unwrap_or_else(|e| error!("{e}"));
    let row = stats.first();
    let rows = row.get::<i64>(1).unwrap_or_else(|e| error!("{e}")).unwrap_or(0);
    let null_keys = row.get::<i64>(2).unwrap_or_else(|e| error!("{e}")).unwrap_or(0);
    if null_keys > 0 {
        return Err(RetlError::NullKeys {
            model: sync.source.clone(),
            count: null_keys,
            columns: sync.primary_key.join(", "),
        });
    }
    let duplicates = row.get::<i64>(3).unwrap_or_else(|e| error!("{e}")).unwrap_or(0);
    if duplicates > 0 {
        return Err(RetlError::DuplicateKeys {
            model: sync.source.clone(),
            count: duplicates,
            example: row.get::<String>(4).unwrap_or_else(|e| error!("{e}")).unwrap_or_default(),
            times: row.get::<i64>(5).unwrap_or_else(|e| error!("{e}")).unwrap_or(0),
        });
    }
    Ok(rows)
}

/// Whether the model's key is unique and never NULL by construction, so that the plan need not
/// check: the model is a plain projection of one table (see key_source.rs), whose key columns
/// are NOT NULL and include all columns of a unique index (immediate, not partial, on columns).
/// Such a projection has one row per table row, and the index allows no two of those with the
/// same key. The check costs about a quarter of a plan of a million rows.
fn key_is_unique(client: &SpiClient, sync: &SyncDef) -> bool {
    client
        .select(
            "SELECT EXISTS (SELECT FROM retl._key_source(format('retl_models.%I', $1::text)::regclass, $2) k \
                             WHERE EXISTS (SELECT FROM pg_index i \
                                            WHERE i.indrelid = k.relid AND i.indisunique AND i.indimmediate AND i.indisvalid \
                                              AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indkey::int2[] <@ k.attnums) \
                               AND NOT EXISTS (SELECT FROM pg_attribute a \
                                                WHERE a.attrelid = k.relid AND a.attnum = ANY (k.attnums) AND NOT a.attnotnull))",
            Some(1),
            &[sync.source.as_str().into(), sync.primary_key.clone().into()],
        )
        .and_then(|t| t.first().get_one::<bool>())
        .unwrap_or_else(|e| error!("{e}"))
        .unwrap_or(false)
}

pub struct PlanSummary {
    /// None when only changed keys were planned.
    pub rows_in_model: Option<i64>,
    pub scope: &'static str,
    pub inserts: i64,
    pub updates: i64,
    pub deletes: i64,
}

impl PlanSummary {
    pub fn total(&self) -> i64 {
        self.inserts + self.updates + self.deletes
    }
}

/// A plan that did not queue anything: why, and (for a safeguard's refusal) what it would
/// have queued.
pub struct PlanFailure {
    pub error: RetlError,
    pub summary: Option<PlanSummary>,
}

impl From<RetlError> for PlanFailure {
    fn from(error: RetlError) -> Self {
        PlanFailure { error, summary: None }
    }
}

/// What started a run and which safeguards it may pass.
struct RunInfo {
    trigger: String,
    allowed: Allowed,
}

fn run_info(client: &SpiClient, run_id: i64) -> RunInfo {
    let table = client
        .select(
            "SELECT trigger, allow_mass_delete, allow_schema_change FROM retl.runs WHERE id = $1",
            Some(1),
            &[run_id.into()],
        )
        .unwrap_or_else(|e| error!("{e}"));
    let row = table.first();
    RunInfo {
        trigger: row.get::<String>(1).ok().flatten().unwrap_or_default(),
        allowed: Allowed {
            mass_delete: row.get::<bool>(2).ok().flatten().unwrap_or(false),
            schema_change: row.get::<bool>(3).ok().flatten().unwrap_or(false),
        },
    }
}

/// Plan run `run_id` of `sync` into the outbox (inside the caller's transaction). On an error
/// the caller rolls the transaction back: nothing stays queued.
pub fn plan_run(client: &mut SpiClient, sync: &SyncDef, run_id: i64) -> Result<PlanSummary, PlanFailure> {
    let run = run_info(client, run_id);
    // The policy of the destination, the model's tags or the policy may have changed.
    safeguards::check_policy(client, sync)?;
    let columns = safeguards::model_columns(client, sync);
    safeguards::check_schema(client, sync, &columns, run.allowed)?;
    let sync = &sync.with_column_types(&columns);
    let scope = match run.trigger.as_str() {
        "retry" => failed_keys(client, sync),
        trigger => take_changed_keys(client, sync, trigger == "change"),
    };
    let (rows_in_model, (new, changed, gone)) = match plan_in_one_pass(client, sync, &scope, run_id)? {
        Some(planned) => planned,
        None => {
            let rows = materialize(client, sync, &scope)?;
            clear_outbox(client, sync);
            ((scope == Scope::Model).then_some(rows), queue_diff(client, sync, &scope, run_id))
        }
    };
    // In delete mode every planned row is a deletion.
    let summary = if sync.mode == Mode::Delete {
        PlanSummary { rows_in_model, scope: scope.name(), inserts: 0, updates: 0, deletes: new }
    } else {
        PlanSummary { rows_in_model, scope: scope.name(), inserts: new, updates: changed, deletes: gone }
    };
    let planned = Planned { rows_in_model, total: summary.total(), deletes: summary.deletes };
    if let Err(error) = safeguards::check_plan(client, sync, &sync.guards, &planned, run.allowed) {
        return Err(PlanFailure { error, summary: Some(summary) });
    }
    // The columns this plan read: the schema contract of later runs once this one succeeds.
    client
        .update(
            "UPDATE retl.runs SET model_columns = $2::jsonb WHERE id = $1",
            None,
            &[run_id.into(), serde_json::Value::Object(columns).to_string().into()],
        )
        .unwrap_or_else(|e| error!("{e}"));
    identity::as_role(sync.owner, || drop_plan_table(client)).unwrap_or_else(|e| error!("{e}"));
    Ok(summary)
}

/// Leftovers of an earlier failed run are superseded: a plan is computed afresh.
fn clear_outbox(client: &mut SpiClient, sync: &SyncDef) {
    client
        .update("DELETE FROM retl.outbox WHERE sync_id = $1", None, &[sync.id.into()])
        .unwrap_or_else(|e| error!("{e}"));
}

/// The one-pass plan (one_pass.rs) of a whole model, where it applies: the rows in the model
/// and the (new, changed, gone) rows it queued. None: the SQL plan is to be made instead (a
/// plan of some keys, an older hash version, or a NULL or duplicate key for it to report).
fn plan_in_one_pass(
    client: &mut SpiClient,
    sync: &SyncDef,
    scope: &Scope,
    run_id: i64,
) -> Result<Option<(Option<i64>, (i64, i64, i64))>, RetlError> {
    if *scope != Scope::Model || !crate::one_pass::applies(sync) {
        return Ok(None);
    }
    let columns = check_columns(client, sync)?;
    clear_outbox(client, sync);
    Ok(match crate::one_pass::plan(client, sync, &columns, run_id) {
        crate::one_pass::Outcome::Planned { rows_in_model, new, changed, gone } => Some((Some(rows_in_model), (new, changed, gone))),
        crate::one_pass::Outcome::KeyProblem => None,
    })
}

/// Queue the diff of pg_temp.retl_plan against the snapshot (the SQL plan): (new, changed,
/// gone) rows queued.
fn queue_diff(client: &mut SpiClient, sync: &SyncDef, scope: &Scope, run_id: i64) -> (i64, i64, i64) {
    // nulls => 'keep': the fields that are NULL are left out, so the destination keeps its value.
    let sql = format!(
        "WITH diff AS ({diff}), \
              queued AS (INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash) \
                         SELECT $1, $2, op, key, CASE WHEN $4 THEN retl._without_nulls(payload) ELSE payload END, hash \
                           FROM diff RETURNING 1) \
         SELECT count(*) FILTER (WHERE change = 'new'), \
                count(*) FILTER (WHERE change = 'changed'), \
                count(*) FILTER (WHERE change = 'gone') \
           FROM diff",
        diff = diff_sql(sync, scope)
    );
    let keys = match scope {
        Scope::Model => None,
        Scope::Keys(keys) => Some(keys.as_str()),
    };
    let (new, changed, gone) = client
        .update(
            sql.as_str(),
            None,
            &[sync.id.into(), run_id.into(), keys.into(), sync.guards.keep_nulls_out.into()],
        )
        .and_then(|t| t.first().get_three::<i64, i64, i64>())
        .unwrap_or_else(|e| error!("{e}"));
    let (new, changed, gone) = (new.unwrap_or(0), changed.unwrap_or(0), gone.unwrap_or(0));
    (new, changed, gone)
}

/// A retry (retl.retry_failed) plans only the keys the destination rejected, with those still
/// queued; the change log is left for the next on-change run.
fn failed_keys(client: &mut SpiClient, sync: &SyncDef) -> Scope {
    let keys = client
        .select(
            "SELECT coalesce(jsonb_agg(DISTINCT key), '[]')::text \
               FROM (SELECT key FROM retl.row_errors WHERE sync_id = $1 \
                     UNION ALL SELECT key FROM retl.outbox WHERE sync_id = $1) k",
            Some(1),
            &[sync.id.into()],
        )
        .and_then(|t| t.first().get_one::<String>())
        .unwrap_or_else(|e| error!("{e}"))
        .unwrap_or_else(|| "[]".into());
    Scope::Keys(keys)
}

/// The scope of a run's plan. Every plan takes the sync's change log; a run caused by a change
/// plans only the logged keys when the log allows it (retl._take_changed_keys).
fn take_changed_keys(client: &mut SpiClient, sync: &SyncDef, caused_by_change: bool) -> Scope {
    let keys = client
        .update(
            "SELECT retl._take_changed_keys($1, $2, $3, $4)::text",
            Some(1),
            &[sync.id.into(), sync.source.as_str().into(), sync.primary_key.clone().into(), caused_by_change.into()],
        )
        .and_then(|t| t.first().get_one::<String>())
        .unwrap_or_else(|e| error!("{e}"));
    keys.map_or(Scope::Model, Scope::Keys)
}

/// What the next run would queue, for `retl.preview`. Only the sync's owner may look.
pub fn preview(sync_name: &str) -> Result<Vec<(String, serde_json::Value, Option<serde_json::Value>)>, RetlError> {
    Spi::connect_mut(|client| {
        // Looked up with the extension owner's rights (row-level security would hide another
        // user's sync): someone else's sync is "must be owner", as everywhere else.
        let extension_owner = identity::extension_owner(client);
        let Some(sync) = identity::as_role(extension_owner, || load_sync_by_name(client, sync_name)) else {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("sync \"{sync_name}\" does not exist"),
                "pg_reverse_etl",
            )
            .report(PgLogLevel::ERROR);
            unreachable!()
        };
        client
            .select("SELECT retl._check_owner('sync', $1, $2::regrole)", None, &[sync.name.as_str().into(), sync.owner.into()])
            .unwrap_or_else(|e| error!("{e}"));
        // Hashes and payloads as a run computes them, whatever this session's settings.
        let table = with_output_settings(|| -> Result<_, RetlError> {
            let sync = sync.with_column_types(&safeguards::model_columns(client, &sync));
            materialize(client, &sync, &Scope::Model)?;
            let sql = format!("SELECT op, key::text, payload::text FROM ({}) p ORDER BY key", diff_sql(&sync, &Scope::Model));
            // The snapshot is not readable by users: diff with the extension owner's rights.
            Ok(identity::as_role(extension_owner, || client.select(sql.as_str(), None, &[sync.id.into()]))
                .unwrap_or_else(|e| error!("{e}")))
        })?;
        let parse = |s: String| serde_json::from_str(&s).unwrap_or(serde_json::Value::Null);
        let rows = table
            .into_iter()
            .map(|row| {
                let op = row.get::<String>(1).ok().flatten().unwrap_or_default();
                let key = row.get::<String>(2).ok().flatten().map(parse).unwrap_or_default();
                let payload = row.get::<String>(3).ok().flatten().map(parse);
                (op, key, payload)
            })
            .collect();
        identity::as_role(sync.owner, || drop_plan_table(client)).unwrap_or_else(|e| error!("{e}"));
        Ok(rows)
    })
}
