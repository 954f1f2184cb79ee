# pg_reverse_etl — the two set-up commands are `make run` (demo) and `make test` (every test).
PGRX_VERSION := 0.18.1
PG_CONFIG    := /usr/lib/postgresql/15/bin/pg_config
export PGRX_VERSION
export PGHOST     ?= 127.0.0.1
export PGPORT     ?= 28815
export PGUSER     ?= postgres
export PGPASSWORD ?= retl-dev
export PGDATABASE ?= postgres

.PHONY: run test deps install cluster stop unit e2e demo clean bench load release-extension fuzz

## make run: install what is missing, build and install the extension, start a local cluster
## with it preloaded, and run the demo sync to a local webhook receiver.
run: deps install cluster demo

## make test: every test — engine unit tests, then end-to-end tests against a real cluster.
test: deps unit install cluster e2e

deps:
	@scripts/deps.sh

unit:
	cargo test -p retl-engine
	cargo test -p retl-e2e --lib

# Installing replaces the shared library; a running cluster that preloads it must not see
# the file change under it, so the cluster is stopped first and started again after.
# Also installs the install scripts of earlier releases (extension/sql/releases), so that
# CREATE EXTENSION ... VERSION 'old' followed by ALTER EXTENSION ... UPDATE can be tested.
install:
	@scripts/cluster.sh stop
	cd extension && cargo pgrx install --pg-config $(PG_CONFIG)
	install -m 644 extension/sql/releases/*.sql $$($(PG_CONFIG) --sharedir)/extension/

cluster:
	@scripts/cluster.sh start

stop:
	@scripts/cluster.sh stop

# Every test run starts from a freshly created extension (the cluster itself is kept).
# The dbt package's test (e2e/tests/dbt_package.rs) runs the dbt of $(DBT_VENV).
DBT_VENV := .run/dbt-venv
e2e: $(DBT_VENV)/ok
	psql -X -q -v ON_ERROR_STOP=1 -c "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE" -c "CREATE EXTENSION pg_reverse_etl"
	RETL_DBT=$(abspath $(DBT_VENV))/bin/dbt cargo test -p retl-e2e --tests --no-fail-fast -- --test-threads=1

# dbt-core and dbt-postgres from PyPI, every version pinned in dbt/requirements.txt
# (reinstalled when that file changes).
$(DBT_VENV)/ok: dbt/requirements.txt
	dpkg-query -W -f='$${Status}' python3-venv 2>/dev/null | grep -q "install ok installed" || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null)
	rm -rf $(DBT_VENV)
	/usr/bin/python3 -m venv $(DBT_VENV)
	$(DBT_VENV)/bin/pip install -q --disable-pip-version-check -r dbt/requirements.txt
	touch $@

demo:
	@scripts/demo.sh

clean: stop
	rm -rf .run
	cargo clean

## make bench: the benchmarks of docs/BENCHMARKS.md against a release build of the extension,
## freshly created: scale (plan time against the floor at 100k/1M/10M rows and 0/0.2/10%
## changed, delivery throughput, a rate-limited destination, snapshot size, worker memory, an
## external psycopg+requests script doing the same job), on-change latency (100 single-row
## updates/s for 30 s on a 10,000-row model) and what the on-change triggers cost writers.
## The scale part rewrites its section of docs/BENCHMARKS.md and docs/benchmarks-scale.png
## (about 25 minutes here; BENCH_SIZES=100000,1000000 for a 6-minute run). Results: printed, and in
## .run/scale.json, .run/bench.json and .run/overhead.json. Reinstalls the extension.
BENCH_SIZES ?= 100000,1000000,10000000
BENCH_VENV  := .run/bench-venv
bench: deps release-extension $(BENCH_VENV)/ok
	cargo build --release -p retl-e2e --bin bench-receiver
	$(BENCH_VENV)/bin/python bench/scale.py --sizes $(BENCH_SIZES)
	cargo run --release -p retl-e2e --bin retl-bench -- --seconds 30 --json .run/bench.json
	cargo run --release -p retl-e2e --bin retl-overhead -- --json .run/overhead.json

# The scale benchmark's Python (its external-script baseline and its plot), from PyPI.
$(BENCH_VENV)/ok:
	dpkg-query -W -f='$${Status}' python3-venv 2>/dev/null | grep -q "install ok installed" || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null)
	/usr/bin/python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q "psycopg[binary]==3.3.9" "requests==2.34.2" "matplotlib==3.11.2"
	touch $@

## make load: the long part of the reliability suite (docs/LOAD.md), not part of `make test`:
## 100 syncs over one 1,000,000-row model against a throttled destination for 10 minutes
## (about 15 minutes in all), checking that no sync starves, the destination's rate limit is
## never exceeded, every sync ends equal to its segment of the model, and reporting the peak
## memory of every worker. Scale it down with LOAD_ROWS, LOAD_SYNCS, LOAD_SECONDS, LOAD_RATE
## (e.g. `make load LOAD_ROWS=100000 LOAD_SECONDS=60`). Results: printed, and as JSON lines in
## .run/load.json. Reinstalls the extension (release build) like `make bench`.
load: deps release-extension
	LOAD_JSON=.run/load.json cargo run --release -p retl-e2e --bin retl-load

# The release build, installed, with the cluster restarted and the extension freshly created:
# what the benchmarks and the load run measure.
release-extension:
	@scripts/cluster.sh stop
	cd extension && cargo pgrx install --release --pg-config $(PG_CONFIG)
	install -m 644 extension/sql/releases/*.sql $$($(PG_CONFIG) --sharedir)/extension/
	@scripts/cluster.sh start
	psql -X -q -v ON_ERROR_STOP=1 -c "DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE" -c "CREATE EXTENSION pg_reverse_etl"

## make fuzz: every cargo-fuzz target of fuzz/ (options, cron, templates, mappings; see
## docs/FUZZING.md) for FUZZ_SECONDS each, from a copy of the seed corpus; fails if any crashes.
## Needs no cluster. Installs cargo-fuzz if missing.
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh
