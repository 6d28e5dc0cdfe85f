-- The SQL install's publish functions (no C extension): the signatures, checks, errors and hints
-- of pg_outbox/src/publish.rs and storage.rs, in PL/pgSQL. The table form only: without
-- superuser, pg_logical_emit_message cannot be revoked from PUBLIC, so anyone could forge a
-- wal-form message; the worker therefore accepts only the table form where the extension is not
-- installed (README, "Managed PostgreSQL").

-- The helpers below run only inside the SECURITY DEFINER publish functions, whose
-- SET search_path = pg_catalog, pg_temp they inherit: without a SET clause of their own, which
-- would cost a settings save and restore per call (several per publish).

-- A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, 12 bits of sub-millisecond time, random
-- bits; ascending within a session even within one microsecond, as the extension's ids are.
CREATE FUNCTION outbox._uuid_v7() RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    micros bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    sub_ms int := ((micros % 1000) * 4096 / 1000)::int;
    bytes bytea := uuid_send(gen_random_uuid());
    last text := current_setting('pg_outbox._last_id', true);
    tail bigint;
    id uuid;
BEGIN
    bytes := overlay(bytes PLACING substring(int8send(micros / 1000) FROM 3 FOR 6) FROM 1 FOR 6);
    bytes := set_byte(bytes, 6, 112 | (sub_ms >> 8));       -- version 7, sub-millisecond high bits
    bytes := set_byte(bytes, 7, sub_ms & 255);
    bytes := set_byte(bytes, 8, (get_byte(bytes, 8) & 63) | 128);  -- variant 10
    id := encode(bytes, 'hex')::uuid;
    IF last IS NOT NULL AND last <> '' AND id <= last::uuid THEN
        -- The clock did not move on: one more than the last id, in its random tail.
        bytes := uuid_send(last::uuid);
        tail := ('x' || encode(substring(bytes FROM 10 FOR 7), 'hex'))::bit(56)::bigint + 1;
        bytes := overlay(bytes PLACING substring(int8send(tail) FROM 2 FOR 7) FROM 10 FOR 7);
        id := encode(bytes, 'hex')::uuid;
    END IF;
    PERFORM set_config('pg_outbox._last_id', id::text, false);
    RETURN id;
END
$$;

-- pg_outbox.max_message_size as the database (or the cluster's configuration) sets it, in bytes.
-- Not the session's value: the extension makes it a superuser setting that a publisher cannot
-- raise; here only ALTER DATABASE ... SET (the database owner) can.
CREATE FUNCTION outbox._max_message_size() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT least(pg_size_bytes(coalesce(
        (SELECT substring(c FROM '^pg_outbox\.max_message_size=(.*)$')
           FROM pg_db_role_setting s, unnest(s.setconfig) AS c
          WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND s.setrole = 0 AND c LIKE 'pg_outbox.max_message_size=%'),
        '512kB')), 64 * 1024 * 1024)
$$;

-- pg_outbox.retention in seconds (default 1 day), read the same way: the database's setting.
CREATE FUNCTION outbox._retention_seconds() RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT extract(epoch FROM coalesce(
        (SELECT substring(c FROM '^pg_outbox\.retention=(.*)$')::interval
           FROM pg_db_role_setting s, unnest(s.setconfig) AS c
          WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND s.setrole = 0 AND c LIKE 'pg_outbox.retention=%'),
        interval '1 day'))::integer
$$;

-- What every publish checks before it writes, as the extension's Writer::open does: a read-only
-- transaction is refused like an INSERT, and only the table form exists here.
CREATE FUNCTION outbox._check_writable(function_name text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF current_setting('transaction_read_only')::boolean THEN
        RAISE EXCEPTION 'cannot execute % in a read-only transaction', function_name
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    CASE coalesce(nullif(current_setting('pg_outbox.storage', true), ''), 'table')
        WHEN 'table' THEN NULL;
        WHEN 'wal' THEN
            RAISE EXCEPTION '%: pg_outbox.storage = ''wal'' is not available in the SQL install', function_name
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Without the C extension pg_logical_emit_message stays open to every role, so the worker accepts only the table form here: use pg_outbox.storage = ''table'' (the default), or install the extension.';
        ELSE
            RAISE EXCEPTION 'invalid value for parameter "pg_outbox.storage": "%"', current_setting('pg_outbox.storage')
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Available values: table, wal.';
    END CASE;
END
$$;

-- The queue name rules of publish.rs (check_queue_name).
CREATE FUNCTION outbox._check_queue(function_name text, queue text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    hint constant text := 'Queue names become Kafka topics and AMQP routing keys: use 1 to 249 of the characters A-Z a-z 0-9 . _ - (not "." or "..").';
    problem text;
BEGIN
    IF queue IS NULL THEN
        RAISE EXCEPTION '%: queue must not be NULL', function_name
            USING ERRCODE = 'null_value_not_allowed', HINT = hint;
    END IF;
    problem := CASE
        WHEN queue = '' THEN 'it is empty'
        WHEN octet_length(queue) > 249 THEN format('it is %s characters long, the limit is 249', octet_length(queue))
        WHEN queue ~ '[^A-Za-z0-9._-]' THEN format('character %s is not allowed', outbox._char_literal(substring(queue FROM '[^A-Za-z0-9._-]')))
        WHEN queue IN ('.', '..') THEN '"." and ".." are not valid Kafka topic names'
    END;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%: invalid queue name "%": %', function_name, queue, problem
            USING ERRCODE = 'invalid_parameter_value', HINT = hint;
    END IF;
END
$$;

-- A character as Rust's {:?} prints it in publish.rs's messages: 'x', with \n, \t, \' escaped.
CREATE FUNCTION outbox._char_literal(c text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT '''' || CASE c WHEN E'\n' THEN '\n' WHEN E'\t' THEN '\t' WHEN E'\r' THEN '\r'
                          WHEN '''' THEN '\''' WHEN '\' THEN '\\' ELSE c END || ''''
$$;

-- The key and headers rules of publish.rs (key_arg, headers_arg, check_headers).
CREATE FUNCTION outbox._check_key(function_name text, argument_name text, key text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF key = '' THEN
        RAISE EXCEPTION '%: % must not be an empty string', function_name, argument_name
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass NULL for a message without a key.';
    END IF;
END
$$;

CREATE FUNCTION outbox._check_headers(function_name text, headers jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    hint constant text := 'Pass a JSON object whose values are strings, e.g. ''{"traceparent": "00-..."}'', or ''{}'' for none.';
    header record;
BEGIN
    IF jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION '%: headers must be a JSON object, got a JSON %', function_name,
            CASE jsonb_typeof(headers) WHEN 'array' THEN 'array' ELSE 'scalar' END
            USING ERRCODE = 'invalid_parameter_value', HINT = hint;
    END IF;
    FOR header IN SELECT key, value FROM jsonb_each(headers) ORDER BY key COLLATE "C" LOOP
        IF header.key = '' THEN
            RAISE EXCEPTION '%: a header name is empty', function_name
                USING ERRCODE = 'invalid_parameter_value', HINT = hint;
        ELSIF lower(header.key) LIKE 'outbox-%' THEN
            RAISE EXCEPTION '%: header "%" uses the reserved prefix "outbox-"', function_name, header.key
                USING ERRCODE = 'invalid_parameter_value', HINT = hint;
        ELSIF jsonb_typeof(header.value) <> 'string' THEN
            RAISE EXCEPTION '%: header "%" must be a string, got %', function_name, header.key, header.value
                USING ERRCODE = 'invalid_parameter_value', HINT = hint;
        END IF;
    END LOOP;
END
$$;

-- The size rule of storage.rs (check_size): key + headers + payload as stored, against
-- pg_outbox.max_message_size, or its 64MB ceiling for a redriven message.
CREATE FUNCTION outbox._check_size(function_name text, key text, headers jsonb, payload_size bigint, ceiling boolean)
RETURNS void LANGUAGE plpgsql STABLE AS $$
DECLARE
    key_size bigint := coalesce(octet_length(key), 0);
    headers_size bigint := pg_column_size(headers) - 4;
    size bigint := key_size + headers_size + payload_size;
    limit_bytes bigint := CASE WHEN ceiling THEN 64 * 1024 * 1024 ELSE outbox._max_message_size() END;
BEGIN
    IF size > limit_bytes THEN
        RAISE EXCEPTION '%: the message is % bytes (key %, headers %, payload %), more than % (% bytes)',
            function_name, size, key_size, headers_size, payload_size,
            CASE WHEN ceiling THEN 'the ceiling of pg_outbox.max_message_size' ELSE 'pg_outbox.max_message_size' END,
            limit_bytes
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'Brokers refuse large messages: store the large part elsewhere (a table, object storage) and publish a reference to it, or raise pg_outbox.max_message_size (superuser, at most 64MB) together with the broker''s limit.';
    END IF;
END
$$;

-- One checked message into outbox.messages.
CREATE FUNCTION outbox._write(function_name text, id uuid, queue text, key text, payload jsonb,
                              payload_bytes bytea, headers jsonb, ceiling boolean)
RETURNS uuid LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM outbox._check_size(function_name, key, headers,
        coalesce(pg_column_size(payload), pg_column_size(payload_bytes)) - 4, ceiling);
    INSERT INTO outbox.messages (id, queue, key, payload, payload_bytes, headers, created_at)
        VALUES (id, queue, key, payload, payload_bytes, headers, now());
    RETURN id;
END
$$;

CREATE FUNCTION outbox.publish(queue text, payload jsonb, headers jsonb DEFAULT '{}', key text DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._check_writable('outbox.publish');
    PERFORM outbox._check_queue('outbox.publish', $1);
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'outbox.publish: payload must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass a JSON value, e.g. ''{}''.';
    END IF;
    PERFORM outbox._check_headers('outbox.publish', coalesce($3, '{}'));
    PERFORM outbox._check_key('outbox.publish', 'key', $4);
    RETURN outbox._write('outbox.publish', outbox._uuid_v7(), $1, $4, $2, NULL, coalesce($3, '{}'), false);
END
$$;
COMMENT ON FUNCTION outbox.publish(text, jsonb, jsonb, text) IS
    'Publishes a JSON message to queue in the current transaction; returns its id (UUIDv7).';

CREATE FUNCTION outbox.publish_bytes(queue text, payload bytea, headers jsonb DEFAULT '{}', key text DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox._check_writable('outbox.publish_bytes');
    PERFORM outbox._check_queue('outbox.publish_bytes', $1);
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'outbox.publish_bytes: payload must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass a bytea value, e.g. ''\x00''::bytea.';
    END IF;
    PERFORM outbox._check_headers('outbox.publish_bytes', coalesce($3, '{}'));
    PERFORM outbox._check_key('outbox.publish_bytes', 'key', $4);
    RETURN outbox._write('outbox.publish_bytes', outbox._uuid_v7(), $1, $4, NULL, $2, coalesce($3, '{}'), false);
END
$$;
COMMENT ON FUNCTION outbox.publish_bytes(text, bytea, jsonb, text) IS
    'Publishes a binary message (Avro, Protobuf...) to queue in the current transaction; set a content-type header.';

CREATE FUNCTION outbox.publish_batch(queue text, payloads jsonb[], headers jsonb DEFAULT '{}', keys text[] DEFAULT NULL)
RETURNS SETOF uuid LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER ROWS 100
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f constant text := 'outbox.publish_batch';
    i int;
BEGIN
    PERFORM outbox._check_writable(f);
    PERFORM outbox._check_queue(f, $1);
    IF $2 IS NULL THEN
        RAISE EXCEPTION '%: payloads must not be NULL', f
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass an array of JSON values, e.g. ARRAY[''{}'']::jsonb[].';
    END IF;
    IF array_ndims($2) > 1 THEN
        RAISE EXCEPTION '%: payloads must be a one-dimensional array, got % dimensions', f, array_ndims($2)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass a flat array.';
    END IF;
    PERFORM outbox._check_headers(f, coalesce($3, '{}'));
    IF array_ndims($4) > 1 THEN
        RAISE EXCEPTION '%: keys must be a one-dimensional array, got % dimensions', f, array_ndims($4)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass a flat array.';
    END IF;
    IF $4 IS NOT NULL AND cardinality($4) <> cardinality($2) THEN
        RAISE EXCEPTION '%: payloads has % elements but keys has %', f, cardinality($2), cardinality($4)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass one key per payload (NULL elements for no key), or NULL for no keys at all.';
    END IF;
    FOR i IN 1 .. coalesce(cardinality($2), 0) LOOP
        IF $2[array_lower($2, 1) + i - 1] IS NULL THEN
            RAISE EXCEPTION '%: payloads[%] must not be NULL', f, i
                USING ERRCODE = 'null_value_not_allowed', HINT = 'Every element of payloads must be a JSON value.';
        END IF;
        PERFORM outbox._check_key(f, 'keys element', $4[array_lower($4, 1) + i - 1]);
        RETURN NEXT outbox._write(f, outbox._uuid_v7(), $1, $4[array_lower($4, 1) + i - 1],
                                  $2[array_lower($2, 1) + i - 1], NULL, coalesce($3, '{}'), false);
    END LOOP;
END
$$;
COMMENT ON FUNCTION outbox.publish_batch(text, jsonb[], jsonb, text[]) IS
    'Publishes one message per element of payloads (keys[i] is the key of payloads[i]); returns their ids in order.';

-- Re-publishes a message with its original id (used by outbox.redrive). Not granted to anyone.
CREATE FUNCTION outbox._publish_message(id uuid, queue text, key text, payload jsonb, payload_bytes bytea, headers jsonb)
RETURNS uuid LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f constant text := 'outbox._publish_message';
BEGIN
    PERFORM outbox._check_writable(f);
    IF $1 IS NULL THEN
        RAISE EXCEPTION '%: id must not be NULL', f
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass the id of the message.';
    END IF;
    PERFORM outbox._check_queue(f, $2);
    PERFORM outbox._check_key(f, 'key', $3);
    PERFORM outbox._check_headers(f, coalesce($6, '{}'));
    IF $4 IS NULL AND $5 IS NULL THEN
        RAISE EXCEPTION '%: payload_bytes must not be NULL', f
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass payload or payload_bytes.';
    END IF;
    RETURN outbox._write(f, $1, $2, $3, $4, CASE WHEN $4 IS NULL THEN $5 END, coalesce($6, '{}'), true);
END
$$;
