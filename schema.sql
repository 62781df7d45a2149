-- The service's tables as this version makes them. Applied at every start
-- (applySchema in database.go), after upgrade.sql has brought a database of an
-- earlier version to this shape: every statement must be idempotent, and
-- replicas starting together serialise on an advisory lock.

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
-- waiting to be published.
CREATE TABLE IF NOT EXISTS outbox (
    -- The transaction that inserted the row. The relay claims in the order
    -- of the primary key, and remembers where the rows it may still have to
    -- publish begin (outboxFloor in store.go), so that a claim never walks
    -- the rows it published before, which the database cannot remove while
    -- a long query holds vacuum back. id order alone could not do that: ids
    -- are taken at insert, and a transaction that took a lower one may
    -- commit later.
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    id             bigint      GENERATED ALWAYS AS IDENTITY,
    topic          text        NOT NULL,
    key            text        NOT NULL,
    -- Made unique by the service (a version 7 UUID); an index to enforce it
    -- would cost every insert an index entry, for a row that lives
    -- milliseconds.
    event_id       uuid        NOT NULL,
    payload        json        NOT NULL, -- json, not jsonb: relayed byte for byte
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- The W3C trace context of the request that created the order
    -- (trace.go): the relay sends it as the record's headers.
    traceparent    text,
    tracestate     text,
    -- Until when the relay that claimed the row is publishing it. No index
    -- names it, and pages are kept half empty, so that the claim's update
    -- stays on its page (HOT) and writes no index entry.
    lease_until    timestamptz,
    -- The table's one index: every statement of the relay finds rows through
    -- it, so no statistics can make the planner prefer another.
    PRIMARY KEY (transaction_id, id)
) WITH (fillfactor = 50);
