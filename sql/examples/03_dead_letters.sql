-- Dead letters: what the worker could not deliver (after its retries) lands here with the error.
-- Inspect, fix the cause, then publish again with the same id (outbox-worker dlq redrive does the same).
INSERT INTO outbox.dead_letters (id, queue, key, payload, headers, created_at, destination, error, attempts)
VALUES ('01a20762-ec2a-765d-9f35-de1979bd8f71', 'billing.invoices', 'c-7', '{"invoice": 1}', '{}', now(),
        'rabbit:events/billing.invoices', 'amqp: unroutable, returned by the broker: 312 NO_ROUTE', 5);

SELECT id, queue, destination, attempts, error FROM outbox.dead_letters ORDER BY failed_at;

SELECT outbox.redrive('01a20762-ec2a-765d-9f35-de1979bd8f71'::uuid);   -- one message
SELECT outbox.redrive('billing.invoices');                              -- or a whole queue

DO $$
BEGIN
    ASSERT NOT EXISTS (SELECT FROM outbox.dead_letters), 'redriven letters leave the table';
    ASSERT EXISTS (SELECT FROM outbox.messages WHERE id = '01a20762-ec2a-765d-9f35-de1979bd8f71'),
        'published again with the same id';
END $$;

SELECT * FROM outbox.status();
