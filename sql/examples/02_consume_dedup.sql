-- A consumer's exactly-once effect: mark the message id and apply the business change in ONE
-- transaction in the consumer's own database. A redelivered id is skipped.
-- Once, by an operator: the consumer name 'billing' belongs to the role the service runs as.
SELECT outbox.register_consumer('billing', current_user::regrole);

CREATE TABLE IF NOT EXISTS invoices (order_id bigint PRIMARY KEY, amount numeric NOT NULL);

CREATE OR REPLACE FUNCTION handle_order(message_id text, order_id bigint, amount numeric)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF NOT outbox.try_mark_processed('billing', message_id) THEN
        RETURN 'duplicate, skipped';
    END IF;
    INSERT INTO invoices VALUES (order_id, amount);
    RETURN 'processed';
END $$;

SELECT handle_order('01a20762-ec24-7553-b1c8-4b31a062edfe', 1001, 12.99);  -- first delivery
SELECT handle_order('01a20762-ec24-7553-b1c8-4b31a062edfe', 1001, 12.99);  -- redelivery

DO $$
BEGIN
    ASSERT (SELECT count(*) FROM invoices WHERE order_id = 1001) = 1, 'one invoice despite two deliveries';
    ASSERT outbox.is_processed('billing', '01a20762-ec24-7553-b1c8-4b31a062edfe');
END $$;

-- Housekeeping: forget ids older than the broker's redelivery window.
SELECT outbox.purge_processed('7 days');
