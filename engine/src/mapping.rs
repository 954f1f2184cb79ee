//! A sync's mappings (`{"destination_field": "model_column", ...}`, checked by
//! `retl._check_mappings` when the sync is created) as the planner reads them, and the SQL that
//! builds a record's payload from a model row with them. Pure: the extension passes in
//! Postgres's own quoting functions.

/// `jsonb_build_object` takes at most 100 arguments: wide payloads are built in chunks.
pub const PAIRS_PER_CALL: usize = 50;

/// The (destination field, model column) pairs of `mappings::text`, in the order of the
/// fields' names. The catalog only holds a non-empty object of strings; anything else reads
/// as no pairs (text that is not an object) or an empty column name (a value that is not a
/// string), never an error.
pub fn parse_mappings(text: &str) -> Vec<(String, String)> {
    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).unwrap_or_default();
    obj.into_iter()
        .map(|(field, col)| (field, col.as_str().unwrap_or_default().to_string()))
        .collect()
}

/// `jsonb_build_object('field', <prefix>column, ...)`, chunked and joined with `||`, or
/// `'{}'::jsonb` for no pairs. `literal` and `identifier` quote a field name and a column name.
pub fn build_object_sql(
    pairs: &[(String, String)],
    prefix: &str,
    literal: impl Fn(&str) -> String,
    identifier: impl Fn(&str) -> String,
) -> String {
    if pairs.is_empty() {
        return "'{}'::jsonb".into();
    }
    pairs
        .chunks(PAIRS_PER_CALL)
        .map(|chunk| {
            let args: Vec<String> = chunk
                .iter()
                .map(|(field, col)| format!("{}, {prefix}{}", literal(field), identifier(col)))
                .collect();
            format!("jsonb_build_object({})", args.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" || ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    fn identifier(s: &str) -> String {
        format!("\"{}\"", s.replace('"', "\"\""))
    }

    #[test]
    fn mappings_in_field_order() {
        assert_eq!(
            parse_mappings(r#"{"full_name": "name", "email": "email"}"#),
            vec![("email".to_string(), "email".to_string()), ("full_name".to_string(), "name".to_string())]
        );
    }

    #[test]
    fn anything_but_an_object_of_strings_degrades() {
        assert_eq!(parse_mappings("not json"), vec![]);
        assert_eq!(parse_mappings("[1, 2]"), vec![]);
        assert_eq!(parse_mappings(r#"{"a": 1}"#), vec![("a".to_string(), String::new())]);
    }

    #[test]
    fn payload_sql_is_chunked() {
        assert_eq!(build_object_sql(&[], "m.", literal, identifier), "'{}'::jsonb");
        let pairs = parse_mappings(r#"{"it's": "a \"b\""}"#);
        assert_eq!(build_object_sql(&pairs, "m.", literal, identifier), r#"jsonb_build_object('it''s', m."a ""b""")"#);
        let pairs: Vec<(String, String)> = (0..101).map(|i| (format!("f{i}"), format!("c{i}"))).collect();
        let sql = build_object_sql(&pairs, "(d.r).", literal, identifier);
        assert_eq!(sql.matches("jsonb_build_object(").count(), 3);
        assert_eq!(sql.matches(" || ").count(), 2);
    }
}
