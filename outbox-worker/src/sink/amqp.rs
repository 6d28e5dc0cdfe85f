//! RabbitMQ (AMQP 0.9.1) through lapin: publisher confirms, persistent messages, `mandatory`, so a
//! message no queue is bound for comes back and counts as a (permanent) failure.
//!
//! One task owns the connection and publishes in call order; each confirm is awaited on its own so
//! many messages are in flight. A lost connection fails what is pending (the caller re-sends it in
//! order) and is reopened on the next message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, oneshot};

use super::{Ack, Sink, SinkError};
use crate::config::AmqpSinkConfig;
use crate::message::{is_content_type, Message};

struct Publish {
    exchange: String,
    routing_key: String,
    payload: Vec<u8>,
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

async fn open(config: &AmqpSinkConfig) -> Result<(Connection, Channel), lapin::Error> {
    let connection =
        Connection::connect(config.url.expose(), ConnectionProperties::default()).await?;
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
    Ok((connection, channel))
}

async fn publish_loop(
    config: AmqpSinkConfig,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    connected: Arc<AtomicBool>,
) {
    let mut session: Option<(Connection, Channel)> = None;
    while let Some(p) = rx.recv().await {
        if !session
            .as_ref()
            .is_some_and(|(_, ch)| ch.status().connected())
        {
            session = match open(&config).await {
                Ok(s) => {
                    tracing::info!(url = %config.url, "amqp connected");
                    Some(s)
                }
                Err(e) => {
                    connected.store(false, Ordering::Release);
                    let _ = p.ack.send(Err(SinkError::Transient(format!(
                        "amqp: cannot connect: {e}"
                    ))));
                    continue;
                }
            };
        }
        connected.store(true, Ordering::Release);
        let (_, channel) = session.as_ref().expect("connected");
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        match channel
            .basic_publish(
                &p.exchange,
                &p.routing_key,
                options,
                &p.payload,
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
                        Err(e) => Err(SinkError::Transient(format!("amqp: {e}"))),
                    };
                    let _ = ack.send(result);
                });
            }
            Err(e) => {
                connected.store(false, Ordering::Release);
                session = None;
                let _ = p.ack.send(Err(SinkError::Transient(format!("amqp: {e}"))));
            }
        }
    }
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
    put("outbox-id", &message.id.to_string());
    put("outbox-queue", &message.queue);
    put("outbox-created-at", &message.created_at_rfc3339());
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
            payload: message.payload.as_bytes().to_vec(),
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
