-- pg_outbox: the SQL-language functions (dedup, dead letters, retention, status) and the grants.
-- Runs last (finalize), after the C functions of publish.rs exist.

-- Raises a clear error when a text argument is NULL or empty.
CREATE FUNCTION outbox._require_text(function_name text, argument_name text, value text, hint text)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION '%: % must not be NULL', function_name, argument_name
            USING ERRCODE = 'null_value_not_allowed', HINT = hint;
    ELSIF value = '' THEN
        RAISE EXCEPTION '%: % must not be an empty string', function_name, argument_name
            USING ERRCODE = 'invalid_parameter_value', HINT = hint;
    END IF;
END
$$;

-- Raises a clear error when a name or id is NULL, empty, or longer than the index on it can hold
-- (a btree entry holds at most a third of a page: a consumer name and a message id of 1,000 bytes
-- each fit; PostgreSQL's own error, 54000, names neither).
CREATE FUNCTION outbox._require_key_text(function_name text, argument_name text, value text, hint text)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._require_text(function_name, argument_name, value, hint);
    IF octet_length(value) > 1000 THEN
        RAISE EXCEPTION '%: % is % bytes, over 1000', function_name, argument_name, octet_length(value)
            USING ERRCODE = 'string_data_right_truncation', HINT = hint;
    END IF;
END
$$;

------------------------------------------------------------------------------------------------
-- Idempotent consumers
------------------------------------------------------------------------------------------------

-- Whether the current role may act as consumer: a member of the role registered for it.
-- SECURITY INVOKER and SQL, so row-level security can inline it and current_user is the caller.
-- A SQL-standard body (BEGIN ATOMIC) is parsed here, once, under this script's search_path: the
-- caller's search_path cannot swap its = for an operator of its own (a SET clause would do that
-- too, but would stop the planner from inlining it into the policy).
CREATE FUNCTION outbox._may_act_as(consumer text)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT EXISTS (SELECT FROM outbox.consumers c
                      JOIN pg_catalog.pg_roles r ON r.rolname OPERATOR(pg_catalog.=) c.role
                    WHERE c.name OPERATOR(pg_catalog.=) _may_act_as.consumer
                      AND pg_catalog.pg_has_role(r.oid, 'USAGE'));
END;

-- Raises a clear error unless the current role may act as consumer. VOLATILE, so that each of
-- its statements reads with a snapshot taken after the locks it waited for: a STABLE function
-- reads with its caller's, from before an upgrade it waited on, and missed what the upgrade wrote.
CREATE FUNCTION outbox._require_consumer(function_name text, consumer text)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
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

CREATE FUNCTION outbox.register_consumer(consumer text, role regrole)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._require_key_text('outbox.register_consumer', 'consumer', $1,
        'Name the consumer as its service passes it to try_mark_processed, e.g. ''billing.orders''.');
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'outbox.register_consumer: role must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass the role the consuming service logs in as (or a group role it belongs to).';
    END IF;
    -- '-'::regrole is 0, and any number casts: 0.2.1 stored "unknown (OID=0)".
    IF NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = $2) THEN
        RAISE EXCEPTION 'outbox.register_consumer: no role has oid %', $2::oid
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the name of an existing role.';
    END IF;
    INSERT INTO outbox.consumers AS c (name, role) VALUES ($1, pg_get_userbyid($2))
        ON CONFLICT (name) DO UPDATE SET role = excluded.role, registered_at = now();
END
$$;
COMMENT ON FUNCTION outbox.register_consumer(text, regrole) IS
    'Lets members of role mark messages as processed under the consumer name (replaces an earlier registration).';

CREATE FUNCTION outbox.unregister_consumer(consumer text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._require_text('outbox.unregister_consumer', 'consumer', $1,
        'Pass a consumer name as registered: SELECT name FROM outbox.consumers lists them.');
    DELETE FROM outbox.consumers c WHERE c.name = $1;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION outbox.unregister_consumer(text) IS
    'Removes a consumer registration; its marks stay until purge_processed removes them.';

-- SECURITY INVOKER: row-level security on outbox.processed_messages limits each role to the
-- consumers registered for it, whatever it calls.
CREATE FUNCTION outbox.try_mark_processed(consumer text, message_id text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._require_key_text('outbox.try_mark_processed', 'consumer', $1,
        'Name the consumer (e.g. the service and handler), so each consumer de-duplicates on its own.');
    PERFORM outbox._require_key_text('outbox.try_mark_processed', 'message_id', $2,
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

CREATE FUNCTION outbox.is_processed(consumer text, message_id text)
RETURNS boolean LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._require_key_text('outbox.is_processed', 'consumer', $1, 'Name the consumer.');
    PERFORM outbox._require_key_text('outbox.is_processed', 'message_id', $2, 'Pass the outbox-id header of the message.');
    PERFORM outbox._require_consumer('outbox.is_processed', $1);
    RETURN EXISTS (SELECT FROM outbox.processed_messages p WHERE p.consumer = $1 AND p.message_id = $2);
END
$$;

CREATE FUNCTION outbox.purge_processed(older_than interval, consumer text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    purged bigint;
    cutoff timestamptz;
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
    cutoff := outbox._before_now(older_than);
    -- Row-level security limits a consumer role to its own consumers' marks.
    DELETE FROM outbox.processed_messages p
     WHERE p.processed_at < cutoff AND ($2 IS NULL OR p.consumer = $2);
    GET DIAGNOSTICS purged = ROW_COUNT;
    RETURN purged;
END
$$;

------------------------------------------------------------------------------------------------
-- Dead letters
------------------------------------------------------------------------------------------------

-- A dead letter's writer as redrive names it.
CREATE FUNCTION outbox._writer(written_by name) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce('role ' || quote_ident(written_by), 'an unrecorded role (before pg_outbox 0.2.1)')
$$;

-- Redrive publishes only what a worker set aside: a row written by a role that is not a member
-- of outbox_relay (by hand, before 0.2.2 let only workers write them) is refused, so an
-- operator cannot publish anything by writing a dead letter. The table's owner may vouch for one
-- by setting written_by (only the owner can).
CREATE FUNCTION outbox._require_worker_letter(letter outbox.dead_letters) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF letter.written_by IS NULL
       OR NOT EXISTS (SELECT FROM pg_roles r WHERE r.rolname = letter.written_by
                         AND (pg_has_role(r.oid, 'outbox_relay', 'MEMBER')
                              OR pg_has_role(r.oid, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'outbox.dead_letters'::regclass), 'MEMBER'))) THEN
        RAISE EXCEPTION 'outbox.redrive: dead letter % was written by %, not by a worker (a member of outbox_relay)',
            letter.id, outbox._writer(letter.written_by)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only what a worker set aside is published again. If you trust this row, the table''s owner can vouch for it: UPDATE outbox.dead_letters SET written_by = <the worker''s role> WHERE id = ...; or publish it yourself with outbox.publish.';
    END IF;
END
$$;

-- The dead letter's headers, with outbox-redriven-by naming the login role that redrives it: the
-- one reserved header pg_outbox sets, so consumers can tell a redriven message from a first
-- delivery (and who sent it again). Any spelling of it already in the row (a worker's role can
-- write one into a dead letter: OUTBOX-REDRIVEN-BY) goes first.
CREATE FUNCTION outbox._redriven_headers(headers jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT jsonb_object_agg(h.key, h.value) FROM jsonb_each(headers) h
                      WHERE lower(h.key) <> 'outbox-redriven-by'), '{}')
           || jsonb_build_object('outbox-redriven-by', session_user::text)
$$;

CREATE FUNCTION outbox.redrive(id uuid)
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
    PERFORM outbox._require_worker_letter(letter);
    RAISE NOTICE 'outbox.redrive: dead letter % was written by %', $1, outbox._writer(letter.written_by);
    -- Same id, so consumers that saw an earlier attempt still de-duplicate it.
    RETURN outbox._publish_message(letter.id, letter.queue, letter.key, letter.payload,
                                   letter.payload_bytes, outbox._redriven_headers(letter.headers));
END
$$;
COMMENT ON FUNCTION outbox.redrive(uuid) IS
    'Publishes a dead letter again with the same id and removes it from outbox.dead_letters, in one transaction.';

CREATE FUNCTION outbox.redrive(queue text)
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
        PERFORM outbox._require_worker_letter(letter);
        PERFORM outbox._publish_message(letter.id, letter.queue, letter.key, letter.payload,
                                        letter.payload_bytes, outbox._redriven_headers(letter.headers));
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

------------------------------------------------------------------------------------------------
-- Retention
------------------------------------------------------------------------------------------------

-- now() - age, or -infinity when that is before the earliest timestamp (interval '10000 years'
-- raised 22008 "timestamp out of range": nothing is that old, so nothing goes).
CREATE FUNCTION outbox._before_now(age interval) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN now() - age;
EXCEPTION WHEN datetime_field_overflow THEN
    RETURN '-infinity';
END
$$;

CREATE FUNCTION outbox.prune(older_than interval DEFAULT NULL, max_rows integer DEFAULT 100000)
RETURNS bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- Through the library, so every session reads pg_outbox.retention the same way.
    keep interval := coalesce(older_than, make_interval(secs => outbox._retention_seconds()));
    pruned bigint;
    cutoff timestamptz;
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
    cutoff := outbox._before_now(keep);
    DELETE FROM outbox.messages m
     WHERE m.ctid = ANY (ARRAY(SELECT x.ctid FROM outbox.messages x
                                WHERE x.created_at < cutoff LIMIT max_rows));
    GET DIAGNOSTICS pruned = ROW_COUNT;
    RETURN pruned;
END
$$;
COMMENT ON FUNCTION outbox.prune(interval, integer) IS
    'Deletes up to max_rows rows of outbox.messages older than older_than (default: pg_outbox.retention); returns how many.';

------------------------------------------------------------------------------------------------
-- Status
------------------------------------------------------------------------------------------------

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

-- Beside outbox.status() (whose columns an upgrade cannot change in place): which queues each
-- slot of outbox.slots delivers, by its latest claim.
CREATE FUNCTION outbox.slot_queues()
RETURNS TABLE (slot_name name, queues text[], claimed_from pg_lsn, publication name)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.slot_name, nullif(c.queues, '{}'), c.from_lsn,
           CASE WHEN cardinality(c.queues) > 0 THEN ('pg_outbox_' || s.slot_name)::name
                ELSE 'pg_outbox'::name END
      FROM outbox.slots s
      LEFT JOIN LATERAL (SELECT q.queues, q.from_lsn FROM outbox.queue_claims q
                          WHERE q.slot_name = s.slot_name AND q.claimed_at >= s.created_at
                          ORDER BY q.seq DESC LIMIT 1) c ON true
     ORDER BY s.slot_name
$$;
COMMENT ON FUNCTION outbox.slot_queues() IS
    'The queues each slot delivers (NULL: every queue no set claims), from which WAL position, and the publication made for it.';

------------------------------------------------------------------------------------------------
-- A publication per slot with a set of queues (outbox-worker setup --queues), row-filtered on
-- the queue, so that the slot's walsender sends it only what it may deliver.
------------------------------------------------------------------------------------------------

-- The row filter for these globs (`*`: any run of characters), as pg_get_expr prints it back:
-- `(queue ~ '^(a|b[.].*)$'::text)`, globs sorted. Only the characters of queue names and `*`:
-- nothing in a glob is SQL or a regular expression of its own.
CREATE FUNCTION outbox._queue_filter(globs text[])
RETURNS text LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad text := (SELECT g FROM unnest(globs) g WHERE g IS NULL OR g !~ '^[-A-Za-z0-9._*]+$' LIMIT 1);
BEGIN
    IF globs IS NULL OR cardinality(globs) = 0 OR bad IS NOT NULL OR EXISTS (SELECT FROM unnest(globs) g WHERE g IS NULL) THEN
        RAISE EXCEPTION 'outbox: % is not a queue set', coalesce(quote_literal(globs::text), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A queue set is one or more globs of the characters of queue names (A-Z a-z 0-9 . _ -) and *.';
    END IF;
    RETURN format('(queue ~ %L::text)',
                  '^(' || (SELECT string_agg(replace(replace(g, '.', '[.]'), '*', '.*'), '|' ORDER BY g COLLATE "C")
                             FROM (SELECT DISTINCT g FROM unnest(globs) g) d) || ')$');
END
$$;

-- The globs publication pg_outbox_<slot> streams, read back from its row filter; NULL when it
-- is missing or is not exactly what outbox.filter_slot_publication makes (the inserts into
-- outbox.messages, every column, the filter of outbox._queue_filter and nothing else).
CREATE FUNCTION outbox.slot_publication_queues(slot name)
RETURNS text[] LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    prefix constant text := '(queue ~ ''^(';
    suffix constant text := ')$''::text)';
    expr text;
    globs text[];
BEGIN
    SELECT pg_get_expr(r.prqual, r.prrelid) INTO expr
      FROM pg_publication p JOIN pg_publication_rel r ON r.prpubid = p.oid
     WHERE p.pubname = 'pg_outbox_' || slot
       AND p.pubinsert AND NOT (p.pubupdate OR p.pubdelete OR p.pubtruncate OR p.puballtables)
       AND r.prrelid = to_regclass('outbox.messages') AND r.prattrs IS NULL
       AND NOT EXISTS (SELECT FROM pg_publication_rel o WHERE o.prpubid = p.oid AND o.prrelid <> r.prrelid)
       AND NOT EXISTS (SELECT FROM pg_publication_namespace n WHERE n.pnpubid = p.oid);
    IF expr IS NULL OR left(expr, length(prefix)) <> prefix OR right(expr, length(suffix)) <> suffix THEN
        RETURN NULL;
    END IF;
    globs := ARRAY(SELECT replace(replace(g, '.*', '*'), '[.]', '.') COLLATE "C"
                     FROM unnest(string_to_array(substr(expr, length(prefix) + 1,
                                                        length(expr) - length(prefix) - length(suffix)), '|')) g
                    ORDER BY 1);
    IF cardinality(globs) = 0 OR EXISTS (SELECT FROM unnest(globs) g WHERE g !~ '^[-A-Za-z0-9._*]+$') THEN
        RETURN NULL;
    END IF;
    IF outbox._queue_filter(globs) <> expr THEN
        RETURN NULL;
    END IF;
    RETURN globs;
END
$$;
COMMENT ON FUNCTION outbox.slot_publication_queues(name) IS
    'The queue globs publication pg_outbox_<slot> streams; NULL when it is missing or not as outbox.filter_slot_publication made it.';

-- Makes publication pg_outbox_<slot> stream the inserts into outbox.messages whose queue
-- matches a glob of the slot's claims that may still apply (the one in force at the slot's
-- confirmed position and every later one; all of them when the slot is not on this server, as
-- one decoded on a standby) or of `adding`, the set it is about to claim. So its filter keeps
-- every message the slot may deliver, from its confirmed position on. Returns 'created',
-- 'remade' (it was not as this function makes it, or left out queues the slot's claims need:
-- changed by hand), 'widened' (it now streams queues it did not), 'narrowed' or 'unchanged'.
-- outbox-worker setup then waits for the transactions in progress before it records a claim:
-- what they inserted before a change is decoded with the filter before it. After 'created' or
-- 'remade' the slot streams publication pg_outbox until it has confirmed past the new claim.
CREATE FUNCTION outbox.filter_slot_publication(slot name, adding text[])
RETURNS text LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    publication name;
    confirmed pg_lsn;
    globs text[];
    claimed text[];
    before text[];
    filter text;
BEGIN
    IF slot IS NULL OR slot::text !~ '^[a-z0-9_]{1,53}$' THEN
        RAISE EXCEPTION 'outbox.filter_slot_publication: % is not a slot name of 1 to 53 characters a-z, 0-9 and _', coalesce(quote_literal(slot), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Its publication is pg_outbox_<slot>, and a name holds 63 characters: choose a shorter postgres.slot.';
    END IF;
    PERFORM outbox._queue_filter(adding);
    publication := 'pg_outbox_' || slot;
    -- Read with the claims as setup writes them (it takes the same lock).
    LOCK TABLE outbox.slots IN SHARE ROW EXCLUSIVE MODE;
    SELECT s.confirmed_flush_lsn INTO confirmed
      FROM pg_replication_slots s WHERE s.slot_name = slot AND s.database = current_database();
    claimed := ARRAY(SELECT DISTINCT g COLLATE "C" FROM (
                         SELECT unnest(c.queues) AS g FROM outbox.queue_claims c
                          WHERE c.slot_name = slot
                            -- Not those of a slot of that name dropped before (a retired slot).
                            AND c.claimed_at >= coalesce((SELECT s.created_at FROM outbox.slots s
                                                           WHERE s.slot_name = slot), 'infinity')
                            AND (confirmed IS NULL OR c.from_lsn > confirmed
                                 OR c.seq = (SELECT max(l.seq) FROM outbox.queue_claims l
                                              WHERE l.slot_name = slot AND l.from_lsn <= confirmed))) a
                      ORDER BY 1);
    globs := ARRAY(SELECT DISTINCT g COLLATE "C" FROM unnest(claimed || adding) g ORDER BY 1);
    filter := outbox._queue_filter(globs);
    IF NOT EXISTS (SELECT FROM pg_publication p WHERE p.pubname = publication) THEN
        EXECUTE format('CREATE PUBLICATION %I FOR TABLE outbox.messages WHERE %s WITH (publish = %L)',
                       publication, filter, 'insert');
        RETURN 'created';
    END IF;
    IF (SELECT p.pubowner FROM pg_publication p WHERE p.pubname = publication)
       <> (SELECT c.relowner FROM pg_class c WHERE c.oid = to_regclass('outbox.messages')) THEN
        RAISE EXCEPTION 'outbox.filter_slot_publication: publication % exists and belongs to role %, not to pg_outbox''s installer',
            publication, (SELECT p.pubowner::regrole FROM pg_publication p WHERE p.pubname = publication)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Drop it (DROP PUBLICATION %I) or choose another postgres.slot.', publication);
    END IF;
    before := outbox.slot_publication_queues(slot);
    IF before IS NOT DISTINCT FROM globs THEN
        RETURN 'unchanged';
    END IF;
    EXECUTE format('ALTER PUBLICATION %I SET TABLE outbox.messages WHERE %s', publication, filter);
    EXECUTE format('ALTER PUBLICATION %I SET (publish = %L, publish_via_partition_root = false)', publication, 'insert');
    IF before IS NULL OR NOT claimed <@ before THEN
        RETURN 'remade';
    ELSIF globs <@ before THEN
        RETURN 'narrowed';
    END IF;
    RETURN 'widened';
END
$$;
COMMENT ON FUNCTION outbox.filter_slot_publication(name, text[]) IS
    'Creates or updates publication pg_outbox_<slot>, row-filtered on the queues the slot may deliver (outbox-worker setup --queues).';

------------------------------------------------------------------------------------------------
-- Rights: nothing for PUBLIC; four roles the README names.
------------------------------------------------------------------------------------------------

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
        IF o.grantee <> 0 AND o.grantee::regrole::text NOT IN ('outbox_publisher', 'outbox_consumer', 'outbox_operator', 'outbox_relay') THEN
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
                          outbox._require_text(text, text, text, text),
                          outbox._require_key_text(text, text, text, text),
                          outbox._before_now(interval)
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
                          outbox.register_consumer(text, regrole), outbox.unregister_consumer(text),
                          outbox.filter_slot_publication(name, text[]), outbox.slot_publication_queues(name),
                          outbox.slot_queues()
    TO outbox_operator;
GRANT SELECT ON outbox.messages TO outbox_operator;
GRANT SELECT, DELETE ON outbox.dead_letters TO outbox_operator;
-- Only the worker writes dead letters, so redrive publishes only what a worker set aside.
GRANT INSERT ON outbox.dead_letters TO outbox_relay;
GRANT SELECT, INSERT, UPDATE ON outbox.slots TO outbox_operator;
GRANT SELECT, INSERT ON outbox.queue_claims TO outbox_operator;

-- Last, after every object is in place: schema outbox, everything in it and the publication
-- belong to the installer. Anything else was planted by a role that had CREATE on the schema
-- (before this install revoked it, or while it ran) and could capture calls to outbox.*.
DO $owners$
DECLARE
    planted text := (
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
         WHERE o.owner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user));
BEGIN
    IF planted IS NOT NULL THEN
        RAISE EXCEPTION 'pg_outbox: objects of pg_outbox belong to another role than %, who is installing it: %', current_user, planted
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A role with CREATE on schema outbox could plant objects that capture calls to outbox.*: inspect and drop them, then install again.';
    END IF;
END
$owners$;
