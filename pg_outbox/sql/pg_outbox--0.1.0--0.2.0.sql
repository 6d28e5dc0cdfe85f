-- pg_outbox 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_outbox UPDATE). Released upgrade scripts are edited
-- only to close a hole, never to change what they make; tests/tests/extension_upgrade.rs proves
-- the result equals a fresh 0.2.0 install. 0.2.1 added the two guards below: this script called
-- unnest, cardinality and format through the search_path, in a schema that 0.1.0 let another role
-- own (issue 21).
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

-- Only outbox.publish* may put a message on the wire (see schema.sql).
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

-- pg_dump keeps the extension's rows, and leaves the publication to CREATE EXTENSION.
SELECT pg_catalog.pg_extension_config_dump('outbox.messages', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.processed_messages', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.dead_letters', '');
INSERT INTO pg_catalog.pg_depend (classid, objid, objsubid, refclassid, refobjid, refobjsubid, deptype)
SELECT 'pg_catalog.pg_publication'::regclass, p.oid, 0, 'pg_catalog.pg_extension'::regclass, e.oid, 0, 'e'
  FROM pg_catalog.pg_publication p, pg_catalog.pg_extension e
 WHERE p.pubname = 'pg_outbox' AND e.extname = 'pg_outbox'
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_publication'::regclass AND d.objid = p.oid AND d.deptype = 'e');

CREATE TABLE outbox.consumers (
    name          text        PRIMARY KEY CHECK (name <> ''),
    role          regrole     NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('outbox.consumers', '');
COMMENT ON TABLE outbox.consumers IS
    'Consumer names and the role whose members may mark messages as processed under that name.';

-- The slots a worker has streamed from. A slot that disappears (dropped, invalidated, lost in a
-- failover or a restore) then stops the worker with what may be missing, instead of being
-- created again at the current position over undelivered messages. Kept by outbox-worker;
-- dumped, so a restored database remembers it too.
CREATE TABLE outbox.slots (
    slot_name        name        PRIMARY KEY,
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

-- 0.1.0 let any outbox_consumer use any name: keep that for the names in use, and say so.
DO $consumers$
DECLARE
    names text[] := ARRAY(SELECT DISTINCT consumer FROM outbox.processed_messages ORDER BY 1);
BEGIN
    INSERT INTO outbox.consumers (name, role) SELECT unnest(names), 'outbox_consumer'::regrole;
    IF cardinality(names) > 0 THEN
        -- A WARNING: ALTER EXTENSION hides NOTICEs of its scripts from the client and the log.
        RAISE WARNING 'pg_outbox 0.2.0: consumers % are registered for every member of outbox_consumer, as in 0.1.0; tie each to its own role with outbox.register_consumer(name, role)', names;
    END IF;
END
$consumers$;

CREATE FUNCTION outbox._retention_seconds() RETURNS integer STABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'retention_seconds_wrapper';

-- Whether the current role may act as consumer: a member of the role registered for it.
-- SECURITY INVOKER and SQL, so row-level security can inline it and current_user is the caller.
CREATE OR REPLACE FUNCTION outbox._may_act_as(consumer text)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT EXISTS (SELECT FROM outbox.consumers c
                    WHERE c.name = $1 AND pg_catalog.pg_has_role(c.role, 'USAGE'))
$$;

-- Raises a clear error unless the current role may act as consumer.
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
    INSERT INTO outbox.consumers AS c (name, role) VALUES ($1, $2)
        ON CONFLICT (name) DO UPDATE SET role = excluded.role, registered_at = now();
END
$$;
COMMENT ON FUNCTION outbox.register_consumer(text, regrole) IS
    'Lets members of role mark messages as processed under the consumer name (replaces an earlier registration).';

CREATE OR REPLACE FUNCTION outbox.unregister_consumer(consumer text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM outbox.consumers c WHERE c.name = $1;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION outbox.unregister_consumer(text) IS
    'Removes a consumer registration; its marks stay until purge_processed removes them.';

-- SECURITY INVOKER: row-level security on outbox.processed_messages limits each role to the
-- consumers registered for it, whatever it calls.
CREATE OR REPLACE FUNCTION outbox.try_mark_processed(consumer text, message_id text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._require_text('outbox.try_mark_processed', 'consumer', $1,
        'Name the consumer (e.g. the service and handler), so each consumer de-duplicates on its own.');
    PERFORM outbox._require_text('outbox.try_mark_processed', 'message_id', $2,
        'Pass the outbox-id header of the message.');
    PERFORM outbox._require_consumer('outbox.try_mark_processed', $1);
    -- A concurrent caller with the same id waits here for our transaction: it gets true only if
    -- we roll back.
    INSERT INTO outbox.processed_messages (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION outbox.try_mark_processed(text, text) IS
    'Marks message_id as processed by consumer in the current transaction: true the first time, false for a duplicate.';

CREATE OR REPLACE FUNCTION outbox.is_processed(consumer text, message_id text)
RETURNS boolean LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._require_text('outbox.is_processed', 'consumer', $1, 'Name the consumer.');
    PERFORM outbox._require_text('outbox.is_processed', 'message_id', $2, 'Pass the outbox-id header of the message.');
    PERFORM outbox._require_consumer('outbox.is_processed', $1);
    RETURN EXISTS (SELECT FROM outbox.processed_messages p WHERE p.consumer = $1 AND p.message_id = $2);
END
$$;

CREATE OR REPLACE FUNCTION outbox.purge_processed(older_than interval, consumer text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    purged bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'outbox.purge_processed: older_than must be a non-negative interval, got %',
            coalesce(older_than::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Keep marks longer than the longest redelivery window, e.g. interval ''7 days''.';
    END IF;
    IF consumer = '' THEN
        RAISE EXCEPTION 'outbox.purge_processed: consumer must not be an empty string'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass NULL to purge every consumer you may act as.';
    END IF;
    -- Row-level security limits a consumer role to its own consumers' marks.
    DELETE FROM outbox.processed_messages p
     WHERE p.processed_at < now() - older_than AND ($2 IS NULL OR p.consumer = $2);
    GET DIAGNOSTICS purged = ROW_COUNT;
    RETURN purged;
END
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
    END LOOP;
    RETURN redriven;
END
$$;
COMMENT ON FUNCTION outbox.redrive(text) IS
    'Publishes every dead letter of queue again (same ids, original order; quarantined ones stay); returns how many.';

CREATE OR REPLACE FUNCTION outbox.prune(older_than interval DEFAULT NULL, max_rows integer DEFAULT 100000)
RETURNS bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- Through the library, so every session reads pg_outbox.retention the same way.
    keep interval := coalesce(older_than, make_interval(secs => outbox._retention_seconds()));
    pruned bigint;
BEGIN
    IF keep < interval '0' THEN
        RAISE EXCEPTION 'outbox.prune: older_than must be a non-negative interval, got %', keep
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass NULL to use pg_outbox.retention.';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'outbox.prune: max_rows must be a positive integer, got %', coalesce(max_rows::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Call prune() repeatedly until it returns less than max_rows.';
    END IF;
    -- Another publication that streams deletes of outbox.messages (FOR ALL TABLES, say) makes a
    -- DELETE need a replica identity. Only then: REPLICA IDENTITY FULL, once (each pruned row is
    -- then logged whole); our own publication streams inserts only and needs none.
    IF EXISTS (SELECT FROM pg_catalog.pg_publication_tables t
                 JOIN pg_catalog.pg_publication p ON p.pubname = t.pubname
                WHERE t.schemaname = 'outbox' AND t.tablename = 'messages' AND p.pubdelete)
       AND (SELECT c.relreplident FROM pg_catalog.pg_class c WHERE c.oid = 'outbox.messages'::regclass) = 'd' THEN
        RAISE NOTICE 'outbox.prune: a publication streams deletes of outbox.messages; setting REPLICA IDENTITY FULL on it';
        ALTER TABLE outbox.messages REPLICA IDENTITY FULL;
    END IF;
    -- One bounded batch per call keeps each transaction short; the BRIN index finds the batch.
    DELETE FROM outbox.messages m
     WHERE m.ctid = ANY (ARRAY(SELECT x.ctid FROM outbox.messages x
                                WHERE x.created_at < now() - keep LIMIT max_rows));
    GET DIAGNOSTICS pruned = ROW_COUNT;
    RETURN pruned;
END
$$;
COMMENT ON FUNCTION outbox.prune(interval, integer) IS
    'Deletes up to max_rows rows of outbox.messages older than older_than (default: pg_outbox.retention); returns how many.';

-- status() gained a column: a new signature.
DROP FUNCTION outbox.status();
CREATE FUNCTION outbox.status()
RETURNS TABLE (slot_name name, active boolean, active_pid integer, confirmed_flush_lsn pg_lsn,
               lag_bytes numeric, retained_wal_bytes numeric, wal_status text, dead_letters bigint,
               failover boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.slot_name, s.active, s.active_pid, s.confirmed_flush_lsn,
           pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn),
           pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn),
           s.wal_status,
           (SELECT count(*) FROM outbox.dead_letters),
           -- PostgreSQL 17+ copies a failover slot to standbys; older ones have no such column.
           coalesce((to_jsonb(s) ->> 'failover')::boolean, false)
      FROM pg_replication_slots s
     WHERE s.slot_type = 'logical' AND s.plugin = 'pgoutput' AND s.database = current_database()
     ORDER BY s.slot_name
$$;
COMMENT ON FUNCTION outbox.status() IS
    'One row per pgoutput slot of this database: activity, worker pid, bytes not yet confirmed, WAL retained, whether it survives a failover.';

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
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
ALTER TABLE outbox.processed_messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY registered_consumer ON outbox.processed_messages TO outbox_consumer
    USING (outbox._may_act_as(consumer)) WITH CHECK (outbox._may_act_as(consumer));
CREATE POLICY operator_reads ON outbox.processed_messages FOR SELECT TO outbox_operator USING (true);
CREATE POLICY operator_purges ON outbox.processed_messages FOR DELETE TO outbox_operator USING (true);

GRANT EXECUTE ON FUNCTION outbox.redrive(uuid), outbox.redrive(text),
                          outbox.prune(interval, integer), outbox.status(),
                          outbox.register_consumer(text, regrole), outbox.unregister_consumer(text)
    TO outbox_operator;
GRANT SELECT ON outbox.messages TO outbox_operator;
GRANT SELECT, INSERT, DELETE ON outbox.dead_letters TO outbox_operator;
GRANT SELECT, INSERT, UPDATE ON outbox.slots TO outbox_operator;
