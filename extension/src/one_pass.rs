//! The one-pass plan of a whole model, for syncs whose snapshot holds fingerprints (hash
//! version 4, see fingerprint.rs).
//!
//! The SQL plan (plan.rs) materialises the model with every row's jsonb key and hash into a
//! temporary table, checks its keys with a GROUP BY, and diffs it against the snapshot with a
//! FULL JOIN on the jsonb key: on a million rows, about nine times what materialising the model
//! alone costs. This plan reads the snapshot's fingerprints into memory (24 bytes a row), then
//! streams the model from a cursor once, fingerprints each row, and looks it up: unchanged rows
//! cost a hash and a probe, and only new and changed rows are written, in batches, to the
//! outbox, with keys and payloads the worker builds (jsonb_rows.rs), or SQL when some column's
//! type is not one the worker builds. The key check comes for free: a key
//! seen twice, or NULL, hands the plan back to the SQL plan, which reports it exactly as it
//! always has.

use crate::fingerprint::{with_varlena_bytes, Fingerprinter};
use crate::jsonb_rows::ObjectBuilder;
use crate::plan::{self, Mode, SyncDef};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, SpiClient};
use pgrx::{PgMemoryContexts, PgTupleDesc};
use retl_engine::hash::{split_fingerprint, FingerprintIndex, FINGERPRINT_LEN};
use std::ffi::CString;

/// Rows fetched from the model's cursor at a time.
const FETCH_ROWS: i64 = 10_000;
/// New or changed rows written to the outbox per statement.
const FLUSH_ROWS: usize = 5_000;
/// ... or fewer, once they hold this many bytes.
const FLUSH_BYTES: usize = 32 << 20;
/// How many rows ahead of its probe a row's snapshot entry is prefetched: enough for the
/// memory to answer while the rows in between are probed.
const PREFETCH_AHEAD: usize = 16;
/// Snapshot fingerprints passed per statement when gone rows are queued for deletion.
const GONE_PER_STATEMENT: usize = 10_000;

pub enum Outcome {
    Planned { rows_in_model: i64, new: i64, changed: i64, gone: i64 },
    /// A NULL or duplicate key: the SQL plan finds and reports it.
    KeyProblem,
}

/// Whether this plan can take `sync`: fingerprints, and a mode that diffs rows (a delete-mode
/// sync's model is a list of keys, planned by SQL).
pub fn applies(sync: &SyncDef) -> bool {
    sync.hash_version >= 4 && sync.mode != Mode::Delete
}

/// Read the fingerprints of sync `sync_id`'s snapshot (with the current user's rights: the
/// worker's). Each is read in place, without a copy: a palloc'd copy per row would stay in the
/// plan's memory until its end (480 MB for 10M rows).
fn load_snapshot(sync: &SyncDef) -> FingerprintIndex {
    let mut chunks: Vec<Vec<[u64; 3]>> = Vec::new();
    let mut chunk: Vec<[u64; 3]> = Vec::with_capacity(FETCH_ROWS as usize);
    let query = "SELECT hash FROM retl.snapshots WHERE sync_id = $1";
    let mut bad = false;
    for_each_row(query, &[sync.id.into()], |values, nulls| {
        let parsed = (!nulls[0]).then(|| unsafe { with_varlena_bytes(values[0], split_fingerprint) }).flatten();
        match parsed {
            Some((key, fields)) => chunk.push(FingerprintIndex::entry(key, fields)),
            None => bad = true,
        }
        if chunk.len() == chunk.capacity() {
            chunks.push(std::mem::replace(&mut chunk, Vec::with_capacity(FETCH_ROWS as usize)));
        }
    });
    chunks.push(chunk);
    if bad {
        error!("the snapshot of sync \"{}\" holds a hash that is not a fingerprint of version 4", sync.name);
    }
    FingerprintIndex::from_chunks(chunks)
}

/// Runs `query` as the current user and calls `row` with each row's values. On Postgres 14
/// and later the rows go straight from the executor's slots to `row` (a DestReceiver of
/// SPI_execute_extended): no copy of each row into SPI's tuple table and no deforming of it
/// again, which were two thirds of reading a million fingerprints.
#[cfg(not(feature = "pg13"))]
fn for_each_row(query: &str, args: &[DatumWithOid], mut row: impl FnMut(&[pg_sys::Datum], &[bool])) {
    #[repr(C)]
    struct RowReceiver {
        /// First: Postgres sees a DestReceiver.
        receiver: pg_sys::DestReceiver,
        /// A `&mut &mut dyn FnMut(&[Datum], &[bool])`.
        row: *mut std::ffi::c_void,
    }
    #[pg_guard]
    unsafe extern "C-unwind" fn receive_slot(slot: *mut pg_sys::TupleTableSlot, receiver: *mut pg_sys::DestReceiver) -> bool {
        unsafe {
            pg_sys::slot_getallattrs(slot);
            let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
            let (values, nulls): (&[pg_sys::Datum], &[bool]) = if natts == 0 {
                (&[], &[])
            } else {
                (std::slice::from_raw_parts((*slot).tts_values, natts), std::slice::from_raw_parts((*slot).tts_isnull, natts))
            };
            let row = &mut *((*receiver.cast::<RowReceiver>()).row as *mut &mut dyn FnMut(&[pg_sys::Datum], &[bool]));
            row(values, nulls);
        }
        true
    }
    // (Empty: nothing in them can fail.)
    unsafe extern "C-unwind" fn startup(_: *mut pg_sys::DestReceiver, _: std::ffi::c_int, _: pg_sys::TupleDesc) {}
    unsafe extern "C-unwind" fn nothing(_: *mut pg_sys::DestReceiver) {}

    let mut row: &mut dyn FnMut(&[pg_sys::Datum], &[bool]) = &mut row;
    let mut receiver = RowReceiver {
        receiver: pg_sys::DestReceiver {
            receiveSlot: Some(receive_slot),
            rStartup: Some(startup),
            rShutdown: Some(nothing),
            rDestroy: Some(nothing),
            mydest: pg_sys::CommandDest::DestNone,
        },
        row: (&mut row as *mut &mut dyn FnMut(&[pg_sys::Datum], &[bool])).cast(),
    };
    let query = CString::new(query).expect("no NUL in generated SQL");
    unsafe {
        let params = pg_sys::makeParamList(args.len() as i32);
        for (param, arg) in (*params).params.as_mut_slice(args.len()).iter_mut().zip(args) {
            *param = pg_sys::ParamExternData {
                value: arg.datum().map(|d| d.sans_lifetime()).unwrap_or(pg_sys::Datum::from(0usize)),
                isnull: arg.datum().is_none(),
                pflags: pg_sys::PARAM_FLAG_CONST as u16,
                ptype: arg.oid(),
            };
        }
        let options = pg_sys::SPIExecuteOptions {
            params,
            read_only: false,
            allow_nonatomic: false,
            must_return_tuples: true,
            tcount: 0,
            dest: &mut receiver.receiver,
            owner: std::ptr::null_mut(),
        };
        let status = pg_sys::SPI_execute_extended(query.as_ptr(), &options);
        if status < 0 {
            error!("SPI_execute_extended failed ({status}) on: {}", query.to_string_lossy());
        }
        pg_sys::pfree(params.cast());
    }
}

/// Runs `query` through a cursor, as the current user, and calls `row` with each row's values
/// (Postgres 13, whose SPI cannot hand rows to a DestReceiver).
#[cfg(feature = "pg13")]
fn for_each_row(query: &str, args: &[DatumWithOid], mut row: impl FnMut(&[pg_sys::Datum], &[bool])) {
    let mut deformer = Deformer::default();
    for_each_batch(query, args, None, |tupdesc, tuples| {
        for &tuple in tuples {
            let (values, nulls) = unsafe { deformer.deform(tuple, tupdesc) };
            row(values, nulls);
        }
    });
}

/// A tuple's values, in buffers reused from row to row.
#[derive(Default)]
struct Deformer {
    datums: Vec<pg_sys::Datum>,
    isnull: Vec<bool>,
}

impl Deformer {
    /// # Safety
    /// `tuple` must be a valid tuple of `tupdesc`.
    unsafe fn deform(&mut self, tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> (&[pg_sys::Datum], &[bool]) {
        let natts = unsafe { (*tupdesc).natts } as usize;
        self.datums.resize(natts, pg_sys::Datum::from(0usize));
        self.isnull.resize(natts, false);
        unsafe { pg_sys::heap_deform_tuple(tuple, tupdesc, self.datums.as_mut_ptr(), self.isnull.as_mut_ptr()) };
        (&self.datums, &self.isnull)
    }
}

/// Runs `query` through a cursor and calls `batch` with each fetch's tuple descriptor and
/// tuples (valid until it returns). With `model_owner`, the query is a model's: planned and
/// run as that role (plan::as_model_owner); without, as the current user.
fn for_each_batch(
    query: &str,
    args: &[DatumWithOid],
    model_owner: Option<pg_sys::Oid>,
    mut batch: impl FnMut(pg_sys::TupleDesc, &[pg_sys::HeapTuple]),
) {
    let as_owner = |f: &mut dyn FnMut()| match model_owner {
        None => f(),
        Some(owner) => plan::as_model_owner(owner, || f()),
    };
    let query = CString::new(query).expect("no NUL in generated SQL");
    let mut types: Vec<pg_sys::Oid> = args.iter().map(|a| a.oid()).collect();
    let mut values: Vec<pg_sys::Datum> =
        args.iter().map(|a| a.datum().map(|d| d.sans_lifetime()).unwrap_or(pg_sys::Datum::from(0usize))).collect();
    let nulls: Vec<std::ffi::c_char> = args.iter().map(|a| if a.datum().is_some() { b' ' } else { b'n' } as std::ffi::c_char).collect();
    let mut portal: pg_sys::Portal = std::ptr::null_mut();
    as_owner(&mut || unsafe {
        portal = pg_sys::SPI_cursor_open_with_args(
            std::ptr::null(),
            query.as_ptr(),
            types.len() as i32,
            types.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            false,
            0,
        );
    });
    loop {
        as_owner(&mut || unsafe { pg_sys::SPI_cursor_fetch(portal, true, FETCH_ROWS as _) });
        let (table, count) = unsafe { (pg_sys::SPI_tuptable, pg_sys::SPI_processed as usize) };
        if count == 0 {
            if !table.is_null() {
                unsafe { pg_sys::SPI_freetuptable(table) };
            }
            break;
        }
        unsafe {
            batch((*table).tupdesc, std::slice::from_raw_parts((*table).vals, count));
            pg_sys::SPI_freetuptable(table);
        }
    }
    unsafe { pg_sys::SPI_cursor_close(portal) };
}

/// New or changed rows waiting to be written to the outbox (in their own memory context, reset
/// once they are written), with their fingerprints: their keys and payloads as jsonb, or the
/// rows themselves as composite values of the model's row type for SQL to build them from.
struct Pending {
    rows: Vec<pg_sys::Datum>,
    keys: Vec<pg_sys::Datum>,
    payloads: Vec<pg_sys::Datum>,
    fingerprints: Vec<Vec<u8>>,
    bytes: usize,
    memory: PgMemoryContexts,
    /// A row's values, reused from row to row.
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

impl Pending {
    fn new(name: &str) -> Self {
        Pending {
            rows: Vec::new(),
            keys: Vec::new(),
            payloads: Vec::new(),
            fingerprints: Vec::new(),
            bytes: 0,
            memory: PgMemoryContexts::new(name),
            values: Vec::new(),
            nulls: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.fingerprints.len()
    }
}

/// Who builds the outbox rows' keys and payloads.
enum Build {
    /// The worker, from each row's values (jsonb_rows.rs): the model's columns are all of
    /// types it builds.
    InWorker { key: ObjectBuilder, payload: ObjectBuilder },
    /// SQL, from the rows passed as an array of the model's row type.
    InSql { row_type: pg_sys::Oid, array_type: pg_sys::Oid },
}

/// What a flush needs: the statement, who builds keys and payloads, and the model's row
/// descriptor.
struct Writer {
    sql: String,
    build: Build,
    row_desc: PgTupleDesc<'static>,
}

impl Writer {
    fn new(client: &SpiClient, sync: &SyncDef, columns: &[String]) -> Writer {
        let row_type = client
            .select(
                "SELECT reltype FROM pg_catalog.pg_class WHERE oid = format('retl_models.%I', $1::text)::regclass",
                Some(1),
                &[sync.source.as_str().into()],
            )
            .and_then(|t| t.first().get_one::<pg_sys::Oid>())
            .unwrap_or_else(|e| error!("{e}"))
            .unwrap_or_else(|| error!("the view of model \"{}\" has no row type", sync.source));
        let row_desc = unsafe { PgTupleDesc::from_pg(pg_sys::lookup_rowtype_tupdesc(row_type, -1)) };
        if let Some((key, payload)) = worker_builders(sync, columns, &row_desc) {
            let sql = "INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash) \
                       SELECT $1, $2, $3, u.key, CASE WHEN $6 THEN retl._without_nulls(u.payload) ELSE u.payload END, u.fingerprint \
                         FROM unnest($4::jsonb[], $7::jsonb[], $5::bytea[]) AS u(key, payload, fingerprint)"
                .to_string();
            return Writer { sql, build: Build::InWorker { key, payload }, row_desc };
        }
        let array_type = unsafe { pg_sys::get_array_type(row_type) };
        // The fingerprints' column, named apart from the model's columns.
        let mut fingerprint = "retl_fingerprint".to_string();
        while columns.contains(&fingerprint) {
            fingerprint.push('_');
        }
        let aliases = columns.iter().chain([&fingerprint]).map(|c| quote_identifier(c)).collect::<Vec<_>>().join(", ");
        let whole_row = format!(
            "ROW({})::retl_models.{}",
            columns.iter().map(|c| format!("u.{}", quote_identifier(c))).collect::<Vec<_>>().join(", "),
            quote_identifier(&sync.source)
        );
        let (key, payload, lateral) = plan::key_and_payload_sql(sync, "u.", &whole_row);
        let sql = format!(
            "INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash) \
             SELECT $1, $2, $3, key, CASE WHEN $6 THEN retl._without_nulls(payload) ELSE payload END, fingerprint \
               FROM (SELECT {key} AS key, {payload} AS payload, u.{fingerprint} AS fingerprint \
                       FROM unnest($4::retl_models.{source}[], $5::bytea[]) AS u({aliases}){lateral}) p",
            fingerprint = quote_identifier(&fingerprint),
            source = quote_identifier(&sync.source),
        );
        Writer { sql, build: Build::InSql { row_type, array_type }, row_desc }
    }

    /// Keep `tuple` (a row of the model's cursor) for the outbox.
    fn keep(&self, pending: &mut Pending, tuple: pg_sys::HeapTuple, fingerprint: &[u8]) {
        let desc = self.row_desc.as_ptr();
        match &self.build {
            Build::InWorker { key, payload } => {
                let width = self.row_desc.len();
                pending.values.resize(width, pg_sys::Datum::from(0usize));
                pending.nulls.resize(width, true);
                let (values, nulls) = (&mut pending.values, &mut pending.nulls);
                let (keys, payloads) = (&mut pending.keys, &mut pending.payloads);
                unsafe {
                    pending.memory.switch_to(|_| {
                        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
                        keys.push(key.build(values, nulls));
                        payloads.push(payload.build(values, nulls));
                    })
                };
            }
            Build::InSql { .. } => {
                // Flattened (TOASTed values inlined) and stamped with the model's row type.
                let row = unsafe { pending.memory.switch_to(|_| pg_sys::heap_copy_tuple_as_datum(tuple, desc)) };
                pending.rows.push(row);
            }
        }
        pending.fingerprints.push(fingerprint.to_vec());
        pending.bytes += unsafe { (*tuple).t_len } as usize;
    }

    /// Keep `tuple` for the outbox as `op`, and write the batch once it is full.
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &self,
        client: &mut SpiClient,
        sync: &SyncDef,
        run_id: i64,
        op: &str,
        pending: &mut Pending,
        tuple: pg_sys::HeapTuple,
        fingerprint: &[u8],
    ) {
        self.keep(pending, tuple, fingerprint);
        if pending.len() >= FLUSH_ROWS || pending.bytes >= FLUSH_BYTES {
            self.flush(client, sync, run_id, op, pending);
        }
    }

    fn flush(&self, client: &mut SpiClient, sync: &SyncDef, run_id: i64, op: &str, pending: &mut Pending) {
        if pending.len() == 0 {
            return;
        }
        // Built in the batch's memory, reset below (in SPI's it would stay until the plan ends).
        let fingerprints = std::mem::take(&mut pending.fingerprints);
        let fingerprints = unsafe { pending.memory.switch_to(|_| fingerprints.into_datum()) };
        // $4: the rows' keys (and $7 their payloads), or the rows.
        let (rows_or_keys, payloads) = match &self.build {
            Build::InWorker { .. } => {
                let (keys, payloads) = (&mut pending.keys, &mut pending.payloads);
                let jsonb_array = |values: &mut Vec<pg_sys::Datum>| unsafe {
                    varlena_array(values, pg_sys::JSONBOID, pg_sys::TYPALIGN_INT, pg_sys::JSONBARRAYOID)
                };
                unsafe { pending.memory.switch_to(|_| (jsonb_array(keys), Some(jsonb_array(payloads)))) }
            }
            Build::InSql { row_type, array_type } => {
                let rows = &mut pending.rows;
                // Composite values are aligned as doubles.
                let array =
                    unsafe { pending.memory.switch_to(|_| varlena_array(rows, *row_type, pg_sys::TYPALIGN_DOUBLE, *array_type)) };
                (array, None)
            }
        };
        let mut args = vec![
            sync.id.into(),
            run_id.into(),
            op.into(),
            rows_or_keys,
            unsafe { DatumWithOid::new(fingerprints, pg_sys::BYTEAARRAYOID) },
            sync.guards.keep_nulls_out.into(),
        ];
        args.extend(payloads);
        client.update(&self.sql, None, &args).unwrap_or_else(|e| error!("{e}"));
        pending.rows.clear();
        pending.keys.clear();
        pending.payloads.clear();
        pending.bytes = 0;
        unsafe { pending.memory.reset() };
    }
}

/// Builders of the rows' keys and payloads, when every column they take is of a type
/// jsonb_rows builds (bytea columns, sent as base64, are not).
fn worker_builders(sync: &SyncDef, columns: &[String], desc: &PgTupleDesc) -> Option<(ObjectBuilder, ObjectBuilder)> {
    let attr = |name: &String| columns.iter().position(|c| c == name);
    let key_fields = sync.primary_key.iter().map(|k| Some((k.clone(), attr(k)?))).collect::<Option<Vec<_>>>()?;
    let payload_fields = match &sync.mappings {
        Some(pairs) => pairs.iter().map(|(field, column)| Some((field.clone(), attr(column)?))).collect::<Option<Vec<_>>>()?,
        None => columns.iter().enumerate().map(|(i, column)| (column.clone(), i)).collect(),
    };
    Some((ObjectBuilder::new(desc, &key_fields)?, ObjectBuilder::new(desc, &payload_fields)?))
}

/// An array of type `array_type` of `values` (varlena datums of `element_type`, aligned as
/// `align`), in the current memory context.
///
/// # Safety
/// Every value must be a valid datum of `element_type`, and `array_type` its array type.
unsafe fn varlena_array(values: &mut [pg_sys::Datum], element_type: pg_sys::Oid, align: u8, array_type: pg_sys::Oid) -> DatumWithOid<'static> {
    unsafe {
        let array = pg_sys::construct_array(values.as_mut_ptr(), values.len() as i32, element_type, -1, false, align as std::ffi::c_char);
        DatumWithOid::new(pg_sys::Datum::from(array), array_type)
    }
}

/// Plan run `run_id` of `sync` over its whole model into the outbox (which the caller has
/// emptied of this sync's rows), returning what it queued.
pub fn plan(client: &mut SpiClient, sync: &SyncDef, columns: &[String], run_id: i64) -> Outcome {
    let mut snapshot = load_snapshot(sync);
    let writer = Writer::new(client, sync, columns);
    let (new_op, changed_op) = match sync.mode {
        Mode::Insert => (Some("insert"), None),
        Mode::Update => (Some("update"), Some("update")),
        Mode::Upsert => (Some("upsert"), Some("upsert")),
        Mode::Mirror => (Some("upsert"), Some("upsert")),
        Mode::Delete => unreachable!("delete-mode syncs take the SQL plan"),
    };
    let (fields, signature) = plan::fingerprint_fields(sync, columns);
    let attr = |name: &String| columns.iter().position(|c| c == name).expect("checked by check_columns");
    let key_attrs: Vec<usize> = sync.primary_key.iter().map(attr).collect();
    let field_attrs: Vec<usize> = fields.iter().map(attr).collect();
    let mut fingerprinter = Fingerprinter::new(&writer.row_desc, &key_attrs, &field_attrs, &signature);

    let (mut rows, mut new, mut changed) = (0i64, 0i64, 0i64);
    let mut new_keys: Vec<u128> = Vec::new();
    let mut key_problem = false;
    let (mut pending_new, mut pending_changed) = (Pending::new("retl one-pass new rows"), Pending::new("retl one-pass changed rows"));
    let query = format!("SELECT m.* FROM retl_models.{} m", quote_identifier(&sync.source));
    let mut deformer = Deformer::default();
    let mut fingerprints: Vec<([u8; FINGERPRINT_LEN], bool)> = Vec::with_capacity(FETCH_ROWS as usize);
    for_each_batch(&query, &[], Some(sync.owner), |tupdesc, tuples| {
        if key_problem {
            return;
        }
        // Fingerprints first, then the probes, each prefetching the entry of the row
        // PREFETCH_AHEAD rows on (see FingerprintIndex::prefetch), and the bucket offsets
        // that prefetch reads twice as far on.
        fingerprints.clear();
        fingerprints.extend(tuples.iter().map(|&tuple| unsafe {
            let (values, nulls) = deformer.deform(tuple, tupdesc);
            fingerprinter.fingerprint(values, nulls)
        }));
        for (i, (&tuple, (fingerprint, key_is_null))) in tuples.iter().zip(&fingerprints).enumerate() {
            if let Some((ahead, _)) = fingerprints.get(i + 2 * PREFETCH_AHEAD) {
                snapshot.prefetch_bucket(split_fingerprint(ahead).expect("24 bytes").0);
            }
            if let Some((ahead, _)) = fingerprints.get(i + PREFETCH_AHEAD) {
                snapshot.prefetch(split_fingerprint(ahead).expect("24 bytes").0);
            }
            rows += 1;
            if *key_is_null {
                key_problem = true;
                return;
            }
            let (key, fields) = split_fingerprint(fingerprint).expect("24 bytes");
            match snapshot.find(key) {
                Some(i) if snapshot.is_seen(i) => {
                    key_problem = true;
                    return;
                }
                Some(i) => {
                    snapshot.set_seen(i);
                    if snapshot.fields(i) != fields {
                        if let Some(op) = changed_op {
                            changed += 1;
                            writer.queue(client, sync, run_id, op, &mut pending_changed, tuple, fingerprint);
                        }
                    }
                }
                None => {
                    new_keys.push(key);
                    if let Some(op) = new_op {
                        new += 1;
                        writer.queue(client, sync, run_id, op, &mut pending_new, tuple, fingerprint);
                    }
                }
            }
        }
    });
    new_keys.sort_unstable();
    if key_problem || new_keys.windows(2).any(|w| w[0] == w[1]) {
        return Outcome::KeyProblem;
    }
    if let Some(op) = new_op {
        writer.flush(client, sync, run_id, op, &mut pending_new);
    }
    if let Some(op) = changed_op {
        writer.flush(client, sync, run_id, op, &mut pending_changed);
    }
    let mut gone = 0i64;
    if sync.mode == Mode::Mirror {
        let unseen: Vec<Vec<u8>> = snapshot.unseen().map(|i| snapshot.fingerprint(i).to_vec()).collect();
        for chunk in unseen.chunks(GONE_PER_STATEMENT) {
            let queued = client
                .update(
                    "INSERT INTO retl.outbox (sync_id, run_id, op, key, payload, hash) \
                     SELECT $1, $2, 'delete', key, NULL, hash FROM retl.snapshots \
                      WHERE sync_id = $1 AND hash = ANY ($3::bytea[])",
                    None,
                    &[sync.id.into(), run_id.into(), chunk.to_vec().into()],
                )
                .unwrap_or_else(|e| error!("{e}"));
            gone += queued.len() as i64;
        }
    }
    Outcome::Planned { rows_in_model: rows, new, changed, gone }
}
