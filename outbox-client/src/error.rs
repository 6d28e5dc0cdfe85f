use tokio_postgres::error::SqlState;

/// What can go wrong when talking to the outbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PostgreSQL refused the call: bad input (SQLSTATE class 22), missing rights (42501), ...
    #[error("{0}")]
    Server(ServerError),
    /// The connection failed, or another client-side error.
    #[error("postgres: {0}")]
    Connection(tokio_postgres::Error),
    /// The payload could not be serialized to JSON.
    #[error("serializing the payload: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// An error raised by the server, with what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code.code())?;
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl Error {
    /// True when the server rejected an argument (SQLSTATE class 22: data exception).
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::Server(e) if e.code.code().starts_with("22"))
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => Error::Server(ServerError {
                code: db.code().clone(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
            }),
            None => Error::Connection(e),
        }
    }
}
