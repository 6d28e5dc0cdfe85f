"""An independent AMQP client (pika): reads QUEUE with basic_get until EXPECTED messages arrived
or TIMEOUT seconds passed; prints one JSON object per message."""
import json
import sys
import time

import pika

url, queue, expected, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
count = 0
deadline = time.time() + timeout
while count < expected and time.time() < deadline:
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    if method is None:
        time.sleep(0.05)
        continue
    count += 1
    headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (properties.headers or {}).items()}
    print(json.dumps({
        "message_id": properties.message_id,
        "content_type": properties.content_type,
        "delivery_mode": properties.delivery_mode,
        "headers": headers,
        "body": json.loads(body),
    }))
connection.close()
