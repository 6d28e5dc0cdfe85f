-- Which SQL install this is: the worker reads it (no extension, so only the table form is
-- accepted), and so will later versions of this script.
CREATE TABLE IF NOT EXISTS outbox.sql_install (
    version      text        NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
-- The build: a digest of this script, so that a changed script of the same version upgrades too.
ALTER TABLE outbox.sql_install ADD COLUMN IF NOT EXISTS build text;
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
COMMIT;
-- The prologue pinned the search_path for this script; a session that ran it with \i gets its own back.
RESET search_path;
SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext('pg_outbox SQL install'), 0) AS pg_outbox_unlocked \gset
