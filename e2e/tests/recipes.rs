//! Every recipe of docs/RECIPES.md, run as written against a fake of its vendor: the only
//! changes are the server's `url` (pointed at the fake) and the credentials (the fake's).
mod common;
use common::*;
use retl_e2e::fake_customerio::FakeCustomerIo;
use retl_e2e::fake_intercom::FakeIntercom;
use retl_e2e::fake_meta::FakeMeta;
use retl_e2e::fake_salesforce::{FakeSalesforce, FieldSpec};
use retl_e2e::fake_slack::FakeSlack;
use retl_e2e::fake_stripe::FakeStripe;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Waits, when a quarter hour (:00, :15, :30, :45 UTC) is less than a minute away, until it
/// has passed: every recipe's schedule fires on such a slot, and a scheduled run starting in
/// the middle of a test would take the rows the test's own run is to send.
fn clear_of_schedule_slots(client: &mut postgres::Client) {
    let left: f64 = client
        .query_one("SELECT (900 - extract(epoch FROM clock_timestamp())::numeric % 900)::float8", &[])
        .unwrap()
        .get(0);
    if left < 60.0 {
        std::thread::sleep(Duration::from_secs_f64(left + 2.0));
    }
}

/// Runs `sql` (a recipe with `replacements` made, each of which must apply) in its own schema
/// `schema`, after `setup`; `objects` are (syncs, models, servers) to drop before and after.
struct Recipe {
    /// Recipes share the names of servers, models and syncs (as their readers would): one at a
    /// time, whatever --test-threads says.
    _serial: std::sync::MutexGuard<'static, ()>,
    client: postgres::Client,
    schema: String,
    syncs: Vec<&'static str>,
    models: Vec<&'static str>,
    servers: Vec<&'static str>,
}

impl Recipe {
    fn run(name: &str, replacements: &[(&str, String)], setup: &str, syncs: Vec<&'static str>, models: Vec<&'static str>, servers: Vec<&'static str>) -> Recipe {
        Recipe::run_all(name, &[name], replacements, setup, syncs, models, servers)
    }

    /// Runs the recipes `names` one after the other (as a reader who follows one recipe
    /// after another would) in the schema `recipe_{label}`; each replacement must apply to
    /// one of them at least.
    fn run_all(
        label: &str,
        names: &[&str],
        replacements: &[(&str, String)],
        setup: &str,
        syncs: Vec<&'static str>,
        models: Vec<&'static str>,
        servers: Vec<&'static str>,
    ) -> Recipe {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut client = connect();
        ensure_extension(&mut client);
        let schema = format!("recipe_{label}");
        let mut r = Recipe { _serial: serial, client, schema, syncs, models, servers };
        r.clean();
        let mut sqls: Vec<String> = names.iter().map(|name| recipe(name)).collect();
        for (from, to) in replacements {
            assert!(sqls.iter().any(|sql| sql.contains(from)), "recipes {names:?} no longer contain {from:?}");
            for sql in &mut sqls {
                *sql = sql.replace(from, to);
            }
        }
        clear_of_schedule_slots(&mut r.client);
        r.client
            .batch_execute(&format!("CREATE SCHEMA {0}; SET search_path = {0}, public; {setup}", r.schema))
            .unwrap();
        for (name, sql) in names.iter().zip(&sqls) {
            r.statements(name, sql);
        }
        r
    }

    /// Runs `sql` one statement at a time, as psql would (each commits before the next: the
    /// worker that checks a sync's fields must see the committed server).
    fn statements(&mut self, name: &str, sql: &str) {
        for statement in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            self.client.batch_execute(statement).unwrap_or_else(|e| panic!("recipe {name}: {statement}: {e}"));
        }
    }

    /// Runs the recipe `name` as written, every statement but the last, and returns the rows of
    /// the last (a query).
    fn query(&mut self, name: &str) -> Vec<postgres::Row> {
        let sql = recipe(name);
        let sql = sql.trim().trim_end_matches(';');
        let (before, last) = sql.rsplit_once(";\n").unwrap_or(("", sql));
        self.statements(name, before);
        self.client.query(last.trim(), &[]).unwrap_or_else(|e| panic!("recipe {name}: {last}: {e}"))
    }

    fn clean(&mut self) {
        for sync in &self.syncs {
            if let Err(e) = self.client.execute("SELECT retl.drop_sync($1, if_exists => true)", &[sync]) {
                eprintln!("drop_sync {sync}: {e:?}");
            }
        }
        for model in &self.models {
            let audiences = "SELECT retl.drop_audience(a.name) FROM retl.audiences a JOIN retl.models m ON m.id = a.model_id WHERE m.name = $1";
            if let Err(e) = self.client.execute(audiences, &[model]) {
                eprintln!("drop audiences of {model}: {e:?}");
            }
            if let Err(e) = self.client.execute("SELECT retl.drop_model($1, if_exists => true)", &[model]) {
                eprintln!("drop_model {model}: {e:?}");
            }
        }
        for server in &self.servers {
            let _ = self.client.batch_execute(&format!("DROP SERVER IF EXISTS {server} CASCADE"));
        }
        let _ = self.client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

impl Drop for Recipe {
    fn drop(&mut self) {
        self.clean();
    }
}

#[test]
fn slack_an_alert_for_every_new_high_value_signup() {
    let slack = FakeSlack::start("xoxb-recipe");
    slack.add_channel("C0001", "sales");
    let mut r = Recipe::run(
        "slack",
        &[("type 'slack',", format!("type 'slack', url '{}',", slack.base_url())), ("xoxb-your-bot-token", "xoxb-recipe".into())],
        "CREATE TABLE signups (id bigint PRIMARY KEY, name text, region text, plan text);",
        vec!["pro_signups_to_slack"],
        vec!["pro_signups"],
        vec!["slack_sales"],
    );
    r.client
        .batch_execute("INSERT INTO signups VALUES (1, 'Ann', 'EU', 'pro'), (2, 'Bo', 'US', 'free'), (3, 'Cy', 'APAC', 'pro')")
        .unwrap();
    wait_until(Duration::from_secs(30), "two messages", || slack.messages("C0001").len() == 2);
    let mut texts: Vec<String> = slack.messages("C0001").into_iter().map(|m| m.text).collect();
    texts.sort();
    assert_eq!(texts, ["New pro signup: Ann in EU", "New pro signup: Cy in APAC"]);
}

#[test]
fn stripe_plan_and_health_score_into_customer_metadata() {
    let stripe = FakeStripe::start("sk_test_recipe");
    stripe.add_customer("cus_1", "a@example.com");
    stripe.add_customer("cus_2", "b@example.com");
    let mut r = Recipe::run(
        "stripe",
        &[("type 'stripe'", format!("type 'stripe', url '{}'", stripe.base_url())), ("sk_live_your_secret_key", "sk_test_recipe".into())],
        "CREATE TABLE accounts (id bigint PRIMARY KEY, stripe_customer_id text, plan text, health_score numeric);
         INSERT INTO accounts VALUES (1, 'cus_1', 'pro', 0.9), (2, 'cus_2', 'free', 0.4), (3, NULL, 'free', 0.1);",
        vec!["account_health_to_stripe"],
        vec!["account_health"],
        vec!["stripe"],
    );
    let run = run_sync(&mut r.client, "account_health_to_stripe");
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 2), "{run:?}");
    let customers = stripe.customers();
    assert_eq!(customers["cus_1"]["metadata"], json!({"plan": "pro", "health_score": "0.9"}));
    assert_eq!(customers["cus_2"]["metadata"], json!({"plan": "free", "health_score": "0.4"}));
}

#[test]
fn customerio_identify_people() {
    let cio = FakeCustomerIo::start("site-r", "key-r");
    let mut r = Recipe::run(
        "customerio",
        &[("type 'customerio'", format!("type 'customerio', url '{}'", cio.base_url())), ("your-site-id:your-api-key", "site-r:key-r".into())],
        "CREATE TABLE users (id bigint PRIMARY KEY, email text, plan text, signed_up_at timestamptz);
         INSERT INTO users VALUES (1, 'a@example.com', 'pro', '2024-01-02 03:04:05+00'), (2, 'b@example.com', 'free', '2024-02-01 00:00:00+00');",
        vec!["people_to_customerio"],
        vec!["cio_people"],
        vec!["customerio"],
    );
    let run = run_sync(&mut r.client, "people_to_customerio");
    assert_eq!((run.status.as_str(), run.delivered, run.api_calls), ("succeeded", 2, 2), "{run:?}");
    assert_eq!(
        cio.customers(),
        BTreeMap::from([
            ("1".to_string(), json!({"email": "a@example.com", "plan": "pro", "created_at": 1704164645})),
            ("2".to_string(), json!({"email": "b@example.com", "plan": "free", "created_at": 1706745600})),
        ])
    );
    let mut calls: Vec<(String, String, u16)> = cio.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect();
    calls.sort();
    assert_eq!(calls, [("PUT".into(), "/api/v1/customers/1".into(), 200), ("PUT".into(), "/api/v1/customers/2".into(), 200)]);
}

#[test]
fn meta_high_value_users_as_an_ad_audience() {
    let meta = FakeMeta::start("EAAB-recipe");
    meta.add_audience("23850000000000");
    let mut r = Recipe::run(
        "meta_audience",
        &[("type 'meta_audience',", format!("type 'meta_audience', url '{}',", meta.base_url())), ("your-system-user-access-token", "EAAB-recipe".into())],
        "CREATE TABLE users (id bigint PRIMARY KEY, email text, phone text, lifetime_value numeric);
         INSERT INTO users VALUES (1, 'Ann@Example.com', '+1 650 555 0100', 5000), (2, 'bo@example.com', NULL, 20);",
        vec!["high_value_to_meta"],
        vec!["high_value_users"],
        vec!["meta_high_value"],
    );
    let run = run_sync(&mut r.client, "high_value_to_meta");
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 1), "{run:?}");
    let members = meta.members("23850000000000");
    assert_eq!(members.len(), 1);
    let hashed: (String, String) = r
        .client
        .query_one("SELECT encode(sha256('ann@example.com'), 'hex'), encode(sha256('16505550100'), 'hex')", &[])
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!(members.into_iter().next().unwrap(), vec![hashed.0, hashed.1]);
}

#[test]
fn intercom_churn_risk_audience_mirrored_as_a_tag() {
    let ic = FakeIntercom::start("ic-recipe");
    for id in ["1", "2", "3"] {
        ic.add_contact(id, &format!("c{id}@example.com"));
    }
    let mut r = Recipe::run(
        "intercom",
        &[("type 'intercom',", format!("type 'intercom', url '{}',", ic.base_url())), ("your-intercom-access-token", "ic-recipe".into())],
        "CREATE TABLE customers (id bigint PRIMARY KEY, churn_risk numeric);
         INSERT INTO customers VALUES (1, 0.9), (2, 0.2), (3, 0.75);",
        vec!["churn_risk_to_intercom"],
        vec!["customer_risk"],
        vec!["intercom_tags"],
    );
    let tagged = |ic: &FakeIntercom| -> Vec<String> {
        ic.contacts().into_iter().filter(|(_, c)| c["tags"].as_array().unwrap().contains(&json!("churn_risk"))).map(|(k, _)| k).collect()
    };
    // The audience as the database has it: the tag must list exactly these contacts.
    let audience = |client: &mut postgres::Client| -> Vec<String> {
        client.query("SELECT external_id FROM retl_models.churn_risk_high ORDER BY 1", &[]).unwrap().iter().map(|row| row.get(0)).collect()
    };
    let calls = |ic: &FakeIntercom| -> Vec<(String, String, u16)> { ic.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect() };
    let run = run_sync(&mut r.client, "churn_risk_to_intercom");
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 2), "{run:?}");
    assert_eq!(tagged(&ic), ["1", "3"]);
    assert_eq!(tagged(&ic), audience(&mut r.client));
    // Customer 3 leaves the audience: one request untags them by the Intercom id the first
    // run learned; nothing else is sent, and the contact itself stays.
    ic.clear_calls();
    r.client.batch_execute("UPDATE customers SET churn_risk = 0.1 WHERE id = 3").unwrap();
    let leaving = run_sync(&mut r.client, "churn_risk_to_intercom");
    assert_eq!((leaving.status.as_str(), leaving.deletes, leaving.delivered, leaving.api_calls), ("succeeded", 1, 1, 1), "{leaving:?}");
    assert_eq!(calls(&ic), [("POST".into(), "/tags".into(), 200)]);
    let contact_3 = ic.contacts()["3"]["id"].clone();
    assert_eq!(ic.calls()[0].body, Some(json!({"name": "churn_risk", "users": [{"id": contact_3, "untag": true}]})));
    assert_eq!(tagged(&ic), ["1"]);
    assert_eq!(tagged(&ic), audience(&mut r.client));
    assert_eq!(ic.contacts().len(), 3);
    assert!(ic.contacts().values().all(|c| c["archived"] == false), "a tag mirror never archives contacts");
}

/// Salesforce's Lead as the recipe expects it: `App_User_Id__c` an external-id field,
/// `Lead_Score__c` a number; LastName and Company required, as in every org.
fn lead_object(sf: &FakeSalesforce) {
    sf.add_object(
        "Lead",
        "00Q",
        vec![
            FieldSpec::new("Id", "id").read_only().required().defaulted(),
            FieldSpec::new("LastName", "string").required(),
            FieldSpec::new("Company", "string").required(),
            FieldSpec::new("Email", "email"),
            FieldSpec::new("App_User_Id__c", "string").external_id(),
            FieldSpec::new("Lead_Score__c", "double"),
        ],
    );
}

/// The Salesforce recipe's server url and OAuth credentials, replaced by the fake's.
fn salesforce_replacements(sf: &FakeSalesforce) -> Vec<(&'static str, String)> {
    sf.configure_oauth("sf-recipe-client", "sf-recipe-secret", Some("sf-recipe-refresh"));
    vec![
        ("https://your-domain.my.salesforce.com", sf.base_url()),
        ("your-consumer-key", "sf-recipe-client".into()),
        ("your-consumer-secret", "sf-recipe-secret".into()),
        ("your-refresh-token", "sf-recipe-refresh".into()),
    ]
}

/// The leads Salesforce holds, by App_User_Id__c (the Id left out).
fn leads(sf: &FakeSalesforce) -> BTreeMap<String, Value> {
    sf.records("Lead")
        .into_values()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("Id");
            (r["App_User_Id__c"].as_str().unwrap().to_string(), r)
        })
        .collect()
}

/// The leads the model says Salesforce should hold, by App_User_Id__c.
fn scored_leads(client: &mut postgres::Client) -> BTreeMap<String, Value> {
    client
        .query("SELECT id, email, last_name, company, score FROM retl_models.lead_scores", &[])
        .unwrap()
        .iter()
        .map(|row| {
            let (id, email, last_name, company, score): (String, String, String, String, i32) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            (id.clone(), json!({"App_User_Id__c": id, "Email": email, "LastName": last_name, "Company": company, "Lead_Score__c": score}))
        })
        .collect()
}

fn sf_calls(sf: &FakeSalesforce) -> Vec<(String, String, u16)> {
    sf.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect()
}

const LEAD_UPSERT: &str = "/services/data/v62.0/composite/sobjects/Lead/App_User_Id__c";

#[test]
fn salesforce_lead_score_upserted_every_30_minutes() {
    let sf = FakeSalesforce::start("sf-recipe-unused");
    lead_object(&sf);
    let mut r = Recipe::run(
        "salesforce",
        &salesforce_replacements(&sf),
        "CREATE TABLE users (id bigint PRIMARY KEY, email text, last_name text, company text);
         CREATE TABLE page_views (user_id bigint REFERENCES users, path text);
         INSERT INTO users VALUES (1, 'ann@example.com', 'Lee', 'Acme'), (2, 'bo@example.com', 'Park', 'Globex'),
                                  (3, 'cy@example.com', 'Diaz', 'Initech');
         INSERT INTO page_views VALUES (1, '/'), (1, '/pricing');
         INSERT INTO page_views SELECT 3, CASE WHEN i <= 2 THEN '/pricing' ELSE '/docs' END FROM generate_series(1, 10) i;",
        vec!["lead_scores_to_salesforce"],
        vec!["lead_scores"],
        vec!["salesforce"],
    );
    // Every 30 minutes, on the clock: the next run is the next :00 or :30 (UTC), under 30
    // minutes away, and no run but the recipe's own first load happened.
    let (schedule, time_zone, ahead, minute, second): (String, String, f64, f64, f64) = r
        .client
        .query_one(
            "SELECT schedule, time_zone, extract(epoch FROM next_run_at - now())::float8,
                    extract(minute FROM next_run_at AT TIME ZONE 'UTC')::float8, extract(second FROM next_run_at)::float8
               FROM retl.syncs WHERE name = 'lead_scores_to_salesforce'",
            &[],
        )
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .unwrap();
    assert_eq!((schedule.as_str(), time_zone.as_str()), ("*/30 * * * *", "UTC"));
    assert!(ahead > 0.0 && ahead <= 1800.0, "next run in {ahead} s");
    assert!((minute == 0.0 || minute == 30.0) && second == 0.0, "next run at minute {minute}, second {second}");
    let triggers: Vec<String> = r
        .client
        .query("SELECT r.trigger FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id WHERE s.name = 'lead_scores_to_salesforce'", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(triggers, ["manual"]);

    // The first load (the recipe's retl.run): one token, the describe of create_sync, then
    // every lead in one Collections upsert.
    let first = last_run_of(&mut r.client, "lead_scores_to_salesforce");
    assert_eq!((first.status.as_str(), first.inserts + first.updates, first.delivered, first.api_calls), ("succeeded", 3, 3, 1), "{first:?}");
    assert_eq!(
        sf_calls(&sf),
        [
            ("POST".into(), "/services/oauth2/token".into(), 200),
            ("GET".into(), "/services/data/v62.0/sobjects/Lead/describe".into(), 200),
            ("PATCH".into(), LEAD_UPSERT.into(), 200),
        ]
    );
    assert_eq!(sf.calls()[0].body.as_ref().unwrap()["grant_type"], "refresh_token");
    let want = scored_leads(&mut r.client);
    assert_eq!(want["1"]["Lead_Score__c"], json!(50));
    assert_eq!(want["2"]["Lead_Score__c"], json!(0));
    assert_eq!(want["3"]["Lead_Score__c"], json!(100));
    assert_eq!(leads(&sf), want);

    // What the schedule does every 30 minutes, done now: only the lead whose score changed.
    sf.clear_calls();
    r.client.batch_execute("INSERT INTO page_views VALUES (2, '/pricing')").unwrap();
    let next = run_sync(&mut r.client, "lead_scores_to_salesforce");
    assert_eq!((next.status.as_str(), next.updates, next.delivered, next.api_calls), ("succeeded", 1, 1, 1), "{next:?}");
    assert_eq!(sf_calls(&sf), [("PATCH".into(), LEAD_UPSERT.into(), 200)]);
    let records = sf.calls()[0].body.as_ref().unwrap()["records"].clone();
    assert_eq!(
        records,
        json!([{"attributes": {"type": "Lead"}, "App_User_Id__c": "2", "Email": "bo@example.com", "LastName": "Park", "Company": "Globex", "Lead_Score__c": 40}])
    );
    assert_eq!(leads(&sf), scored_leads(&mut r.client));
    sf.clear_calls();
    let idle = run_sync(&mut r.client, "lead_scores_to_salesforce");
    assert_eq!((idle.delivered, idle.api_calls), (0, 0), "{idle:?}");
    assert!(sf.calls().is_empty());
}

/// Rows the extension keeps for key `{"id": "42"}` in its per-sync tables, for the syncs of
/// `model`.
fn rows_for_42(client: &mut postgres::Client, model: &str) -> i64 {
    let tables = ["snapshots", "outbox", "row_errors", "identities", "changed_keys"];
    let sql = tables
        .iter()
        .map(|t| {
            format!(
                "(SELECT count(*) FROM retl.{t} x JOIN retl.syncs s ON s.id = x.sync_id JOIN retl.models m ON m.id = s.model_id
                   WHERE m.name = $1 AND x.key = '{{\"id\": \"42\"}}')"
            )
        })
        .collect::<Vec<_>>()
        .join(" + ");
    client.query_one(&format!("SELECT {sql}"), &[&model]).unwrap().get(0)
}

#[test]
fn gdpr_erasure_one_request_every_destination() {
    let cio = FakeCustomerIo::start("site-g", "key-g");
    let sf = FakeSalesforce::start("sf-gdpr-unused");
    lead_object(&sf);
    let mut replacements = salesforce_replacements(&sf);
    replacements.push(("type 'customerio'", format!("type 'customerio', url '{}'", cio.base_url())));
    replacements.push(("your-site-id:your-api-key", "site-g:key-g".into()));
    // The Customer.io and Salesforce recipes' tables in one, and the erasure requests.
    let mut r = Recipe::run_all(
        "gdpr",
        &["customerio", "salesforce", "gdpr_erasure"],
        &replacements,
        "CREATE TABLE users (id bigint PRIMARY KEY, email text, plan text, signed_up_at timestamptz, last_name text, company text);
         CREATE TABLE page_views (user_id bigint REFERENCES users, path text);
         CREATE TABLE gdpr_erasures (user_id bigint PRIMARY KEY);
         INSERT INTO users VALUES (41, 'ann@example.com', 'pro', '2024-01-02 03:04:05+00', 'Lee', 'Acme'),
                                  (42, 'bo@example.com', 'free', '2024-02-01 00:00:00+00', 'Park', 'Globex'),
                                  (43, 'cy@example.com', 'pro', '2024-03-01 00:00:00+00', 'Diaz', 'Initech');
         INSERT INTO page_views VALUES (42, '/pricing'), (43, '/');",
        vec!["erase_in_customerio", "erase_in_salesforce", "people_to_customerio", "lead_scores_to_salesforce"],
        vec!["erasure_requests", "cio_people", "lead_scores"],
        vec!["customerio", "salesforce"],
    );
    // Person 42 is in both destinations (the Salesforce recipe loaded its leads already).
    let people = run_sync(&mut r.client, "people_to_customerio");
    assert_eq!((people.status.as_str(), people.delivered), ("succeeded", 3), "{people:?}");
    assert_eq!(cio.customers().keys().collect::<Vec<_>>(), ["41", "42", "43"]);
    assert_eq!(leads(&sf).keys().collect::<Vec<_>>(), ["41", "42", "43"]);
    let lead_ids: BTreeMap<String, String> =
        sf.records("Lead").into_iter().map(|(id, r)| (r["App_User_Id__c"].as_str().unwrap().to_string(), id)).collect();
    let (cio_before, leads_before) = (rows_for_42(&mut r.client, "cio_people"), rows_for_42(&mut r.client, "lead_scores"));
    assert_eq!((cio_before, leads_before), (1, 2), "a snapshot row each, and the lead's Salesforce Id");
    cio.clear_calls();
    sf.clear_calls();

    // One request, as the recipe makes it: both delete syncs run by themselves.
    r.statements("gdpr_erasure_request", &recipe("gdpr_erasure_request"));
    let settled = |client: &mut postgres::Client| -> bool {
        let busy: i64 = client
            .query_one(
                "SELECT count(*) FROM retl.runs r JOIN retl.syncs s ON s.id = r.sync_id
                  WHERE s.name LIKE 'erase_in_%' AND r.status IN ('queued', 'delivering')",
                &[],
            )
            .unwrap()
            .get(0);
        busy == 0
    };
    let mut check = Vec::new();
    wait_until(SHORT, "both erasure runs", || {
        check = r
            .query("gdpr_erasure_check")
            .iter()
            .map(|row| {
                let (name, trigger, status): (String, String, String) = (row.get(0), row.get(1), row.get(2));
                let (planned, delivered, error): (i64, i64, Option<String>) = (row.get(3), row.get(4), row.get(5));
                (name, trigger, status, planned, delivered, error)
            })
            .collect();
        check.len() == 2 && check.iter().all(|c| c.2 != "queued" && c.2 != "delivering") && settled(&mut r.client)
    });
    assert_eq!(
        check,
        [
            ("erase_in_customerio".to_string(), "change".to_string(), "succeeded".to_string(), 1, 1, None),
            ("erase_in_salesforce".to_string(), "change".to_string(), "succeeded".to_string(), 1, 1, None),
        ]
    );
    // Each destination got exactly the delete of person 42, and nothing else.
    let cio_calls: Vec<(String, String, u16)> = cio.calls().into_iter().map(|c| (c.method, c.path, c.status)).collect();
    assert_eq!(cio_calls, [("DELETE".into(), "/api/v1/customers/42".into(), 200)]);
    assert_eq!(sf_calls(&sf), [("DELETE".into(), "/services/data/v62.0/sobjects/Lead/App_User_Id__c/42".into(), 204)]);
    assert_eq!(cio.deleted(), ["42"]);
    assert_eq!(cio.customers().keys().collect::<Vec<_>>(), ["41", "43"]);
    assert_eq!(leads(&sf).keys().collect::<Vec<_>>(), ["41", "43"]);
    assert!(!sf.records("Lead").contains_key(&lead_ids["42"]));

    // Then the extension forgets the key: the request removed, forget once per model.
    let forgotten: BTreeMap<String, i64> = r.query("gdpr_erasure_forget").iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(forgotten.keys().collect::<Vec<_>>(), ["cio_people", "erasure_requests", "lead_scores"]);
    assert_eq!((forgotten["cio_people"], forgotten["lead_scores"]), (cio_before, leads_before), "{forgotten:?}");
    wait_until(SHORT, "the runs the request's removal caused", || settled(&mut r.client));
    for model in ["erasure_requests", "cio_people", "lead_scores"] {
        assert_eq!(rows_for_42(&mut r.client, model), 0, "{model} still holds the key");
    }
    // The audit log says it happened, per model, without the key.
    let audit: Vec<(String, String, Value)> = r
        .client
        .query(
            "SELECT object_type, object_name, after::text FROM retl.audit_log
              WHERE action = 'forget' AND object_name IN ('erasure_requests', 'cio_people', 'lead_scores') ORDER BY id DESC LIMIT 3",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), serde_json::from_str(row.get(2)).unwrap()))
        .collect();
    let mut audited: Vec<(String, String, i64)> =
        audit.iter().map(|(t, n, after)| (t.clone(), n.clone(), after["syncs"].as_i64().unwrap())).collect();
    audited.sort();
    assert_eq!(
        audited,
        [("key".into(), "cio_people".into(), 1), ("key".into(), "erasure_requests".into(), 2), ("key".into(), "lead_scores".into(), 1)]
    );
    assert!(audit.iter().all(|(_, _, after)| !after.to_string().contains("42")), "{audit:?}");
    // Removing the request sent nothing more anywhere.
    assert_eq!(cio.calls().len(), 1);
    assert_eq!(sf.calls().len(), 1);
}
