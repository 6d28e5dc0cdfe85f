# Sourced by scripts: a throw-away PostgreSQL cluster run as the postgres user, of the
# installation PG_CONFIG names (PostgreSQL 15 from Debian by default).
# pg_cluster_start [extra postgresql.conf lines...] sets PGHOST, PGPORT, PGUSER, PGDATABASE and
# PG_CLUSTER_DIR; pg_cluster_stop removes it.
PG_BIN=$("${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" --bindir)

pg_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_cluster_start() {
  PG_CLUSTER_DIR=$(mktemp -d /tmp/pg_outbox_cluster.XXXXXX)
  chown postgres:postgres "$PG_CLUSTER_DIR"; chmod 700 "$PG_CLUSTER_DIR"
  PGPORT=$(pg_free_port)
  runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_CLUSTER_DIR/data" -U postgres -A trust -E UTF8 \
    --locale=C.UTF-8 >/dev/null
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PGPORT"
    echo "unix_socket_directories = '$PG_CLUSTER_DIR'"
    echo "wal_level = logical"
    echo "max_replication_slots = 10"
    echo "max_wal_senders = 10"
    printf '%s\n' "$@"
  } >>"$PG_CLUSTER_DIR/data/postgresql.conf"
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_CLUSTER_DIR/data" -l "$PG_CLUSTER_DIR/log" -w -t 60 start >/dev/null
  export PGHOST=127.0.0.1 PGPORT PGUSER=postgres PGDATABASE=postgres PG_CLUSTER_DIR
}

pg_cluster_stop() {
  [[ -n "${PG_CLUSTER_DIR:-}" && -d "$PG_CLUSTER_DIR" ]] || return 0
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_CLUSTER_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PG_CLUSTER_DIR"
}
