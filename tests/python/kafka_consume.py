"""An independent Kafka client (kafka-python): reads a topic from the beginning and prints one
JSON object per record (key, headers, payload) until EXPECTED distinct outbox ids arrived and
nothing more came for 2 s (so that duplicates after the last new id are counted too).
An optional fifth argument is the isolation level (read_uncommitted, the default, or
read_committed)."""
import json
import sys
import time

from kafka import KafkaConsumer

brokers, topic, expected, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
isolation = sys.argv[5] if len(sys.argv) > 5 else "read_uncommitted"
consumer = KafkaConsumer(topic, bootstrap_servers=brokers, group_id=None,
                         auto_offset_reset="earliest", enable_auto_commit=False,
                         consumer_timeout_ms=2000, isolation_level=isolation)
ids = set()
deadline = time.time() + timeout
while len(ids) < expected and time.time() < deadline:
    for record in consumer:
        headers = {k: v.decode() for k, v in record.headers}
        ids.add(headers.get("outbox-id"))
        print(json.dumps({
            "partition": record.partition,
            "key": record.key.decode() if record.key is not None else None,
            "headers": headers,
            "payload": json.loads(record.value),
        }))
consumer.close()
