#!/usr/bin/env bash
# The `make run` demo: a customers table, a model over it, a local webhook receiver, a
# destination and an upsert sync. Three runs: everything, exactly the 2 changed rows, nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN_DIR=$ROOT/.run
RECEIVER_PORT=${RECEIVER_PORT:-8787}

cargo build -q -p retl-e2e --bin webhook-receiver
pkill -f "webhook-receiver --port $RECEIVER_PORT" 2>/dev/null || true
"$ROOT/target/debug/webhook-receiver" --port "$RECEIVER_PORT" --token demo-secret >"$RUN_DIR/receiver.log" 2>&1 &
RECEIVER_PID=$!
trap 'kill $RECEIVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$RECEIVER_PORT/_requests" >/dev/null && break; sleep 0.1; done

sql() { psql -X -q -v ON_ERROR_STOP=1 -P pager=off "$@"; }
received() { echo "receiver so far: $(curl -fs "http://127.0.0.1:$RECEIVER_PORT/_requests")"; }

echo "== 1. define a model, a destination and a sync"
sql <<'SQL'
DROP EXTENSION IF EXISTS pg_reverse_etl CASCADE;
DROP TABLE IF EXISTS customers;
CREATE EXTENSION pg_reverse_etl;
CREATE TABLE customers (
    id bigint PRIMARY KEY, email text NOT NULL, name text, plan text, lifetime_value numeric(10,2)
);
INSERT INTO customers
SELECT i, format('user%s@example.com', i), format('Customer %s', i),
       (ARRAY['free', 'pro', 'enterprise'])[1 + i % 3], round((i * 137.5)::numeric % 5000, 2)
  FROM generate_series(1, 10) i;
SELECT retl.create_model(name => 'customers_model',
                         query => 'SELECT id, email, name, plan, lifetime_value FROM customers',
                         primary_key => '{id}');
CREATE SERVER demo_webhook FOREIGN DATA WRAPPER retl
    OPTIONS (type 'webhook', url 'http://127.0.0.1:8787/hook', batch_size '4', rate_limit '20');
CREATE USER MAPPING FOR CURRENT_USER SERVER demo_webhook OPTIONS (token 'demo-secret');
SELECT retl.create_sync(name => 'customers_to_webhook', model => 'customers_model',
                        destination => 'demo_webhook', mode => 'upsert',
                        mappings => '{"email": "email", "full_name": "name", "plan": "plan", "ltv": "lifetime_value"}');
SQL

echo "== 2. first run: every row is sent"
sql -c "SELECT id, status, rows_in_model, planned_inserts, delivered, api_calls FROM retl.run('customers_to_webhook', wait => true)"
sql -c "SELECT sync, last_status, runs, success_rate, queue_depth, failing_rows, rows_synced, last_delivered, last_api_calls FROM retl.sync_status"
received

echo "== 3. change 2 rows: exactly 2 rows are sent"
sql -c "UPDATE customers SET plan = 'enterprise', lifetime_value = lifetime_value + 1000 WHERE id IN (3, 7)"
sql -c "SELECT key, payload FROM retl.preview('customers_to_webhook')"
sql -c "SELECT id, status, planned_updates, delivered, api_calls FROM retl.run('customers_to_webhook', wait => true)"
received

echo "== 4. nothing changed: zero requests"
sql -c "SELECT id, status, planned_inserts + planned_updates + planned_deletes AS planned, delivered, api_calls FROM retl.run('customers_to_webhook', wait => true)"
received

echo "== 5. on change: a commit sends the change by itself, no retl.run needed"
sql -c "SELECT retl.alter_sync(name => 'customers_to_webhook', schedule => 'on change')"
sql -c "UPDATE customers SET plan = 'free' WHERE id = 5"
for _ in $(seq 50); do
    curl -fs "http://127.0.0.1:$RECEIVER_PORT/_requests" | grep -q '"records_sent":13' && break
    sleep 0.1
done
received
sql -c "SELECT id, trigger, status, delivered, api_calls, finished_at - queued_at AS took FROM retl.runs ORDER BY id DESC LIMIT 1"
sql -c "SELECT * FROM retl.worker_status()"

echo "== the receiver's log"
cat "$RUN_DIR/receiver.log"
echo "== records held by the receiver"
curl -fs "http://127.0.0.1:$RECEIVER_PORT/_records"; echo
