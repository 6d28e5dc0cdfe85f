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
GRANT SELECT ON outbox.sql_install TO outbox_publisher, outbox_consumer, outbox_operator;
COMMIT;
