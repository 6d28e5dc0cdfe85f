//! The `outbox-worker` command line: parses flags into a [`Config`] and one [`Action`], then calls
//! the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use outbox_worker::admin::{self, DlqCommand as Dlq};
use outbox_worker::config::{self, Config, LogFormat, Overrides};
use outbox_worker::pipeline;
use outbox_worker::replay::{self, ReplayRange};
use outbox_worker::setup::SlotSetup;
use tokio_util::sync::CancellationToken;

/// glibc malloc took a third of the CPU under librdkafka's and tokio's threads (perf, Kafka drain);
/// the `override` feature gives librdkafka's C allocations to mimalloc as well.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Delivers pg_outbox messages from PostgreSQL to Kafka, RabbitMQ (AMQP) or stdout"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream the slot and deliver messages until SIGTERM.
    Run(Options),
    /// Check the database, create the publication and the slot, then exit.
    Setup {
        #[command(flatten)]
        options: Options,
        /// Start a new slot at the current position, in place of one that was dropped or
        /// invalidated (messages it had not delivered must be sent again: README, "A lost slot").
        #[arg(long)]
        new_slot: bool,
        /// Slots decoded on a server this setup cannot see (another standby) whose workers you
        /// stopped: a claim that changes what they deliver is refused without this.
        #[arg(long, value_name = "SLOT[,SLOT...]", value_delimiter = ',')]
        stopped_elsewhere: Vec<String>,
    },
    /// Load and validate the configuration, print it with defaults filled in, then exit.
    CheckConfig(Options),
    /// Print the slot, its lag and the dead-letter count (outbox.status()).
    Status(Options),
    /// Send table-form messages again from outbox.messages (after a lost slot or a failover), with
    /// their ids, in id order, through the configured routes and sinks.
    Replay {
        #[command(flatten)]
        options: Options,
        /// Messages created at or after this: an RFC 3339 time (2026-11-23T17:04:05Z) or a
        /// duration ago (90m, 2h).
        #[arg(long, value_parser = parse_time)]
        since: DateTime<Utc>,
        /// Messages created before this (same forms).
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Only queues matching this glob (orders.*).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Dead letters: messages a broker refused for good.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        options: Options,
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Publish dead letters again (same ids) and remove them from the table.
    Redrive {
        #[command(flatten)]
        options: Options,
        /// One message.
        #[arg(long, conflicts_with = "queue", required_unless_present = "queue")]
        id: Option<uuid::Uuid>,
        /// Every dead letter of this queue, in their original order.
        #[arg(long)]
        queue: Option<String>,
    },
}

#[derive(Args)]
struct Options {
    /// TOML config file; `OUTBOX_*` environment variables and these flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// postgres://user:password@host:port/database (the user needs REPLICATION).
    #[arg(long)]
    postgres_url: Option<String>,
    /// Replication slot name (default pg_outbox).
    #[arg(long)]
    slot: Option<String>,
    /// The queues this slot delivers, globs with `*` (orders.*,billing); unset: every queue no
    /// other slot claims.
    #[arg(long, value_delimiter = ',', value_name = "GLOB[,GLOB...]")]
    queues: Option<Vec<String>>,
    /// Quick path: route every queue to the Kafka topic of the same name on these brokers.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT]")]
    kafka_brokers: Option<String>,
    /// Quick path: route every queue to RabbitMQ (exchange --amqp-exchange, routing key = queue).
    #[arg(long, value_name = "amqp://USER:PASSWORD@HOST:PORT/VHOST")]
    amqp_url: Option<String>,
    /// The exchange for --amqp-url (default: the default exchange "").
    #[arg(long, value_name = "NAME")]
    amqp_exchange: Option<String>,
    /// Serve /metrics and /health/live, /health/ready on this address.
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl Options {
    fn load(self) -> Result<Config, config::ConfigError> {
        Config::load(
            self.config.as_deref(),
            Overrides {
                postgres_url: self.postgres_url,
                slot: self.slot,
                queues: self.queues,
                kafka_brokers: self.kafka_brokers,
                amqp_url: self.amqp_url,
                amqp_exchange: self.amqp_exchange,
                http_listen: self.http_listen,
                log_format: self.log_format.map(|f| match f {
                    LogFormatArg::Text => LogFormat::Text,
                    LogFormatArg::Json => LogFormat::Json,
                }),
            },
        )
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level))
        // The replication library logs every failed connection as an ERROR of its own (once a
        // second for a standby waiting for the slot); the worker logs each with its remedy.
        .add_directive(
            "pgwire_replication::client::tokio_client=off"
                .parse()
                .expect("a valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// SIGTERM or SIGINT cancels the token. The stop it starts is bounded by `shutdown_timeout` (the
/// drain) plus a second: should anything still hang then (a write to a reader that never reads,
/// say), the process exits anyway, and what was not confirmed is delivered again by the next run.
fn on_signal(shutdown: CancellationToken, shutdown_timeout: Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // The stop and its deadline start before anything is logged: a log line can block (stderr
        // a full pipe nobody reads) and must not hold them.
        shutdown.cancel();
        // A plain thread: it must fire even if every runtime worker is blocked.
        std::thread::spawn(move || {
            // Exits a little before the promised bound, which the exit itself takes time to meet.
            const WARNING: Duration = Duration::from_millis(50);
            const MARGIN: Duration = Duration::from_millis(200);
            std::thread::sleep((shutdown_timeout + STOP_GRACE).saturating_sub(WARNING + MARGIN));
            // Its warning may block like any log line: it gets a thread of its own, and the exit
            // waits for it a moment at most.
            std::thread::spawn(|| {
                tracing::warn!(
                    "the stop took longer than shutdown_timeout; exiting now (unconfirmed \
                     messages are delivered again by the next run)"
                );
            });
            std::thread::sleep(WARNING);
            std::process::exit(0);
        });
        tracing::info!("{name} received");
    });
}

/// What a stop may take beyond `shutdown_timeout`: confirming, closing connections.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// `--since` / `--until`: an RFC 3339 time, or a duration before now.
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    humantime::parse_duration(text)
        .ok()
        .and_then(|ago| chrono::Duration::from_std(ago).ok())
        .map(|ago| Utc::now() - ago)
        .ok_or_else(|| {
            format!("{text:?} is neither an RFC 3339 time (2026-11-23T17:04:05Z) nor a duration ago (90m)")
        })
}

/// What to do once the configuration is loaded.
enum Action {
    Run,
    Setup(SlotSetup, Vec<String>),
    CheckConfig,
    Status,
    Replay(ReplayRange),
    Dlq(Dlq),
}

impl Command {
    fn into_parts(self) -> (Options, Action) {
        match self {
            Command::Run(o) => (o, Action::Run),
            Command::Setup {
                options,
                new_slot,
                stopped_elsewhere,
            } => (
                options,
                Action::Setup(
                    if new_slot {
                        SlotSetup::Replace
                    } else {
                        SlotSetup::Keep
                    },
                    stopped_elsewhere,
                ),
            ),
            Command::CheckConfig(o) => (o, Action::CheckConfig),
            Command::Status(o) => (o, Action::Status),
            Command::Replay {
                options,
                since,
                until,
                queue,
            } => (
                options,
                Action::Replay(ReplayRange {
                    since,
                    until,
                    queue,
                }),
            ),
            Command::Dlq {
                command:
                    DlqCommand::List {
                        options,
                        queue,
                        limit,
                    },
            } => (options, Action::Dlq(Dlq::List { queue, limit })),
            Command::Dlq {
                command: DlqCommand::Redrive { options, id, queue },
            } => (options, Action::Dlq(Dlq::Redrive { id, queue })),
        }
    }
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime");
    let code = runtime.block_on(run_command());
    // The spans still batched go out before the exit (the export has a timeout of its own).
    outbox_worker::traces::shutdown();
    // Not the default wait for blocking tasks: one may be stuck in a write to stdout that its
    // reader never reads, and the process must exit all the same.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn run_command() -> ExitCode {
    let (options, action) = Cli::parse().command.into_parts();
    let config = match options.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("outbox-worker: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    if matches!(action, Action::Run | Action::Replay(_)) {
        match outbox_worker::traces::init(&config.telemetry) {
            Ok(true) => tracing::info!("telemetry: exporting trace spans over OTLP/HTTP"),
            Ok(false) => {}
            Err(e) => {
                eprintln!("outbox-worker: configuration error: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    let result = match action {
        Action::CheckConfig => {
            if let Err(e) = outbox_worker::traces::check_environment() {
                eprintln!("outbox-worker: configuration error: {e}");
                return ExitCode::from(2);
            }
            print!("{}", admin::show_config(&config));
            Ok(())
        }
        Action::Setup(mode, stopped) => admin::setup(&config, mode, stopped).await,
        Action::Status => admin::status(config.url()).await,
        Action::Replay(range) => {
            let shutdown = CancellationToken::new();
            on_signal(shutdown.clone(), config.delivery.shutdown_timeout);
            replay::replay(&config, range, shutdown).await.map(|_| ())
        }
        Action::Dlq(command) => admin::dlq(config.url(), config.primary_url(), command).await,
        Action::Run => {
            let shutdown = CancellationToken::new();
            on_signal(shutdown.clone(), config.delivery.shutdown_timeout);
            pipeline::run(config, shutdown).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("outbox-worker: {e:#}");
            // 2: the configuration is wrong (as for a bad config file); 1: everything else.
            if e.downcast_ref::<config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
