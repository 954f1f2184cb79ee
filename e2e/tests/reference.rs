//! docs/REFERENCE.md documents everything the installed extension offers. What exists is read
//! from the running cluster (the catalogs, pg_settings and the wrapper's own validator), so a
//! new function, argument, view column, setting or option fails this test until it is
//! documented. The rules, over the Markdown text outside fenced code blocks (a "code span" is
//! text between single backticks, which may run over several lines):
//!
//! - **functions**: every function of schema `retl` whose name does not start with `_` has a
//!   signature: a code span starting with `retl.NAME(`. Every argument name (IN, OUT and TABLE
//!   columns, from `pg_proc.proargnames`) appears as a word in one of its signatures, e.g.
//!   `retl.preview(sync text) → TABLE(op text, key jsonb, payload jsonb)`.
//! - **tables and views**: every table and view of schema `retl` not starting with `_` appears
//!   as the code span `retl.NAME`. Every view also has a heading containing `retl.NAME`, and in
//!   its section (up to the next heading of the same or a higher level) every column appears as
//!   a code span of exactly its name.
//! - **settings**: every `retl.*` row of `pg_settings` is the first cell of a table row (a line
//!   starting with `|`) as the code span `retl.NAME`.
//! - **destination options**: every server option and user-mapping option the `retl` wrapper's
//!   validator accepts (it lists them when refusing an unknown one) is, as the code span
//!   `NAME`, in the first cell of a table row; every destination type it supports has a heading
//!   containing the code span `type 'TYPE'`.
//! - **sync options**: every argument of `retl.create_sync` and `retl.alter_sync` but `name`
//!   is in the first cell of a table row, as a code span (`max_rows` or `max_rows bigint`).
//!
//! The failure message lists each thing missing, one per line, with the rule it breaks.
mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};

struct Doc {
    /// Inline code spans outside fenced blocks, in order.
    spans: Vec<String>,
    /// (heading level, heading text, the section's text up to the next heading of the same or a
    /// higher level), for every heading.
    sections: Vec<(usize, String, String)>,
    /// The first cell of every table row.
    first_cells: Vec<String>,
}

fn code_spans(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn read_doc() -> Doc {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/REFERENCE.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut prose = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            prose.push(line);
        }
    }
    let spans = code_spans(&prose.join("\n"));
    let headings: Vec<(usize, usize)> = prose
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with('#'))
        .map(|(i, l)| (i, l.chars().take_while(|c| *c == '#').count()))
        .collect();
    let sections = headings
        .iter()
        .map(|&(i, level)| {
            let end = headings.iter().find(|&&(j, l)| j > i && l <= level).map(|&(j, _)| j).unwrap_or(prose.len());
            (level, prose[i].to_string(), prose[i + 1..end].join("\n"))
        })
        .collect();
    let first_cells = prose
        .iter()
        .filter(|l| l.starts_with('|'))
        .filter_map(|l| l[1..].split('|').next())
        .map(str::to_string)
        .collect();
    Doc { spans, sections, first_cells }
}

fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

impl Doc {
    fn has_span(&self, exact: &str) -> bool {
        self.spans.iter().any(|s| s == exact)
    }

    /// The words of every signature of `retl.name`, or None without one.
    fn signature_words(&self, name: &str) -> Option<BTreeSet<String>> {
        let start = format!("retl.{name}(");
        let signatures: Vec<&String> = self.spans.iter().filter(|s| s.starts_with(&start)).collect();
        (!signatures.is_empty()).then(|| signatures.iter().flat_map(|s| words(&s[start.len()..])).collect())
    }

    /// Whether a table row's first cell holds `name` as a code span (alone, or followed by its
    /// type when `typed`).
    fn in_first_cell(&self, name: &str, typed: bool) -> bool {
        self.first_cells.iter().any(|cell| {
            code_spans(cell).iter().any(|s| s == name || (typed && s.split_whitespace().next() == Some(name)))
        })
    }

    /// The sections whose heading contains `needle`.
    fn sections_with(&self, needle: &str) -> Vec<&(usize, String, String)> {
        self.sections.iter().filter(|(_, heading, _)| heading.contains(needle)).collect()
    }
}

/// The names the validator lists after "valid options: " when refusing an unknown option in
/// `statement` (run in a transaction that is rolled back).
fn valid_options(client: &mut postgres::Client, setup: &str, statement: &str) -> Vec<String> {
    let mut tx = client.transaction().unwrap();
    if !setup.is_empty() {
        tx.batch_execute(setup).unwrap();
    }
    let err = tx.batch_execute(statement).expect_err("the validator refuses an unknown option");
    let (code, message, _, _) = db_error(&err);
    assert_eq!(code, "HV00D", "{message}");
    let list = message.split("valid options: ").nth(1).unwrap_or_else(|| panic!("no list of valid options in: {message}"));
    list.split(", ").map(str::to_string).collect()
}

#[test]
fn the_reference_documents_every_function_view_setting_and_option() {
    let doc = read_doc();
    let mut client = connect();
    ensure_extension(&mut client);
    let mut missing: Vec<String> = Vec::new();

    // Functions and their arguments.
    let mut functions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in client
        .query(
            "SELECT p.proname::text, coalesce(p.proargnames, '{}') FROM pg_proc p
              WHERE p.pronamespace = 'retl'::regnamespace AND p.proname NOT LIKE '\\_%'",
            &[],
        )
        .unwrap()
    {
        let (name, args): (String, Vec<String>) = (row.get(0), row.get(1));
        functions.entry(name).or_default().extend(args.into_iter().filter(|a| !a.is_empty()));
    }
    assert!(functions.contains_key("create_sync") && functions.contains_key("run"), "{functions:?}");
    for (name, args) in &functions {
        match doc.signature_words(name) {
            None => missing.push(format!("function retl.{name}: no signature (a code span starting with `retl.{name}(`)")),
            Some(documented) => {
                for arg in args.iter().filter(|a| !documented.contains(*a)) {
                    missing.push(format!("function retl.{name}: argument {arg} is in no signature `retl.{name}(...)`"));
                }
            }
        }
    }

    // Tables and views, and the columns of views.
    let relations: Vec<(String, String)> = client
        .query(
            "SELECT c.relname::text, CASE WHEN c.relkind IN ('v', 'm') THEN 'view' ELSE 'table' END FROM pg_class c
              WHERE c.relnamespace = 'retl'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm') AND c.relname NOT LIKE '\\_%'
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(relations.iter().any(|(n, _)| n == "sync_status") && relations.iter().any(|(n, _)| n == "runs"), "{relations:?}");
    for (name, kind) in &relations {
        let qualified = format!("retl.{name}");
        if !doc.has_span(&qualified) {
            missing.push(format!("{kind} {qualified}: never written as the code span `{qualified}`"));
        }
        if kind != "view" {
            continue;
        }
        let sections = doc.sections_with(&format!("`{qualified}`"));
        if sections.is_empty() {
            missing.push(format!("view {qualified}: no heading containing `{qualified}`"));
            continue;
        }
        let spans: BTreeSet<String> = sections.iter().flat_map(|(_, _, body)| code_spans(body)).collect();
        let columns: Vec<String> = client
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&qualified],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for column in columns.iter().filter(|c| !spans.contains(*c)) {
            missing.push(format!("view {qualified}: column {column} is not a code span `{column}` in its section"));
        }
    }

    // Settings.
    let settings: Vec<String> = client
        .query("SELECT name FROM pg_settings WHERE name LIKE 'retl.%' ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(settings.contains(&"retl.workers".to_string()), "the library is not loaded: {settings:?}");
    for setting in settings.iter().filter(|s| !doc.in_first_cell(s, false)) {
        missing.push(format!("setting {setting}: not in the first cell of a table row as `{setting}`"));
    }

    // Destination options, as the wrapper's validator lists them, and destination types.
    let server_options = valid_options(&mut client, "", "CREATE SERVER retl_reference_probe FOREIGN DATA WRAPPER retl OPTIONS (no_such_option 'x')");
    let mapping_options = valid_options(
        &mut client,
        "CREATE SERVER retl_reference_probe FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url 'http://127.0.0.1:9/')",
        "CREATE USER MAPPING FOR CURRENT_USER SERVER retl_reference_probe OPTIONS (no_such_option 'x')",
    );
    assert!(server_options.contains(&"batch_size".to_string()) && mapping_options.contains(&"token".to_string()));
    for (kind, options) in [("server", &server_options), ("user mapping", &mapping_options)] {
        for option in options.iter().filter(|o| !doc.in_first_cell(o, false)) {
            missing.push(format!("{kind} option {option}: not in the first cell of a table row as `{option}`"));
        }
    }
    let err = client
        .batch_execute("BEGIN; CREATE SERVER retl_reference_probe FOREIGN DATA WRAPPER retl OPTIONS (type 'no_such_type', url 'http://127.0.0.1:9/')")
        .expect_err("an unknown type is refused");
    client.batch_execute("ROLLBACK").unwrap();
    let message = db_error(&err).1;
    let types: Vec<&str> = message
        .split("(supported: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no list of supported types in: {message}"))
        .split(", ")
        .collect();
    assert!(types.contains(&"webhook") && types.contains(&"salesforce"), "{types:?}");
    for kind in types {
        let span = format!("`type '{kind}'`");
        if doc.sections_with(&span).is_empty() {
            missing.push(format!("destination type {kind}: no heading containing {span}"));
        }
    }

    // Sync options: the arguments of create_sync and alter_sync.
    for function in ["create_sync", "alter_sync"] {
        for arg in functions.get(function).into_iter().flatten().filter(|a| *a != "name") {
            if !doc.in_first_cell(arg, true) {
                missing.push(format!("sync option {arg} (of retl.{function}): not in the first cell of a table row as `{arg}` or `{arg} TYPE`"));
            }
        }
    }

    missing.dedup();
    assert!(missing.is_empty(), "docs/REFERENCE.md does not document {} things:\n{}", missing.len(), missing.join("\n"));
}
