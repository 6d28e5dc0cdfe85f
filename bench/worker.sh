#!/usr/bin/env bash
# End-to-end delivery benchmark of outbox-worker (release build): drain throughput per storage
# form and sink (Apache Kafka, RabbitMQ) against the slot's raw decoding rate and bare rdkafka/lapin
# clients, the worker's peak RSS, commit→consumed latency at 1k msg/s to both brokers, and
# Debezium 3.6.1 beside the worker (drain, RSS, CPU, idle WAL, latency at 1k and 10k msg/s).
# Writes the tables into BENCHMARKS.md between their markers. Needs scripts/install-deps (Kafka's
# and Debezium's jars) and the extension installed (scripts/install-extension).
#   bench/worker.sh [backlog, default 200000]
#   bench/worker.sh 1000000 --memory   peak RSS rows only (table storage), between the worker-memory markers
#   bench/worker.sh 100000 --debezium  only Debezium beside the worker, between the versus-debezium markers
#   bench/worker.sh 200000 --throughput only the drain table (between the worker markers); --latency only latency
#   bench/worker.sh 200000 --tracing   only the cost of trace export (between the worker-tracing markers)
#   bench/worker.sh 200000 --slots     only what one more slot costs, on the primary and on a standby (worker-slots)
#   bench/worker.sh 100000 --split     only one worker against two on disjoint queue sets, to RabbitMQ (worker-split)
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building outbox-worker and worker-bench (release)" >&2
cargo build --release -p outbox-worker -p outbox-tests --bin outbox-worker --bin worker-bench
exec target/release/worker-bench "${1:-200000}" "${@:2}"
