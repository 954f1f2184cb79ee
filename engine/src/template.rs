//! Liquid templates (the generic HTTP connector's URL, method, headers and body). Standard
//! Liquid plus a `json` filter that writes any value as JSON (quoted and escaped strings,
//! objects, arrays, `null`), which is what building a JSON body needs.

use liquid_core::{Display_filter, Filter, FilterReflection, ParseFilter, Result, Runtime, Value, ValueView};

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(name = "json", description = "Writes the value as JSON.", parsed(JsonFilter))]
struct Json;

#[derive(Debug, Default, Display_filter)]
#[name = "json"]
struct JsonFilter;

impl Filter for JsonFilter {
    fn evaluate(&self, input: &dyn ValueView, _runtime: &dyn Runtime) -> Result<Value> {
        let text = serde_json::to_string(&input.to_value())
            .map_err(|e| liquid_core::Error::with_msg(format!("cannot write the value as JSON: {e}")))?;
        Ok(Value::scalar(text))
    }
}

/// A parsed template.
pub struct Template(liquid::Template);

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Template")
    }
}

/// Parse `source`; the error says where and what.
pub fn parse(source: &str) -> std::result::Result<Template, String> {
    let parser = liquid::ParserBuilder::with_stdlib()
        .filter(Json)
        .build()
        .map_err(|e| e.to_string())?;
    parser.parse(source).map(Template).map_err(|e| one_line(&e.to_string()))
}

impl Template {
    /// Render with `vars` (a JSON object: its keys are the template's variables).
    pub fn render(&self, vars: &serde_json::Value) -> std::result::Result<String, String> {
        let globals = liquid::to_object(vars).map_err(|e| one_line(&e.to_string()))?;
        self.0.render(&globals).map_err(|e| one_line(&e.to_string()))
    }
}

/// Liquid's messages span several lines; error messages here are one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_variables_filters_and_json() {
        let t = parse(r#"{"email": {{ fields.email | json }}, "name": "{{ fields.name | upcase }}", "n": {{ fields.n | json }}, "tags": {{ fields.tags | json }}, "none": {{ fields.none | json }}}"#).unwrap();
        let out = t
            .render(&json!({"fields": {"email": "a\"b@x.com", "name": "ann", "n": 3, "tags": ["x", "y"], "none": null}}))
            .unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed, json!({"email": "a\"b@x.com", "name": "ANN", "n": 3, "tags": ["x", "y"], "none": null}));
    }

    #[test]
    fn an_unknown_variable_is_an_error_naming_it() {
        let t = parse("{{ fields.emial }}").unwrap();
        let err = t.render(&json!({"fields": {"email": "a@x.com"}})).unwrap_err();
        assert!(err.contains("emial") && err.contains("email"), "{err}");
    }

    #[test]
    fn conditionals_and_loops() {
        let t = parse("{% if op == 'delete' %}DELETE{% else %}PUT{% endif %} {% for r in records %}{{ r.key.id }},{% endfor %}").unwrap();
        assert_eq!(t.render(&json!({"op": "delete", "records": [{"key": {"id": 1}}, {"key": {"id": 2}}]})).unwrap(), "DELETE 1,2,");
        assert_eq!(t.render(&json!({"op": "upsert", "records": []})).unwrap(), "PUT ");
    }

    #[test]
    fn syntax_errors_are_one_line() {
        let err = parse("{{ fields.email ").unwrap_err();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("fields.email"), "{err}");
        let err = parse("{% if x %}never closed").unwrap_err();
        assert!(!err.contains('\n'), "{err}");
    }
}
