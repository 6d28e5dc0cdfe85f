//! Ordinary (non-replication) SQL connections: setup, dead letters, the lag poller and the
//! operator commands all connect here.

mod tls;

use anyhow::{Context, Result};
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, NoTls};

use crate::secret::redact_url;

/// An ordinary (non-replication) connection, TLS as `sslmode` says; its driver task ends with
/// the client.
pub async fn connect(url: &str) -> Result<Client> {
    let config = parse(url)?;
    connect_with(&config)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact_url(url)))
}

fn parse(url: &str) -> Result<tokio_postgres::Config> {
    url.parse()
        .with_context(|| format!("postgres.url {}", redact_url(url)))
}

async fn connect_with(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let client = if config.get_ssl_mode() == SslMode::Disable {
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(drive(connection));
        client
    } else {
        let (client, connection) = config.connect(tls::connector()).await?;
        tokio::spawn(drive(connection));
        client
    };
    // Every statement of the worker finds names in pg_catalog first and never in a schema that
    // another role may create objects in: a function planted in `public` with a closer argument
    // type than the catalog's would run as the worker. set_config rather than a start-up option,
    // which some poolers refuse.
    client
        .batch_execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)")
        .await?;
    Ok(client)
}

/// A connection that accepts writes (the publication, `outbox.slots`, dead letters): `url`'s
/// server, or `primary_url`'s while `url`'s is a standby whose slot the worker decodes
/// (PostgreSQL 16+). After the standby's promotion that is `url`'s server again.
pub async fn connect_writer(url: &str, primary_url: Option<&str>) -> Result<Client> {
    let client = connect(url).await?;
    let Some(primary_url) = primary_url else {
        return Ok(client);
    };
    if !in_recovery(&client).await? {
        return Ok(client);
    }
    let primary = connect(primary_url)
        .await
        .context("postgres.url is a standby: the worker writes to postgres.primary_url")?;
    if in_recovery(&primary).await? {
        return Err(crate::fatal::Fatal::new(
            format!(
                "postgres.primary_url {} is a standby too (in recovery)",
                redact_url(primary_url)
            ),
            "postgres.primary_url must name the primary of the standby postgres.url names",
        )
        .into());
    }
    // Its dead letters and slot records must land in the database the slot decodes.
    let identity = "SELECT system_identifier::text, current_database()::text FROM pg_catalog.pg_control_system()";
    let (standby_row, primary_row) = (
        client.query_one(identity, &[]).await?,
        primary.query_one(identity, &[]).await?,
    );
    let (standby_id, primary_id): ((String, String), (String, String)) = (
        (standby_row.get(0), standby_row.get(1)),
        (primary_row.get(0), primary_row.get(1)),
    );
    if standby_id != primary_id {
        return Err(crate::fatal::Fatal::new(
            format!(
                "postgres.primary_url {} is not where the standby postgres.url names replicates \
                 from: system {} database {:?} there, system {} database {:?} on the standby",
                redact_url(primary_url),
                primary_id.0,
                primary_id.1,
                standby_id.0,
                standby_id.1
            ),
            "postgres.primary_url must name the standby's primary and the same database",
        )
        .into());
    }
    Ok(primary)
}

/// Cancels what `client` (connected to `url`) is running, as libpq's PQcancel does.
pub async fn cancel(client: &Client, url: &str) {
    let token = client.cancel_token();
    let cancelled = match parse(url).map(|c| c.get_ssl_mode()) {
        Ok(SslMode::Disable) => token.cancel_query(NoTls).await,
        _ => token.cancel_query(tls::connector()).await,
    };
    if let Err(e) = cancelled {
        tracing::debug!(error = %e, "cannot cancel a query");
    }
}

pub async fn in_recovery(client: &Client) -> Result<bool> {
    Ok(client
        .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
        .await?
        .get(0))
}

/// The host and port of `url`'s server that accepts writes. With several hosts
/// (`postgres://u@a:5432,b:5432/db`, as libpq's multi-host URLs) each is asked in turn whether it
/// is in recovery, so after a failover the replication connection goes to the new primary; one
/// host is returned as it is.
pub async fn primary_of(url: &str) -> Result<(Host, u16)> {
    let config = parse(url)?;
    let hosts = config.get_hosts();
    let port_of = |i: usize| {
        let ports = config.get_ports();
        ports.get(i).or(ports.first()).copied().unwrap_or(5432)
    };
    let Some(first) = hosts.first() else {
        return Ok((Host::Tcp("localhost".into()), port_of(0)));
    };
    if hosts.len() == 1 {
        return Ok((first.clone(), port_of(0)));
    }
    let mut last_error = None;
    for (i, host) in hosts.iter().enumerate() {
        let mut one = tokio_postgres::Config::new();
        if let Some(user) = config.get_user() {
            one.user(user);
        }
        if let Some(password) = config.get_password() {
            one.password(password);
        }
        if let Some(dbname) = config.get_dbname() {
            one.dbname(dbname);
        }
        one.ssl_mode(config.get_ssl_mode())
            .connect_timeout(
                config
                    .get_connect_timeout()
                    .copied()
                    .unwrap_or(Duration::from_secs(5)),
            )
            .port(port_of(i));
        match host {
            Host::Tcp(name) => one.host(name),
            Host::Unix(path) => one.host_path(path),
        };
        let in_recovery = match connect_with(&one).await {
            Ok(client) => client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map(|row| row.get::<_, bool>(0)),
            Err(e) => Err(e),
        };
        match in_recovery {
            Ok(false) => return Ok((host.clone(), port_of(i))),
            Ok(true) => {}
            Err(e) => last_error = Some(e),
        }
    }
    match last_error {
        Some(e) => Err(anyhow::Error::new(e).context("no host of postgres.url answered")),
        None => Err(anyhow::anyhow!(
            "every host of postgres.url is a standby (in recovery): waiting for a primary"
        )),
    }
}

async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "postgres connection ended");
    }
}

/// The server's error behind an error with context, if the server answered with one.
pub fn db_error_in(e: &anyhow::Error) -> Option<&tokio_postgres::error::DbError> {
    e.chain()
        .find_map(|cause| cause.downcast_ref::<tokio_postgres::Error>())
        .and_then(tokio_postgres::Error::as_db_error)
}

/// An error the server answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
}

impl ServerError {
    /// pgwire-replication reports a server error as text ending in "(SQLSTATE XXXXX)".
    pub fn from_wire(text: &str) -> ServerError {
        let code = text
            .rfind("(SQLSTATE ")
            .and_then(|at| text.get(at + "(SQLSTATE ".len()..at + "(SQLSTATE ".len() + 5))
            .unwrap_or("");
        ServerError {
            code: code.to_owned(),
            message: text.to_owned(),
        }
    }

    pub fn from_db(db: &tokio_postgres::error::DbError) -> ServerError {
        ServerError {
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
        }
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.contains("(SQLSTATE ") {
            f.write_str(&self.message)
        } else {
            write!(f, "{} (SQLSTATE {})", self.message, self.code)
        }
    }
}
