//! Sync mappings as the planner reads them (`mapping::parse_mappings` of `mappings::text`)
//! and the SQL that builds each record's payload from the model row with them
//! (`mapping::build_object_sql`). The payload's values are computed by Postgres
//! (`jsonb_build_object`); what Rust owns, and what is checked here, is that every mapped
//! field, and nothing else, reaches that SQL, paired with its column, in calls of at most 100
//! arguments.
//!
//! Input: UTF-8 text, the mappings JSON (usually an object of field -> column).
#![no_main]

use libfuzzer_sys::fuzz_target;
use retl_engine::mapping::{build_object_sql, parse_mappings, PAIRS_PER_CALL};

/// Quoting that cannot produce `,`, `(`, `)` or spaces, so the SQL can be taken apart again.
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> String {
    let bytes: Vec<u8> = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
    String::from_utf8(bytes).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let pairs = parse_mappings(text);
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(obj)) => {
            // Every mapped field is there once, with its column (or "" when it is not a string).
            assert_eq!(pairs.len(), obj.len());
            for (field, col) in &pairs {
                assert_eq!(obj[field].as_str().unwrap_or_default(), col);
            }
        }
        _ => assert!(pairs.is_empty(), "{text:?} is not an object but gives {pairs:?}"),
    }

    let sql = build_object_sql(&pairs, "m.", |s| format!("L{}", hex(s)), |s| format!("I{}", hex(s)));
    if pairs.is_empty() {
        assert_eq!(sql, "'{}'::jsonb");
        return;
    }
    let mut rebuilt = Vec::new();
    for call in sql.split(" || ") {
        let args = call.strip_prefix("jsonb_build_object(").and_then(|a| a.strip_suffix(')')).expect(&sql);
        let args: Vec<&str> = args.split(", ").collect();
        assert!(args.len() % 2 == 0 && args.len() <= 100, "{} arguments in one call", args.len());
        assert!(args.len() <= 2 * PAIRS_PER_CALL);
        for pair in args.chunks(2) {
            let field = pair[0].strip_prefix('L').expect(&sql);
            let col = pair[1].strip_prefix("m.I").expect(&sql);
            rebuilt.push((unhex(field), unhex(col)));
        }
    }
    assert_eq!(rebuilt, pairs);
});
