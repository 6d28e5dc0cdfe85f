//! What an error means, in one place: reconnect, wait for the slot, the slot is gone, or stop with
//! a hint (exit 1). PostgreSQL's errors are judged by their SQLSTATE, a typed field; the only text
//! that is parsed is pgwire-replication's, once, where it enters (`pg::ServerError::from_wire`).
//! Broker errors are classified by each sink (`sink/*.rs`: transient, permanent, closed); a
//! message that breaks the publish rules is quarantined by the source (`source/decode.rs`).

use pgwire_replication::PgWireError;

use crate::fatal::Fatal;
use crate::pg::ServerError;
use crate::source::SourceError;

/// What to do about an error of the replication stream.
#[derive(Debug)]
pub enum Remedy {
    /// A dropped connection, a restarting server, too many connections: reconnect.
    Reconnect,
    /// The slot is held by another process (a standby waiting, or the walsender of a worker that
    /// just died and has not noticed yet): poll until it is free.
    WaitForSlot,
    /// The slot does not exist or was invalidated: messages may be missing; never recreate it
    /// silently.
    SlotGone(String),
    /// No retry can fix it: stop and say what to do.
    Stop(Fatal),
}

/// What the role of each connection must be granted when it lacks a right.
const REPLICATION_RIGHT: &str = "the REPLICATION attribute (ALTER ROLE … REPLICATION; on Amazon \
                                 RDS and Aurora, GRANT rds_replication TO …)";
pub const WORKER_RIGHT: &str = "outbox_relay";

/// The replication stream's errors.
pub fn of_stream(error: &SourceError) -> Remedy {
    let server = match error {
        SourceError::Server(server) => server.clone(),
        SourceError::Connection(PgWireError::Server(text)) => ServerError::from_wire(text),
        SourceError::Connection(PgWireError::Io(_) | PgWireError::Task(_)) => {
            return Remedy::Reconnect
        }
        SourceError::Connection(PgWireError::Auth(message)) => {
            return Remedy::Stop(Fatal::new(
                format!("authentication failed: {message}"),
                "check the user and password in postgres.url",
            ))
        }
        SourceError::Connection(PgWireError::Tls(message)) => {
            return Remedy::Stop(Fatal::new(
                format!("TLS: {message}"),
                "check sslmode in postgres.url and the server's certificate",
            ))
        }
        SourceError::Connection(other) => {
            return Remedy::Stop(Fatal::new(
                other.to_string(),
                "check postgres.url; if it is right, this is a bug: please report it",
            ))
        }
        other => {
            return Remedy::Stop(Fatal::new(
                other.to_string(),
                "the replication stream holds something this worker cannot read; upgrade \
                 outbox-worker to the extension's version",
            ))
        }
    };
    let (code, message) = (server.code.as_str(), server.to_string());
    match code {
        "55006" => Remedy::WaitForSlot,
        "42704" if message.contains("replication slot") => Remedy::SlotGone(message),
        "42704" if message.contains("publication") => Remedy::Stop(Fatal::new(
            message,
            "create the publication with `outbox-worker setup`. A slot reads each transaction \
             with the catalog of its time, so if the publication was dropped while messages were \
             written it cannot read past the drop: run `outbox-worker setup --new-slot`, then \
             replay what is missing (README, \"A lost slot\")",
        )),
        "55000" if !message.contains("wal_level") => Remedy::SlotGone(message),
        _ => permanent(&server, REPLICATION_RIGHT).map_or(Remedy::Reconnect, Remedy::Stop),
    }
}

/// An ordinary SQL connection's error (setup, dead letters): `Some` when no retry can fix it.
pub fn of_sql(error: &anyhow::Error, role_hint: &str) -> Option<Fatal> {
    crate::pg::db_error_in(error).and_then(|db| permanent(&ServerError::from_db(db), role_hint))
}

/// [`of_sql`] for a bare tokio-postgres error.
pub fn of_query(error: &tokio_postgres::Error, role_hint: &str) -> Option<Fatal> {
    error
        .as_db_error()
        .and_then(|db| permanent(&ServerError::from_db(db), role_hint))
}

/// A hint for server errors that no retry can fix, by SQLSTATE; `None` means worth a retry.
fn permanent(error: &ServerError, role_hint: &str) -> Option<Fatal> {
    let hint = match error.code.as_str() {
        "28P01" | "28000" => {
            "check the user and password in postgres.url, and that pg_hba.conf lets that user in \
             (for the replication connection: a `replication` line)"
                .to_owned()
        }
        "42501" => format!(
            "the worker's role lacks a right it needs: {role_hint} (see the README, \"The worker\")"
        ),
        "3D000" => "the database in postgres.url does not exist".to_owned(),
        "55000" if error.message.contains("wal_level") => {
            "set wal_level = logical in postgresql.conf and restart PostgreSQL".to_owned()
        }
        "42P01" | "3F000" => {
            "pg_outbox is not installed in this database: CREATE EXTENSION pg_outbox, or where \
             no C extension can be loaded, psql -f sql/pg_outbox.sql"
                .to_owned()
        }
        _ => return None,
    };
    Some(Fatal::new(error.message.clone(), hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqlstate_is_read_once_from_the_wire_text() {
        let e = ServerError::from_wire(
            "password authentication failed for user \"x\" (SQLSTATE 28P01)",
        );
        assert_eq!(e.code, "28P01");
        assert_eq!(ServerError::from_wire("connection reset").code, "");
        assert_eq!(ServerError::from_wire("odd (SQLSTATE 12").code, "");
    }

    fn remedy(code: &str, message: &str) -> Remedy {
        of_stream(&SourceError::Server(ServerError {
            code: code.into(),
            message: message.into(),
        }))
    }

    #[test]
    fn each_sqlstate_has_its_remedy() {
        assert!(matches!(
            remedy("55006", "slot active"),
            Remedy::WaitForSlot
        ));
        assert!(matches!(
            remedy("42704", "replication slot \"x\" does not exist"),
            Remedy::SlotGone(_)
        ));
        assert!(matches!(
            remedy("42704", "publication \"x\" does not exist"),
            Remedy::Stop(_)
        ));
        assert!(matches!(
            remedy("55000", "can no longer get changes"),
            Remedy::SlotGone(_)
        ));
        let Remedy::Stop(fatal) = remedy("55000", "logical decoding requires wal_level >= logical")
        else {
            panic!("wal_level must stop the worker")
        };
        assert!(fatal.hint.contains("wal_level = logical"));
        let Remedy::Stop(fatal) = remedy("42501", "permission denied") else {
            panic!("a missing right must stop the worker")
        };
        assert!(fatal.hint.contains("REPLICATION"));
        assert!(matches!(
            remedy("57P03", "the database system is starting up"),
            Remedy::Reconnect
        ));
    }
}
