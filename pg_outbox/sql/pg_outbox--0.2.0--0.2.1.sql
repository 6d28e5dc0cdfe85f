-- pg_outbox 0.2.0 -> 0.2.1 (ALTER EXTENSION pg_outbox UPDATE): no role can subvert the outbox.
-- tests/tests/extension_upgrade.rs proves the result equals a fresh 0.2.1 install.
\echo Use "ALTER EXTENSION pg_outbox UPDATE" to load this file. \quit

-- Every name below resolves in pg_catalog only (DEVELOPMENT.md, "SQL rules").
-- SET LOCAL: ALTER EXTENSION restores it when the script ends (a plain SET would outlive it).
SET LOCAL search_path = pg_catalog, pg_temp;

-- Nothing here is trusted before it is checked: schema outbox and everything in it belong to the
-- extension's owner. 0.1.0 accepted a schema outbox created by another role, who could have put
-- objects there that capture calls to outbox.* (or this script's own calls).
DO $trust$
DECLARE
    extension_owner oid := (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_outbox');
    strangers text := (
        SELECT pg_catalog.string_agg(pg_catalog.format('%s (owner %s)', o.what, o.owner::regrole), ', ' ORDER BY o.what)
          FROM (SELECT 'schema outbox' AS what, n.nspowner AS owner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'outbox'
                UNION ALL SELECT 'publication pg_outbox', p.pubowner FROM pg_catalog.pg_publication p WHERE p.pubname = 'pg_outbox'
                UNION ALL SELECT 'relation ' || c.oid::regclass, c.relowner FROM pg_catalog.pg_class c WHERE c.relnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'function ' || p.oid::regprocedure, p.proowner FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'type ' || t.oid::regtype, t.typowner FROM pg_catalog.pg_type t WHERE t.typnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'operator ' || o.oid::regoperator, o.oprowner FROM pg_catalog.pg_operator o WHERE o.oprnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'collation ' || c.collname, c.collowner FROM pg_catalog.pg_collation c WHERE c.collnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'conversion ' || c.conname, c.conowner FROM pg_catalog.pg_conversion c WHERE c.connamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'operator class ' || c.opcname, c.opcowner FROM pg_catalog.pg_opclass c WHERE c.opcnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'operator family ' || f.opfname, f.opfowner FROM pg_catalog.pg_opfamily f WHERE f.opfnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'text search configuration ' || c.cfgname, c.cfgowner FROM pg_catalog.pg_ts_config c WHERE c.cfgnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'text search dictionary ' || d.dictname, d.dictowner FROM pg_catalog.pg_ts_dict d WHERE d.dictnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'statistics object ' || s.stxname, s.stxowner FROM pg_catalog.pg_statistic_ext s WHERE s.stxnamespace = 'outbox'::regnamespace
               ) o
         WHERE o.owner <> extension_owner);
BEGIN
    IF strangers IS NOT NULL THEN
        RAISE EXCEPTION 'pg_outbox: objects in schema outbox belong to another role than %, who owns the extension: %', extension_owner::regrole, strangers
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A role that owns schema outbox or objects in it could capture calls to outbox.*: inspect them, drop them (or ALTER SCHEMA outbox OWNER TO ' || extension_owner::regrole || '), then ALTER EXTENSION pg_outbox UPDATE again.';
    END IF;
END
$trust$;

-- Consumers are registered by role name, not regrole: a restore into a cluster without that role
-- must load.
ALTER TABLE outbox.consumers ALTER COLUMN role TYPE name USING pg_catalog.pg_get_userbyid(role);

-- Whether the current role may act as consumer: a member of the role registered for it.
-- SECURITY INVOKER and SQL, so row-level security can inline it and current_user is the caller.
-- A SQL-standard body (BEGIN ATOMIC) is parsed here, once, under this script's search_path: the
-- caller's search_path cannot swap its = for an operator of its own (a SET clause would do that
-- too, but would stop the planner from inlining it into the policy).
CREATE OR REPLACE FUNCTION outbox._may_act_as(consumer text)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT EXISTS (SELECT FROM outbox.consumers c
                      JOIN pg_catalog.pg_roles r ON r.rolname OPERATOR(pg_catalog.=) c.role
                    WHERE c.name OPERATOR(pg_catalog.=) _may_act_as.consumer
                      AND pg_catalog.pg_has_role(r.oid, 'USAGE'));
END;

CREATE OR REPLACE FUNCTION outbox._require_consumer(function_name text, consumer text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT outbox._may_act_as(consumer) THEN
        IF NOT EXISTS (SELECT FROM outbox.consumers c WHERE c.name = consumer) THEN
            RAISE EXCEPTION '%: consumer "%" is not registered', function_name, consumer
                USING ERRCODE = 'insufficient_privilege',
                      HINT = format('An operator registers each consumer name for the role that uses it: SELECT outbox.register_consumer(%L, %L);',
                                    consumer, current_user);
        END IF;
        IF NOT EXISTS (SELECT FROM outbox.consumers c JOIN pg_catalog.pg_roles r ON r.rolname = c.role
                        WHERE c.name = consumer) THEN
            -- A registration restored into a cluster without its role.
            RAISE EXCEPTION '%: consumer "%" is registered for role %, which does not exist', function_name, consumer,
                (SELECT c.role FROM outbox.consumers c WHERE c.name = consumer)
                USING ERRCODE = 'insufficient_privilege',
                      HINT = format('Create that role, or have an operator register the name again: SELECT outbox.register_consumer(%L, ...);', consumer);
        END IF;
        RAISE EXCEPTION '%: role % may not act as consumer "%"', function_name, current_user, consumer
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Consumer %L is registered for role %s; use a member of that role, or have an operator register another name.',
                                consumer, (SELECT c.role FROM outbox.consumers c WHERE c.name = consumer));
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION outbox.register_consumer(consumer text, role regrole)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._require_text('outbox.register_consumer', 'consumer', $1,
        'Name the consumer as its service passes it to try_mark_processed, e.g. ''billing.orders''.');
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'outbox.register_consumer: role must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass the role the consuming service logs in as (or a group role it belongs to).';
    END IF;
    INSERT INTO outbox.consumers AS c (name, role) VALUES ($1, pg_get_userbyid($2))
        ON CONFLICT (name) DO UPDATE SET role = excluded.role, registered_at = now();
END
$$;


-- Who wrote each dead letter (issue 21, item 13): rows written before are NULL, by a role nobody
-- recorded.
ALTER TABLE outbox.dead_letters ADD COLUMN written_by name;
ALTER TABLE outbox.dead_letters ALTER COLUMN written_by SET DEFAULT session_user;
-- Operators (the worker's role among them) may INSERT dead letters, but written_by is always
-- the session's login role: a row written by hand (an id reused from a real message, a
-- quarantined row copied into a normal one) names who wrote it, and outbox.redrive says so.
-- session_user, not current_user: SET ROLE does not change it, and only a superuser can. The
-- table's owner (the installer, a superuser) may write any value: a restore, a move between
-- installs keep what was recorded. A trigger rather than column rights: the worker checks at
-- start that it may INSERT into the table (has_table_privilege), which column rights would fail.
-- CREATE OR REPLACE: the SQL install keeps this function across upgrades (its trigger needs it).
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
END
$trigger$;

-- A dead letter's writer as redrive names it.
CREATE FUNCTION outbox._writer(written_by name) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce('role ' || quote_ident(written_by), 'an unrecorded role (before pg_outbox 0.2.1)')
$$;

CREATE OR REPLACE FUNCTION outbox.redrive(id uuid)
RETURNS uuid LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    letter outbox.dead_letters;
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'outbox.redrive: id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass the id of a row of outbox.dead_letters.';
    END IF;
    DELETE FROM outbox.dead_letters d WHERE d.id = $1 RETURNING * INTO letter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox.redrive: no dead letter with id %', $1
            USING ERRCODE = 'no_data_found', HINT = 'SELECT id, queue, error FROM outbox.dead_letters lists them.';
    END IF;
    IF letter.destination = 'quarantine' THEN
        RAISE EXCEPTION 'outbox.redrive: dead letter % is quarantined: it was not written by outbox.publish*', $1
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Inspect payload_bytes and error; if it is legitimate, publish it again with outbox.publish, then DELETE the row.';
    END IF;
    -- Who wrote the row: the worker's role, or a role that wrote it by hand (written_by).
    RAISE NOTICE 'outbox.redrive: dead letter % was written by %', $1, outbox._writer(letter.written_by);
    -- Same id, so consumers that saw an earlier attempt still de-duplicate it.
    RETURN outbox._publish_message(letter.id, letter.queue, letter.key, letter.payload,
                                   letter.payload_bytes, letter.headers);
END
$$;
COMMENT ON FUNCTION outbox.redrive(uuid) IS
    'Publishes a dead letter again with the same id and removes it from outbox.dead_letters, in one transaction.';

CREATE OR REPLACE FUNCTION outbox.redrive(queue text)
RETURNS bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    letter outbox.dead_letters;
    redriven bigint := 0;
    writers text[] := '{}';
BEGIN
    PERFORM outbox._require_text('outbox.redrive', 'queue', $1, 'Pass the queue whose dead letters to publish again.');
    -- UUIDv7 ids sort by publish time: redrive in the original order.
    FOR letter IN
        WITH gone AS (DELETE FROM outbox.dead_letters d
                       WHERE d.queue = $1 AND d.destination <> 'quarantine' RETURNING *)
        SELECT * FROM gone ORDER BY gone.id
    LOOP
        PERFORM outbox._publish_message(letter.id, letter.queue, letter.key, letter.payload,
                                        letter.payload_bytes, letter.headers);
        redriven := redriven + 1;
        writers := writers || outbox._writer(letter.written_by);
    END LOOP;
    IF redriven > 0 THEN
        RAISE NOTICE 'outbox.redrive: % dead letter(s) of queue % written by %', redriven, $1,
            (SELECT string_agg(format('%s (%s)', w.writer, w.n), ', ' ORDER BY w.writer)
               FROM (SELECT u AS writer, count(*) AS n FROM unnest(writers) u GROUP BY u) w);
    END IF;
    RETURN redriven;
END
$$;
COMMENT ON FUNCTION outbox.redrive(text) IS
    'Publishes every dead letter of queue again (same ids, original order; quarantined ones stay); returns how many.';

-- The C publish functions run as the caller (issue 24): they need no privilege of their own
-- (heap_insert and LogLogicalMessage check none; EXECUTE is the access rule), and a definer's
-- function costs two catalog lookups on every statement that calls it.
ALTER FUNCTION outbox.publish(text, jsonb, jsonb, text) SECURITY INVOKER;
ALTER FUNCTION outbox.publish_bytes(text, bytea, jsonb, text) SECURITY INVOKER;
ALTER FUNCTION outbox.publish_batch(text, jsonb[], jsonb, text[]) SECURITY INVOKER;

-- The publication streams exactly outbox.messages, inserts only (its owner was checked above).
DO $publication$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'pg_outbox') THEN
        ALTER PUBLICATION pg_outbox SET TABLE outbox.messages;
        ALTER PUBLICATION pg_outbox SET (publish = 'insert', publish_via_partition_root = false);
    ELSE
        CREATE PUBLICATION pg_outbox FOR TABLE outbox.messages WITH (publish = 'insert');
        INSERT INTO pg_catalog.pg_depend (classid, objid, objsubid, refclassid, refobjid, refobjsubid, deptype)
        SELECT 'pg_catalog.pg_publication'::regclass, p.oid, 0, 'pg_catalog.pg_extension'::regclass, e.oid, 0, 'e'
          FROM pg_catalog.pg_publication p, pg_catalog.pg_extension e
         WHERE p.pubname = 'pg_outbox' AND e.extname = 'pg_outbox';
    END IF;
END
$publication$;
-- Its table is a member too (pg_dump of PostgreSQL 18 dumps it otherwise; see schema.sql).
INSERT INTO pg_catalog.pg_depend (classid, objid, objsubid, refclassid, refobjid, refobjsubid, deptype)
SELECT 'pg_catalog.pg_publication_rel'::regclass, r.oid, 0, 'pg_catalog.pg_extension'::regclass, e.oid, 0, 'e'
  FROM pg_catalog.pg_publication_rel r
  JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid, pg_catalog.pg_extension e
 WHERE p.pubname = 'pg_outbox' AND e.extname = 'pg_outbox'
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_publication_rel'::regclass AND d.objid = r.oid AND d.deptype = 'e');

-- Exactly the grants below, after every install and upgrade: every right on the schema, its
-- tables and its functions that anyone but the owner holds is revoked first, whoever granted it
-- (default privileges of the installer: ALTER DEFAULT PRIVILEGES ... GRANT ... TO app; an
-- administrator's own GRANT). What another role held is named in a WARNING.
DO $acl$
DECLARE
    o record;
    revoked text[] := '{}';
BEGIN
    FOR o IN
        SELECT 'SCHEMA' AS kind, 'outbox' AS name, g.grantee, g.privilege_type
          FROM pg_catalog.pg_namespace n,
               pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) g
         WHERE n.nspname = 'outbox' AND g.grantee <> n.nspowner
        UNION ALL
        SELECT 'TABLE', c.oid::regclass::text, g.grantee, g.privilege_type
          FROM pg_catalog.pg_class c,
               pg_catalog.aclexplode(coalesce(c.relacl, pg_catalog.acldefault('r', c.relowner))) g
         WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
           AND g.grantee <> c.relowner
        UNION ALL
        SELECT DISTINCT 'TABLE', c.oid::regclass::text, g.grantee, g.privilege_type || ' (' || a.attname || ')'
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid,
               pg_catalog.aclexplode(a.attacl) g
         WHERE c.relnamespace = 'outbox'::regnamespace AND a.attacl IS NOT NULL AND g.grantee <> c.relowner
        UNION ALL
        SELECT 'FUNCTION', p.oid::regprocedure::text, g.grantee, g.privilege_type
          FROM pg_catalog.pg_proc p,
               pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) g
         WHERE p.pronamespace = 'outbox'::regnamespace AND g.grantee <> p.proowner
        ORDER BY 1, 2, 3
    LOOP
        -- regrole prints a quoted identifier.
        EXECUTE pg_catalog.format('REVOKE ALL ON %s %s FROM %s', o.kind, o.name,
                                  CASE o.grantee WHEN 0 THEN 'PUBLIC' ELSE o.grantee::regrole::text END);
        IF o.grantee <> 0 AND o.grantee::regrole::text NOT IN ('outbox_publisher', 'outbox_consumer', 'outbox_operator') THEN
            revoked := revoked || pg_catalog.format('%s: %s on %s %s', o.grantee::regrole, o.privilege_type,
                                                    pg_catalog.lower(o.kind), o.name);
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(revoked) > 0 THEN
        RAISE WARNING 'pg_outbox: revoked rights that roles other than pg_outbox''s held on its objects:%',
            E'\n' || pg_catalog.array_to_string(revoked, E'\n')
            USING HINT = 'pg_outbox grants exactly what the README lists (Security). Grant a role outbox_publisher, outbox_consumer or outbox_operator instead.';
    END IF;
END
$acl$;
GRANT USAGE ON SCHEMA outbox TO outbox_publisher, outbox_consumer, outbox_operator;

GRANT EXECUTE ON FUNCTION outbox.publish(text, jsonb, jsonb, text),
                          outbox.publish_bytes(text, bytea, jsonb, text),
                          outbox.publish_batch(text, jsonb[], jsonb, text[])
    TO outbox_publisher;

GRANT EXECUTE ON FUNCTION outbox.try_mark_processed(text, text),
                          outbox.is_processed(text, text),
                          outbox.purge_processed(interval, text),
                          outbox._may_act_as(text), outbox._require_consumer(text, text),
                          outbox._require_text(text, text, text, text)
    TO outbox_consumer, outbox_operator;
-- Row-level security: a consumer role reads, marks and purges only the consumers registered
-- for it; an operator reads and purges all. The extension's owner (the installer) bypasses it.
GRANT SELECT ON outbox.consumers TO outbox_consumer, outbox_operator;
GRANT SELECT, INSERT, DELETE ON outbox.processed_messages TO outbox_consumer;
GRANT SELECT, DELETE ON outbox.processed_messages TO outbox_operator;

GRANT EXECUTE ON FUNCTION outbox.redrive(uuid), outbox.redrive(text),
                          outbox.prune(interval, integer), outbox.status(),
                          outbox.register_consumer(text, regrole), outbox.unregister_consumer(text)
    TO outbox_operator;
GRANT SELECT ON outbox.messages TO outbox_operator;
GRANT SELECT, INSERT, DELETE ON outbox.dead_letters TO outbox_operator;
GRANT SELECT, INSERT, UPDATE ON outbox.slots TO outbox_operator;


-- Checked again at the end: nothing was planted while this ran.
DO $trust$
DECLARE
    extension_owner oid := (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_outbox');
    strangers text := (
        SELECT pg_catalog.string_agg(pg_catalog.format('%s (owner %s)', o.what, o.owner::regrole), ', ' ORDER BY o.what)
          FROM (SELECT 'schema outbox' AS what, n.nspowner AS owner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'outbox'
                UNION ALL SELECT 'publication pg_outbox', p.pubowner FROM pg_catalog.pg_publication p WHERE p.pubname = 'pg_outbox'
                UNION ALL SELECT 'relation ' || c.oid::regclass, c.relowner FROM pg_catalog.pg_class c WHERE c.relnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'function ' || p.oid::regprocedure, p.proowner FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'type ' || t.oid::regtype, t.typowner FROM pg_catalog.pg_type t WHERE t.typnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'operator ' || o.oid::regoperator, o.oprowner FROM pg_catalog.pg_operator o WHERE o.oprnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'collation ' || c.collname, c.collowner FROM pg_catalog.pg_collation c WHERE c.collnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'conversion ' || c.conname, c.conowner FROM pg_catalog.pg_conversion c WHERE c.connamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'operator class ' || c.opcname, c.opcowner FROM pg_catalog.pg_opclass c WHERE c.opcnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'operator family ' || f.opfname, f.opfowner FROM pg_catalog.pg_opfamily f WHERE f.opfnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'text search configuration ' || c.cfgname, c.cfgowner FROM pg_catalog.pg_ts_config c WHERE c.cfgnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'text search dictionary ' || d.dictname, d.dictowner FROM pg_catalog.pg_ts_dict d WHERE d.dictnamespace = 'outbox'::regnamespace
                UNION ALL SELECT 'statistics object ' || s.stxname, s.stxowner FROM pg_catalog.pg_statistic_ext s WHERE s.stxnamespace = 'outbox'::regnamespace
               ) o
         WHERE o.owner <> extension_owner);
BEGIN
    IF strangers IS NOT NULL THEN
        RAISE EXCEPTION 'pg_outbox: objects in schema outbox belong to another role than %, who owns the extension: %', extension_owner::regrole, strangers
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A role that owns schema outbox or objects in it could capture calls to outbox.*: inspect them, drop them (or ALTER SCHEMA outbox OWNER TO ' || extension_owner::regrole || '), then ALTER EXTENSION pg_outbox UPDATE again.';
    END IF;
END
$trust$;
