//! Every recipe of docs/RECIPES.md, run as written against a fake of its vendor: the only
//! changes are the server's `url` (pointed at the fake) and the credentials (the fake's).
mod common;
use common::*;
use retl_e2e::fake_customerio::FakeCustomerIo;
use retl_e2e::fake_intercom::FakeIntercom;
use retl_e2e::fake_meta::FakeMeta;
use retl_e2e::fake_slack::FakeSlack;
use retl_e2e::fake_stripe::FakeStripe;
use serde_json::json;
use std::time::Duration;

/// The SQL block that follows `<!-- recipe: name -->` in docs/RECIPES.md.
fn recipe(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/RECIPES.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = text.find(&format!("<!-- recipe: {name} -->")).unwrap_or_else(|| panic!("no recipe {name}"));
    let block = &text[start..];
    let sql = block.split("```sql").nth(1).and_then(|b| b.split("```").next()).expect("a sql block");
    sql.to_string()
}

/// Runs `sql` (a recipe with `replacements` made, each of which must apply) in its own schema
/// `schema`, after `setup`; `objects` are (syncs, models, servers) to drop before and after.
struct Recipe {
    client: postgres::Client,
    schema: String,
    syncs: Vec<&'static str>,
    models: Vec<&'static str>,
    servers: Vec<&'static str>,
}

impl Recipe {
    fn run(name: &str, replacements: &[(&str, String)], setup: &str, syncs: Vec<&'static str>, models: Vec<&'static str>, servers: Vec<&'static str>) -> Recipe {
        let mut client = connect();
        ensure_extension(&mut client);
        let schema = format!("recipe_{name}");
        let mut r = Recipe { client, schema, syncs, models, servers };
        r.clean();
        let mut sql = recipe(name);
        for (from, to) in replacements {
            assert!(sql.contains(from), "recipe {name} no longer contains {from:?}");
            sql = sql.replace(from, to);
        }
        r.client
            .batch_execute(&format!("CREATE SCHEMA {0}; SET search_path = {0}, public; {setup}", r.schema))
            .unwrap();
        // One statement at a time, as psql would (each commits before the next: the worker that
        // checks a sync's fields must see the committed server).
        for statement in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            r.client.batch_execute(statement).unwrap_or_else(|e| panic!("recipe {name}: {statement}: {e}"));
        }
        r
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
fn slack_a_message_for_every_new_pro_signup() {
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
fn customerio_identify_people_and_erase_them_on_request() {
    let cio = FakeCustomerIo::start("site-r", "key-r");
    let mut r = Recipe::run(
        "customerio",
        &[("type 'customerio'", format!("type 'customerio', url '{}'", cio.base_url())), ("your-site-id:your-api-key", "site-r:key-r".into())],
        "CREATE TABLE users (id bigint PRIMARY KEY, email text, plan text, signed_up_at timestamptz);
         INSERT INTO users VALUES (1, 'a@example.com', 'pro', '2024-01-02 03:04:05+00'), (2, 'b@example.com', 'free', '2024-02-01 00:00:00+00');
         CREATE TABLE gdpr_erasures (user_id bigint PRIMARY KEY);",
        vec!["erase_in_customerio", "people_to_customerio"],
        vec!["cio_erasures", "cio_people"],
        vec!["customerio"],
    );
    let run = run_sync(&mut r.client, "people_to_customerio");
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 2), "{run:?}");
    assert_eq!(cio.customers()["1"], json!({"email": "a@example.com", "plan": "pro", "created_at": 1704164645}));
    r.client.batch_execute("INSERT INTO gdpr_erasures VALUES (2)").unwrap();
    wait_until(Duration::from_secs(30), "the erasure", || cio.deleted() == ["2"]);
    assert_eq!(cio.customers().keys().collect::<Vec<_>>(), ["1"]);
}

#[test]
fn meta_high_value_users_as_a_custom_audience() {
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
fn intercom_churn_risk_as_a_tag_on_existing_contacts() {
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
    let run = run_sync(&mut r.client, "churn_risk_to_intercom");
    assert_eq!((run.status.as_str(), run.delivered), ("succeeded", 2), "{run:?}");
    assert_eq!(tagged(&ic), ["1", "3"]);
    r.client.batch_execute("UPDATE customers SET churn_risk = 0.1 WHERE id = 3").unwrap();
    run_sync(&mut r.client, "churn_risk_to_intercom");
    assert_eq!(tagged(&ic), ["1"]);
}
