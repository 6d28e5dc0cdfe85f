"""An independent AMQP client (pika): reads QUEUE with basic_get until EXPECTED distinct messages
(by message id: duplicates after an outage do not count) arrived or TIMEOUT seconds passed; prints one JSON object per message. An optional fifth argument is a
pause after each message, in seconds (a slow consumer)."""
import json
import sys
import time

import pika

url, queue, expected, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
distinct = set()
deadline = time.time() + timeout
while len(distinct) < expected and time.time() < deadline:
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    if method is None:
        time.sleep(0.05)
        continue
    distinct.add(properties.message_id)
    if pause:
        time.sleep(pause)
    headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (properties.headers or {}).items()}
    print(json.dumps({
        "message_id": properties.message_id,
        "content_type": properties.content_type,
        "delivery_mode": properties.delivery_mode,
        "headers": headers,
        "body": json.loads(body),
    }))
connection.close()
