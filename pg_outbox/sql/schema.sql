-- pg_outbox: tables, roles and the publication. Runs first (bootstrap); the functions that use
-- these objects follow, then finalize.sql grants rights.

-- Roles the docs name. Cluster-wide, so created only when missing and never dropped with the
-- extension. Grant them to your application roles.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outbox_publisher') THEN
        CREATE ROLE outbox_publisher NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outbox_consumer') THEN
        CREATE ROLE outbox_consumer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outbox_operator') THEN
        CREATE ROLE outbox_operator NOLOGIN;
    END IF;
END
$roles$;

-- The outbox itself. Insert-only: rows are never updated, so logical decoding never meets an
-- unchanged TOASTed value, and the publication streams inserts only (pruning is never streamed).
-- No primary key: uniqueness comes from UUIDv7 ids, and an index would tax every publish.
CREATE TABLE outbox.messages (
    id            uuid        NOT NULL,
    queue         text        NOT NULL,
    key           text,
    payload       jsonb,
    payload_bytes bytea,
    headers       jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- BRIN: rows arrive in created_at order, so a few kilobytes index a day of messages and cost
-- next to nothing per insert; outbox.prune() uses it to find expired rows.
CREATE INDEX messages_created_at_brin ON outbox.messages USING brin (created_at)
    WITH (pages_per_range = 32);
COMMENT ON TABLE outbox.messages IS
    'pg_outbox messages (storage = table). Insert-only; write through outbox.publish*(), prune with outbox.prune().';

-- A publication is not a member of the extension, so it may survive a DROP EXTENSION: reuse it.
DO $publication$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'pg_outbox') THEN
        ALTER PUBLICATION pg_outbox SET TABLE outbox.messages;
        ALTER PUBLICATION pg_outbox SET (publish = 'insert');
    ELSE
        CREATE PUBLICATION pg_outbox FOR TABLE outbox.messages WITH (publish = 'insert');
    END IF;
END
$publication$;

-- Idempotent consumers: one row per (consumer, message) already processed.
CREATE TABLE outbox.processed_messages (
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX processed_messages_processed_at ON outbox.processed_messages (processed_at);

-- Messages the worker could not deliver after its retries.
CREATE TABLE outbox.dead_letters (
    id            uuid        PRIMARY KEY,
    queue         text        NOT NULL,
    key           text,
    payload       jsonb,
    payload_bytes bytea,
    headers       jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL,
    destination   text        NOT NULL,
    error         text        NOT NULL,
    attempts      integer     NOT NULL CHECK (attempts > 0),
    failed_at     timestamptz NOT NULL DEFAULT now(),
    CHECK ((payload IS NULL) <> (payload_bytes IS NULL))
);
CREATE INDEX dead_letters_queue ON outbox.dead_letters (queue);
