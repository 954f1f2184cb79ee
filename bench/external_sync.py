#!/usr/bin/env python3
"""The job pg_reverse_etl does, done the way many teams do it without a tool: a script that
reads the whole model, diffs it against a snapshot it keeps itself, and posts the changed rows
to the destination. It is the baseline of the scale benchmark (bench/scale.py, `make bench`).

Written straightforwardly but not carelessly:
  - the model is read through a server-side cursor (psycopg, 10,000 rows per round trip);
  - each row's mapped fields are hashed (sha256 of canonical JSON) and compared with the
    snapshot table the script keeps in the same database (key -> hash), read whole;
  - changed and new rows are posted with requests (one keep-alive session) in batches of the
    same size the extension uses, to the same webhook destination and contract
    ({sync, run_id, records: [{op, key, fields}]}, an Idempotency-Key per batch), one request
    at a time;
  - a batch's rows enter the snapshot only once the destination acknowledged them (every
    per-record result 2xx), so a failed run resends them next time.

Usage: external_sync.py --query SQL --key COLUMN --url URL [--batch-size N] [--sync NAME]
Prints one JSON line: {"rows_read", "changed", "requests", "seconds"}.
"""

import argparse
import hashlib
import json
import sys
import time
import uuid

import psycopg
import requests


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--query", required=True, help="the model's query")
    ap.add_argument("--key", required=True, help="the model's key column")
    ap.add_argument("--url", required=True, help="the webhook URL")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--sync", default="external_script", help="the sync name sent in bodies")
    ap.add_argument("--state-table", default="external_sync_state")
    args = ap.parse_args()

    started = time.perf_counter()
    conn = psycopg.connect(autocommit=False)
    state = args.state_table
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {state} (key text PRIMARY KEY, hash bytea NOT NULL)")
        cur.execute(f"SELECT key, hash FROM {state}")
        snapshot = {key: bytes(h) for key, h in cur}
    conn.commit()

    session = requests.Session()
    run_id = int(time.time() * 1000)
    changed, requests_sent, rows_read = 0, 0, 0
    pending = []  # (key text, hash, record)

    def flush():
        nonlocal requests_sent
        if not pending:
            return
        body = {"sync": args.sync, "run_id": run_id, "records": [r for _, _, r in pending]}
        response = session.post(
            args.url,
            data=json.dumps(body, default=str),
            headers={"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4())},
            timeout=30,
        )
        requests_sent += 1
        response.raise_for_status()
        results = response.json().get("results", [])
        if len(results) != len(pending) or any(not 200 <= r.get("status", 0) < 300 for r in results):
            sys.exit(f"external_sync: the destination rejected records: {response.text[:300]}")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {state} (key, hash) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET hash = excluded.hash",
                [(k, h) for k, h, _ in pending],
            )
        conn.commit()
        pending.clear()

    with psycopg.connect(autocommit=False) as reader, reader.cursor(name="model") as cur:
        cur.itersize = 10000
        cur.execute(args.query)
        columns = [d.name for d in cur.description]
        key_index = columns.index(args.key)
        for row in cur:
            rows_read += 1
            key = row[key_index]
            fields = {c: v for c, v in zip(columns, row) if c != args.key}
            text = canonical(fields)
            digest = hashlib.sha256(text.encode()).digest()
            key_text = str(key)
            if snapshot.get(key_text) == digest:
                continue
            changed += 1
            pending.append((key_text, digest, {"op": "upsert", "key": {args.key: key}, "fields": json.loads(text)}))
            if len(pending) >= args.batch_size:
                flush()
    flush()
    conn.close()
    print(json.dumps({"rows_read": rows_read, "changed": changed, "requests": requests_sent,
                      "seconds": round(time.perf_counter() - started, 3)}))


if __name__ == "__main__":
    main()
