//! Every common Postgres type, as each destination receives it.
//!
//! The webhook gets JSON, checked in the raw request body (numbers digit for digit, not after
//! parsing them into f64). The expected encoding of each type, and why:
//!
//! | type | sent as | note |
//! |---|---|---|
//! | smallint, integer, bigint | JSON number, exact | `to_jsonb` too; bigint beyond 2^53 stays exact in the text |
//! | numeric | JSON number with exactly Postgres' digits and scale (`1.50` stays `1.50`) | `to_jsonb` too; a decimal must not go through a binary float |
//! | numeric / float NaN, ±Infinity | strings `"NaN"`, `"Infinity"`, `"-Infinity"` | `to_jsonb` too; JSON has no such numbers, and null would be confused with SQL NULL |
//! | real, double precision | JSON number, shortest round-trip spelling | `to_jsonb` too |
//! | boolean | `true` / `false` | |
//! | text | JSON string, any length (1 MB here), non-BMP characters intact, `"` `\` and control characters escaped | |
//! | date | `"2024-02-29"` | `to_jsonb` too (ISO 8601, whatever DateStyle) |
//! | timestamp | `"2024-02-29T13:14:15.123456"` (no offset: it has none) | `to_jsonb` too |
//! | timestamptz | ISO 8601 with the server's TimeZone offset (the test cluster's is UTC: `"2024-07-01T12:00:00.5+00:00"`) | `to_jsonb` writes the session TimeZone's offset: a preview in a session with another TimeZone must show what the run sends |
//! | time, timetz | `"13:14:15.5"`, `"10:00:00+02"` | `to_jsonb` too |
//! | interval | ISO 8601 duration `"P1Y2M3DT4H5M6.5S"` | `to_jsonb` writes IntervalStyle's text (`1 year 2 mons ...`), which nothing outside Postgres parses; ISO 8601 is what Debezium, JSON Schema (`format: duration`) and java.time / Temporal read |
//! | uuid, inet, enum | their text | `to_jsonb` too |
//! | arrays | JSON arrays (NULL elements as null, 2-D as nested arrays) | `to_jsonb` too |
//! | jsonb, json | embedded JSON (not a string), numbers exact | `to_jsonb` too |
//! | bytea | base64 (RFC 4648, padded): `"3q2+7wD/"` | `to_jsonb` writes `"\\xdeadbeef00ff"` (bytea_output text); base64 is JSON's convention for bytes (OpenAPI `format: byte`, Debezium, protobuf JSON) |
//! | composite | JSON object by field name | `to_jsonb` too |
//! | NULL of any type | null | |
//!
//! HubSpot (property values are strings): numbers in their exact decimal spelling, booleans
//! `true`/`false`, dates `YYYY-MM-DD` (what a HubSpot date property takes besides midnight-UTC
//! milliseconds), datetimes ISO 8601 in UTC, arrays as JSON text, NULL as "" (clears).
mod common;
use common::*;
use postgres::Client;
use retl_e2e::fake_hubspot::{FakeHubSpot, PropertySpec};
use serde_json::Value;
use std::collections::BTreeMap;

/// JSON with numbers kept as written, so digits can be compared exactly.
#[derive(Clone, Debug, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(BTreeMap<String, J>),
}

impl J {
    fn get(&self, name: &str) -> &J {
        match self {
            J::Obj(m) => m.get(name).unwrap_or_else(|| panic!("no member {name:?} in {}", short(self))),
            other => panic!("not an object: {}", short(other)),
        }
    }
    fn items(&self) -> &[J] {
        match self {
            J::Arr(a) => a,
            other => panic!("not an array: {}", short(other)),
        }
    }
}

/// Debug text, cut short (one of the values is 1 MB).
fn short(j: &J) -> String {
    let mut s = format!("{j:?}");
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Parses strict JSON (RFC 8259): NaN, Infinity, trailing commas etc. are errors.
fn parse(text: &str) -> J {
    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }
    impl P<'_> {
        fn fail(&self, what: &str) -> ! {
            let from = self.i.saturating_sub(40);
            let to = (self.i + 40).min(self.s.len());
            panic!("invalid JSON at byte {} ({what}): ...{}...", self.i, String::from_utf8_lossy(&self.s[from..to]))
        }
        fn ws(&mut self) {
            while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            }
        }
        fn eat(&mut self, b: u8) {
            self.ws();
            if self.s.get(self.i) != Some(&b) {
                self.fail(&format!("expected {:?}", b as char));
            }
            self.i += 1;
        }
        fn value(&mut self) -> J {
            self.ws();
            match self.s.get(self.i) {
                Some(b'{') => {
                    self.i += 1;
                    let mut m = BTreeMap::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return J::Obj(m);
                    }
                    loop {
                        self.ws();
                        let k = self.string();
                        self.eat(b':');
                        let v = self.value();
                        if m.insert(k.clone(), v).is_some() {
                            self.fail(&format!("duplicate member {k:?}"));
                        }
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return J::Obj(m);
                            }
                            _ => self.fail("expected , or }"),
                        }
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    let mut a = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return J::Arr(a);
                    }
                    loop {
                        a.push(self.value());
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return J::Arr(a);
                            }
                            _ => self.fail("expected , or ]"),
                        }
                    }
                }
                Some(b'"') => J::Str(self.string()),
                Some(b't') if self.s[self.i..].starts_with(b"true") => {
                    self.i += 4;
                    J::Bool(true)
                }
                Some(b'f') if self.s[self.i..].starts_with(b"false") => {
                    self.i += 5;
                    J::Bool(false)
                }
                Some(b'n') if self.s[self.i..].starts_with(b"null") => {
                    self.i += 4;
                    J::Null
                }
                Some(b'-' | b'0'..=b'9') => {
                    let start = self.i;
                    if self.s[self.i] == b'-' {
                        self.i += 1;
                    }
                    let digits = |p: &mut Self| {
                        let from = p.i;
                        while p.i < p.s.len() && p.s[p.i].is_ascii_digit() {
                            p.i += 1;
                        }
                        if p.i == from {
                            p.fail("expected a digit");
                        }
                    };
                    if self.s.get(self.i) == Some(&b'0') {
                        self.i += 1;
                    } else {
                        digits(self);
                    }
                    if self.s.get(self.i) == Some(&b'.') {
                        self.i += 1;
                        digits(self);
                    }
                    if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
                        self.i += 1;
                        if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                            self.i += 1;
                        }
                        digits(self);
                    }
                    J::Num(String::from_utf8(self.s[start..self.i].to_vec()).unwrap())
                }
                _ => self.fail("expected a value"),
            }
        }
        fn hex4(&mut self) -> u32 {
            let h = self.s.get(self.i..self.i + 4).unwrap_or_else(|| self.fail("short \\u escape"));
            let v = u32::from_str_radix(std::str::from_utf8(h).unwrap_or(""), 16).unwrap_or_else(|_| self.fail("bad \\u escape"));
            self.i += 4;
            v
        }
        fn string(&mut self) -> String {
            self.eat(b'"');
            let mut out = String::new();
            loop {
                let start = self.i;
                while self.i < self.s.len() && !matches!(self.s[self.i], b'"' | b'\\') {
                    if self.s[self.i] < 0x20 {
                        self.fail("unescaped control character in a string");
                    }
                    self.i += 1;
                }
                out.push_str(std::str::from_utf8(&self.s[start..self.i]).unwrap_or_else(|_| self.fail("invalid UTF-8")));
                match self.s.get(self.i) {
                    Some(b'"') => {
                        self.i += 1;
                        return out;
                    }
                    Some(b'\\') => {
                        self.i += 1;
                        let c = self.s.get(self.i).copied().unwrap_or_else(|| self.fail("unfinished escape"));
                        self.i += 1;
                        match c {
                            b'"' => out.push('"'),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'n' => out.push('\n'),
                            b'r' => out.push('\r'),
                            b't' => out.push('\t'),
                            b'u' => {
                                let hi = self.hex4();
                                let code = if (0xD800..0xDC00).contains(&hi) {
                                    if !self.s[self.i..].starts_with(b"\\u") {
                                        self.fail("lone high surrogate");
                                    }
                                    self.i += 2;
                                    let lo = self.hex4();
                                    if !(0xDC00..0xE000).contains(&lo) {
                                        self.fail("bad low surrogate");
                                    }
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                } else {
                                    hi
                                };
                                out.push(char::from_u32(code).unwrap_or_else(|| self.fail("lone surrogate")));
                            }
                            _ => self.fail("unknown escape"),
                        }
                    }
                    _ => self.fail("unterminated string"),
                }
            }
        }
    }
    let mut p = P { s: text.as_bytes(), i: 0 };
    let v = p.value();
    p.ws();
    if p.i != p.s.len() {
        p.fail("trailing characters");
    }
    v
}

/// A JSON string literal for `s`.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Differences between an expected and an actual object, member by member.
fn differences(what: &str, expected: &J, actual: &J) -> Vec<String> {
    let (J::Obj(e), J::Obj(a)) = (expected, actual) else {
        return vec![format!("{what}: expected {}, got {}", short(expected), short(actual))];
    };
    let mut out = Vec::new();
    for (name, want) in e {
        match a.get(name) {
            None => out.push(format!("{what}.{name}: missing (expected {})", short(want))),
            Some(got) if got != want => out.push(format!("{what}.{name}: expected {}, got {}", short(want), short(got))),
            Some(_) => {}
        }
    }
    for name in a.keys().filter(|n| !e.contains_key(*n)) {
        out.push(format!("{what}.{name}: not expected, got {}", short(&a[name])));
    }
    out
}

const LONG_TEXT_BYTES: usize = 1 << 20;

fn long_text() -> String {
    "0123456789abcdef".repeat(LONG_TEXT_BYTES / 16)
}

const UNICODE: &str = "𝔘𝔫𝔦 😀 é";
const ESCAPES_SQL: &str = r#"E'quote \" backslash \\ slash / tab \t newline \n cr \r bell \x07 esc \x1b unit \x1f del \x7f'"#;
const ESCAPES: &str = "quote \" backslash \\ slash / tab \t newline \n cr \r bell \u{7} esc \u{1b} unit \u{1f} del \u{7f}";

struct Types {
    client: Client,
    sync: String,
}

/// A table with one column of each type and three rows (1: values, 2: all NULL, 3: edge
/// values), written in a session whose TimeZone is America/New_York; a model over it; a
/// webhook destination at `url`; a sync sending every column.
fn set_up(url: &str) -> Types {
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("ty");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    let long = long_text();
    client
        .batch_execute(&format!(
            "SET TimeZone = 'America/New_York';
             CREATE TYPE {base}_mood AS ENUM ('sad', 'happy');
             CREATE TYPE {base}_addr AS (street text, zip int, geo numeric);
             CREATE TABLE {table} (
               id int PRIMARY KEY,
               c_smallint smallint, c_integer integer, c_bigint bigint,
               c_numeric numeric, c_numeric_tenth numeric, c_numeric_scaled numeric(10,2),
               c_numeric_nan numeric, c_numeric_inf numeric, c_numeric_ninf numeric,
               c_real real, c_double double precision, c_double_neg double precision,
               c_double_nan double precision, c_double_inf double precision, c_double_ninf double precision,
               c_bool boolean, c_text_long text, c_unicode text, c_escapes text,
               c_date date, c_timestamp timestamp, c_timestamptz timestamptz, c_time time, c_timetz timetz,
               c_interval interval, c_uuid uuid, c_inet inet, c_inet6 inet,
               c_int_array int[], c_text_array text[], c_int_2d int[],
               c_jsonb jsonb, c_json json, c_bytea bytea, c_enum {base}_mood, c_composite {base}_addr);
             INSERT INTO {table} VALUES (1,
               32767, 2147483647, 9223372036854775807,
               12345678901234567890.123456789012345678901234567890, 0.1, 1.50,
               'NaN', 'Infinity', '-Infinity',
               1.1, 0.1, -2.5,
               'NaN', 'Infinity', '-Infinity',
               true, '{long}', '{UNICODE}', {ESCAPES_SQL},
               '2024-02-29', '2024-02-29 13:14:15.123456', '2024-07-01 08:00:00.5', '13:14:15.5', '10:00:00+02',
               '1 year 2 mons 3 days 04:05:06.5', '4ad0b1e2-0000-4000-8000-000000000001', '192.168.0.1/24', '2001:db8::1',
               ARRAY[1, 2, NULL], ARRAY['a', NULL, 'c\"d'], '{{{{1,2}},{{3,4}}}}',
               '{{\"n\": 1.000000000000000000001, \"big\": 123456789012345678901234567890, \"nested\": {{\"a\": [1, \"two\", null, true, 0.1]}}}}',
               '{{\"b\": 2.50, \"a\": [1]}}', '\\xdeadbeef00ff', 'happy', ROW('Main St', 12345, 1.10));
             INSERT INTO {table} (id) VALUES (2);
             INSERT INTO {table} (id, c_smallint, c_integer, c_bigint, c_numeric, c_numeric_tenth, c_numeric_scaled,
                                  c_text_long, c_int_array, c_jsonb, c_bytea, c_interval)
               VALUES (3, -32768, -2147483648, -9223372036854775808, -0.000000000000000000001, 0, 0,
                       '', '{{}}', '{{}}', '', '0');
             RESET TimeZone;
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
             SELECT retl.create_sync(name => '{sync}', model => '{model}', destination => '{server}');"
        ))
        .unwrap();
    Types { client, sync }
}

/// What each row's fields must arrive as (JSON text; numbers compared digit for digit).
fn expected_fields() -> BTreeMap<i64, J> {
    let row1 = format!(
        r#"{{"id": 1,
            "c_smallint": 32767, "c_integer": 2147483647, "c_bigint": 9223372036854775807,
            "c_numeric": 12345678901234567890.123456789012345678901234567890, "c_numeric_tenth": 0.1, "c_numeric_scaled": 1.50,
            "c_numeric_nan": "NaN", "c_numeric_inf": "Infinity", "c_numeric_ninf": "-Infinity",
            "c_real": 1.1, "c_double": 0.1, "c_double_neg": -2.5,
            "c_double_nan": "NaN", "c_double_inf": "Infinity", "c_double_ninf": "-Infinity",
            "c_bool": true, "c_text_long": {long}, "c_unicode": {unicode}, "c_escapes": {escapes},
            "c_date": "2024-02-29", "c_timestamp": "2024-02-29T13:14:15.123456",
            "c_timestamptz": "2024-07-01T12:00:00.5+00:00", "c_time": "13:14:15.5", "c_timetz": "10:00:00+02",
            "c_interval": "P1Y2M3DT4H5M6.5S", "c_uuid": "4ad0b1e2-0000-4000-8000-000000000001",
            "c_inet": "192.168.0.1/24", "c_inet6": "2001:db8::1",
            "c_int_array": [1, 2, null], "c_text_array": ["a", null, "c\"d"], "c_int_2d": [[1, 2], [3, 4]],
            "c_jsonb": {{"n": 1.000000000000000000001, "big": 123456789012345678901234567890, "nested": {{"a": [1, "two", null, true, 0.1]}}}},
            "c_json": {{"b": 2.50, "a": [1]}}, "c_bytea": "3q2+7wD/", "c_enum": "happy",
            "c_composite": {{"street": "Main St", "zip": 12345, "geo": 1.10}}}}"#,
        long = quoted(&long_text()),
        unicode = quoted(UNICODE),
        escapes = quoted(ESCAPES),
    );
    let J::Obj(columns) = parse(&row1) else { unreachable!() };
    let nulls: BTreeMap<String, J> = columns.keys().map(|k| (k.clone(), J::Null)).collect();
    let mut row2 = nulls.clone();
    row2.insert("id".into(), J::Num("2".into()));
    let mut row3 = nulls;
    let J::Obj(edges) = parse(
        r#"{"id": 3, "c_smallint": -32768, "c_integer": -2147483648, "c_bigint": -9223372036854775808,
            "c_numeric": -0.000000000000000000001, "c_numeric_tenth": 0, "c_numeric_scaled": 0.00,
            "c_text_long": "", "c_int_array": [], "c_jsonb": {}, "c_bytea": "", "c_interval": "PT0S"}"#,
    ) else {
        unreachable!()
    };
    row3.extend(edges);
    BTreeMap::from([(1, J::Obj(columns)), (2, J::Obj(row2)), (3, J::Obj(row3))])
}

/// Every record of every request the fake answered, by key id: (op, key, fields), from the
/// raw bodies.
fn records_sent(fake: &FakeWebhook) -> BTreeMap<i64, (J, J, J)> {
    let mut out = BTreeMap::new();
    for request in fake.requests() {
        assert_eq!(request.status, 200, "the fake refused a request: {}", request.raw_body().chars().take(500).collect::<String>());
        let body = parse(request.raw_body());
        for record in body.get("records").items() {
            let key = record.get("key").clone();
            let J::Num(id) = key.get("id") else { panic!("key {}", short(&key)) };
            out.insert(id.parse().unwrap(), (record.get("op").clone(), key.clone(), record.get("fields").clone()));
        }
    }
    out
}

#[test]
fn every_common_type_reaches_the_webhook_encoded_exactly() {
    let fake = FakeWebhook::start();
    let mut t = set_up(&fake.url());
    let _cleanup = DropSyncs(vec![t.sync.clone()]);
    let run = run_sync(&mut t.client, &t.sync);
    assert_eq!((run.status.as_str(), run.inserts, run.delivered, run.failed), ("succeeded", 3, 3, 0), "{run:?}");
    let sent = records_sent(&fake);
    assert_eq!(sent.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    let mut problems = Vec::new();
    for (id, want) in expected_fields() {
        let (op, key, fields) = &sent[&id];
        assert_eq!((op, key), (&J::Str("upsert".into()), &parse(&format!(r#"{{"id": {id}}}"#))));
        problems.extend(differences(&format!("row {id}"), &want, fields));
    }
    assert!(problems.is_empty(), "{} values arrived wrong:\n{}", problems.len(), problems.join("\n"));

    // Nothing changed, so nothing is sent again: the encoding is stable from run to run.
    fake.clear_journal();
    let again = run_sync(&mut t.client, &t.sync);
    assert_eq!((again.status.as_str(), again.inserts + again.updates + again.deletes), ("succeeded", 0), "{again:?}");
    assert_eq!(fake.request_count(), 0);
}

/// Fingerprints (hash version 4, fingerprint.rs) take most types by their bytes and the rest
/// by text: every change a destination would see is sent, including those a type's equality
/// hides (an interval written another way, a renamed enum label, a case change under a
/// nondeterministic collation, and since version 4 a numeric's trailing zeros: 0.1 and 0.10
/// are the same number, written differently in the payload).
#[test]
fn every_change_a_destination_would_see_is_sent_again() {
    let fake = FakeWebhook::start();
    let mut t = set_up(&fake.url());
    let _cleanup = DropSyncs(vec![t.sync.clone()]);
    assert_eq!(run_sync(&mut t.client, &t.sync).delivered, 3);
    let base = t.sync.trim_end_matches("_s").to_string();
    let changes = [
        ("UPDATE {t} SET c_interval = c_interval - interval '1 day' + interval '24 hours' WHERE id = 1", "c_interval", 1),
        ("ALTER TYPE {base}_mood RENAME VALUE 'happy' TO 'glad'", "c_enum", 1),
        ("UPDATE {t} SET c_text_array = ARRAY['A', NULL, 'c\"d'] WHERE id = 1", "c_text_array", 1),
        ("UPDATE {t} SET c_jsonb = jsonb_set(c_jsonb, '{nested,a,0}', '2') WHERE id = 1", "c_jsonb", 1),
        ("UPDATE {t} SET c_json = '{\"b\": 2.5, \"a\": [1]}' WHERE id = 1", "c_json", 1),
        ("UPDATE {t} SET c_timestamptz = c_timestamptz + interval '1 microsecond' WHERE id = 1", "c_timestamptz", 1),
        ("UPDATE {t} SET c_composite = ROW('Main St', 12345, 1.1) WHERE id = 1", "c_composite", 1),
        ("UPDATE {t} SET c_bytea = '\\xdeadbeef00fe' WHERE id = 1", "c_bytea", 1),
        ("UPDATE {t} SET c_real = 1.2 WHERE id = 1", "c_real", 1),
        ("UPDATE {t} SET c_bool = false WHERE id = 1", "c_bool", 1),
        ("UPDATE {t} SET c_escapes = replace(c_escapes, 'quote', 'QUOTE') WHERE id = 1", "c_escapes", 1),
        ("UPDATE {t} SET c_numeric_tenth = 0.10 WHERE id = 1", "c_numeric_tenth", 1),
    ];
    for (sql, column, sent) in changes {
        fake.clear_journal();
        let sql = sql.replace("{t}", &format!("{base}_t")).replace("{base}", &base);
        t.client.batch_execute(&sql).unwrap();
        let run = run_sync(&mut t.client, &t.sync);
        assert_eq!(
            (run.status.as_str(), run.inserts + run.updates + run.deletes, run.delivered, fake.request_count()),
            ("succeeded", sent, sent, sent as usize),
            "{column} after {sql}: {run:?}"
        );
    }

    // A nondeterministic collation: 'bob' and 'BOB' are equal there, and still a change.
    let fake_ci = FakeWebhook::start();
    t.client
        .batch_execute(&format!(
            "CREATE COLLATION {base}_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             CREATE TABLE {base}_ci_t (id int PRIMARY KEY, name text COLLATE {base}_ci);
             INSERT INTO {base}_ci_t VALUES (1, 'bob');
             SELECT retl.create_model(name => '{base}_ci_m', query => 'SELECT * FROM {base}_ci_t');
             CREATE SERVER {base}_ci_d FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{url}');
             SELECT retl.create_sync(name => '{base}_ci_s', model => '{base}_ci_m', destination => '{base}_ci_d');",
            url = fake_ci.url()
        ))
        .unwrap();
    let _cleanup_ci = DropSyncs(vec![format!("{base}_ci_s")]);
    assert_eq!(run_sync(&mut t.client, &format!("{base}_ci_s")).delivered, 1);
    t.client.batch_execute(&format!("UPDATE {base}_ci_t SET name = 'BOB'")).unwrap();
    let run = run_sync(&mut t.client, &format!("{base}_ci_s"));
    assert_eq!((run.status.as_str(), run.updates, run.delivered), ("succeeded", 1, 1), "{run:?}");
    assert_eq!(fake_ci.records()[r#"{"id":1}"#]["name"], "BOB");
}

#[test]
fn preview_shows_exactly_what_a_run_sends_whatever_the_session_settings() {
    // retl.preview is "what the next run would send": run in a session whose TimeZone,
    // IntervalStyle and bytea_output differ from the server's, it must still show the payload
    // the worker sends.
    let fake = FakeWebhook::start();
    let mut t = set_up(&fake.url());
    let _cleanup = DropSyncs(vec![t.sync.clone()]);
    t.client
        .batch_execute("SET TimeZone = 'Asia/Kolkata'; SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'")
        .unwrap();
    let previewed: BTreeMap<i64, J> = t
        .client
        .query("SELECT (key->>'id')::int8, payload::text FROM retl.preview($1)", &[&t.sync])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), parse(r.get(1))))
        .collect();
    assert_eq!(run_sync(&mut t.client, &t.sync).status, "succeeded");
    let sent = records_sent(&fake);
    let mut problems = Vec::new();
    for (id, (_, _, fields)) in &sent {
        problems.extend(differences(&format!("row {id} (preview vs sent)"), &previewed[id], fields));
    }
    assert_eq!(previewed.len(), sent.len());
    assert!(problems.is_empty(), "preview differs from what was sent:\n{}", problems.join("\n"));
}

#[test]
fn hubspot_gets_each_type_as_the_property_string_it_expects() {
    let hs = FakeHubSpot::start("pat-types");
    let prop = |name: &str, kind: &str, unique: bool| PropertySpec { name: name.into(), kind: kind.into(), read_only: false, unique };
    hs.add_object(
        "p_typed",
        vec![
            prop("ext_id", "string", true),
            prop("amount", "number", false),
            prop("ratio", "number", false),
            prop("big_count", "number", false),
            prop("flag", "bool", false),
            prop("day", "datetime", false),
            prop("at", "datetime", false),
            prop("note", "string", false),
            prop("tags", "string", false),
            prop("cleared", "string", false),
        ],
    );
    let mut client = connect();
    ensure_extension(&mut client);
    let base = unique("tyhs");
    let (table, model, server, sync) = (format!("{base}_t"), format!("{base}_m"), format!("{base}_d"), format!("{base}_s"));
    client
        .batch_execute(&format!(
            "SET TimeZone = 'America/New_York';
             CREATE TABLE {table} (ext_id text PRIMARY KEY, amount numeric, ratio float8, big_count bigint, flag boolean,
                                   day date, at timestamptz, note text, tags text[], cleared text);
             INSERT INTO {table} VALUES
               ('t-1', 12345678901234567890.123456789, 0.1, 9007199254740993, true, '2024-02-29', '2024-07-01 08:00:00.5',
                '{UNICODE} \"q\"', ARRAY['a', NULL, 'c'], NULL),
               ('t-2', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
             RESET TimeZone;
             SELECT retl.create_model(name => '{model}', query => 'SELECT * FROM {table}', primary_key => '{{ext_id}}');
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'hubspot', url '{url}', object 'p_typed', id_property 'ext_id');
             CREATE USER MAPPING FOR CURRENT_USER SERVER {server} OPTIONS (token 'pat-types');",
            url = hs.base_url(),
        ))
        .unwrap();
    client.execute("SELECT retl.create_sync(name => $1, model => $2, destination => $3)", &[&sync, &model, &server]).unwrap();
    let _cleanup = DropSyncs(vec![sync.clone()]);
    let run = run_sync(&mut client, &sync);
    assert_eq!((run.status.as_str(), run.delivered, run.failed), ("succeeded", 2, 0), "{run:?}");
    let upserts: Vec<Value> = hs
        .calls()
        .into_iter()
        .filter(|c| c.path.ends_with("/batch/upsert"))
        .flat_map(|c| c.body.unwrap()["inputs"].as_array().unwrap().clone())
        .collect();
    let sent: BTreeMap<String, Value> = upserts.iter().map(|i| (i["id"].as_str().unwrap().to_string(), i["properties"].clone())).collect();
    let expected = BTreeMap::from([
        (
            "t-1".to_string(),
            serde_json::json!({
                "amount": "12345678901234567890.123456789",
                "ratio": "0.1",
                "big_count": "9007199254740993",
                "flag": "true",
                "day": "2024-02-29",
                "at": "2024-07-01T12:00:00.5+00:00",
                "note": format!("{UNICODE} \"q\""),
                "tags": "[\"a\",null,\"c\"]",
                "cleared": "",
            }),
        ),
        (
            "t-2".to_string(),
            serde_json::json!({
                "amount": "", "ratio": "", "big_count": "", "flag": "", "day": "", "at": "", "note": "", "tags": "", "cleared": "",
            }),
        ),
    ]);
    let mut problems = Vec::new();
    for (id, want) in &expected {
        for (name, value) in want.as_object().unwrap() {
            let got = &sent[id][name];
            if got != value {
                problems.push(format!("{id}.{name}: expected {value}, got {got}"));
            }
        }
        assert_eq!(sent[id].as_object().unwrap().len(), want.as_object().unwrap().len(), "{id}: {}", sent[id]);
    }
    assert!(problems.is_empty(), "HubSpot property values:\n{}", problems.join("\n"));
    let held: BTreeMap<String, Value> = hs.objects("p_typed").values().map(|p| (p["ext_id"].as_str().unwrap().to_string(), p["amount"].clone())).collect();
    assert_eq!(held.len(), 2, "HubSpot accepted both records: {held:?}");
}
