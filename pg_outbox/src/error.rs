//! Errors raised to the SQL caller: always a clear message, always a hint.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises `ERROR` with SQLSTATE 22023 (invalid_parameter_value).
pub fn invalid(message: String, hint: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        hint,
    )
}

/// Raises `ERROR` with SQLSTATE 22004 (null_value_not_allowed) for a NULL argument.
pub fn null_argument(function: &str, argument: &str, hint: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        format!("{function}: {argument} must not be NULL"),
        hint,
    )
}

pub fn raise(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(code, message, "pg_outbox")
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returns control to PostgreSQL")
}
