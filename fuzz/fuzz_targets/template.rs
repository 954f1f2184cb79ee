//! Liquid templates of the generic HTTP connector: `template::parse`, then `render`.
//!
//! Input: UTF-8 text; up to the first NUL byte it is the template, after it the variables as
//! JSON. Without a NUL, or when the rest is not JSON, fixed variables shaped like the
//! connector's (op, key, fields, records, destination_id) are used.
#![no_main]

use libfuzzer_sys::fuzz_target;
use retl_engine::template;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (source, vars) = text.split_once('\0').unwrap_or((text, ""));
    let vars: serde_json::Value = serde_json::from_str(vars).unwrap_or_else(|_| {
        serde_json::json!({
            "op": "upsert",
            "key": {"id": 42},
            "fields": {"email": "ann@example.com", "name": "Ann \"A\" O'Neil", "n": 3, "tags": ["x", "y"], "none": null},
            "records": [{"op": "delete", "key": {"id": 1}, "fields": {}}],
            "destination_id": "c_123",
        })
    });
    let plain = !source.contains("{{") && !source.contains("{%");
    let parsed = match template::parse(source) {
        Ok(t) => t,
        Err(e) => {
            assert!(!plain, "plain text {source:?} does not parse: {e}");
            assert!(!e.contains('\n'), "error spans lines: {e}");
            return;
        }
    };
    // Not asserted: that a second render gives the same text. Liquid objects are hash maps, so
    // `{{ fields }}` (or `| json` of an object) lists keys in varying order.
    match parsed.render(&vars) {
        Ok(out) if plain => assert_eq!(out, source, "plain text must render to itself"),
        Ok(_) => {}
        Err(e) => assert!(!e.contains('\n'), "error spans lines: {e}"),
    }
});
