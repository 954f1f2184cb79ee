//! Checks on SQL text users hand us (model queries, audience filters) with Postgres's own
//! parser, before any of it is executed or stored.

use crate::errors::RetlError;
use pgrx::list::old_list::PgList;
use pgrx::prelude::*;
use std::ffi::CString;

fn raw_parse(sql: &str) -> Vec<*mut pg_sys::RawStmt> {
    let text = CString::new(sql).unwrap_or_else(|_| {
        error!("SQL text must not contain a NUL byte")
    });
    unsafe {
        #[cfg(feature = "pg13")]
        let list = pg_sys::raw_parser(text.as_ptr());
        #[cfg(not(feature = "pg13"))]
        let list = pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        PgList::<pg_sys::RawStmt>::from_pg(list).iter_ptr().collect()
    }
}

fn statement_kind(node: *mut pg_sys::Node) -> &'static str {
    let tag = unsafe { (*node).type_ };
    match tag {
        pg_sys::NodeTag::T_InsertStmt => "INSERT",
        pg_sys::NodeTag::T_UpdateStmt => "UPDATE",
        pg_sys::NodeTag::T_DeleteStmt => "DELETE",
        pg_sys::NodeTag::T_CallStmt => "CALL",
        pg_sys::NodeTag::T_DoStmt => "DO",
        pg_sys::NodeTag::T_CreateStmt | pg_sys::NodeTag::T_CreateTableAsStmt => "CREATE",
        pg_sys::NodeTag::T_DropStmt => "DROP",
        _ => "a utility statement",
    }
}

/// The one SELECT statement in `query`, as its exact text (without a trailing semicolon).
pub fn single_select(query: &str) -> Result<String, RetlError> {
    let stmts = raw_parse(query);
    if stmts.len() != 1 {
        return Err(RetlError::MultipleStatements(stmts.len()));
    }
    let raw = stmts[0];
    unsafe {
        let node = (*raw).stmt;
        if (*node).type_ != pg_sys::NodeTag::T_SelectStmt {
            return Err(RetlError::NotASelect(statement_kind(node)));
        }
        if !(*(node as *mut pg_sys::SelectStmt)).intoClause.is_null() {
            return Err(RetlError::SelectInto);
        }
        let start = (*raw).stmt_location.max(0) as usize;
        let len = (*raw).stmt_len as usize;
        // stmt_location/len are byte offsets; len 0 means "to the end of the string".
        let text = if len == 0 { &query[start..] } else { &query[start..start + len] };
        Ok(text.trim().to_string())
    }
}

/// `filter` must be one boolean expression: parsed as the WHERE clause of a bare SELECT, the
/// statement must have nothing but that WHERE clause (no UNION, FROM, GROUP BY... smuggled in).
pub fn check_filter(filter: &str) -> Result<(), RetlError> {
    let bad = || RetlError::BadFilter(filter.to_string());
    if filter.trim().is_empty() {
        return Err(bad());
    }
    // The newline keeps a trailing "-- comment" from swallowing the closing parenthesis.
    let stmts = raw_parse(&format!("SELECT 1 WHERE ({filter}\n)"));
    if stmts.len() != 1 {
        return Err(bad());
    }
    unsafe {
        let node = (*stmts[0]).stmt;
        if (*node).type_ != pg_sys::NodeTag::T_SelectStmt {
            return Err(bad());
        }
        let s = &*(node as *mut pg_sys::SelectStmt);
        let only_where = s.op == pg_sys::SetOperation::SETOP_NONE
            && s.intoClause.is_null()
            && s.distinctClause.is_null()
            && s.fromClause.is_null()
            && s.groupClause.is_null()
            && s.havingClause.is_null()
            && s.windowClause.is_null()
            && s.valuesLists.is_null()
            && s.sortClause.is_null()
            && s.limitOffset.is_null()
            && s.limitCount.is_null()
            && s.lockingClause.is_null()
            && s.withClause.is_null()
            && !s.whereClause.is_null()
            && PgList::<pg_sys::Node>::from_pg(s.targetList).len() == 1;
        if !only_where {
            return Err(bad());
        }
    }
    Ok(())
}
