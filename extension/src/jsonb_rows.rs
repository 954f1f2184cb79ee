//! A model row's key or payload as jsonb, built in the worker from the row's values instead of
//! by `to_jsonb` / `jsonb_build_object` in SQL, with the same result to the byte.
//!
//! Why: a plan that queues many rows spent most of its outbox write in SQL building them. For
//! each value of each row, `to_jsonb` looks its type up again (domain, output function, array,
//! composite, cast to json), and the rows went to SQL as an array of composite values to be
//! unpacked. Here the types are looked up once per plan, and the conversion is Postgres' own:
//! the type's output function, `numeric_in`, `JsonEncodeDateTime`, `pushJsonbValue` (which
//! sorts the keys as jsonb does) and `JsonbValueToJsonb`.
//!
//! Only columns of common built-in types (or domains over them) are built here, each exactly
//! as `to_jsonb` converts its category (Postgres 15's `datum_to_jsonb`):
//! - boolean: a JSON boolean;
//! - smallint, integer, bigint, real, double precision, numeric: the output function's text
//!   read back by `numeric_in` as a JSON number, or that text as a string when it is NaN or
//!   an infinity (it has an `N` or `n` in it). The same numbers without the text, where that
//!   is exact: an integer by its cast to numeric, and a numeric (not NaN or an infinity) as it
//!   is, `numeric_in` of `numeric_out`'s text being the value it printed, to the byte;
//! - date, timestamp, timestamptz: `JsonEncodeDateTime` (ISO 8601, whatever DateStyle);
//! - text, varchar, char(n), uuid, interval: the output function's text, as a string.
//!
//! Any other type (arrays, composites, json, jsonb, enums, bytea, ...) and the caller builds
//! the whole object in SQL as before.

use crate::fingerprint::output_function;
use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use std::ffi::{c_char, c_int, CStr};

// Called without pgrx's per-call error trap, many times inside one (see `build`): each trap is
// a sigsetjmp, and four calls per value made them a sizeable part of the work.
unsafe extern "C-unwind" {
    #[link_name = "pushJsonbValue"]
    fn push_jsonb_value(
        state: *mut *mut pg_sys::JsonbParseState,
        token: pg_sys::JsonbIteratorToken::Type,
        value: *mut pg_sys::JsonbValue,
    ) -> *mut pg_sys::JsonbValue;
    #[link_name = "JsonbValueToJsonb"]
    fn jsonb_value_to_jsonb(value: *mut pg_sys::JsonbValue) -> *mut pg_sys::Jsonb;
    #[link_name = "OutputFunctionCall"]
    fn output_function_call(function: *mut pg_sys::FmgrInfo, value: pg_sys::Datum) -> *mut c_char;
    #[link_name = "DirectFunctionCall3Coll"]
    fn direct_function_call3(
        function: pg_sys::PGFunction,
        collation: pg_sys::Oid,
        a: pg_sys::Datum,
        b: pg_sys::Datum,
        c: pg_sys::Datum,
    ) -> pg_sys::Datum;
    #[link_name = "numeric_in"]
    fn numeric_in(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
    #[link_name = "JsonEncodeDateTime"]
    fn json_encode_date_time(buf: *mut c_char, value: pg_sys::Datum, type_oid: pg_sys::Oid, tzp: *const c_int) -> *mut c_char;
    #[link_name = "pg_detoast_datum_packed"]
    fn detoast_packed(datum: *mut pg_sys::varlena) -> *mut pg_sys::varlena;
    #[link_name = "pg_detoast_datum"]
    fn detoast(datum: *mut pg_sys::varlena) -> *mut pg_sys::varlena;
    #[link_name = "DirectFunctionCall1Coll"]
    fn direct_function_call1(function: pg_sys::PGFunction, collation: pg_sys::Oid, a: pg_sys::Datum) -> pg_sys::Datum;
    #[link_name = "int2_numeric"]
    fn int2_numeric(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
    #[link_name = "int4_numeric"]
    fn int4_numeric(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
    #[link_name = "int8_numeric"]
    fn int8_numeric(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
}

/// How one column's values become jsonb values, decided once from its type.
enum Convert {
    Bool,
    /// A float: the output function's text, read back as a numeric (its shortest text is not
    /// what its cast to numeric gives).
    Float(Box<pg_sys::FmgrInfo>),
    /// An integer, by its cast to numeric (`int8_numeric` and the like): what `numeric_in`
    /// makes of its text, without the text.
    Integer(pg_sys::PGFunction),
    /// A numeric as it is, or, when it is NaN or an infinity, by its output function's text.
    Numeric(Box<pg_sys::FmgrInfo>),
    /// A text type's characters.
    Text,
    /// `JsonEncodeDateTime` of a date, timestamp or timestamptz.
    DateTime(pg_sys::Oid),
    /// The output function's text, as a string.
    Output(Box<pg_sys::FmgrInfo>),
}

/// The conversion for a column of type `type_oid`, if it is one built here.
fn convert_for(type_oid: pg_sys::Oid) -> Option<Convert> {
    // to_jsonb looks through domains the same way.
    let base = unsafe { pg_sys::getBaseType(type_oid) };
    Some(match base {
        pg_sys::BOOLOID => Convert::Bool,
        pg_sys::INT2OID => Convert::Integer(Some(int2_numeric)),
        pg_sys::INT4OID => Convert::Integer(Some(int4_numeric)),
        pg_sys::INT8OID => Convert::Integer(Some(int8_numeric)),
        pg_sys::NUMERICOID => Convert::Numeric(output_function(base)),
        pg_sys::FLOAT4OID | pg_sys::FLOAT8OID => Convert::Float(output_function(base)),
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Convert::Text,
        pg_sys::DATEOID | pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => Convert::DateTime(base),
        pg_sys::UUIDOID | pg_sys::INTERVALOID => Convert::Output(output_function(base)),
        _ => return None,
    })
}

struct Field {
    name: Vec<u8>,
    /// The column's position in the row.
    attr: usize,
    convert: Convert,
}

/// Builds the jsonb object `{name: value, ...}` of fixed fields from a row's values.
pub struct ObjectBuilder {
    fields: Vec<Field>,
    /// The row's width: every field's `attr` is below it.
    width: usize,
}

impl ObjectBuilder {
    /// A builder of the object whose fields are `fields` (name, column position in rows of
    /// `desc`), or None when some column's type is not one built here.
    pub fn new(desc: &PgTupleDesc, fields: &[(String, usize)]) -> Option<ObjectBuilder> {
        let mut fields = fields
            .iter()
            .map(|(name, attr)| {
                let attribute = desc.get(*attr)?;
                Some(Field { name: name.as_bytes().to_vec(), attr: *attr, convert: convert_for(attribute.atttypid)? })
            })
            .collect::<Option<Vec<Field>>>()?;
        // In jsonb's order of keys (shorter first, then bytewise): jsonb sorts every object's
        // keys, and its sort finds keys already in order at once.
        fields.sort_by(|a, b| (a.name.len(), &a.name).cmp(&(b.name.len(), &b.name)));
        Some(ObjectBuilder { fields, width: desc.len() })
    }

    /// The object for a row's `values` and `nulls` (a row of the descriptor given to `new`),
    /// as a jsonb datum allocated, like everything it uses, in the current memory context.
    ///
    /// # Safety
    /// `values` and `nulls` must be a deformed row of that descriptor.
    pub unsafe fn build(&self, values: &[pg_sys::Datum], nulls: &[bool]) -> pg_sys::Datum {
        assert!(values.len() >= self.width && nulls.len() >= self.width, "a row of the builder's descriptor");
        let mut string_too_long = false;
        // One error trap for the whole object. Nothing in the closure owns anything to drop, and
        // nothing in it can panic, so an error thrown by Postgres (out of memory, a jsonb over
        // its size limit) may jump out of it.
        let jsonb = unsafe {
            pg_sys::ffi::pg_guard_ffi_boundary(|| {
                let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
                push_jsonb_value(&mut state, pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT, std::ptr::null_mut());
                for field in &self.fields {
                    let mut key = string_value(field.name.as_ptr() as *mut c_char, field.name.len());
                    push_jsonb_value(&mut state, pg_sys::JsonbIteratorToken::WJB_KEY, &mut key);
                    let mut value = if *nulls.get_unchecked(field.attr) {
                        null_value()
                    } else {
                        let value = field.convert.value(*values.get_unchecked(field.attr));
                        if value.type_ == pg_sys::jbvType::jbvString
                            && value.val.string.len as u32 > pg_sys::JENTRY_OFFLENMASK
                        {
                            string_too_long = true;
                            return std::ptr::null_mut();
                        }
                        value
                    };
                    push_jsonb_value(&mut state, pg_sys::JsonbIteratorToken::WJB_VALUE, &mut value);
                }
                let object = push_jsonb_value(&mut state, pg_sys::JsonbIteratorToken::WJB_END_OBJECT, std::ptr::null_mut());
                jsonb_value_to_jsonb(object)
            })
        };
        if string_too_long {
            // to_jsonb's own error (checkStringLen).
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                "string too long to represent as jsonb string",
                "pg_reverse_etl",
            )
            .set_detail(format!("Due to an implementation restriction, jsonb strings cannot exceed {} bytes.", pg_sys::JENTRY_OFFLENMASK))
            .report(PgLogLevel::ERROR);
        }
        pg_sys::Datum::from(jsonb)
    }
}

impl Convert {
    /// # Safety
    /// Inside an error trap; `value` is a non-NULL value of the column's type.
    unsafe fn value(&self, value: pg_sys::Datum) -> pg_sys::JsonbValue {
        unsafe {
            match self {
                Convert::Bool => {
                    let mut v = null_value();
                    v.type_ = pg_sys::jbvType::jbvBool;
                    v.val.boolean = value.value() != 0;
                    v
                }
                Convert::Integer(cast) => numeric_value(direct_function_call1(*cast, pg_sys::InvalidOid, value)),
                Convert::Numeric(finfo) => {
                    let numeric = detoast(value.cast_mut_ptr::<pg_sys::varlena>());
                    if is_special_numeric(numeric) {
                        number_by_text(finfo, value)
                    } else {
                        numeric_value(pg_sys::Datum::from(numeric))
                    }
                }
                Convert::Float(finfo) => number_by_text(finfo, value),
                Convert::Text => {
                    let original = value.cast_mut_ptr::<pg_sys::varlena>();
                    let text = if pgrx::varlena::varatt_is_4b_c(original) || pgrx::varlena::varatt_is_1b_e(original) {
                        detoast_packed(original)
                    } else {
                        original
                    };
                    string_value(pgrx::varlena::vardata_any(text) as *mut c_char, pgrx::varlena::varsize_any_exhdr(text))
                }
                Convert::DateTime(type_oid) => {
                    let text = json_encode_date_time(std::ptr::null_mut(), value, *type_oid, std::ptr::null());
                    string_value(text, CStr::from_ptr(text).to_bytes().len())
                }
                Convert::Output(finfo) => {
                    let text = output_function_call(&**finfo as *const _ as *mut _, value);
                    string_value(text, CStr::from_ptr(text).to_bytes().len())
                }
            }
        }
    }
}

/// A number's jsonb value by its output function's text: read back by `numeric_in`, or a
/// string when it is NaN or an infinity (JSON has no such numbers).
///
/// # Safety
/// Inside an error trap; `value` is a non-NULL value of the function's type.
unsafe fn number_by_text(finfo: &pg_sys::FmgrInfo, value: pg_sys::Datum) -> pg_sys::JsonbValue {
    unsafe {
        let text = output_function_call(finfo as *const _ as *mut _, value);
        let bytes = CStr::from_ptr(text).to_bytes();
        if bytes.iter().any(|&b| b == b'N' || b == b'n') {
            string_value(text, bytes.len())
        } else {
            let numeric = direct_function_call3(
                Some(numeric_in),
                pg_sys::InvalidOid,
                pg_sys::Datum::from(text),
                pg_sys::Datum::from(pg_sys::InvalidOid),
                pg_sys::Datum::from(-1i32),
            );
            numeric_value(numeric)
        }
    }
}

/// A JSON number of a numeric datum (a 4-byte varlena header, as numeric functions return).
fn numeric_value(numeric: pg_sys::Datum) -> pg_sys::JsonbValue {
    let mut v = null_value();
    v.type_ = pg_sys::jbvType::jbvNumeric;
    v.val.numeric = numeric.cast_mut_ptr();
    v
}

/// Whether a detoasted numeric is NaN or an infinity: the top two bits of its first 16-bit
/// word (`NUMERIC_IS_SPECIAL` in Postgres' numeric.c, the same in every version since 14; 13's
/// NaN has them too).
///
/// # Safety
/// `numeric` must be a detoasted numeric (4-byte header).
unsafe fn is_special_numeric(numeric: *mut pg_sys::varlena) -> bool {
    const NUMERIC_SIGN_MASK: u16 = 0xC000;
    const NUMERIC_SPECIAL: u16 = 0xC000;
    let header = unsafe { std::ptr::read_unaligned(pgrx::varlena::vardata_4b(numeric) as *const u16) };
    header & NUMERIC_SIGN_MASK == NUMERIC_SPECIAL
}

fn null_value() -> pg_sys::JsonbValue {
    // jbvNull is 0: an all-zero value is a JSON null.
    unsafe { std::mem::zeroed() }
}

fn string_value(text: *mut c_char, len: usize) -> pg_sys::JsonbValue {
    let mut v = null_value();
    v.type_ = pg_sys::jbvType::jbvString;
    v.val.string = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 { len: len as c_int, val: text };
    v
}
