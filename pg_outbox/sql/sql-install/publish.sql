-- The SQL install's publish functions (no C extension): the signatures, checks, errors and hints
-- of pg_outbox/src/publish.rs and storage.rs, in PL/pgSQL. The table form only: without
-- superuser, pg_logical_emit_message cannot be revoked from PUBLIC, so anyone could forge a
-- wal-form message; the worker therefore accepts only the table form where the extension is not
-- installed (README, "Managed PostgreSQL").

-- Every function here resolves names in pg_catalog only, whoever calls it and whatever its
-- search_path (DEVELOPMENT.md, "SQL rules"): a SET search_path clause, or, for the SQL helpers on
-- the path of every publish that the planner inlines (a SET clause would stop that), a
-- SQL-standard body (BEGIN ATOMIC) that is parsed once, here, under this script's search_path.
-- No role but the owner may call the helpers.

-- The SQL install's settings, where no superuser can ALTER DATABASE ... SET pg_outbox.* (PostgreSQL
-- 15 refuses a placeholder setting to a non-superuser database owner): set by an operator with
-- outbox.set_setting, read by every session, changed by no publisher. A row here wins over the
-- database's setting.
CREATE TABLE IF NOT EXISTS outbox.settings (
    name   text        PRIMARY KEY CHECK (name IN ('pg_outbox.max_message_size', 'pg_outbox.retention')),
    value  text        NOT NULL,
    set_at timestamptz NOT NULL DEFAULT now(),
    set_by name        NOT NULL DEFAULT current_user
);

-- A setting as an operator (outbox.settings) or the database (or the cluster's configuration)
-- sets it, not the session: the extension makes pg_outbox.max_message_size a superuser setting
-- that a publisher cannot raise. PL/pgSQL, not SQL, so that its query plans are kept for the
-- session rather than made again in every transaction.
CREATE FUNCTION outbox._database_setting(name text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce(
        (SELECT s.value FROM outbox.settings s WHERE s.name = _database_setting.name),
        (SELECT substring(c FROM length(name) + 2)
           FROM pg_db_role_setting s, unnest(s.setconfig) AS c
          WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND s.setrole = 0 AND starts_with(c, name || '=')));
END
$$;

-- pg_outbox.max_message_size in bytes, read and checked as the extension's setting is: a number
-- without a unit is kB, from 1kB to 64MB.
CREATE FUNCTION outbox._max_message_size() RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    setting text := coalesce(outbox._database_setting('pg_outbox.max_message_size'), '512kB');
    bytes bigint;
BEGIN
    BEGIN
        bytes := pg_size_bytes(CASE WHEN setting ~ '^\s*\d+\s*$' THEN setting || 'kB' ELSE setting END);
    EXCEPTION WHEN invalid_parameter_value OR numeric_value_out_of_range THEN
        bytes := NULL;
    END;
    IF bytes IS NULL OR bytes NOT BETWEEN 1024 AND 64 * 1024 * 1024 THEN
        RAISE EXCEPTION 'invalid value for parameter "pg_outbox.max_message_size": "%"', setting
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Set a size from 1kB to 64MB: SELECT outbox.set_setting(''pg_outbox.max_message_size'', ''1MB''); (an operator), or ALTER DATABASE ... SET pg_outbox.max_message_size = ''1MB''.';
    END IF;
    RETURN bytes;
END
$$;

-- pg_outbox.retention in seconds (default 1 day), read and checked the same way: a number without
-- a unit is seconds, at least one second.
CREATE FUNCTION outbox._retention_seconds() RETURNS integer
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    setting text := coalesce(outbox._database_setting('pg_outbox.retention'), '1d');
    seconds numeric;
BEGIN
    BEGIN
        seconds := extract(epoch FROM setting::interval);
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow
                   OR numeric_value_out_of_range THEN
        seconds := NULL;
    END;
    IF seconds IS NULL OR seconds NOT BETWEEN 1 AND 2147483647 THEN
        RAISE EXCEPTION 'invalid value for parameter "pg_outbox.retention": "%"', setting
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Set a duration of at least 1s: SELECT outbox.set_setting(''pg_outbox.retention'', ''7d''); (an operator), or ALTER DATABASE ... SET pg_outbox.retention = ''7d''.';
    END IF;
    RETURN seconds::integer;
END
$$;

-- Sets pg_outbox.max_message_size or pg_outbox.retention for every session of this database
-- (value NULL: back to the database's setting, or the default), checked as it is set. For
-- outbox_operator: no superuser needed, and no publisher can change it.
CREATE FUNCTION outbox.set_setting(name text, value text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF name IS NULL OR name NOT IN ('pg_outbox.max_message_size', 'pg_outbox.retention') THEN
        RAISE EXCEPTION 'outbox.set_setting: unknown setting %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'undefined_object', HINT = 'The SQL install has two: pg_outbox.max_message_size and pg_outbox.retention.';
    END IF;
    -- One statement either way, so that two operators setting it at once do not both insert.
    -- session_user: the operator who called, not this function's owner.
    IF value IS NULL THEN
        DELETE FROM outbox.settings s WHERE s.name = set_setting.name;
    ELSE
        INSERT INTO outbox.settings AS s (name, value, set_at, set_by)
             VALUES (set_setting.name, set_setting.value, now(), session_user)
        ON CONFLICT ON CONSTRAINT settings_pkey
        DO UPDATE SET value = excluded.value, set_at = excluded.set_at, set_by = excluded.set_by;
    END IF;
    -- Read back as every publish and prune reads it: a bad value raises here, undoing the change.
    IF name = 'pg_outbox.max_message_size' THEN
        PERFORM outbox._max_message_size();
    ELSE
        PERFORM outbox._retention_seconds();
    END IF;
END
$$;
COMMENT ON FUNCTION outbox.set_setting(text, text) IS
    'Sets pg_outbox.max_message_size or pg_outbox.retention for this database (SQL install; NULL resets it).';

-- What every publish checks before it writes, as the extension's Writer::open does: a read-only
-- transaction is refused like an INSERT, and only the table form exists here.
CREATE FUNCTION outbox._check_writable(function_name text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('transaction_read_only')::boolean THEN
        RAISE EXCEPTION 'cannot execute % in a read-only transaction', function_name
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    CASE lower(coalesce(nullif(current_setting('pg_outbox.storage', true), ''), 'table'))
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
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp AS $$
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
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT '''' || CASE c WHEN E'\n' THEN '\n' WHEN E'\t' THEN '\t' WHEN E'\r' THEN '\r'
                          WHEN '''' THEN '\''' WHEN '\' THEN '\\' ELSE c END || ''''
$$;

-- The key and headers rules of publish.rs (key_arg, headers_arg, check_headers).
CREATE FUNCTION outbox._check_key(function_name text, argument_name text, key text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF key = '' THEN
        RAISE EXCEPTION '%: % must not be an empty string', function_name, argument_name
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass NULL for a message without a key.';
    END IF;
END
$$;

CREATE FUNCTION outbox._check_headers(function_name text, headers jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp AS $$
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
        -- outbox-redriven-by: the one reserved header pg_outbox sets itself (redrive, through
        -- _publish_message, which only its own functions can call).
        ELSIF lower(header.key) LIKE 'outbox-%'
              AND NOT (function_name = 'outbox._publish_message' AND header.key = 'outbox-redriven-by') THEN
            RAISE EXCEPTION '%: header "%" uses the reserved prefix "outbox-"', function_name, header.key
                USING ERRCODE = 'invalid_parameter_value', HINT = hint;
        ELSIF jsonb_typeof(header.value) <> 'string' THEN
            RAISE EXCEPTION '%: header "%" must be a string, got %', function_name, header.key, header.value
                USING ERRCODE = 'invalid_parameter_value', HINT = hint;
        END IF;
    END LOOP;
END
$$;

-- The length of a string as JSON text, quotes and escapes included, without printing it (a
-- string of control characters prints 6 bytes for each): \" \\ \b \f \n \r \t take 2 bytes, the
-- other characters below U+0020 \u00XX, 6.
CREATE FUNCTION outbox._json_string_length(s text) RETURNS bigint
LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
    SELECT octet_length(s)::bigint + 2
           + (octet_length(s) - octet_length(translate(s, E'"\\\b\f\n\r\t', '')))
           + 5 * (octet_length(s) - octet_length(translate(s,
                 E'\x01\x02\x03\x04\x05\x06\x07\x0b\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f', '')));
END;

-- _json_length of a value that may print as more than a text can hold (1 GB): printed as usual,
-- and only if that fails (54000 "out of memory: Cannot enlarge string buffer"; a real out of
-- memory), measured part by part. The exception block (a subtransaction) is entered only for
-- values stored in more than 64 kB or compressed, never on the path of an ordinary publish.
CREATE FUNCTION outbox._json_length_of_large(value jsonb) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    BEGIN
        RETURN octet_length(value::text);
    EXCEPTION WHEN program_limit_exceeded OR out_of_memory OR internal_error THEN
        -- internal_error: a text of just under 1 GB that textin cannot allocate.
        NULL;
    END;
    -- jsonb's output: [a, b], {"k": v, "l": w}, strings escaped by escape_json.
    CASE jsonb_typeof(value)
        WHEN 'array' THEN
            RETURN (SELECT 2 + coalesce(sum(outbox._json_length(e) + 2) - 2, 0)
                      FROM jsonb_array_elements(value) AS e);
        WHEN 'object' THEN
            RETURN (SELECT 2 + coalesce(sum(outbox._json_string_length(m.key) + 2 + outbox._json_length(m.value) + 2) - 2, 0)
                      FROM jsonb_each(value) AS m);
        WHEN 'string' THEN
            RETURN outbox._json_string_length(value #>> '{}');
        ELSE
            RETURN octet_length(value::text);
    END CASE;
END
$$;

-- The length of a JSON value's text as jsonb prints it (what the worker sends). A jsonb value
-- prints at most about 12,300 times its stored size (a number like 1e131071 with 16383 decimals:
-- 12 bytes stored, 147,457 printed; a string at most 6 times), so one stored in at most 64 kB,
-- uncompressed, prints in less than the 1 GB a text can hold, and is simply printed: the path of
-- every ordinary publish, inlined by the planner. A larger or compressed one takes
-- _json_length_of_large, which never makes a text over 1 GB.
CREATE FUNCTION outbox._json_length(value jsonb) RETURNS bigint
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE WHEN value IS NULL THEN NULL
                WHEN pg_column_size(value) <= 65536 AND pg_column_compression(value) IS NULL
                THEN octet_length(value::text)
                ELSE outbox._json_length_of_large(value) END;
END;

-- The bytes of a text once converted to UTF-8, in a database whose encoding is not UTF-8: the
-- worker receives every text converted (pgoutput converts it), so a text UTF-8 cannot represent
-- (SQL_ASCII's non-UTF-8 bytes, WIN1252's 0x81) would fail the walsender on that row at every
-- reconnect and stop delivery for good: refused here, as by the extension (size.rs).
CREATE FUNCTION outbox._utf8_length(t text) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN octet_length(convert_to(t, 'UTF8'));
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
    RAISE EXCEPTION 'pg_outbox: text is not valid in the database encoding and cannot be converted to UTF-8 (%)', SQLERRM
        USING ERRCODE = 'character_not_in_repertoire',
              HINT = 'Messages are delivered as UTF-8: publish text that UTF-8 can represent.';
END
$$;

-- A key's bytes as sent: as stored in a UTF-8 database, converted in any other.
CREATE FUNCTION outbox._sent_length(t text) RETURNS bigint
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE WHEN t IS NULL THEN NULL
                WHEN getdatabaseencoding() = 'UTF8' THEN octet_length(t)
                ELSE outbox._utf8_length(t) END;
END;

-- A JSON value's text as sent: _json_length in a UTF-8 database, converted in any other.
CREATE FUNCTION outbox._sent_json_length(value jsonb) RETURNS bigint
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE WHEN value IS NULL THEN NULL
                WHEN getdatabaseencoding() = 'UTF8' THEN outbox._json_length(value)
                ELSE outbox._utf8_length(value::text) END;
END;

-- A message's size as the limit counts it: what the worker sends, as storage.rs counts it: the
-- key's bytes, the JSON text of the headers and of a JSON payload (a jsonb of a few kB can print
-- as gigabytes: numbers like 1e131071), the bytes of a binary payload, all at their full,
-- uncompressed size, and text in UTF-8 (a LATIN1 é counts 2). Inlined by the planner where the
-- publish functions test it.
CREATE FUNCTION outbox._message_size(key text, headers jsonb, payload_size bigint) RETURNS bigint
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(outbox._sent_length(key), 0)
           + CASE WHEN headers = '{}' THEN 2 ELSE outbox._sent_json_length(headers) END
           + payload_size;
END;

-- The payload's size as _message_size counts it.
CREATE FUNCTION outbox._payload_size(payload jsonb, payload_bytes bytea) RETURNS bigint
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(outbox._sent_json_length(payload), octet_length(payload_bytes));
END;

-- The size rule of storage.rs (check_size): key + headers + payload as sent, against
-- pg_outbox.max_message_size, or its 64MB ceiling for a redriven message.
CREATE FUNCTION outbox._check_size(function_name text, key text, headers jsonb, payload_size bigint, ceiling boolean)
RETURNS void LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key_size bigint := coalesce(outbox._sent_length(key), 0);
    headers_size bigint := outbox._sent_json_length(headers);
    size bigint := key_size + headers_size + payload_size;
    limit_bytes bigint := CASE WHEN ceiling THEN 64 * 1024 * 1024 ELSE outbox._max_message_size() END;
BEGIN
    IF size > limit_bytes THEN
        RAISE EXCEPTION '%: the message is % bytes (key %, headers %, payload %), more than % (% bytes)',
            function_name, size, key_size, headers_size, payload_size,
            CASE WHEN ceiling THEN 'the ceiling of pg_outbox.max_message_size' ELSE 'pg_outbox.max_message_size' END,
            limit_bytes
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'Brokers refuse large messages: store the large part elsewhere (a table, object storage) and publish a reference to it, or raise the limit (at most 64MB) together with the broker''s: SELECT outbox.set_setting(''pg_outbox.max_message_size'', ''1MB''); (an operator).';
    END IF;
END
$$;

-- The first of the next n microseconds on this session's id clock: the wall clock, but never at
-- or before the last one the session took, so that the ids a session takes ascend, as the
-- extension's do. SQL, not PL/pgSQL, so that the planner inlines it (as _uuid_v7): one
-- expression, no FROM. The session can set pg_outbox._last_micros to anything: what is not a
-- plain number is ignored (no raw bigint error), and so is a value more than a day ahead of the
-- transaction's start (no far-future ids; a clock stepped back by less still keeps ids ascending).
-- Ignored, not capped: 0.2.1 capped it, and every id after it in the transaction had the same
-- time.
CREATE FUNCTION outbox._take_micros(n bigint) RETURNS bigint
LANGUAGE sql VOLATILE
BEGIN ATOMIC
    SELECT set_config('pg_outbox._last_micros',
               (greatest((extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
                         coalesce(CASE WHEN length(current_setting('pg_outbox._last_micros', true)) BETWEEN 1 AND 18
                                        AND translate(current_setting('pg_outbox._last_micros', true), '0123456789', '') = ''
                                       -- Nested: the cast only once the text is known to be digits.
                                       THEN CASE WHEN current_setting('pg_outbox._last_micros', true)::bigint
                                                      < (extract(epoch FROM now()) * 1000000)::bigint + 86400000000
                                                 THEN current_setting('pg_outbox._last_micros', true)::bigint + 1 END
                                  END, 0)) + n - 1)::text,
               false)::bigint - n + 1;
END;

-- A UUIDv7 (RFC 9562) for a time in Unix microseconds: 48 bits of milliseconds, 12 bits of the
-- microseconds within them, version, and the variant and 62 random bits of a gen_random_uuid()
-- (a strong random source: setseed() cannot make ids repeat).
CREATE FUNCTION outbox._uuid_v7(micros bigint) RETURNS uuid
LANGUAGE sql VOLATILE
BEGIN ATOMIC
    SELECT encode(int8send((micros / 1000 << 16) | 28672 | ((micros % 1000) * 4096 / 1000))
                  || substring(uuid_send(gen_random_uuid()) FROM 9 FOR 8), 'hex')::uuid;
END;

-- One message, checked and written; every publish function ends here. Each check is first a
-- cheap test of the common, valid case, and only a failing one calls the helper above that names
-- the problem exactly as the extension does (a PL/pgSQL call costs more than the test).
-- No SET clause: it would cost a settings save and restore per publish. Instead every name in it
-- is schema-qualified, operators and casts included (OPERATOR(pg_catalog.=), ::pg_catalog.int8),
-- so it means the same under any search_path; tests/tests/sql_rules.rs checks that.
CREATE FUNCTION outbox._publish(function_name text, queue text, payload jsonb, payload_bytes bytea,
                                headers jsonb, key text, id uuid, ceiling boolean)
RETURNS uuid LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    payload_size pg_catalog.int8;
    micros pg_catalog.int8;
BEGIN
    IF pg_catalog.current_setting('transaction_read_only')::pg_catalog.bool
       OR pg_catalog.lower(pg_catalog.current_setting('pg_outbox.storage', true))
          OPERATOR(pg_catalog.<>) ALL ('{"", table}'::pg_catalog.text[]) THEN
        PERFORM outbox._check_writable(function_name);
    END IF;
    IF queue IS NULL OR queue OPERATOR(pg_catalog.~) '[^A-Za-z0-9._-]'
       OR pg_catalog.octet_length(queue) OPERATOR(pg_catalog.<) 1
       OR pg_catalog.octet_length(queue) OPERATOR(pg_catalog.>) 249
       OR queue OPERATOR(pg_catalog.=) '.' OR queue OPERATOR(pg_catalog.=) '..' THEN
        PERFORM outbox._check_queue(function_name, queue);
    END IF;
    IF payload IS NULL AND payload_bytes IS NULL THEN
        RAISE EXCEPTION '%: payload must not be NULL', function_name
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = CASE WHEN function_name OPERATOR(pg_catalog.=) 'outbox.publish_bytes'
                              THEN 'Pass a bytea value, e.g. ''\x00''::bytea.'
                              ELSE 'Pass a JSON value, e.g. ''{}''.' END;
    END IF;
    headers := coalesce(headers, '{}');
    IF headers OPERATOR(pg_catalog.<>) '{}' THEN
        PERFORM outbox._check_headers(function_name, headers);
    END IF;
    IF key OPERATOR(pg_catalog.=) '' THEN
        PERFORM outbox._check_key(function_name, 'key', key);
    END IF;
    -- The size limit is read only for a message that could exceed it: the setting is at least 1kB.
    payload_size := outbox._payload_size(payload, payload_bytes);
    IF outbox._message_size(key, headers, payload_size) OPERATOR(pg_catalog.>) 1024 THEN
        PERFORM outbox._check_size(function_name, key, headers, payload_size, ceiling);
    END IF;
    IF id IS NULL THEN
        micros := outbox._take_micros(1);
        id := outbox._uuid_v7(micros);
    END IF;
    INSERT INTO outbox.messages (id, queue, key, payload, payload_bytes, headers, created_at)
        VALUES (id, queue, key, payload, CASE WHEN payload IS NULL THEN payload_bytes END, headers, pg_catalog.now());
    RETURN id;
END
$$;

CREATE FUNCTION outbox.publish(queue text, payload jsonb, headers jsonb DEFAULT '{}', key text DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN outbox._publish('outbox.publish', queue, payload, NULL, headers, key, NULL, false);
END
$$;
COMMENT ON FUNCTION outbox.publish(text, jsonb, jsonb, text) IS
    'Publishes a JSON message to queue in the current transaction; returns its id (UUIDv7).';

CREATE FUNCTION outbox.publish_bytes(queue text, payload bytea, headers jsonb DEFAULT '{}', key text DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN outbox._publish('outbox.publish_bytes', queue, NULL, payload, headers, key, NULL, false);
END
$$;
COMMENT ON FUNCTION outbox.publish_bytes(text, bytea, jsonb, text) IS
    'Publishes a binary message (Avro, Protobuf...) to queue in the current transaction; set a content-type header.';

-- One element of publish_batch's checks, in the extension's order; true, or the error.
CREATE FUNCTION outbox._check_batch_element(function_name text, i bigint, payload jsonb, key text, headers jsonb)
RETURNS boolean LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF payload IS NULL THEN
        RAISE EXCEPTION '%: payloads[%] must not be NULL', function_name, i
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Every element of payloads must be a JSON value.';
    END IF;
    PERFORM outbox._check_key(function_name, 'keys element', key);
    PERFORM outbox._check_size(function_name, key, headers, outbox._payload_size(payload, NULL), false);
    RETURN true;
END
$$;

-- Every element in one INSERT, each checked as it is written, in order, so that the first bad one
-- is the one reported, as by the extension (its error undoes the rows before it); elements that
-- cannot fail a check skip the PL/pgSQL call (the size limit is at least 1kB). The ids take
-- consecutive microseconds of the session's id clock. A generic plan: a custom plan would copy
-- the arrays into itself (a million elements: 95 MB of backend memory instead of 31).
CREATE FUNCTION outbox.publish_batch(queue text, payloads jsonb[], headers jsonb DEFAULT '{}', keys text[] DEFAULT NULL)
RETURNS SETOF uuid LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER ROWS 100
SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    f constant text := 'outbox.publish_batch';
    all_headers constant jsonb := coalesce(headers, '{}');
    micros bigint;
BEGIN
    PERFORM outbox._check_writable(f);
    PERFORM outbox._check_queue(f, queue);
    IF payloads IS NULL THEN
        RAISE EXCEPTION '%: payloads must not be NULL', f
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass an array of JSON values, e.g. ARRAY[''{}'']::jsonb[].';
    END IF;
    IF array_ndims(payloads) > 1 THEN
        RAISE EXCEPTION '%: payloads must be a one-dimensional array, got % dimensions', f, array_ndims(payloads)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass a flat array.';
    END IF;
    IF all_headers <> '{}' THEN
        PERFORM outbox._check_headers(f, all_headers);
    END IF;
    IF array_ndims(keys) > 1 THEN
        RAISE EXCEPTION '%: keys must be a one-dimensional array, got % dimensions', f, array_ndims(keys)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass a flat array.';
    END IF;
    IF keys IS NOT NULL AND cardinality(keys) <> cardinality(payloads) THEN
        RAISE EXCEPTION '%: payloads has % elements but keys has %', f, cardinality(payloads), cardinality(keys)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass one key per payload (NULL elements for no key), or NULL for no keys at all.';
    END IF;
    IF cardinality(payloads) = 0 THEN
        RETURN;
    END IF;
    micros := outbox._take_micros(cardinality(payloads));
    RETURN QUERY
        INSERT INTO outbox.messages (id, queue, key, payload, headers, created_at)
        SELECT outbox._uuid_v7(micros + u.n - 1), publish_batch.queue, u.k, u.p, all_headers, now()
          FROM unnest(payloads, keys) WITH ORDINALITY AS u(p, k, n)
         WHERE (u.p IS NOT NULL AND u.k IS DISTINCT FROM ''
                AND outbox._message_size(u.k, all_headers, outbox._payload_size(u.p, NULL)) <= 1024)
            OR outbox._check_batch_element(f, u.n, u.p, u.k, all_headers)
        RETURNING id;
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
    -- publish's limit, not its 64MB ceiling: a dead letter may have been written by hand.
    RETURN outbox._publish(f, $2, $4, $5, $6, $3, $1, false);
END
$$;
