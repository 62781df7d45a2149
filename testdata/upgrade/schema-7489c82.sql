-- schema.sql as the service's commit 7489c82 made it; TestDatabaseOfAnEarlierVersionUpgradesInPlace upgrades a database left by it.
-- Applied at every start (see applySchema in store.go): every statement must be
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
-- SELECT, is what makes two concurrent replays safe (insertOrder).
CREATE UNIQUE INDEX IF NOT EXISTS orders_user_idempotency_key_idx
    ON orders (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- The transactional outbox: written in the same transaction as the order,
-- published by the relay (outbox.go), purged after a retention period.
CREATE TABLE IF NOT EXISTS outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    event_id     uuid        NOT NULL UNIQUE,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

-- The relay's claim reads only unpublished rows in id order; a partial index
-- keeps that scan as small as the backlog, however many published rows wait
-- for the purge.
CREATE INDEX IF NOT EXISTS outbox_unpublished_idx
    ON outbox (id) WHERE published_at IS NULL;
