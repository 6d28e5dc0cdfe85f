-- Run by the postgres image's entrypoint on first start (docker-entrypoint-initdb.d).
CREATE EXTENSION pg_outbox;
CREATE ROLE outbox_worker LOGIN REPLICATION PASSWORD 'outbox_worker' IN ROLE outbox_relay;
