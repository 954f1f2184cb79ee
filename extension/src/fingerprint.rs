//! Fingerprints of version 4 (see `retl_engine::hash`): how each column of a model row goes
//! into one. The one-pass planner (one_pass.rs) fingerprints the rows it reads from its cursor;
//! `retl._fingerprint` does the same for SQL (plans of changed keys, previews), so both give
//! the same bytes for the same row.
//!
//! Field values go in by their bytes where the bytes determine what a payload shows (integers
//! of any width as 8 little-endian bytes, so widening a column sends nothing; numeric with its
//! display scale, so 1.0 against 1.00 is a change), and by their output text otherwise: enums
//! (a renamed label), intervals, arrays, composites, json and every other type. Bytes are
//! stricter than equality, never looser: a value that reads the same can at worst be sent
//! once more, a changed one is never missed. Key values go in by their text, tagged as a JSON
//! number or string, like the jsonb key the destination sees.

use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use retl_engine::hash::{decimal, fingerprint_seed, FingerprintInput, Part, FINGERPRINT_LEN};

/// How one column's values go into a fingerprint, decided once from its type.
enum How {
    /// int2, int4, int8 (typlen 2, 4, 8) as a field: 8 little-endian bytes.
    Integer(i16),
    /// The same as a key: decimal text, as `int8out` writes it.
    KeyInteger(i16),
    Bool,
    Date,
    Timestamp(Part),
    Float4,
    Float8,
    Uuid,
    /// A varlena's bytes after detoasting: text types, bytea, numeric, jsonb.
    Varlena(Part),
    /// The output function's text.
    Output(Part, Box<pg_sys::FmgrInfo>),
}

/// The output function of type `type_oid`, looked up once to be called on many values.
pub fn output_function(type_oid: pg_sys::Oid) -> Box<pg_sys::FmgrInfo> {
    let mut function = pg_sys::InvalidOid;
    let mut is_varlena = false;
    let mut finfo: Box<pg_sys::FmgrInfo> = Box::new(unsafe { std::mem::zeroed() });
    unsafe {
        pg_sys::getTypeOutputInfo(type_oid, &mut function, &mut is_varlena);
        pg_sys::fmgr_info(function, &mut *finfo);
    }
    finfo
}

fn output_of(type_oid: pg_sys::Oid, part: Part) -> How {
    How::Output(part, output_function(type_oid))
}

fn field_how(type_oid: pg_sys::Oid) -> How {
    let base = unsafe { pg_sys::getBaseType(type_oid) };
    match base {
        pg_sys::INT2OID => How::Integer(2),
        pg_sys::INT4OID => How::Integer(4),
        pg_sys::INT8OID => How::Integer(8),
        pg_sys::BOOLOID => How::Bool,
        pg_sys::DATEOID => How::Date,
        pg_sys::TIMESTAMPOID => How::Timestamp(Part::Timestamp),
        pg_sys::TIMESTAMPTZOID => How::Timestamp(Part::TimestampTz),
        pg_sys::FLOAT4OID => How::Float4,
        pg_sys::FLOAT8OID => How::Float8,
        pg_sys::UUIDOID => How::Uuid,
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => How::Varlena(Part::String),
        pg_sys::BYTEAOID => How::Varlena(Part::Bytea),
        pg_sys::NUMERICOID => How::Varlena(Part::Numeric),
        // jsonb's binary form has native-endian headers: on other machines it goes by its text.
        pg_sys::JSONBOID if cfg!(target_endian = "little") => How::Varlena(Part::Jsonb),
        _ => output_of(type_oid, Part::Text),
    }
}

fn key_how(type_oid: pg_sys::Oid) -> How {
    let base = unsafe { pg_sys::getBaseType(type_oid) };
    match base {
        pg_sys::INT2OID => How::KeyInteger(2),
        pg_sys::INT4OID => How::KeyInteger(4),
        pg_sys::INT8OID => How::KeyInteger(8),
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => How::Varlena(Part::KeyText),
        pg_sys::NUMERICOID | pg_sys::FLOAT4OID | pg_sys::FLOAT8OID => output_of(type_oid, Part::KeyNumber),
        _ => output_of(type_oid, Part::KeyText),
    }
}

/// Fingerprints rows of one shape: which attributes are the key, which the fields.
pub struct Fingerprinter {
    keys: Vec<(usize, How)>,
    fields: Vec<(usize, How)>,
    seed: u64,
    input: FingerprintInput,
}

impl Fingerprinter {
    /// For rows described by `tupdesc`: the key is attributes `key_attrs` (0-based), the
    /// fields `field_attrs`, named by `signature` (see plan.rs).
    pub fn new(tupdesc: &PgTupleDesc, key_attrs: &[usize], field_attrs: &[usize], signature: &str) -> Self {
        let type_of = |i: usize| tupdesc.get(i).map(|a| a.atttypid).unwrap_or(pg_sys::TEXTOID);
        Fingerprinter {
            keys: key_attrs.iter().map(|&i| (i, key_how(type_of(i)))).collect(),
            fields: field_attrs.iter().map(|&i| (i, field_how(type_of(i)))).collect(),
            seed: fingerprint_seed(signature),
            input: FingerprintInput::default(),
        }
    }

    /// The fingerprint of a deformed row, and whether a key column is NULL.
    ///
    /// # Safety
    /// `values` and `nulls` are a row of the shape given to [`Fingerprinter::new`].
    pub unsafe fn fingerprint(&mut self, values: &[pg_sys::Datum], nulls: &[bool]) -> ([u8; FINGERPRINT_LEN], bool) {
        self.input.clear();
        let mut key_is_null = false;
        for (i, how) in &self.keys {
            key_is_null |= nulls[*i];
            unsafe { push(&mut self.input, true, how, values[*i], nulls[*i]) };
        }
        for (i, how) in &self.fields {
            unsafe { push(&mut self.input, false, how, values[*i], nulls[*i]) };
        }
        (self.input.finish(self.seed), key_is_null)
    }
}

unsafe fn push(input: &mut FingerprintInput, is_key: bool, how: &How, value: pg_sys::Datum, null: bool) {
    let mut add = |part: Part, bytes: &[u8]| if is_key { input.key(part, bytes) } else { input.field(part, bytes) };
    if null {
        return add(Part::Null, b"");
    }
    let raw = value.value();
    match how {
        How::Integer(len) | How::KeyInteger(len) => {
            let n = match len {
                2 => raw as i16 as i64,
                4 => raw as i32 as i64,
                _ => raw as i64,
            };
            if matches!(how, How::KeyInteger(_)) {
                let mut digits = [0u8; 20];
                add(Part::KeyNumber, decimal(n, &mut digits));
            } else {
                add(Part::Integer, &n.to_le_bytes());
            }
        }
        How::Bool => add(Part::Bool, &[(raw != 0) as u8]),
        How::Date => add(Part::Date, &(raw as i32).to_le_bytes()),
        How::Timestamp(part) => add(*part, &(raw as i64).to_le_bytes()),
        How::Float4 => add(Part::Float4, &(raw as u32).to_le_bytes()),
        How::Float8 => add(Part::Float8, &(raw as u64).to_le_bytes()),
        How::Uuid => add(Part::Uuid, unsafe { std::slice::from_raw_parts(value.cast_mut_ptr::<u8>(), 16) }),
        How::Varlena(part) => unsafe {
            with_varlena_bytes(value, |bytes| {
                if *part == Part::Numeric && cfg!(target_endian = "big") {
                    // numeric is 16-bit units (header, weight, digits): hashed little-endian.
                    let swapped: Vec<u8> = bytes.chunks(2).flat_map(|c| c.iter().rev().copied()).collect();
                    add(*part, &swapped);
                } else {
                    add(*part, bytes);
                }
            })
        },
        How::Output(part, finfo) => {
            let text = unsafe { pg_sys::OutputFunctionCall(&**finfo as *const _ as *mut _, value) };
            add(*part, unsafe { std::ffi::CStr::from_ptr(text) }.to_bytes());
            unsafe { pg_sys::pfree(text.cast()) };
        }
    }
}

/// `f` over a varlena datum's bytes, detoasted if need be: a short inline value is read where
/// it is, and a copy made to detoast it is freed afterwards (so that reading millions of
/// values leaves nothing behind in the current memory context).
///
/// # Safety
/// `value` is a varlena datum.
pub unsafe fn with_varlena_bytes<R>(value: pg_sys::Datum, f: impl FnOnce(&[u8]) -> R) -> R {
    let original = value.cast_mut_ptr::<pg_sys::varlena>();
    // pg_detoast_datum_packed's test, made here: most values are inline and uncompressed, and
    // each call into Postgres sets up an error trap (a few percent of a plan, for a value).
    let toasted = unsafe { pgrx::varlena::varatt_is_4b_c(original) || pgrx::varlena::varatt_is_1b_e(original) };
    let detoasted = if toasted { unsafe { pg_sys::pg_detoast_datum_packed(original) } } else { original };
    let bytes = unsafe {
        std::slice::from_raw_parts(pgrx::varlena::vardata_any(detoasted) as *const u8, pgrx::varlena::varsize_any_exhdr(detoasted))
    };
    let out = f(bytes);
    if detoasted != original {
        unsafe { pg_sys::pfree(detoasted.cast()) };
    }
    out
}

/// The fingerprint (version 4) of a model row: `row` holds the key's `key_columns` values,
/// then the sync's fields; `signature` names them (plan.rs). Stable, not immutable: text forms
/// follow the session's output settings, which plans fix (plan::with_output_settings).
#[pg_extern(stable, strict, parallel_safe)]
fn _fingerprint(row: pgrx::AnyElement, key_columns: i32, signature: &str) -> Vec<u8> {
    unsafe {
        let header = pg_sys::pg_detoast_datum(row.datum().cast_mut_ptr()) as pg_sys::HeapTupleHeader;
        let tupdesc_ptr = pg_sys::lookup_rowtype_tupdesc(
            pgrx::heap_tuple_header_get_type_id(header),
            pgrx::heap_tuple_header_get_typmod(header),
        );
        // Released when dropped.
        let tupdesc = PgTupleDesc::from_pg(tupdesc_ptr);
        let natts = tupdesc.len();
        let keys = (key_columns.max(0) as usize).min(natts);
        let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
        tuple.t_len = pgrx::varlena::varsize(header as *const pg_sys::varlena) as u32;
        tuple.t_data = header;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(&mut tuple, tupdesc_ptr, values.as_mut_ptr(), nulls.as_mut_ptr());
        let key_attrs: Vec<usize> = (0..keys).collect();
        let field_attrs: Vec<usize> = (keys..natts).collect();
        let (fingerprint, _) = Fingerprinter::new(&tupdesc, &key_attrs, &field_attrs, signature).fingerprint(&values, &nulls);
        fingerprint.to_vec()
    }
}
