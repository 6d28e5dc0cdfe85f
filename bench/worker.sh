#!/usr/bin/env bash
# End-to-end delivery benchmark of outbox-worker (release build): drain throughput per storage
# form and sink (Apache Kafka, RabbitMQ) against the slot's raw decoding rate and bare rdkafka/lapin
# clients, the worker's peak RSS, and commit→consumed
# latency at 1k msg/s to both brokers.
# Writes the table into BENCHMARKS.md between the worker markers.
#   bench/worker.sh [backlog, default 200000]
#   bench/worker.sh 1000000 --memory   peak RSS rows only (table storage), between the worker-memory markers
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building outbox-worker and worker-bench (release)" >&2
cargo build --release -p outbox-worker -p outbox-tests --bin outbox-worker --bin worker-bench
exec target/release/worker-bench "${1:-200000}" "${@:2}"
