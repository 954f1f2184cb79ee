-- The demo of `make run` (scripts/demo.sh): a customers table, a model over it, the receiver
-- as a webhook destination, and an upsert sync. Runs once, when the data volume is created.
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
    OPTIONS (type 'webhook', url 'http://127.0.0.1:8787/hook', batch_size '4');
CREATE USER MAPPING FOR CURRENT_USER SERVER demo_webhook OPTIONS (token 'demo-secret');
SELECT retl.create_sync(name => 'customers_to_webhook', model => 'customers_model',
                        destination => 'demo_webhook', mode => 'upsert', schedule => 'on change');
