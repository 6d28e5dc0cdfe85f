//! Problems that waiting cannot fix. The worker stops with exit status 1 and says what happened
//! and what to do, instead of retrying forever. Which errors are such problems: `triage.rs`.

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
