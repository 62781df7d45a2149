-- upgrade.sql brings a database that an earlier version of the service made to
-- the shape schema.sql describes. It runs at every start, before schema.sql and
-- under the same advisory lock (applySchema in database.go), and does nothing
-- on a new database or one of this version: a reader learning the schema can
-- skip it.
DO $$
DECLARE
    outbox regclass := to_regclass('outbox');
BEGIN
    IF outbox IS NULL OR EXISTS (SELECT FROM pg_attribute
                                 WHERE attrelid = outbox AND attname = 'transaction_id' AND NOT attisdropped) THEN
        RETURN;
    END IF;

    -- Rows that a version before the delete-on-publish relay marked
    -- published and kept for a purge by age: their events are on the
    -- broker. Deleted before published_at goes, which would make them look
    -- unpublished.
    IF EXISTS (SELECT FROM pg_attribute WHERE attrelid = outbox AND attname = 'published_at' AND NOT attisdropped) THEN
        EXECUTE 'DELETE FROM outbox WHERE published_at IS NOT NULL';
    END IF;

    -- One ALTER TABLE, one ACCESS EXCLUSIVE lock, held while the new
    -- primary key is built over the rows waiting (the backlog only). Only
    -- the first version's jsonb payload makes it rewrite the table: the
    -- rows already there get a constant transaction_id, 0, older than any
    -- new one, so they are claimed first.
    -- While the lock is awaited every insert into outbox queues behind it,
    -- so the wait is bounded: past lock_timeout the start fails, and the
    -- next one tries again.
    SET LOCAL lock_timeout = '5s';
    ALTER TABLE outbox
        ADD COLUMN transaction_id xid8 NOT NULL DEFAULT '0',
        ADD COLUMN IF NOT EXISTS traceparent text,
        ADD COLUMN IF NOT EXISTS tracestate text,
        ADD COLUMN IF NOT EXISTS lease_until timestamptz,
        ALTER COLUMN payload TYPE json,
        DROP COLUMN IF EXISTS published_at, -- and outbox_unpublished_idx with it
        DROP CONSTRAINT IF EXISTS outbox_event_id_key,
        DROP CONSTRAINT outbox_pkey,
        ADD PRIMARY KEY (transaction_id, id),
        SET (fillfactor = 50);
    ALTER TABLE outbox ALTER COLUMN transaction_id SET DEFAULT pg_current_xact_id();
END $$;
