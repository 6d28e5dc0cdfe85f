-- Publish from plain SQL, in the same transaction as the business write.
CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL);

BEGIN;
INSERT INTO orders VALUES (1001, 'c-7', 12.99);
SELECT outbox.publish(
    'orders',                                           -- queue: routes to a topic / exchange
    '{"order_id": 1001, "customer": "c-7", "total": 12.99}',
    '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}',
    'c-7'                                               -- key: same key, same partition, in order
);
COMMIT;

-- Several at once (one id each, in order), and opaque bytes.
SELECT outbox.publish_batch('orders', ARRAY['{"order_id": 1002}', '{"order_id": 1003}']::jsonb[],
                            '{}', ARRAY['c-9', 'c-9']);
SELECT outbox.publish_bytes('images', '\x89504e47', '{"content": "png"}', NULL);

-- The wal storage form: no table row, a logical decoding message only (same API).
BEGIN;
SET LOCAL pg_outbox.storage = 'wal';
SELECT outbox.publish('orders', '{"order_id": 1004}', '{}', 'c-1');
COMMIT;

-- A rolled-back publish never reaches any broker.
BEGIN;
INSERT INTO orders VALUES (1005, 'c-1', 5.00);
SELECT outbox.publish('orders', '{"order_id": 1005}', '{}', 'c-1');
ROLLBACK;

DO $$
BEGIN
    ASSERT (SELECT count(*) FROM outbox.messages WHERE queue = 'orders') = 3, 'three table-form orders';
    ASSERT (SELECT count(*) FROM outbox.messages WHERE queue = 'images') = 1, 'one bytes message';
    ASSERT NOT EXISTS (SELECT FROM orders WHERE id = 1005), 'the rolled-back order is not there';
END $$;
