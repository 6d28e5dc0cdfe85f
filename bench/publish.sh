#!/usr/bin/env bash
# Publish throughput, one run, same payload: outbox.publish (table and wal storage),
# outbox.publish_batch, the same two from the SQL install (sql/pg_outbox.sql, table form, in its
# own database), a bare INSERT into an unindexed jsonb table, pg_logical_emit_message and a
# Debezium-style outbox table; 100 rows per transaction and 1 row per transaction. Then the cost of
# retention: batched deletes (outbox.prune) against dropping a time partition of the same size.
# When the server has pgmq (not on the registries: `make install` from the pgmq repository's
# pgmq-extension/, by hand, never in CI), pgmq.send and pgmq.send_batch run beside them.
# Writes the tables into BENCHMARKS.md between the publish markers.
#
#   bench/publish.sh [seconds per run, default 10] [clients, default 2] [rounds, default 3]
# Variants run interleaved, ROUNDS times each; the table shows the median (2 cores are noisy).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
CLIENTS=${2:-2}
ROUNDS=${3:-3}
source scripts/lib/pg-cluster.sh

echo "==> building and installing the extension (release)" >&2
# The bench feature adds outbox._bench_checks (the per-call cost of each check, below).
PG_CONFIG=$PG_BIN/pg_config ./scripts/install-extension --release --features bench >/dev/null
pg_cluster_start "shared_buffers = 512MB" "max_wal_size = 4GB" "checkpoint_timeout = 30min"
trap pg_cluster_stop EXIT
work=$(mktemp -d); trap 'pg_cluster_stop; rm -rf "$work"' EXIT

PAYLOAD='{"order_id": 918273, "customer_id": "c-4711", "currency": "EUR", "total": 129.95, "items": [{"sku": "SKU-1001", "qty": 2, "price": 39.99}, {"sku": "SKU-2002", "qty": 1, "price": 49.97}], "shipping": {"method": "express", "country": "DE"}}'
psql -qX -v ON_ERROR_STOP=1 <<SQL
CREATE EXTENSION pg_outbox;
CREATE TABLE bare (payload jsonb);
CREATE TABLE debezium_outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype varchar(255) NOT NULL,
  aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb);
CREATE DATABASE sql_install;
SQL
psql -qX -v ON_ERROR_STOP=1 -d sql_install -f sql/pg_outbox.sql >/dev/null
PGMQ=$(psql -qXAt -c "SELECT default_version FROM pg_available_extensions WHERE name = 'pgmq'")
if [[ -n $PGMQ ]]; then
  psql -qX -v ON_ERROR_STOP=1 -c "CREATE EXTENSION pgmq" -c "SELECT pgmq.create('bench')" >/dev/null
fi

# statement for one row of each variant (pgbench script syntax)
declare -A ROW=(
  [bare_insert]="INSERT INTO bare (payload) VALUES ('$PAYLOAD');"
  [debezium_outbox]="INSERT INTO debezium_outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', '918273', 'OrderPlaced', '$PAYLOAD');"
  [emit_message]="SELECT pg_logical_emit_message(true, 'bench', '$PAYLOAD');"
  [publish_table]="SELECT outbox.publish('orders', '$PAYLOAD', '{}', 'c-4711');"
  [publish_wal]="SET pg_outbox.storage = 'wal'; SELECT outbox.publish('orders', '$PAYLOAD', '{}', 'c-4711');"
  [sql_install_publish]="SELECT outbox.publish('orders', '$PAYLOAD', '{}', 'c-4711');"
  [pgmq_send]="SELECT pgmq.send('bench', '$PAYLOAD');"
)
VARIANTS=(bare_insert insert_select debezium_outbox emit_message publish_table publish_wal publish_batch_table publish_batch_wal
  sql_install_publish sql_install_publish_batch)
[[ -n $PGMQ ]] && VARIANTS+=(pgmq_send pgmq_send_batch)
# The SQL install's variants run in its own database.
database() { [[ $1 == sql_install_* ]] && echo sql_install || echo "$PGDATABASE"; }

script() { # variant rows_per_tx
  local v=$1 n=$2
  case $v in
    insert_select)
      echo "INSERT INTO bare SELECT unnest(array_fill('$PAYLOAD'::jsonb, ARRAY[$n]));" ;;
    publish_batch_table|publish_batch_wal|sql_install_publish_batch)
      [[ $v == publish_batch_wal ]] && echo "SET pg_outbox.storage = 'wal';"
      echo "SELECT count(*) FROM outbox.publish_batch('orders', array_fill('$PAYLOAD'::jsonb, ARRAY[$n]));" ;;
    pgmq_send_batch)
      echo "SELECT count(*) FROM pgmq.send_batch('bench', array_fill('$PAYLOAD'::jsonb, ARRAY[$n]));" ;;
    *)
      local stmt=${ROW[$v]}
      if [[ $v == publish_wal ]]; then echo "SET pg_outbox.storage = 'wal';"; stmt=${stmt#SET pg_outbox.storage = \'wal\'; }; fi
      echo "BEGIN;"; for ((i = 0; i < n; i++)); do echo "$stmt"; done; echo "COMMIT;" ;;
  esac
}

run() { # variant rows_per_tx -> rows/s
  local v=$1 n=$2
  script "$v" "$n" >"$work/$v.$n.sql"
  psql -qX -c "TRUNCATE bare, debezium_outbox, outbox.messages${PGMQ:+, pgmq.q_bench}" -c "CHECKPOINT" >/dev/null
  psql -qX -d sql_install -c "TRUNCATE outbox.messages" >/dev/null
  local tps
  tps=$(pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_PER_RUN" -f "$work/$v.$n.sql" "$(database "$v")" 2>&1 |
    sed -n 's/^tps = \([0-9.]*\) .*/\1/p')
  awk -v t="$tps" -v n="$n" 'BEGIN { printf "%.0f", t * n }'
}

declare -A RESULT
for n in 100 1; do
  declare -A ALL=()
  for ((round = 1; round <= ROUNDS; round++)); do
    for v in "${VARIANTS[@]}"; do
      rate=$(run "$v" "$n")
      ALL[$v]="${ALL[$v]:-} $rate"
      echo "  round $round: $v, $n rows/tx: $rate rows/s" >&2
    done
  done
  for v in "${VARIANTS[@]}"; do
    RESULT[$v.$n]=$(printf '%s\n' ${ALL[$v]} | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  done
done

# In-server cost per row, without the client round trip that dominates a per-statement pgbench
# run on a small machine: a PL/pgSQL loop of 100,000 calls in one transaction, rolled back,
# wall time per call, the minimum of 5 interleaved runs.
psql -qX -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE FUNCTION pg_temp_loop_us(statement text, calls int, setup text DEFAULT '') RETURNS float8 LANGUAGE plpgsql AS \$f\$
DECLARE t0 timestamptz; us float8;
BEGIN
  EXECUTE format('CREATE OR REPLACE FUNCTION bench_loop(n int) RETURNS void LANGUAGE plpgsql AS \$b\$ BEGIN FOR i IN 1..n LOOP %s; END LOOP; END \$b\$', statement);
  IF setup <> '' THEN EXECUTE setup; END IF;
  PERFORM bench_loop(greatest(calls / 100, 1));
  t0 := clock_timestamp();
  PERFORM bench_loop(calls);
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1e6 / calls;
END \$f\$;
SQL
declare -A LOOP=(
  [bare_insert]="INSERT INTO bare VALUES ('$PAYLOAD')|1"
  [publish_table]="PERFORM outbox.publish('orders', '$PAYLOAD', '{}', 'c-4711')|1"
  [publish_wal]="PERFORM outbox.publish('orders', '$PAYLOAD', '{}', 'c-4711')|1|SET LOCAL pg_outbox.storage = wal"
  [emit_message]="PERFORM pg_logical_emit_message(true, 'bench', '$PAYLOAD'::text)|1"
  [insert_select]="INSERT INTO bare SELECT unnest(array_fill('$PAYLOAD'::jsonb, ARRAY[100]))|100"
  [publish_batch_table]="PERFORM count(*) FROM outbox.publish_batch('orders', array_fill('$PAYLOAD'::jsonb, ARRAY[100]))|100"
  [publish_batch_wal]="PERFORM count(*) FROM outbox.publish_batch('orders', array_fill('$PAYLOAD'::jsonb, ARRAY[100]))|100|SET LOCAL pg_outbox.storage = wal"
)
LOOP_VARIANTS=(bare_insert publish_table publish_wal emit_message insert_select publish_batch_table publish_batch_wal)
declare -A LOOP_US
for ((round = 1; round <= 5; round++)); do
  for v in "${LOOP_VARIANTS[@]}"; do
    IFS='|' read -r stmt rows setup <<<"${LOOP[$v]}"
    calls=$((100000 / rows))
    us=$(psql -qXAt -v ON_ERROR_STOP=1 -c "BEGIN" -c "SELECT round((pg_temp_loop_us(\$s\$$stmt\$s\$, $calls, \$s\$$setup\$s\$) / $rows)::numeric, 3)" -c "ROLLBACK" | head -1)
    echo "  in-server round $round: $v: $us us/row" >&2
    LOOP_US[$v]=$(printf '%s\n' "${LOOP_US[$v]:-}" "$us" | sed '/^$/d' | sort -g | head -1)
  done
done

# Retention: delete 200k expired rows with outbox.prune (BRIN + batches of 50k) vs DROP a partition.
psql -qX -v ON_ERROR_STOP=1 >/dev/null <<SQL
TRUNCATE outbox.messages;
SELECT count(*) FROM outbox.publish_batch('orders', array_fill('$PAYLOAD'::jsonb, ARRAY[200000]));
UPDATE outbox.messages SET created_at = now() - interval '2 days';
VACUUM outbox.messages;
SELECT count(*) FROM outbox.publish_batch('orders', array_fill('$PAYLOAD'::jsonb, ARRAY[200000]));
CREATE TABLE parted (LIKE outbox.messages) PARTITION BY RANGE (created_at);
CREATE TABLE parted_old PARTITION OF parted FOR VALUES FROM ('-infinity') TO (now() - interval '1 day');
CREATE TABLE parted_new PARTITION OF parted FOR VALUES FROM (now() - interval '1 day') TO ('infinity');
INSERT INTO parted SELECT * FROM outbox.messages;
CHECKPOINT;
SQL
measure() { # sql -> "ms wal_bytes"
  local before after start end
  before=$(psql -qXAt -c "SELECT pg_current_wal_lsn()")
  start=$(date +%s%N)
  psql -qX -v ON_ERROR_STOP=1 -c "$1" >/dev/null
  end=$(date +%s%N)
  after=$(psql -qXAt -c "SELECT pg_current_wal_lsn()")
  echo "$(( (end - start) / 1000000 )) $(psql -qXAt -c "SELECT pg_wal_lsn_diff('$after', '$before')::bigint")"
}
read -r prune_ms prune_wal < <(measure "DO \$\$ BEGIN LOOP EXIT WHEN outbox.prune(max_rows => 50000) < 50000; END LOOP; END \$\$")
read -r drop_ms drop_wal < <(measure "DROP TABLE parted_old")
remaining=$(psql -qXAt -c "SELECT count(*) FROM outbox.messages")
[[ $remaining == 200000 ]] || { echo "prune left $remaining rows, expected 200000" >&2; exit 1; }

# What each check publish keeps costs per call, timed inside the server (200,000 calls each).
CHECKS=$(
  echo "Per-call cost of what publish checks (\`outbox._bench_checks\`, 200,000 calls each, the same payload):"
  echo
  echo "| step | ns per call |"
  echo "|---|---:|"
  psql -qXAt -F '|' -c "SELECT step, round(ns_per_call::numeric) FROM outbox._bench_checks('$PAYLOAD', 200000)" |
    sed 's/^/| /; s/|\([0-9]*\)$/| \1 |/'
)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f×", a / b }'; }
{
  echo "<!-- publish:begin (written by bench/publish.sh) -->"
  echo "### Publish throughput"
  echo
  echo "$(date -u +%Y-%m-%d), PostgreSQL $(psql -qXAt -c 'SHOW server_version'), $(nproc) cores, pgbench -M prepared, $CLIENTS clients," \
       "${SECONDS_PER_RUN}s per run, median of $ROUNDS interleaved rounds, synchronous_commit = on, a $(echo -n "$PAYLOAD" | wc -c)-byte JSON payload."
  echo
  echo "| variant | 100 rows/tx (rows/s) | vs bare INSERT | 1 row/tx (rows/s) | vs bare INSERT |"
  echo "|---|---:|---:|---:|---:|"
  for v in "${VARIANTS[@]}"; do
    echo "| \`$v\` | ${RESULT[$v.100]} | $(ratio "${RESULT[$v.100]}" "${RESULT[bare_insert.100]}") | ${RESULT[$v.1]} | $(ratio "${RESULT[$v.1]}" "${RESULT[bare_insert.1]}") |"
  done
  echo
  [[ -n $PGMQ ]] && echo "pgmq $PGMQ, installed by hand with \`make install\` from the pgmq repository's \`pgmq-extension/\` (not on the registries, so not in CI): \`pgmq.send\` per row and \`pgmq.send_batch\` of the same rows, into one queue." && echo
  echo "\`publish_batch\` of 100 rows against one \`INSERT … SELECT\` of the same 100 rows (\`insert_select\`): table form $(ratio "${RESULT[publish_batch_table.100]}" "${RESULT[insert_select.100]}"), wal form $(ratio "${RESULT[publish_batch_wal.100]}" "${RESULT[insert_select.100]}")."
  echo
  echo "In the server, without the client round trip (which on 2 shared cores is most of a per-statement run): a PL/pgSQL loop of 100,000 calls (1,000 of 100 rows for the batch rows) in one transaction, µs per row, the fastest of 5 interleaved runs."
  echo
  echo "| variant | µs per row | vs bare INSERT |"
  echo "|---|---:|---:|"
  for v in "${LOOP_VARIANTS[@]}"; do
    base=bare_insert; [[ $v == insert_select || $v == publish_batch_* ]] && base=insert_select
    echo "| \`$v\` | ${LOOP_US[$v]} | $(ratio "${LOOP_US[$base]}" "${LOOP_US[$v]}") (vs \`$base\`) |"
  done
  echo
  echo "$CHECKS"
  echo
  echo "The SQL install (PL/pgSQL, table form) against the extension's table form: \`publish\` $(ratio "${RESULT[sql_install_publish.1]}" "${RESULT[publish_table.1]}") at 1 row/tx and $(ratio "${RESULT[sql_install_publish.100]}" "${RESULT[publish_table.100]}") at 100 rows/tx; \`publish_batch\` $(ratio "${RESULT[sql_install_publish_batch.100]}" "${RESULT[publish_batch_table.100]}") at 100 rows/tx."
  echo
  echo "### Retention: removing 200,000 expired rows (200,000 newer rows kept)"
  echo
  echo "| method | time (ms) | WAL written (bytes) |"
  echo "|---|---:|---:|"
  echo "| \`outbox.prune()\` batched deletes (BRIN on created_at, 50k per call) | $prune_ms | $prune_wal |"
  echo "| \`DROP TABLE\` of a time partition | $drop_ms | $drop_wal |"
  echo "<!-- publish:end -->"
} >"$work/section.md"

touch BENCHMARKS.md
python3 - "$work/section.md" <<'PY'
import re, sys
section = open(sys.argv[1]).read().strip()
text = open("BENCHMARKS.md").read()
if "<!-- publish:begin" in text:
    text = re.sub(r"<!-- publish:begin.*?<!-- publish:end -->", lambda _: section, text, flags=re.S)
else:
    text = (text.rstrip() + "\n\n" if text.strip() else "# Benchmarks\n\n") + section + "\n"
open("BENCHMARKS.md", "w").write(text)
PY
cat "$work/section.md"
