//! Values that must never be printed: passwords, keys, URLs with credentials. Their `Debug`,
//! `Display` and `Serialize` (what `check-config` prints) hide the secret; only
//! [`expose`](SecretUrl::expose) hands it to the code that connects.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// What a hidden value prints as.
pub const HIDDEN: &str = "(redacted)";

/// A connection URL (`postgres://`, `amqp://`) that may carry a password: printed without it.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL with its password, for connecting; never for messages.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&redact_url(&self.0))
    }
}

/// A secret text value (a Kafka `sasl.password`): printed as `(redacted)`.
#[derive(Clone, PartialEq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(HIDDEN)
    }
}

/// librdkafka properties that hold a password, a private key or a token.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "oauthbearer.config",
        "jaas",
    ]
    .iter()
    .any(|part| name.contains(part))
}

/// The URL without its password, in both URL (`user:password@`, `?password=`) and key/value
/// (`password=…`) forms.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            // The last '@' ends the credentials: a password may hold '@', '/' or ':'.
            let (user, location) = match rest.rsplit_once('@') {
                Some((credentials, location)) => {
                    let user = credentials.split(':').next().unwrap_or_default();
                    (format!("{user}@"), location)
                }
                None => (String::new(), rest),
            };
            let location = match location.split_once('?') {
                Some((path, query)) => format!("{path}?{}", hide_password_pairs(query, '&')),
                None => location.to_owned(),
            };
            format!("{scheme}://{user}{location}")
        }
        None => hide_password_pairs(url, ' '),
    }
}

fn hide_password_pairs(text: &str, separator: char) -> String {
    text.split(separator)
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.trim().eq_ignore_ascii_case("password") => {
                format!("{key}={HIDDEN}")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(&separator.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_print_without_their_password() {
        for (url, shown) in [
            ("postgres://u:secret@h:5/db", "postgres://u@h:5/db"),
            ("postgres://h/db", "postgres://h/db"),
            (
                "postgres://u@h/db?sslmode=require&password=secret",
                "postgres://u@h/db?sslmode=require&password=(redacted)",
            ),
            (
                "host=h user=u password=secret dbname=db",
                "host=h user=u password=(redacted) dbname=db",
            ),
            (
                "amqp://guest:guest@localhost:5672/%2f",
                "amqp://guest@localhost:5672/%2f",
            ),
            ("amqp://u:p@ss@host", "amqp://u@host"),
            ("postgres://u:pa/ss@h/db", "postgres://u@h/db"),
        ] {
            let secret = SecretUrl::new(url);
            assert_eq!(secret.to_string(), shown);
            assert!(!format!("{secret:?}").contains("secret"));
            assert_eq!(secret.expose(), url);
        }
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "(redacted)");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"(redacted)\"");
        assert!(is_secret_property("sasl.password"));
        assert!(is_secret_property("ssl.key.password"));
        assert!(is_secret_property("ssl.key.pem"));
        assert!(is_secret_property("sasl.oauthbearer.client.secret"));
        assert!(!is_secret_property("sasl.username"));
        assert!(!is_secret_property("compression.type"));
    }
}
