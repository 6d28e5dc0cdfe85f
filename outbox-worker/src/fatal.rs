//! Problems that waiting cannot fix. The worker stops with exit status 1 and says what happened
//! and what to do, instead of retrying forever.

/// What went wrong and what the operator should do about it.
#[derive(Debug, thiserror::Error)]
#[error("{problem}\n  hint: {hint}")]
pub struct Fatal {
    pub problem: String,
    pub hint: String,
}

impl Fatal {
    pub fn new(problem: impl Into<String>, hint: impl Into<String>) -> Fatal {
        Fatal {
            problem: problem.into(),
            hint: hint.into(),
        }
    }
}

/// The SQLSTATE of a server error, from a tokio-postgres error or from pgwire-replication's
/// "message (SQLSTATE XXXXX)" text.
pub fn sqlstate_in(text: &str) -> Option<&str> {
    let start = text.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    text.get(start..start + 5)
}

/// A hint for server errors that no retry can fix, by SQLSTATE; `None` means worth a retry.
/// `what` names the connection ("replication", "dead letters"...).
pub fn permanent_server_error(code: &str, message: &str, role_hint: &str) -> Option<Fatal> {
    let hint = match code {
        "28P01" | "28000" => {
            "check the user and password in postgres.url, and that pg_hba.conf lets that user in \
             (for the replication connection: a `replication` line)"
                .to_owned()
        }
        "42501" => format!(
            "the worker's role lacks a right it needs: {role_hint} (see the README, \"The worker\")"
        ),
        "3D000" => "the database in postgres.url does not exist".to_owned(),
        "55000" if message.contains("wal_level") => {
            "set wal_level = logical in postgresql.conf and restart PostgreSQL".to_owned()
        }
        "42P01" | "3F000" => {
            "pg_outbox is not installed in this database: CREATE EXTENSION pg_outbox, or where \
             no C extension can be loaded, psql -f sql/pg_outbox.sql"
                .to_owned()
        }
        _ => return None,
    };
    Some(Fatal::new(message, hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_sqlstate_at_the_end_of_a_server_message() {
        assert_eq!(
            sqlstate_in("password authentication failed for user \"x\" (SQLSTATE 28P01)"),
            Some("28P01")
        );
        assert_eq!(sqlstate_in("connection reset"), None);
        assert_eq!(sqlstate_in("odd (SQLSTATE 12"), None);
    }
}
