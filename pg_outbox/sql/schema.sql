-- pg_outbox: tables, roles and the publication. Runs first (bootstrap); the functions that use
-- these objects follow, then api.sql grants rights. The SQL install (sql/pg_outbox.sql, made by
-- scripts/build-sql-install) uses this file too, without the @extension-only blocks and the
-- pg_extension_config_dump lines.

-- Every name below resolves in pg_catalog only (pg_temp is never searched for functions or
-- operators): a function, operator or type another role planted in a schema of the installer's
-- search_path (public, say) can neither run as the installer nor capture a call.
-- DEVELOPMENT.md, "SQL rules".
-- @extension-only:begin (the SQL install sets it in its prologue)
-- SET LOCAL: CREATE and ALTER EXTENSION restore it when the script ends. A plain SET would
-- outlive the script and leave the caller's session with search_path = pg_catalog, pg_temp.
SET LOCAL search_path = pg_catalog, pg_temp;
-- @extension-only:end

-- @extension-only:begin (the SQL install creates the schema itself, or upgrades its own)
-- CREATE EXTENSION adopts an existing schema outbox. One created by another role could hold
-- overloads that capture the application's calls (outbox.publish(text, text)...): refuse it.
DO $schema$
DECLARE
    owner name := (SELECT r.rolname FROM pg_catalog.pg_namespace n
                     JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner WHERE n.nspname = 'outbox');
BEGIN
    IF owner IS DISTINCT FROM current_user THEN
        RAISE EXCEPTION 'pg_outbox: schema outbox belongs to role %, not to %, who is installing the extension', owner, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Objects in a schema another role controls could capture calls to outbox.*: inspect the schema, drop it (or ALTER SCHEMA outbox OWNER TO ' || quote_ident(current_user) || '), then CREATE EXTENSION pg_outbox.';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = 'outbox'::regnamespace)
       OR EXISTS (SELECT FROM pg_catalog.pg_proc WHERE pronamespace = 'outbox'::regnamespace)
       OR EXISTS (SELECT FROM pg_catalog.pg_type WHERE typnamespace = 'outbox'::regnamespace) THEN
        RAISE EXCEPTION 'pg_outbox: schema outbox already contains objects'
            USING ERRCODE = 'duplicate_schema',
                  HINT = 'Install into an empty schema: move or drop what is in schema outbox, then CREATE EXTENSION pg_outbox.';
    END IF;
END
$schema$;
-- @extension-only:end

-- @extension-only:begin (revoking from PUBLIC needs superuser; the SQL install accepts only the table form instead)
-- Only outbox.publish* may put a message on the wire: PostgreSQL lets PUBLIC write logical
-- decoding messages with any prefix, so anyone could forge a 'pg_outbox' message. Our C code
-- calls LogLogicalMessage directly and needs no grant. Not undone by DROP EXTENSION.
DO $forgery$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT oid FROM pg_catalog.pg_proc
              WHERE proname = 'pg_logical_emit_message' AND pronamespace = 'pg_catalog'::regnamespace
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$forgery$;
-- @extension-only:end

-- Roles the docs name. Cluster-wide, so created only when missing and never dropped with the
-- extension. Grant them to your application roles.
-- @upgrade:begin
DO $roles$
DECLARE
    role text;
    members text;
BEGIN
    FOREACH role IN ARRAY ARRAY['outbox_publisher', 'outbox_consumer', 'outbox_operator', 'outbox_relay'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = role) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', role);
            EXCEPTION WHEN unique_violation OR duplicate_object THEN
                -- Another database's install made it meanwhile: roles are cluster-wide, the
                -- install's lock is per database.
                NULL;
            END;
        END IF;
    END LOOP;
    -- outbox_relay: the worker's role, an operator that may also write dead letters. Before
    -- 0.2.2 every operator could (and so publish anything through redrive). Upgrading a database
    -- whose operators still hold that right grants outbox_relay to those that lack it, so that no
    -- worker of this database stops; the WARNING names them, for the people among them to lose it.
    IF pg_catalog.to_regclass('outbox.dead_letters') IS NOT NULL
       AND pg_catalog.has_table_privilege('outbox_operator', 'outbox.dead_letters', 'INSERT') THEN
        SELECT pg_catalog.string_agg(pg_catalog.quote_ident(r.rolname), ', ' ORDER BY r.rolname) INTO members
          FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles r ON r.oid = m.member
         WHERE m.roleid = 'outbox_operator'::regrole AND r.rolname <> 'outbox_relay'
           AND NOT pg_catalog.pg_has_role(r.oid, 'outbox_relay', 'MEMBER');
        IF members IS NOT NULL THEN
            EXECUTE 'GRANT outbox_relay TO ' || members;
            RAISE WARNING 'pg_outbox 0.2.2: only members of outbox_relay may write dead letters now; granted it to the members of outbox_operator: %', members
                USING HINT = 'Keep it for your workers'' roles only: REVOKE outbox_relay FROM each person''s role.';
        END IF;
    END IF;
    -- The worker does what an operator does (slots, status, replay) besides its dead letters.
    IF NOT pg_catalog.pg_has_role('outbox_relay', 'outbox_operator', 'MEMBER') THEN
        BEGIN
            GRANT outbox_operator TO outbox_relay;
        EXCEPTION WHEN insufficient_privilege THEN
            -- PostgreSQL 16+: a CREATEROLE installer may grant only roles it administers.
            RAISE WARNING 'pg_outbox: % may not grant outbox_operator to outbox_relay', current_user
                USING HINT = 'Have a superuser (or the role that made outbox_operator) run: GRANT outbox_operator TO outbox_relay;';
        END;
    END IF;
END
$roles$;
-- @upgrade:end

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
-- pg_dump keeps the rows of the extension's tables (by default it would dump none).
SELECT pg_catalog.pg_extension_config_dump('outbox.messages', '');
COMMENT ON TABLE outbox.messages IS
    'pg_outbox messages (storage = table). Insert-only; write through outbox.publish*(), prune with outbox.prune().';

-- The publication. Reused if it survived an earlier DROP EXTENSION of 0.1.0, but only if the
-- installer owns it: its owner could otherwise change what it streams (publish = 'delete') and
-- committed messages would never reach the slot.
DO $publication$
DECLARE
    owner name := (SELECT r.rolname FROM pg_catalog.pg_publication p
                     JOIN pg_catalog.pg_roles r ON r.oid = p.pubowner WHERE p.pubname = 'pg_outbox');
BEGIN
    IF owner IS NOT NULL AND owner <> current_user THEN
        RAISE EXCEPTION 'pg_outbox: publication pg_outbox belongs to role %, not to %, who is installing pg_outbox', owner, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Its owner decides what it streams: drop it (DROP PUBLICATION pg_outbox) or make it yours (ALTER PUBLICATION pg_outbox OWNER TO ' || pg_catalog.quote_ident(current_user) || '), then install again.';
    ELSIF owner IS NOT NULL THEN
        ALTER PUBLICATION pg_outbox SET TABLE outbox.messages;
        ALTER PUBLICATION pg_outbox SET (publish = 'insert', publish_via_partition_root = false);
    ELSE
        CREATE PUBLICATION pg_outbox FOR TABLE outbox.messages WITH (publish = 'insert');
    END IF;
END
$publication$;
-- @extension-only:begin
-- Recorded as a member of the extension, as CREATE EXTENSION records its other objects
-- (PostgreSQL has no ALTER EXTENSION ... ADD PUBLICATION): pg_dump then leaves it to CREATE
-- EXTENSION instead of dumping a second CREATE PUBLICATION that makes `psql -1` fail (and
-- without the table, which it never dumps for an extension's table), and DROP EXTENSION drops it.
INSERT INTO pg_catalog.pg_depend (classid, objid, objsubid, refclassid, refobjid, refobjsubid, deptype)
SELECT 'pg_catalog.pg_publication'::regclass, p.oid, 0, 'pg_catalog.pg_extension'::regclass, e.oid, 0, 'e'
  FROM pg_catalog.pg_publication p, pg_catalog.pg_extension e
 WHERE p.pubname = 'pg_outbox' AND e.extname = 'pg_outbox'
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_publication'::regclass AND d.objid = p.oid AND d.deptype = 'e');
-- Its table too: pg_dump of PostgreSQL 18 dumps a publication's table unless it is a member, and
-- ALTER PUBLICATION ... ADD TABLE then fails on restore (the table is in it already).
INSERT INTO pg_catalog.pg_depend (classid, objid, objsubid, refclassid, refobjid, refobjsubid, deptype)
SELECT 'pg_catalog.pg_publication_rel'::regclass, r.oid, 0, 'pg_catalog.pg_extension'::regclass, e.oid, 0, 'e'
  FROM pg_catalog.pg_publication_rel r
  JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid, pg_catalog.pg_extension e
 WHERE p.pubname = 'pg_outbox' AND e.extname = 'pg_outbox'
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_publication_rel'::regclass AND d.objid = r.oid AND d.deptype = 'e');
-- @extension-only:end

-- Idempotent consumers: one row per (consumer, message) already processed.
CREATE TABLE outbox.processed_messages (
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX processed_messages_processed_at ON outbox.processed_messages (processed_at);
SELECT pg_catalog.pg_extension_config_dump('outbox.processed_messages', '');

-- Which role may mark messages for which consumer name, so one service cannot make another
-- skip messages it never processed. Registered by an operator (outbox.register_consumer).
CREATE TABLE outbox.consumers (
    name          text        PRIMARY KEY CHECK (name <> ''),
    -- A role name, not a regrole: a restore into a cluster without that role must load (the
    -- registration then matches no role until one of that name exists).
    role          name        NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);
-- 0.2.0 stored a regrole (the SQL install keeps its table across upgrades). A rewrite: a consumer
-- that waits on it reads the table empty and fails, once, with 42501 "not registered" (README,
-- "Upgrades"); from 0.2.1 on, no upgrade changes a row a consumer reads.
DO $role$
BEGIN
    IF (SELECT a.atttypid FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = 'outbox.consumers'::regclass AND a.attname = 'role') = 'pg_catalog.regrole'::regtype THEN
        ALTER TABLE outbox.consumers ALTER COLUMN role TYPE name USING pg_catalog.pg_get_userbyid(role);
    END IF;
END
$role$;
SELECT pg_catalog.pg_extension_config_dump('outbox.consumers', '');
COMMENT ON TABLE outbox.consumers IS
    'Consumer names and the role whose members may mark messages as processed under that name.';

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
    -- The login role of the session that wrote the row (the worker's, or an operator's who
    -- wrote it by hand): set by trigger written_by below, never by the writer. NULL: written
    -- before 0.2.1, by a role nobody recorded.
    written_by    name        DEFAULT session_user,
    CHECK ((payload IS NULL) <> (payload_bytes IS NULL))
);
CREATE INDEX dead_letters_queue ON outbox.dead_letters (queue);
SELECT pg_catalog.pg_extension_config_dump('outbox.dead_letters', '');
-- 0.2.0 had no written_by (the SQL install keeps its table across upgrades; checked first, so
-- that a run over a table that has it takes no lock on it).
DO $written_by$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = 'outbox.dead_letters'::regclass AND a.attname = 'written_by' AND NOT a.attisdropped) THEN
        ALTER TABLE outbox.dead_letters ADD COLUMN written_by name;
        ALTER TABLE outbox.dead_letters ALTER COLUMN written_by SET DEFAULT session_user;
    END IF;
END
$written_by$;
-- Operators (the worker's role among them) may INSERT dead letters, but written_by is always
-- the session's login role: a row written by hand (an id reused from a real message, a
-- quarantined row copied into a normal one) names who wrote it, and outbox.redrive says so.
-- session_user, not current_user: SET ROLE does not change it, and only a superuser can. The
-- table's owner (the installer, a superuser) may write any value: a restore, a move between
-- installs keep what was recorded. A trigger rather than column rights: the worker checks at
-- start that it may INSERT into the table (has_table_privilege), which column rights would fail.
-- CREATE OR REPLACE: the SQL install keeps this function across upgrades (its trigger needs it).
-- @upgrade:begin
CREATE OR REPLACE FUNCTION outbox._dead_letter_written_by() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.written_by IS DISTINCT FROM session_user
       AND NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE') THEN
        RAISE EXCEPTION 'outbox.dead_letters: written_by is the role that writes the row (%), it cannot be set to %',
            session_user, coalesce(quote_literal(NEW.written_by), 'NULL')
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Leave written_by out of the INSERT: it records who wrote each dead letter, so that one written by hand is told from one the worker wrote.';
    END IF;
    RETURN NEW;
END
$$;
DO $trigger$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t
                    WHERE t.tgrelid = 'outbox.dead_letters'::regclass AND t.tgname = 'written_by') THEN
        CREATE TRIGGER written_by BEFORE INSERT ON outbox.dead_letters
            FOR EACH ROW EXECUTE FUNCTION outbox._dead_letter_written_by();
    END IF;
    -- ALWAYS: a role allowed to SET session_replication_role = replica would otherwise skip it
    -- (0.2.1) and forge written_by.
    IF (SELECT t.tgenabled FROM pg_catalog.pg_trigger t
         WHERE t.tgrelid = 'outbox.dead_letters'::regclass AND t.tgname = 'written_by') <> 'A' THEN
        ALTER TABLE outbox.dead_letters ENABLE ALWAYS TRIGGER written_by;
    END IF;
END
$trigger$;
-- @upgrade:end

-- The slots a worker has streamed from. A slot that disappears (dropped, invalidated, lost in a
-- failover or a restore) then stops the worker with what may be missing, instead of being
-- created again at the current position over undelivered messages. Kept by outbox-worker;
-- dumped, so a restored database remembers it too.
CREATE TABLE outbox.slots (
    slot_name        name        PRIMARY KEY,
    -- When the row was made: claims of outbox.queue_claims older than it are those of a retired
    -- slot of the same name.
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Every message committed before this time was delivered: the slot confirmed past the WAL
    -- position the server had then.
    delivered_before timestamptz NOT NULL DEFAULT now(),
    -- The server's WAL position at mark_at; once the slot confirms past it, mark_at becomes
    -- delivered_before and a new mark is taken.
    mark_lsn         pg_lsn      NOT NULL DEFAULT pg_catalog.pg_current_wal_lsn(),
    mark_at          timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('outbox.slots', '');
COMMENT ON TABLE outbox.slots IS
    'Replication slots outbox-worker has used, and up to when everything was delivered.';

-- Which slot delivers which queues, as a history in WAL order (0.2.2). A claim takes the queues
-- its globs match (`*`: any run of characters) for messages committed at or after from_lsn; a
-- slot's latest claim replaces its earlier ones. A queue no claim takes goes to the catch-all
-- slot: the one whose latest claim is empty, or that has none (the single slot of 0.2.1).
-- Written by outbox-worker setup under the lock of outbox.slots, with the workers of the slots
-- that lose queues stopped; each worker reads it when it starts streaming. Never updated.
-- @upgrade:begin
CREATE TABLE outbox.queue_claims (
    seq        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot_name  name        NOT NULL,
    queues     text[]      NOT NULL,
    from_lsn   pg_lsn      NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    -- The slot's publication (pg_outbox_<slot>, row-filtered on its queues) has been in place
    -- for every message committed after this position; NULL: the slot streams publication
    -- pg_outbox.
    filtered_from pg_lsn
);
SELECT pg_catalog.pg_extension_config_dump('outbox.queue_claims', '');
COMMENT ON TABLE outbox.queue_claims IS
    'Which replication slot delivers which queues, from which WAL position (outbox-worker setup --queues).';
-- @upgrade:end
