-- schema.sql as the service's commit f4e828c made it; TestDatabaseOfAnEarlierVersionUpgradesInPlace upgrades a database left by it.
-- Applied at every start (applySchema in database.go): every statement must be
-- idempotent, and replicas starting together serialise on an advisory lock.

CREATE TABLE IF NOT EXISTS orders (
    id              uuid        PRIMARY KEY,
    user_id         text        NOT NULL,
    amount          bigint      NOT NULL CHECK (amount > 0),
    description     text        NOT NULL DEFAULT '',
    status          text        NOT NULL DEFAULT 'PENDING'
                                CHECK (status IN ('PENDING', 'PAID', 'FAILED')),
    failure_reason  text,
    -- The Idempotency-Key header and a hash of the request body it came with:
    -- a replay with the same body gets the stored order, a different body 409.
    idempotency_key text,
    request_hash    bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Keyset paging of one user's orders, newest first (listOrders).
CREATE INDEX IF NOT EXISTS orders_user_created_idx
    ON orders (user_id, created_at DESC, id DESC);

-- An Idempotency-Key is scoped to its user; the constraint, not a prior
-- SELECT, is what makes two concurrent replays safe (queueInsertOrders).
CREATE UNIQUE INDEX IF NOT EXISTS orders_user_idempotency_key_idx
    ON orders (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- The transactional outbox: written in the same transaction as the order,
-- claimed by the relay (outbox.go) for a lease, and deleted once the broker
-- acknowledged its event. It is a queue, Kafka the log: it holds only events
-- waiting to be published. published_at is set by no current version: rows a
-- former one marked published are deleted at start.
CREATE TABLE IF NOT EXISTS outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    -- Made unique by the service (a version 7 UUID); an index to enforce it
    -- would cost every insert an index entry, for a row that lives
    -- milliseconds.
    event_id     uuid        NOT NULL,
    payload      json        NOT NULL, -- json, not jsonb: relayed byte for byte
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    traceparent  text,
    tracestate   text,
    -- Until when the relay that claimed the row is publishing it. No index
    -- names it, and pages are kept half empty, so that the claim's update
    -- stays on its page (HOT) and writes no index entry.
    lease_until  timestamptz
) WITH (fillfactor = 50);

-- traceparent and tracestate are the W3C trace context of the request that
-- created the order (trace.go): the relay sends them as the pay-order record's
-- headers. A table made by a former version lacks the newer columns.
-- ALTER TABLE takes an ACCESS EXCLUSIVE lock even when IF NOT EXISTS finds the
-- column: a replica starting while another's relay holds claimed rows would
-- wait for them, and every insert into outbox would queue behind it. So the
-- ALTER runs only when the columns are missing (once, at the upgrade), and
-- gives up after lock_timeout rather than stall the running replicas.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'outbox'::regclass AND attname = 'lease_until' AND NOT attisdropped) THEN
        SET LOCAL lock_timeout = '5s';
        ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text, ADD COLUMN IF NOT EXISTS tracestate text,
                           ADD COLUMN IF NOT EXISTS lease_until timestamptz;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'outbox'::regclass AND conname = 'outbox_event_id_key') THEN
        SET LOCAL lock_timeout = '5s';
        ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = 'outbox'::regclass AND 'fillfactor=50' = ANY (reloptions)) THEN
        SET LOCAL lock_timeout = '5s';
        ALTER TABLE outbox SET (fillfactor = 50);
    END IF;
END $$;

-- The relay's claim reads rows in id order. Every row is unpublished now; the
-- partial index stays so that a table a former version filled with published
-- rows is claimed from as cheaply until they are deleted.
CREATE INDEX IF NOT EXISTS outbox_unpublished_idx
    ON outbox (id) WHERE published_at IS NULL;
