//! Which table column carries a model's key. When a model (or audience) is a plain
//! projection of one table — through any number of views, each a `SELECT` of columns and
//! immutable expressions from exactly one relation, with an optional immutable `WHERE` — every
//! model row is a function of the table rows that share its key, and a commit can tell which
//! model keys it touched: the old and new values of those columns (see `_log_changed_keys`).
//! Then an on-change run plans only those keys instead of the whole model.
//!
//! Anything else (joins, aggregates, DISTINCT, LIMIT, set operations, window functions,
//! subqueries, set-returning or mutable functions, TABLESAMPLE, a key that is an expression,
//! partitioned or inherited tables) is not traced: such a model is planned whole on every run,
//! which is always correct.

use pgrx::prelude::*;
use std::ffi::CString;

/// Views nest; a chain deeper than this is not traced.
const MAX_DEPTH: usize = 32;

/// The base table and the attribute numbers of its columns that carry the model key, in key
/// order, for the view `view` and its key columns; `None` when the model is not a traceable
/// projection of one table.
pub fn trace(view: pg_sys::Oid, key_columns: &[String]) -> Option<(pg_sys::Oid, Vec<i16>)> {
    let mut attnums = Vec::with_capacity(key_columns.len());
    for column in key_columns {
        let name = CString::new(column.as_str()).ok()?;
        let attnum = unsafe { pg_sys::get_attnum(view, name.as_ptr()) };
        if attnum <= 0 {
            return None;
        }
        attnums.push(attnum);
    }
    let mut relid = view;
    for _ in 0..MAX_DEPTH {
        match step(relid, &attnums)? {
            Step::Table => return Some((relid, attnums)),
            Step::View { relid: inner, attnums: mapped } => {
                relid = inner;
                attnums = mapped;
            }
        }
    }
    None
}

enum Step {
    /// `relid` is a plain table without children: the trace ends here.
    Table,
    /// `relid` is a view reading one relation; the key columns are these of that relation.
    View { relid: pg_sys::Oid, attnums: Vec<i16> },
}

fn step(relid: pg_sys::Oid, attnums: &[i16]) -> Option<Step> {
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let form = &*(*rel).rd_rel;
        let result = match form.relkind as u8 {
            // A table with inheritance children or one that is a partition: statements on its
            // relatives fire their own triggers, not this table's.
            pg_sys::RELKIND_RELATION => (!form.relhassubclass && !form.relispartition).then_some(Step::Table),
            pg_sys::RELKIND_VIEW => view_step(pg_sys::get_view_query(rel), attnums),
            _ => None,
        };
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        result
    }
}

/// One view's query: a plain projection of one relation whose key columns are plain columns.
unsafe fn view_step(query: *mut pg_sys::Query, attnums: &[i16]) -> Option<Step> {
    let q = query.as_ref()?;
    let shaped = q.commandType == pg_sys::CmdType::CMD_SELECT
        && q.utilityStmt.is_null()
        && q.cteList.is_null()
        && !q.hasAggs
        && !q.hasWindowFuncs
        && !q.hasTargetSRFs
        && !q.hasSubLinks
        && !q.hasDistinctOn
        && !q.hasRecursive
        && !q.hasModifyingCTE
        && q.groupClause.is_null()
        && q.groupingSets.is_null()
        && q.havingQual.is_null()
        && q.windowClause.is_null()
        && q.distinctClause.is_null()
        && q.limitCount.is_null()
        && q.limitOffset.is_null()
        && q.setOperations.is_null();
    if !shaped {
        return None;
    }
    let jointree = q.jointree.as_ref()?;
    let from = pgrx::PgList::<pg_sys::Node>::from_pg(jointree.fromlist);
    if from.len() != 1 {
        return None;
    }
    let item = from.get_ptr(0)?;
    if (*item).type_ != pg_sys::NodeTag::T_RangeTblRef {
        return None;
    }
    let rtindex = (*(item as *mut pg_sys::RangeTblRef)).rtindex;
    // rtindex counts from 1.
    let rte = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable).get_ptr(rtindex as usize - 1)?;
    let rte = rte.as_ref()?;
    if rte.rtekind != pg_sys::RTEKind::RTE_RELATION || !rte.tablesample.is_null() {
        return None;
    }
    // A row of this view must depend on its source row only: no volatile or stable functions
    // (now(), random(), lookups) in the filter or the columns.
    if pg_sys::contain_mutable_functions(jointree.quals) {
        return None;
    }
    let targets = pgrx::PgList::<pg_sys::TargetEntry>::from_pg(q.targetList);
    let mut mapped = Vec::with_capacity(attnums.len());
    for entry in targets.iter_ptr() {
        let entry = entry.as_ref()?;
        if pg_sys::contain_mutable_functions(entry.expr as *mut pg_sys::Node) {
            return None;
        }
    }
    for &attnum in attnums {
        let entry = targets
            .iter_ptr()
            .filter_map(|e| e.as_ref())
            .find(|e| e.resno == attnum && !e.resjunk)?;
        let expr = entry.expr as *mut pg_sys::Node;
        if expr.is_null() || (*expr).type_ != pg_sys::NodeTag::T_Var {
            return None;
        }
        let var = &*(expr as *mut pg_sys::Var);
        if var.varno as i32 != rtindex || var.varlevelsup != 0 || var.varattno <= 0 {
            return None;
        }
        mapped.push(var.varattno);
    }
    Some(Step::View { relid: rte.relid, attnums: mapped })
}

/// SQL: the table and its key columns' attribute numbers for the model or audience view
/// `retl_models.<name>` with key `key_columns`; no row when it is not traceable.
#[pg_extern(stable)]
fn _key_source(
    view: pg_sys::Oid,
    key_columns: Vec<String>,
) -> TableIterator<'static, (name!(relid, pg_sys::Oid), name!(attnums, Vec<i16>))> {
    TableIterator::new(trace(view, &key_columns))
}
