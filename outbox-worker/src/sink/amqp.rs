//! RabbitMQ (AMQP 0.9.1) through lapin: publisher confirms, persistent messages, `mandatory`, so a
//! message no queue is bound for comes back and counts as a (permanent) failure.
//!
//! One task owns the connection and publishes in call order; each confirm is awaited on its own so
//! many messages are in flight. A lost connection or a channel the broker closed fails what is
//! pending (the caller re-sends it in order); the task reopens them at once and keeps trying while
//! idle, so readiness follows the connection's real state (heartbeats included).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use outbox_client::contract::{HEADER_CREATED_AT, HEADER_ID, HEADER_QUEUE};
use tokio::sync::{mpsc, oneshot};

use super::{Ack, Sink, SinkError};
use crate::config::AmqpSinkConfig;
use crate::message::{is_content_type, Message};

/// Heartbeat interval asked for when the URL names none (RabbitMQ proposes 60 s): a silent broker
/// reads as not ready within about twice this.
const HEARTBEAT_SECS: u16 = 10;
/// How often an idle, disconnected sink tries to connect again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

struct Publish {
    exchange: String,
    routing_key: String,
    /// The message itself, not a copy of its payload: lapin copies it into frames anyway.
    message: Arc<Message>,
    properties: BasicProperties,
    ack: oneshot::Sender<Result<(), SinkError>>,
}

pub struct AmqpSink {
    publishes: mpsc::UnboundedSender<Publish>,
    connected: Arc<AtomicBool>,
}

impl AmqpSink {
    pub fn start(config: &AmqpSinkConfig) -> AmqpSink {
        let (publishes, rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        tokio::spawn(publish_loop(config.clone(), rx, connected.clone()));
        AmqpSink {
            publishes,
            connected,
        }
    }
}

async fn connect(config: &AmqpSinkConfig) -> Result<Connection, lapin::Error> {
    let mut uri: AMQPUri = config
        .url
        .expose()
        .parse()
        .map_err(|e: String| lapin::Error::IOError(Arc::new(std::io::Error::other(e))))?;
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    let connection = Connection::connect_uri(uri, ConnectionProperties::default()).await?;
    tracing::info!(url = %config.url, "amqp connected");
    Ok(connection)
}

async fn open_channel(
    connection: &Connection,
    config: &AmqpSinkConfig,
) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    if let Some(kind) = &config.declare_exchange {
        let kind = match kind.as_str() {
            "direct" => ExchangeKind::Direct,
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            _ => ExchangeKind::Headers,
        };
        let options = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(&config.exchange, kind, options, FieldTable::default())
            .await?;
    }
    Ok(channel)
}

/// The connection and its publishing channel, each reopened when the broker closed it.
#[derive(Default)]
struct Session {
    connection: Option<Connection>,
    channel: Option<Channel>,
}

impl Session {
    fn is_connected(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// A channel ready to publish on, opening what is needed.
    async fn channel(&mut self, config: &AmqpSinkConfig) -> Result<&Channel, lapin::Error> {
        if !self.is_connected() {
            self.channel = None;
            self.connection = Some(connect(config).await?);
        }
        if !self
            .channel
            .as_ref()
            .is_some_and(|ch| ch.status().connected())
        {
            let connection = self.connection.as_ref().expect("connected above");
            self.channel = Some(open_channel(connection, config).await?);
        }
        Ok(self.channel.as_ref().expect("opened above"))
    }
}

async fn publish_loop(
    config: AmqpSinkConfig,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    connected: Arc<AtomicBool>,
) {
    let mut session = Session::default();
    loop {
        connected.store(session.is_connected(), Ordering::Release);
        let p = if session.is_connected() {
            match tokio::time::timeout(RECONNECT_EVERY, rx.recv()).await {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(_) => continue,
            }
        } else {
            // Idle and disconnected: connect now, so that readiness tells the truth without
            // traffic, and again every second until it works.
            tokio::select! {
                p = rx.recv() => match p { Some(p) => p, None => return },
                result = session.channel(&config) => {
                    if let Err(e) = result {
                        tracing::debug!(url = %config.url, error = %e, "amqp: cannot connect");
                        tokio::time::sleep(RECONNECT_EVERY).await;
                    }
                    continue;
                }
            }
        };
        let channel = match session.channel(&config).await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = p.ack.send(Err(classify(
                    &e,
                    p.message.payload.as_bytes().len(),
                    "cannot connect",
                )));
                continue;
            }
        };
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let payload_len = p.message.payload.as_bytes().len();
        match channel
            .basic_publish(
                &p.exchange,
                &p.routing_key,
                options,
                p.message.payload.as_bytes(),
                p.properties,
            )
            .await
        {
            Ok(confirm) => {
                let ack = p.ack;
                tokio::spawn(async move {
                    let result = match confirm.await {
                        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
                        Ok(Confirmation::Ack(Some(returned)))
                        | Ok(Confirmation::Nack(Some(returned))) => {
                            Err(SinkError::Permanent(format!(
                                "amqp: unroutable, returned by the broker: {} {}",
                                returned.reply_code, returned.reply_text
                            )))
                        }
                        Ok(Confirmation::Nack(None)) => Err(SinkError::Transient(
                            "amqp: the broker nacked the message".into(),
                        )),
                        Err(e) => Err(classify(&e, payload_len, "the broker closed the channel")),
                    };
                    let _ = ack.send(result);
                });
            }
            Err(e) => {
                session.channel = None;
                let _ = p.ack.send(Err(classify(&e, payload_len, "cannot publish")));
            }
        }
    }
}

/// What a channel-closing reply code means for the message whose confirm it failed. The broker
/// closes the channel on the first bad publish and every confirm pending on it fails with the same
/// code, so a refusal for size counts as permanent only for the message of that size.
fn classify(error: &lapin::Error, payload_len: usize, context: &str) -> SinkError {
    let lapin::Error::ProtocolError(amqp) = error else {
        return SinkError::Transient(format!("amqp: {context}: {error}"));
    };
    let text = amqp.get_message().as_str();
    let described = format!("amqp: {context}: {} {text}", amqp.get_id());
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => match refused_size(text) {
            Some(size) if size != payload_len => SinkError::Transient(format!(
                "{described} (another message's; this one is re-sent)"
            )),
            _ => SinkError::Permanent(described),
        },
        AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => SinkError::Permanent(described),
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED) => {
            SinkError::Closed(format!(
                "{described}: create the exchange (or set declare_exchange) and give the user \
                 write permission on it"
            ))
        }
        _ => SinkError::Transient(described),
    }
}

/// The body size in RabbitMQ's "message size 20971520 is larger than configured max size …".
fn refused_size(text: &str) -> Option<usize> {
    let rest = &text[text.find("message size ")? + "message size ".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut put = |key: &str, value: &str| {
        headers.insert(
            ShortString::from(key.to_owned()),
            AMQPValue::LongString(LongString::from(value.to_owned())),
        );
    };
    // The publisher's content-type becomes the content_type property, sent once.
    for (key, value) in message.headers.iter().filter(|(k, _)| !is_content_type(k)) {
        put(key, value);
    }
    put(HEADER_ID, &message.id.to_string());
    put(HEADER_QUEUE, &message.queue);
    put(HEADER_CREATED_AT, &message.created_at_rfc3339());
    BasicProperties::default()
        .with_message_id(ShortString::from(message.id.to_string()))
        .with_content_type(ShortString::from(message.content_type().to_owned()))
        .with_timestamp(message.created_at.timestamp().max(0) as u64)
        .with_delivery_mode(2) // persistent
        .with_headers(headers)
}

impl Sink for AmqpSink {
    fn send(&self, destination: &str, message: &Arc<Message>) -> Ack {
        let (exchange, routing_key) = destination.split_once('/').unwrap_or(("", destination));
        let (ack, acked) = oneshot::channel();
        let queued = self.publishes.send(Publish {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            message: message.clone(),
            properties: properties(message),
            ack,
        });
        Box::pin(async move {
            queued
                .map_err(|_| SinkError::Transient("amqp: the publisher task has stopped".into()))?;
            acked.await.unwrap_or_else(|_| {
                Err(SinkError::Transient(
                    "amqp: the publisher task has stopped".into(),
                ))
            })
        })
    }

    fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPHardError};

    use super::*;

    fn closed(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::Error::ProtocolError(AMQPError::new(kind, text.into()))
    }

    #[test]
    fn a_size_refusal_is_permanent_only_for_the_message_of_that_size() {
        let error = closed(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - message size 20971520 is larger than configured max size 16777216",
        );
        assert!(matches!(
            classify(&error, 20_971_520, "x"),
            SinkError::Permanent(_)
        ));
        assert!(matches!(
            classify(&error, 100, "x"),
            SinkError::Transient(_)
        ));
    }

    #[test]
    fn a_missing_exchange_or_refused_access_stops_the_worker_with_a_hint() {
        for kind in [AMQPSoftError::NOTFOUND, AMQPSoftError::ACCESSREFUSED] {
            let error = closed(
                AMQPErrorKind::Soft(kind),
                "NOT_FOUND - no exchange 'x' in vhost '/'",
            );
            let SinkError::Closed(text) = classify(&error, 1, "x") else {
                panic!("not closed")
            };
            assert!(
                text.contains("no exchange 'x'") && text.contains("declare_exchange"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_lost_connection_is_transient() {
        let error = closed(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - shutdown",
        );
        assert!(matches!(classify(&error, 1, "x"), SinkError::Transient(_)));
        assert!(matches!(
            classify(&lapin::Error::MissingHeartbeatError, 1, "x"),
            SinkError::Transient(_)
        ));
    }
}
