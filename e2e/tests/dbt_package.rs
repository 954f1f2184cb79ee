//! The dbt package (dbt/pg_reverse_etl) with real dbt-core and dbt-postgres (the versions of
//! dbt/requirements.txt, installed into .run/dbt-venv by `make e2e`): a throw-away dbt project
//! builds a table model whose after-commit post-hook defines the retl model and sync from the
//! model's `meta.retl` config and runs it; the fake destination receives exactly the model's
//! rows, a rebuild after one source change sends only that row, a failing run fails
//! `dbt build`, and the generated exposures put the sync into dbt's lineage.
mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One dbt invocation may take this long (they take 2 to 5 s here).
const DBT_TIMEOUT: Duration = Duration::from_secs(180);

/// The dbt executable: `RETL_DBT` (set by `make e2e`), else the Makefile's venv.
fn dbt_executable() -> PathBuf {
    let path = match std::env::var_os("RETL_DBT").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.run/dbt-venv/bin/dbt"),
    };
    assert!(
        path.is_file(),
        "dbt not found at {}: install it with `make .run/dbt-venv/ok` (a prerequisite of `make e2e`), \
         or point RETL_DBT at a dbt with the postgres adapter",
        path.display()
    );
    path
}

/// A dbt project in a temporary directory, over its own source table, schema, destination,
/// retl model and sync on the test cluster; all of them dropped again at the end.
struct DbtProject {
    client: postgres::Client,
    dbt: PathBuf,
    dir: PathBuf,
    /// Where dbt builds (the profile's schema) and where the source table is.
    schema: String,
    source_schema: String,
    server: String,
    model: String,
    sync: String,
    /// The second sync: an audience of the model (plan = 'PRO'), to its own destination.
    server2: String,
    audience: String,
    sync2: String,
}

struct DbtOutput {
    success: bool,
    output: String,
}

impl DbtProject {
    fn new(fake_url: &str, fake2_url: &str, rows: i64) -> DbtProject {
        let dbt = dbt_executable();
        let mut client = connect();
        ensure_extension(&mut client);
        let base = unique("dbt");
        let mut project = DbtProject {
            client,
            dbt,
            dir: std::env::temp_dir().join(&base),
            schema: format!("{base}_out"),
            source_schema: format!("{base}_src"),
            server: format!("{base}_d"),
            model: format!("{base}_m"),
            sync: format!("{base}_s"),
            server2: format!("{base}_d2"),
            audience: format!("{base}_a"),
            sync2: format!("{base}_s2"),
        };
        project.exec(&format!(
            "CREATE SCHEMA {src};
             CREATE TABLE {src}.people (id bigint PRIMARY KEY, email text, name text, plan text);
             INSERT INTO {src}.people SELECT i, 'user' || i || '@example.com', 'Person ' || i, 'free'
               FROM generate_series(1, {rows}) i;
             CREATE SERVER {server} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{fake_url}');
             CREATE SERVER {server2} FOREIGN DATA WRAPPER retl OPTIONS (type 'webhook', url '{fake2_url}')",
            src = project.source_schema,
            server = project.server,
            server2 = project.server2
        ));
        project.write_files();
        project
    }

    fn exec(&mut self, sql: &str) {
        self.client.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn write(&self, path: &str, text: &str) {
        let path = self.dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    fn write_files(&self) {
        let env = |name: &str, default: &str| std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or(default.into());
        let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dbt/pg_reverse_etl").canonicalize().unwrap();
        self.write(
            "dbt_project.yml",
            "name: retl_e2e\nversion: \"1.0\"\nconfig-version: 2\nprofile: retl_e2e\n",
        );
        self.write(
            "profiles.yml",
            &format!(
                "retl_e2e:\n  target: dev\n  outputs:\n    dev:\n      type: postgres\n      host: {}\n      port: {}\n      \
                 user: {}\n      password: {}\n      dbname: {}\n      schema: {}\n      threads: 1\n",
                json!(env("PGHOST", "127.0.0.1")),
                env("PGPORT", "28815"),
                json!(env("PGUSER", "postgres")),
                json!(env("PGPASSWORD", "retl-dev")),
                json!(env("PGDATABASE", "postgres")),
                self.schema
            ),
        );
        self.write("packages.yml", &format!("packages:\n  - local: {}\n", json!(package.to_str().unwrap())));
        self.write(
            "models/sources.yml",
            &format!("version: 2\nsources:\n  - name: app\n    schema: {}\n    tables:\n      - name: people\n", self.source_schema),
        );
        // The sync as a user declares it. The mode comes from a var, so that a build can change
        // it (and the hook must alter the existing sync). Two field names with a quote and a
        // backslash: the macros quote what they put into SQL.
        self.write(
            "models/people.sql",
            &format!(
                r#"{{{{ config(
    materialized='table',
    meta={{'retl': {{
        'model': '{model}',
        'primary_key': ['id'],
        'syncs': [{{
            'name': '{sync}',
            'destination': '{server}',
            'mode': var('retl_mode', 'upsert'),
            'mappings': {{'id': 'id', 'email': 'email', "full\\name": 'name', "plan's tier": 'plan'}},
            'timeout': '60 seconds',
        }}, {{
            'name': '{sync2}',
            'destination': '{server2}',
            'audience': '{audience}',
        }}],
        'audiences': [{{'name': '{audience}', 'filter': "plan = 'PRO'"}}],
    }}}},
    post_hook={{'sql': "{{{{ pg_reverse_etl.sync() }}}}", 'transaction': false}},
) }}}}
select id, email, name, upper(plan) as plan from {{{{ source('app', 'people') }}}}
"#,
                model = self.model,
                sync = self.sync,
                server = self.server,
                sync2 = self.sync2,
                server2 = self.server2,
                audience = self.audience
            ),
        );
        // The hook left inside dbt's transaction: refused before it does anything.
        self.write(
            "models/people_in_transaction.sql",
            &format!(
                r#"{{{{ config(materialized='table', meta={{'retl': {{'model': '{model}_tx', 'primary_key': ['id']}}}},
           post_hook="{{{{ pg_reverse_etl.sync() }}}}") }}}}
select 1 as id
"#,
                model = self.model
            ),
        );
    }

    /// Runs dbt with `args` in the project, bounded by [`DBT_TIMEOUT`]; stdout and stderr together.
    fn dbt(&self, args: &[&str]) -> DbtOutput {
        let log = self.dir.join(format!("dbt-{}.log", unique("run")));
        let file = std::fs::File::create(&log).unwrap();
        let started = Instant::now();
        let mut child = Command::new(&self.dbt)
            .args(args)
            .current_dir(&self.dir)
            .env("DBT_PROFILES_DIR", &self.dir)
            .env("DBT_PROJECT_DIR", &self.dir)
            .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
            .env("DBT_VERSION_CHECK", "false")
            .env("DBT_USE_COLORS", "false")
            .env("DBT_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.dbt.display()));
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > DBT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "dbt {} did not finish within {DBT_TIMEOUT:?}; its output:\n{}",
                    args.join(" "),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = std::fs::read_to_string(&log).unwrap();
        eprintln!("dbt {} ({:.1} s, {status}):\n{output}", args.join(" "), started.elapsed().as_secs_f64());
        DbtOutput { success: status.success(), output }
    }

    /// The dbt model's rows as the destination should hold them (mapped field names).
    fn model_state(&mut self) -> BTreeMap<String, Value> {
        self.client
            .query(&format!("SELECT id, email, name, plan FROM {}.people ORDER BY id", self.schema), &[])
            .unwrap()
            .iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let (email, name, plan): (Option<String>, Option<String>, Option<String>) = (r.get(1), r.get(2), r.get(3));
                (key(id), json!({"id": id, "email": email, "full\\name": name, "plan's tier": plan}))
            })
            .collect()
    }

    fn count_rows(&mut self) -> i64 {
        self.client.query_one(&format!("SELECT count(*) FROM {}.people", self.schema), &[]).unwrap().get(0)
    }

    fn last_run(&mut self) -> Run {
        last_run_of(&mut self.client, &self.sync)
    }

    fn clean(&mut self) {
        for sync in [self.sync.clone(), self.sync2.clone()] {
            let _ = self.client.execute("SELECT retl.pause($1)", &[&sync]);
            if let Err(e) = self.client.execute("SELECT retl.drop_sync($1, if_exists => true)", &[&sync]) {
                eprintln!("drop_sync {sync}: {e:?}");
            }
        }
        if let Err(e) = self.client.execute("SELECT retl.drop_audience($1, if_exists => true)", &[&self.audience]) {
            eprintln!("drop_audience {}: {e:?}", self.audience);
        }
        for model in [self.model.clone(), format!("{}_tx", self.model)] {
            if let Err(e) = self.client.execute("SELECT retl.drop_model($1, if_exists => true)", &[&model]) {
                eprintln!("drop_model {model}: {e:?}");
            }
        }
        let _ = self.client.batch_execute(&format!(
            "DROP SERVER IF EXISTS {} CASCADE; DROP SERVER IF EXISTS {} CASCADE;
             DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE",
            self.server, self.server2, self.schema, self.source_schema
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for DbtProject {
    fn drop(&mut self) {
        self.clean();
    }
}

fn assert_dbt_ok(out: &DbtOutput, what: &str) {
    assert!(out.success, "{what} failed:\n{}", out.output);
}

#[test]
fn a_dbt_build_runs_the_sync_declared_in_the_model_config() {
    let fake = FakeWebhook::start();
    let fake2 = FakeWebhook::start();
    let mut p = DbtProject::new(&fake.url(), &fake2.url(), 5);
    let setup = Instant::now();
    assert_dbt_ok(&p.dbt(&["deps"]), "dbt deps");

    // First build: the table is built and committed, then the hook creates the model and the
    // sync and runs it; every row arrives before dbt returns.
    let out = p.dbt(&["build", "--select", "people"]);
    assert_dbt_ok(&out, "the first dbt build");
    assert!(out.output.contains(&format!("pg_reverse_etl: created model {} over \"{}\".\"people\"", p.model, p.schema)), "{}", out.output);
    assert!(out.output.contains(&format!("pg_reverse_etl: created sync {} (model {} to {}, upsert)", p.sync, p.model, p.server)), "{}", out.output);
    let expected = p.model_state();
    assert_eq!(expected.len(), 5);
    assert_eq!(expected[&key(3)]["plan's tier"], "FREE", "the dbt model's rows, not the source's");
    assert_eq!(fake.records(), expected);
    assert_eq!(fake.request_count(), 1);
    let run = p.last_run();
    assert_eq!((run.status.as_str(), run.inserts, run.delivered), ("succeeded", 5, 5));
    assert!(out.output.contains(&format!("pg_reverse_etl: sync {} run {} succeeded: 5 inserts, 0 updates, 0 deletes planned; 5 delivered", p.sync, run.id)), "{}", out.output);
    // The audience sync: created with its audience, nothing in it yet, so nothing sent.
    assert!(out.output.contains(&format!("pg_reverse_etl: created audience {} ({} where plan = 'PRO')", p.audience, p.model)), "{}", out.output);
    assert!(out.output.contains(&format!("pg_reverse_etl: created sync {} (audience {} to {}, upsert)", p.sync2, p.audience, p.server2)), "{}", out.output);
    assert!(out.output.contains(&format!("pg_reverse_etl: sync {} run {} succeeded: 0 inserts", p.sync2, last_run_of(&mut p.client, &p.sync2).id)), "{}", out.output);
    assert_eq!(fake2.request_count(), 0);
    let row = p
        .client
        .query_one(
            "SELECT m.query, m.primary_key, s.mode, s.schedule, s.mappings::text FROM retl.syncs s JOIN retl.models m ON m.id = s.model_id WHERE s.name = $1",
            &[&p.sync],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), format!("\"{}\".\"people\"", p.schema));
    assert_eq!(row.get::<_, Vec<String>>(1), vec!["id".to_string()]);
    assert_eq!((row.get::<_, String>(2), row.get::<_, String>(3)), ("upsert".into(), "manual".into()));
    assert_eq!(serde_json::from_str::<Value>(row.get::<_, &str>(4)).unwrap(), json!({"id": "id", "email": "email", "full\\name": "name", "plan's tier": "plan"}));

    // One source row changes. The rebuild replaces the table (dropping retl's view over the old
    // one with CASCADE); the hook redefines the model, leaves the unchanged sync alone, and
    // the run sends exactly the changed row.
    p.exec(&format!("UPDATE {}.people SET name = 'Changed Name' WHERE id = 2", p.source_schema));
    let out = p.dbt(&["build", "--select", "people"]);
    assert_dbt_ok(&out, "the second dbt build");
    assert!(out.output.contains(&format!("pg_reverse_etl: redefined model {}", p.model)), "{}", out.output);
    assert!(!out.output.contains("pg_reverse_etl: altered"), "nothing of the syncs or the audience changed:\n{}", out.output);
    assert!(!out.output.contains("pg_reverse_etl: created"), "{}", out.output);
    assert_eq!(fake.request_count(), 2);
    assert_eq!(keys_in_request(&fake, 1), [key(2)].into_iter().collect());
    assert_eq!(fake.records(), p.model_state());
    assert_eq!(fake.records()[&key(2)]["full\\name"], "Changed Name");
    let run = p.last_run();
    assert_eq!((run.status.as_str(), run.inserts, run.updates, run.deletes, run.delivered), ("succeeded", 0, 1, 0, 1));
    let view: Option<String> = p
        .client
        .query_one("SELECT to_regclass(format('retl_models.%I', $1::text))::text", &[&p.model])
        .unwrap()
        .get(0);
    assert!(view.is_some(), "retl's view over the rebuilt table is back");

    // Builds that must leave the syncs alone: --empty (no rows: a mirror sync would delete
    // everything), and a target not in the var retl_targets.
    let out = p.dbt(&["build", "--select", "people", "--empty"]);
    assert_dbt_ok(&out, "dbt build --empty");
    assert!(out.output.contains("pg_reverse_etl: model people: built --empty; syncs left alone"), "{}", out.output);
    assert_eq!(p.count_rows(), 0, "the --empty build made an empty table");
    let out = p.dbt(&["build", "--select", "people", "--vars", "{retl_targets: [prod]}"]);
    assert_dbt_ok(&out, "dbt build in a target not in retl_targets");
    assert!(out.output.contains("pg_reverse_etl: model people: target dev is not in retl_targets; syncs left alone"), "{}", out.output);
    assert_eq!(p.count_rows(), 5);
    assert_eq!(p.last_run().id, run.id, "no run was made");
    assert_eq!(fake.request_count(), 2);

    // Exposures: generated from retl, written where dbt reads them, and dbt puts the sync
    // downstream of the model.
    let out = p.dbt(&["-q", "run-operation", "pg_reverse_etl.generate_exposures"]);
    assert_dbt_ok(&out, "generate_exposures");
    assert!(out.output.starts_with("version: 2\n"), "{}", out.output);
    let exposure = format!("retl_{}", p.sync);
    assert!(out.output.contains(&format!("  - name: {exposure}\n")), "{}", out.output);
    p.write("models/retl_exposures.yml", &out.output);
    let out = p.dbt(&["-q", "ls", "--resource-type", "exposure", "--output", "json", "--output-keys", "name depends_on config description"]);
    assert_dbt_ok(&out, "dbt ls of the exposures");
    let listed: Vec<Value> = out.output.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(listed.len(), 2, "exactly this project's syncs are exposures:\n{}", out.output);
    assert_eq!(listed[0]["name"], exposure.as_str());
    assert_eq!(listed[0]["depends_on"]["nodes"], json!(["model.retl_e2e.people"]));
    assert_eq!(listed[0]["config"]["meta"]["retl_sync"], p.sync.as_str());
    assert_eq!(
        listed[0]["description"],
        format!("pg_reverse_etl sync `{}`: model `{}` to destination `{}` (webhook), mode upsert, schedule manual.", p.sync, p.model, p.server)
    );
    assert_eq!(listed[1]["name"], format!("retl_{}", p.sync2));
    assert_eq!(listed[1]["depends_on"]["nodes"], json!(["model.retl_e2e.people"]));
    assert_eq!(listed[1]["config"]["meta"]["retl_audience"], p.audience.as_str());
    assert_eq!(
        listed[1]["description"],
        format!(
            "pg_reverse_etl sync `{}`: model `{}` (audience `{}`: plan = 'PRO') to destination `{}` (webhook), mode upsert, schedule manual.",
            p.sync2, p.model, p.audience, p.server2
        )
    );

    // A failing run fails the build: the destination refuses the credentials. The same build
    // changes the sync's mode (through the var), so the hook alters the existing sync first.
    p.exec(&format!("UPDATE {}.people SET plan = 'pro' WHERE id = 3", p.source_schema));
    fake.script(vec![Scripted::status(401)]);
    let out = p.dbt(&["build", "--select", "people", "--vars", "{retl_mode: mirror}"]);
    assert!(!out.success, "dbt build succeeded although the run failed:\n{}", out.output);
    let run = p.last_run();
    assert_eq!((run.status.as_str(), run.updates, run.delivered), ("failed", 1, 0));
    let message = format!(
        "run {} of sync \"{}\" failed: destination rejected the credentials (HTTP 401): check the token in the user mapping",
        run.id, p.sync
    );
    assert!(out.output.contains(&message), "dbt's output names the failure ({message}):\n{}", out.output);
    assert!(out.output.contains(&format!("pg_reverse_etl: altered sync {}: mode", p.sync)), "{}", out.output);
    assert!(out.output.contains("ERROR=1"), "{}", out.output);
    let mode: String = p.client.query_one("SELECT mode FROM retl.syncs WHERE name = $1", &[&p.sync]).unwrap().get(0);
    assert_eq!(mode, "mirror");
    assert_eq!(fake.request_count(), 3);
    assert_eq!(fake.records()[&key(3)]["plan's tier"], "FREE", "nothing was applied");
    assert_eq!(p.model_state()[&key(3)]["plan's tier"], "PRO", "the table itself was built and committed");
    assert_eq!(fake2.request_count(), 0, "the build stopped at the first failing sync");

    // The next build (the destination fine again, the mode back to upsert) delivers what the
    // failed run left queued, and only that.
    let out = p.dbt(&["build", "--select", "people"]);
    assert_dbt_ok(&out, "the build after the failure");
    assert!(out.output.contains(&format!("pg_reverse_etl: altered sync {}: mode", p.sync)), "{}", out.output);
    assert_eq!(fake.request_count(), 4);
    assert_eq!(keys_in_request(&fake, 3), [key(3)].into_iter().collect());
    assert_eq!(fake.records(), p.model_state());
    // The audience's destination gets the one row now in the audience, every column unmapped.
    assert_eq!(fake2.request_count(), 1);
    assert_eq!(
        fake2.records(),
        [(key(3), json!({"id": 3, "email": "user3@example.com", "name": "Person 3", "plan": "PRO"}))].into_iter().collect()
    );

    // The hook inside dbt's transaction is refused with how to fix it, before it defines anything.
    let out = p.dbt(&["run", "--select", "people_in_transaction"]);
    assert!(!out.success, "{}", out.output);
    assert!(out.output.contains("pg_reverse_etl.sync() runs inside dbt's transaction"), "{}", out.output);
    assert!(out.output.contains("'transaction': false"), "{}", out.output);
    assert_eq!(p.client.query_one("SELECT count(*) FROM retl.models WHERE name = $1", &[&format!("{}_tx", p.model)]).unwrap().get::<_, i64>(0), 0);
    eprintln!("dbt invocations took {:.1} s", setup.elapsed().as_secs_f64());
}

/// The recipe's fixed names (destination, retl model, sync), dropped before and after.
struct RecipeNames(postgres::Client);

impl RecipeNames {
    fn clean(&mut self) {
        let _ = self.0.execute("SELECT retl.drop_sync('customer_health_to_crm', if_exists => true)", &[]);
        let _ = self.0.execute("SELECT retl.drop_model('customer_health', if_exists => true)", &[]);
        let _ = self.0.batch_execute("DROP SERVER IF EXISTS crm_hook CASCADE");
    }
}

impl Drop for RecipeNames {
    fn drop(&mut self) {
        self.clean();
    }
}

#[test]
fn the_dbt_recipe_runs_as_written() {
    let fake = FakeWebhook::builder().token("recipe-token").start();
    let unused = FakeWebhook::start();
    let mut names = RecipeNames(connect());
    names.clean();
    let mut p = DbtProject::new(&unused.url(), &unused.url(), 0);
    p.exec(&format!(
        "CREATE TABLE {src}.customers (id bigint PRIMARY KEY, email text, plan text, churn_score numeric);
         INSERT INTO {src}.customers SELECT i, 'c' || i || '@example.com', 'pro', i / 7.0 FROM generate_series(1, 6) i;",
        src = p.source_schema
    ));
    let mut destination = recipe("dbt_destination");
    for (from, to) in [("https://hooks.example.com/retl", fake.url()), ("your-webhook-token", "recipe-token".to_string())] {
        assert!(destination.contains(from), "the recipe no longer contains {from:?}");
        destination = destination.replace(from, &to);
    }
    p.exec(&destination);
    std::fs::remove_dir_all(p.dir.join("models")).unwrap();
    p.write(
        "models/sources.yml",
        &format!("version: 2\nsources:\n  - name: app\n    schema: {}\n    tables:\n      - name: customers\n", p.source_schema),
    );
    p.write("models/customer_health.sql", &recipe("dbt_model"));
    let expected = |p: &mut DbtProject| -> BTreeMap<String, Value> {
        p.client
            .query(
                &format!(
                    "SELECT jsonb_build_object('id', id)::text, jsonb_build_object('email', email, 'plan', plan, 'churn_risk', churn_risk)::text
                       FROM {}.customer_health",
                    p.schema
                ),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| {
                let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap();
                (parse(r.get(0)).to_string(), parse(r.get(1)))
            })
            .collect()
    };

    assert_dbt_ok(&p.dbt(&["deps"]), "dbt deps");
    assert_dbt_ok(&p.dbt(&["build"]), "the recipe's first dbt build");
    let first = expected(&mut p);
    assert_eq!(first.len(), 6);
    assert_eq!(first[&key(3)]["churn_risk"].to_string(), "0.43", "the dbt model's rounding");
    assert_eq!(fake.records(), first);
    assert_eq!(fake.request_count(), 1);

    // One source row changes: the rebuild sends that row alone.
    p.exec(&format!("UPDATE {}.customers SET churn_score = 0.9 WHERE id = 3", p.source_schema));
    assert_dbt_ok(&p.dbt(&["build"]), "the recipe's second dbt build");
    assert_eq!(fake.request_count(), 2);
    assert_eq!(keys_in_request(&fake, 1), [key(3)].into_iter().collect());
    assert_eq!(fake.records(), expected(&mut p));
    drop(p);
    names.clean();
}
