-- Which SQL install this is: the worker reads it (no extension, so only the table form is
-- accepted), and so will later versions of this script.
CREATE TABLE IF NOT EXISTS outbox.sql_install (
    version      text        NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
-- The build: a digest of this script, so that a changed script of the same version upgrades too.
-- Looked up first: ALTER TABLE takes its lock even when the column is there, and would wait
-- behind any session that read the table (holding the upgrade's other locks meanwhile).
DO $build$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = 'outbox.sql_install'::regclass AND a.attname = 'build' AND NOT a.attisdropped) THEN
        ALTER TABLE outbox.sql_install ADD COLUMN build text;
    END IF;
END
$build$;
DELETE FROM outbox.sql_install;
INSERT INTO outbox.sql_install (version, build) VALUES ('@VERSION@', '@BUILD@');
-- Exactly these rights, as api.sql sets them for the other tables (default privileges of the
-- installer would otherwise let a role rewrite the version record).
DO $acl$
DECLARE
    grantee oid;
BEGIN
    FOR grantee IN
        SELECT DISTINCT g.grantee
          FROM pg_catalog.pg_class c, pg_catalog.aclexplode(coalesce(c.relacl, pg_catalog.acldefault('r', c.relowner))) g
         WHERE c.oid = 'outbox.sql_install'::regclass AND g.grantee <> c.relowner
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON TABLE outbox.sql_install FROM %s',
                                  CASE grantee WHEN 0 THEN 'PUBLIC' ELSE grantee::regrole::text END);
    END LOOP;
END
$acl$;
GRANT SELECT ON outbox.sql_install TO outbox_publisher, outbox_consumer, outbox_operator;
-- The SQL install's own settings (sql-install/publish.sql), after api.sql set every other right.
GRANT EXECUTE ON FUNCTION outbox.set_setting(text, text) TO outbox_operator;
GRANT SELECT ON outbox.settings TO outbox_operator;
-- Functions of an earlier version that this one no longer has: this transaction made or replaced
-- every function of this version. Those nothing else needs first; one that something outside
-- pg_outbox still needs (a view, a BEGIN ATOMIC wrapper) stops the upgrade, named.
DO $obsolete$
DECLARE
    f regprocedure;
    dropped integer;
    users text;
BEGIN
    LOOP
        dropped := 0;
        FOR f IN SELECT fn.oid::regprocedure FROM pg_catalog.pg_proc fn
                  WHERE fn.pronamespace = 'outbox'::regnamespace
                    AND NOT fn.xmin = pg_catalog.pg_current_xact_id()::xid
                    AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                                     WHERE d.refclassid = 'pg_catalog.pg_proc'::regclass AND d.refobjid = fn.oid
                                       AND d.objid <> fn.oid) LOOP
            EXECUTE format('DROP FUNCTION %s', f);
            dropped := dropped + 1;
        END LOOP;
        EXIT WHEN dropped = 0;
    END LOOP;
    FOR f IN SELECT fn.oid::regprocedure FROM pg_catalog.pg_proc fn
              WHERE fn.pronamespace = 'outbox'::regnamespace
                AND NOT fn.xmin = pg_catalog.pg_current_xact_id()::xid LOOP
        users := (SELECT string_agg(pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
                    FROM pg_catalog.pg_depend d
                   WHERE d.refclassid = 'pg_catalog.pg_proc'::regclass AND d.refobjid = f AND d.objid <> f);
        RAISE EXCEPTION 'pg_outbox: function % is gone in @VERSION@, but % uses it', f, users
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Drop or change what uses it, then run this script again (nothing was changed).';
    END LOOP;
END
$obsolete$;
COMMIT;
-- The prologue pinned the search_path for this script; a session that ran it with \i gets its own back.
RESET search_path;
SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext('pg_outbox SQL install'), 0) AS pg_outbox_unlocked \gset
