-- The database's own ceiling for POST /orders, the strict one: the two inserts
-- createOrder makes (order row, outbox row) without HTTP, Go, Kafka, or the
-- NOTIFY, whose cluster-wide lock keeps commits from being grouped (see
-- pgbench_create_order.sql for the variant with it).
-- BenchmarkCreateThroughput runs it as:
--   PGOPTIONS='-c search_path=<schema>' pgbench -n -f testdata/pgbench_create_order_nonotify.sql -c 16 -j 2 -T 15 <db>
\set amount random(1, 100000)
BEGIN;
INSERT INTO orders (id, user_id, amount, description, request_hash)
VALUES (gen_random_uuid(), 'bench-' || :client_id, :amount, 'pgbench', '\x00')
RETURNING id AS order_id, created_at \gset
INSERT INTO outbox (topic, key, event_id, payload)
SELECT 'pay-order', ':order_id', e, json_build_object('event_id', e, 'order_id', ':order_id'::uuid,
       'user_id', 'bench-' || :client_id, 'amount', :amount, 'created_at', ':created_at'::timestamptz)
FROM gen_random_uuid() AS e;
END;
