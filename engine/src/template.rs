//! Liquid templates (the generic HTTP connector's URL, method, headers and body). Standard
//! Liquid plus a `json` filter that writes any value as JSON (quoted and escaped strings,
//! objects, arrays, `null`), which is what building a JSON body needs.

use liquid_core::parser::BlockElement;
use liquid_core::{BlockReflection, Language, ParseBlock, Renderable, TagBlock, TagTokenIter};
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

/// Liquid's `{% comment %}` block, except that an error of a tag inside it is an error of the
/// template, as in every other block. The stock one ignores them, and after a tag that had read
/// to the end of the template (`{% comment %}{% if a %}`, `{% comment %}{% if a %}{% for`) it
/// asked for the next token and panicked ("File shouldn't end before EOI").
#[derive(Clone, Copy, Debug, Default)]
struct Comment;

impl BlockReflection for Comment {
    fn start_tag(&self) -> &str {
        "comment"
    }

    fn end_tag(&self) -> &str {
        "endcomment"
    }

    fn description(&self) -> &str {
        ""
    }
}

impl ParseBlock for Comment {
    fn parse(&self, mut arguments: TagTokenIter<'_>, mut tokens: TagBlock<'_, '_>, options: &Language) -> Result<Box<dyn Renderable>> {
        arguments.expect_nothing()?;
        while let Some(token) = tokens.next()? {
            // Tags are parsed (nested comments, `{% raw %}`), expressions and text skipped.
            if let BlockElement::Tag(tag) = token {
                tag.parse(&mut tokens, options)?;
            }
        }
        tokens.assert_empty();
        Ok(Box::new(CommentedOut))
    }

    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Clone, Copy, Debug)]
struct CommentedOut;

impl Renderable for CommentedOut {
    fn render_to(&self, _writer: &mut dyn std::io::Write, _runtime: &dyn Runtime) -> Result<()> {
        Ok(())
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
    if let Some(literal) = oversized_integer(source) {
        return Err(format!(
            "the number {literal} is too large for a template (integers go from {} to {})",
            i64::MIN,
            i64::MAX
        ));
    }
    let parser = liquid::ParserBuilder::with_stdlib()
        .filter(Json)
        .block(Comment)
        .build()
        .map_err(|e| e.to_string())?;
    parser.parse(source).map(Template).map_err(|e| one_line(&e.to_string()))
}

impl Template {
    /// Render with `vars` (a JSON object: its keys are the template's variables).
    pub fn render(&self, vars: &serde_json::Value) -> std::result::Result<String, String> {
        let Value::Object(globals) = liquid_value(vars) else {
            return Err("template variables must be a JSON object".into());
        };
        self.0.render(&globals).map_err(|e| one_line(&e.to_string()))
    }
}

/// `value` as a Liquid value, converted by hand: with serde_json's arbitrary_precision a number
/// serialises as a private map, which liquid's serde bridge would take for an object. Liquid
/// numbers are i64 or f64, so a decimal beyond f64 precision is rounded here (templates only).
fn liquid_value(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::scalar(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::scalar(i),
            None => Value::scalar(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::scalar(s.clone()),
        serde_json::Value::Array(items) => Value::Array(items.iter().map(liquid_value).collect()),
        serde_json::Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone().into(), liquid_value(v))).collect())
        }
    }
}

/// An integer literal inside `{{ }}` or `{% %}` that does not fit in an i64: Liquid's parser
/// panics on one ("Grammar ensures matches are parseable as integers"). Follows Liquid's grammar
/// closely enough for that: string literals, identifiers containing digits (`a1`, `a-1`), floats
/// and `{% raw %}` blocks are skipped; a huge number in a `{% comment %}` is reported too.
fn oversized_integer(source: &str) -> Option<&str> {
    let b = source.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while let Some(open) = source[i..].find(['{']).map(|o| o + i) {
        i = open + 1;
        if !matches!(b.get(open + 1), Some(b'{' | b'%')) {
            continue;
        }
        let inner = open + 2;
        if b[open + 1] == b'%' && source[inner..].trim_start_matches(['-', ' ', '\t', '\r', '\n']).starts_with("raw") {
            i = source[inner..].find("endraw").map_or(b.len(), |e| inner + e);
            continue;
        }
        let mut j = inner;
        while j < b.len() {
            match b[j] {
                quote @ (b'\'' | b'"') => j = source[j + 1..].find(quote as char).map_or(b.len(), |e| j + 1 + e + 1),
                b'}' | b'%' if b.get(j + 1) == Some(&b'}') => {
                    j += 2;
                    break;
                }
                c if c.is_ascii_digit() => {
                    let start = j;
                    while j < b.len() && b[j].is_ascii_digit() {
                        j += 1;
                    }
                    let before = |k: usize| (start >= inner + k).then(|| b[start - k]);
                    let part_of_name = before(1).is_some_and(ident)
                        || (before(1) == Some(b'-') && before(2).is_some_and(ident))
                        || (before(1) == Some(b'.') && before(2).is_some_and(|c| c.is_ascii_digit()));
                    let float = b.get(j) == Some(&b'.') && b.get(j + 1).is_some_and(u8::is_ascii_digit);
                    // A sign right after `{{`/`{%` is whitespace control (`{{-`), not a sign.
                    let signed = matches!(before(1), Some(b'-' | b'+')) && start - 1 > inner;
                    let literal = &source[if signed { start - 1 } else { start }..j];
                    if !part_of_name && !float && literal.parse::<i64>().is_err() {
                        return Some(literal);
                    }
                }
                _ => j += 1,
            }
        }
        i = i.max(j);
    }
    None
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

    /// Found by the `template` fuzz target: Liquid's parser panicked on an integer beyond i64.
    #[test]
    fn a_too_large_integer_is_an_error_not_a_panic() {
        for source in [
            "{{ 9999999999999999999999999999}}",
            "{\r\nf999999499forkr i : {{ 9999999999999999999999999999}}eelds.name uprecord>lankr 0]}}}",
            "{{ fields.n | plus: 9223372036854775808 }}",
            "{{ fields.n | plus: -9223372036854775809 }}",
            "{{-9223372036854775808 }}",
            "{{ a[99999999999999999999] }}",
            "{% for i in (1..99999999999999999999) %}{% endfor %}",
            "{% if x == 'a' and 99999999999999999999 %}{% endif %}",
        ] {
            let err = parse(source).unwrap_err();
            assert!(err.contains("too large"), "{source}: {err}");
        }
        for source in [
            "order 99999999999999999999 {{ fields.n | plus: -9223372036854775808 }}",
            "{{ fields.a99999999999999999999 }} {{ fields.a-99999999999999999999 }}",
            "{{ 1.99999999999999999999 | plus: 99999999999999999999.5 }}",
            "{{ '99999999999999999999' }} {{ \"99999999999999999999\" }}",
            "{% raw %}{{ 99999999999999999999 }}{% endraw %}",
        ] {
            assert!(parse(source).is_ok(), "{source}: {:?}", parse(source).err());
        }
    }

    /// Found by the `template` fuzz target: Liquid's comment block panicked on a block left
    /// unclosed inside an unclosed comment.
    #[test]
    fn an_unclosed_block_in_a_comment_is_an_error_not_a_panic() {
        for source in [
            "{% comment %}om2ment % comment %sssss}omment %{%'\n rment $}omment {{{}%incrementt }omment{% if op ==rd %} ",
            "{\"emaa{% comment %}{% if a %}ma ieldfs.{% for}`{ s.key.neldid }",
            "{% comment %}{% if a %}",
            "{% comment %}{% if a %}{% for",
            "{% comment %}{% raw %}",
            "{% for r in records %}{% comment %}{% unless a %}",
            // A broken tag inside a comment is an error too (it used to be ignored).
            "{% comment %}{% if %}{% endif %}{% endcomment %}",
        ] {
            assert!(parse(source).is_err(), "{source}");
        }
        // Comments still hide what they hold, nested comments and raw blocks included.
        let t = parse("a{% comment %}{{ x }}{% if x %}{% endif %}{% comment %}{% raw %}{% endcomment %}{% endraw %}{% endcomment %}{% endcomment %}b").unwrap();
        assert_eq!(t.render(&json!({})).unwrap(), "ab");
        assert!(parse("{% comment %}{% endcomment %}{% comment %}{% endif %}").is_err());
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
