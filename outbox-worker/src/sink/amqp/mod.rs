//! RabbitMQ (AMQP 0.9.1) through lapin: publisher confirms, persistent messages, `mandatory`, so a
//! message no queue is bound for comes back and counts as a (permanent) failure, matched to its
//! message by id ([`confirms`]).
//!
//! One task owns the connection and puts messages on the channel in call order, in batches: every
//! message queued when the last batch was answered goes out at once (many in flight, none waiting
//! for another's write), and the next batch goes once every confirm of this one is in, which is
//! what lets each return find its message. A lost connection or a channel the broker closed
//! fails what is pending (the caller re-sends it in order); the task reopens them at once and
//! keeps trying while idle, so readiness follows the connection's real state (heartbeats
//! included).

mod confirms;
mod orphans;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use outbox_client::contract::{HEADER_CREATED_AT, HEADER_ID, HEADER_QUEUE};
use tokio::sync::{mpsc, oneshot};

use self::confirms::{Confirmed, Settled};
use self::orphans::{Abandoned, Orphans};
use super::{Ack, Receipt, Sink, SinkError};
use crate::config::AmqpSinkConfig;
use crate::message::{is_content_type, Message};
use crate::router::Destination;

/// Heartbeat interval asked for when the URL names none (RabbitMQ proposes 60 s): a silent broker
/// reads as not ready within about twice this.
const HEARTBEAT_SECS: u16 = 10;
/// How often an idle, disconnected sink tries to connect again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Bounds of one batch of publishes: the next batch waits for every confirm of this one.
const BATCH_MESSAGES: usize = 4_096;
const BATCH_BYTES: usize = 64 << 20;

struct Publish {
    exchange: Arc<str>,
    routing_key: Arc<str>,
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

    /// Connected and not blocked by the broker (`connection.blocked`: a memory or disk alarm).
    fn can_deliver(&self) -> bool {
        self.is_connected()
            && !self
                .connection
                .as_ref()
                .is_some_and(|c| c.status().blocked())
    }

    /// The frame size the connection negotiated (RabbitMQ's default: 128 kB).
    fn frame_max(&self) -> Option<usize> {
        self.connection
            .as_ref()
            .map(|c| c.configuration().frame_max() as usize)
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

/// What the publisher task does next.
enum Next {
    Publish(Box<Publish>),
    /// Nothing to send yet (a reconnect attempt or an idle second passed).
    Again,
    /// The sink is gone.
    Stop,
}

/// The next message to publish; while idle and disconnected, a reconnect attempt instead.
async fn next_publish(
    rx: &mut mpsc::UnboundedReceiver<Publish>,
    session: &mut Session,
    config: &AmqpSinkConfig,
) -> Next {
    if session.is_connected() {
        return match tokio::time::timeout(RECONNECT_EVERY, rx.recv()).await {
            Ok(Some(p)) => Next::Publish(Box::new(p)),
            Ok(None) => Next::Stop,
            Err(_) => Next::Again,
        };
    }
    // Idle and disconnected: connect now, so that readiness tells the truth without traffic, and
    // again every second until it works.
    tokio::select! {
        p = rx.recv() => p.map_or(Next::Stop, |p| Next::Publish(Box::new(p))),
        result = session.channel(config) => {
            if let Err(e) = result {
                tracing::debug!(url = %config.url, error = %e, "amqp: cannot connect");
                tokio::time::sleep(RECONNECT_EVERY).await;
            }
            Next::Again
        }
    }
}

async fn publish_loop(
    config: AmqpSinkConfig,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    connected: Arc<AtomicBool>,
) {
    let mut session = Session::default();
    // The broker's max_message_size, once a refusal has told it: later messages over it are
    // refused here, so that only the first costs a closed channel (and re-sends of the messages
    // in flight on it). RabbitMQ does not announce the limit.
    let broker_max = Arc::new(AtomicUsize::new(usize::MAX));
    // Route exchanges seen to exist: the others are checked before a message is sent to them.
    let exchanges = KnownExchanges::default();
    loop {
        connected.store(session.can_deliver(), Ordering::Release);
        let first = match next_publish(&mut rx, &mut session, &config).await {
            Next::Publish(p) => *p,
            Next::Again => continue,
            Next::Stop => return,
        };
        let batch = take_batch(first, &mut rx);
        let mut answered = Vec::with_capacity(batch.len());
        let mut in_flight = Vec::with_capacity(batch.len());
        let mut orphans = Orphans::default();
        for p in batch {
            if let Some(publish) = start_publish(
                p,
                &mut session,
                &config,
                &broker_max,
                &exchanges,
                &mut orphans,
            )
            .await
            {
                let mut publish = Box::pin(publish);
                // lapin numbers the message and queues its frames before its first await: one
                // poll here puts them on the wire in call order. The socket write and the
                // broker's confirm complete later, so the next message does not wait for this
                // one's write.
                match futures::poll!(publish.as_mut()) {
                    Poll::Ready(settled) => {
                        // Done at once means lapin refused it (a confirm takes a round trip): the
                        // next message gets a fresh channel.
                        if settled.result.is_err() {
                            session.channel = None;
                        }
                        answered.push(settled);
                    }
                    Poll::Pending => in_flight.push(publish),
                }
            }
        }
        // Every confirm of the batch, before any is answered and before the next batch is sent:
        // what makes each return find its message ([`confirms`]).
        let all = futures::future::join_all(in_flight);
        tokio::pin!(all);
        let mut readiness = tokio::time::interval(RECONNECT_EVERY);
        answered.extend(loop {
            tokio::select! {
                settled = &mut all => break settled,
                _ = readiness.tick() => {
                    connected.store(session.can_deliver(), Ordering::Release);
                    orphans.check();
                }
            }
        });
        confirms::settle(answered);
    }
}

/// `first` and the messages queued behind it, up to a batch's bounds.
fn take_batch(first: Publish, rx: &mut mpsc::UnboundedReceiver<Publish>) -> Vec<Publish> {
    let mut bytes = first.message.payload.as_bytes().len();
    let mut batch = vec![first];
    while batch.len() < BATCH_MESSAGES && bytes < BATCH_BYTES {
        let Ok(p) = rx.try_recv() else { break };
        bytes += p.message.payload.as_bytes().len();
        batch.push(p);
    }
    batch
}

/// Checks one message and starts publishing it on the session's channel; `None` when it was
/// answered without being sent (refused here, or no channel to send it on).
async fn start_publish(
    p: Publish,
    session: &mut Session,
    config: &AmqpSinkConfig,
    broker_max: &Arc<AtomicUsize>,
    exchanges: &KnownExchanges,
    orphans: &mut Orphans,
) -> Option<impl std::future::Future<Output = Settled>> {
    let size = p.message.payload.as_bytes().len();
    let max = broker_max.load(Ordering::Relaxed);
    if size > max {
        let _ = p.ack.send(Err(SinkError::Permanent(format!(
            "amqp: the message is {size} bytes, over the broker's max_message_size ({max} \
             bytes, as its refusal of an earlier message said); not sent"
        ))));
        return None;
    }
    if let Some(problem) = unsendable(&p, session.frame_max()) {
        let _ = p
            .ack
            .send(Err(SinkError::Permanent(format!("amqp: {problem}"))));
        return None;
    }
    // Opening the channel declares the sink's own exchange: what fails there is the sink's.
    let channel = match session.channel(config).await {
        Ok(channel) => channel.clone(),
        Err(e) => {
            let sink_itself = Suspect {
                payload_len: size,
                exchange: &config.exchange,
                routing_key: &p.routing_key,
                own_exchange: true,
            };
            let _ = p
                .ack
                .send(Err(classify(&e, &sink_itself, "cannot connect")));
            return None;
        }
    };
    let own_exchange = *p.exchange == *config.exchange;
    if !own_exchange && !exchanges.contains(&p.exchange) {
        let connection = session
            .connection
            .as_ref()
            .expect("a channel is open on it");
        match check_exchange(connection, &p.exchange).await {
            Ok(()) => exchanges.insert(&p.exchange),
            // Not an answer about the exchange (RabbitMQ asks no permission of a passive
            // declare; another broker might): the publish itself will tell.
            Err(e) if !is_not_found(&e) && !is_transport(&e) => {}
            Err(e) => {
                let route = Suspect {
                    payload_len: size,
                    exchange: &p.exchange,
                    routing_key: &p.routing_key,
                    own_exchange: false,
                };
                let refused = classify(&e, &route, "the route's exchange, checked before sending");
                let _ = p.ack.send(Err(refused));
                return None;
            }
        }
    }
    let abandoned = orphans.watch(&channel);
    Some(publish(
        channel,
        p,
        own_exchange,
        broker_max.clone(),
        exchanges.clone(),
        abandoned,
    ))
}

/// Route exchanges known to exist. A 404 or 403 for one closes the publishing channel under every
/// message in flight on it (each is then sent again: duplicates), so a route's exchange is checked
/// on a channel of its own (a passive declare) before the first message goes to it, and again
/// after the broker refused it.
#[derive(Clone, Default)]
struct KnownExchanges(Arc<std::sync::Mutex<std::collections::HashSet<Arc<str>>>>);

impl KnownExchanges {
    fn contains(&self, exchange: &Arc<str>) -> bool {
        // The default exchange always exists (and cannot be declared, even passively).
        exchange.is_empty() || self.0.lock().unwrap().contains(exchange)
    }

    fn insert(&self, exchange: &Arc<str>) {
        self.0.lock().unwrap().insert(exchange.clone());
    }

    fn forget(&self, exchange: &str) {
        self.0.lock().unwrap().remove(exchange);
    }
}

/// Whether `exchange` exists, asked on a channel opened for the question: a 404 closes that
/// channel only.
async fn check_exchange(connection: &Connection, exchange: &str) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange,
            ExchangeKind::Direct,
            passive,
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "exchange checked").await;
    Ok(())
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error, lapin::Error::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// The connection failed rather than the broker answering: transient, as `classify` says.
fn is_transport(error: &lapin::Error) -> bool {
    !matches!(error, lapin::Error::ProtocolError(_))
}

/// Publishes one message and waits for the broker's confirm.
async fn publish(
    channel: Channel,
    p: Publish,
    own_exchange: bool,
    broker_max: Arc<AtomicUsize>,
    exchanges: KnownExchanges,
    abandoned: Abandoned,
) -> Settled {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let payload = p.message.payload.as_bytes();
    let suspect = Suspect {
        payload_len: payload.len(),
        exchange: &p.exchange,
        routing_key: &p.routing_key,
        own_exchange,
    };
    let answer = async {
        match channel
            .basic_publish(&p.exchange, &p.routing_key, options, payload, p.properties)
            .await
        {
            Ok(confirm) => confirm
                .await
                .map_err(|e| (e, "the broker closed the channel")),
            Err(e) => Err((e, "cannot publish")),
        }
    };
    // Biased: the publish is polled first, so that the caller's one poll queues its frames.
    let answer = tokio::select! {
        biased;
        answer = answer => Some(answer),
        _ = abandoned => None,
    };
    let result = match answer {
        None => Err(SinkError::Transient(
            "amqp: the channel closed without answering for this message; sending it again".into(),
        )),
        Some(answer) => match answer {
            Ok(Confirmation::Ack(returned)) => Ok(Confirmed {
                ack: true,
                returned: returned.map(|r| returned_message(&r)),
            }),
            Ok(Confirmation::Nack(returned)) => Ok(Confirmed {
                ack: false,
                returned: returned.map(|r| returned_message(&r)),
            }),
            Ok(Confirmation::NotRequested) => Err(SinkError::Transient(
                "amqp: the channel is not in confirm mode".into(),
            )),
            Err((e, context)) => Err(classify(&e, &suspect, context)),
        },
    };
    if let Err(SinkError::Permanent(text)) = &result {
        if let Some(max) = refused_max(text) {
            broker_max.fetch_min(max, Ordering::Relaxed);
        }
        // Deleted (or its permission revoked) since it was checked: checked again next time.
        if !own_exchange && named_exchange(text) == Some(&*p.exchange) {
            exchanges.forget(&p.exchange);
        }
    }
    Settled {
        id: p.message.id.to_string(),
        ack: p.ack,
        result,
    }
}

/// The returned message's id (its `message_id` property) and the broker's reason.
fn returned_message(r: &BasicReturnMessage) -> (Option<String>, String) {
    (
        r.properties.message_id().as_ref().map(|id| id.to_string()),
        format!("{} {}", r.reply_code, r.reply_text),
    )
}

/// The message a channel-closing refusal may be about: what tells it apart from the others in
/// flight on the channel, all of which fail with the same reply.
struct Suspect<'a> {
    payload_len: usize,
    exchange: &'a str,
    routing_key: &'a str,
    /// The exchange is the sink's own (`exchange` in its settings), not a route's.
    own_exchange: bool,
}

/// What a channel-closing reply code means for the message whose confirm it failed. The broker
/// closes the channel on the first bad publish and every confirm pending on it fails with the same
/// code, so a refusal names its culprit where it can: a size refusal counts as permanent only for
/// the message of that size, a missing or forbidden exchange only for the messages sent to it.
/// Only a refusal of the sink's own exchange, credentials or virtual host stops the worker.
fn classify(error: &lapin::Error, suspect: &Suspect<'_>, context: &str) -> SinkError {
    let lapin::Error::ProtocolError(amqp) = error else {
        return SinkError::Transient(format!("amqp: {context}: {error}"));
    };
    let text = amqp.get_message().as_str();
    let described = format!("amqp: {context}: {} {text}", amqp.get_id());
    let stop = |hint: &str| SinkError::Closed(format!("{described}: {hint}"));
    let innocent = || {
        SinkError::Transient(format!(
            "{described} (another message's; this one is re-sent)"
        ))
    };
    let about_another_exchange = named_exchange(text).is_some_and(|named| {
        named != suspect.exchange && !(named == "amq.default" && suspect.exchange.is_empty())
    });
    // Topic authorisation ("access to topic 'K' in exchange 'E'") refuses a routing key, never
    // the sink: the messages with that key are at fault, whatever the exchange.
    if let Some(topic) = named_topic(text) {
        return if topic == suspect.routing_key && !about_another_exchange {
            SinkError::Permanent(format!(
                "{described}: the user may not publish with this routing key (topic \
                 permissions); grant it, then redrive"
            ))
        } else {
            innocent()
        };
    }
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => match refused_size(text) {
            Some(size) if size != suspect.payload_len => innocent(),
            Some(_) => SinkError::Permanent(described),
            // Not about a message: the sink's own settings (declare_exchange of another kind than
            // the existing exchange, say). Every message would meet it.
            None => stop("the broker refuses this sink's settings; fix them (declare_exchange?)"),
        },
        AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => SinkError::Permanent(described),
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED)
            if about_another_exchange =>
        {
            innocent()
        }
        // A route's exchange: that route's messages are refused (and dead-lettered), the others
        // go on.
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED)
            if !suspect.own_exchange =>
        {
            SinkError::Permanent(format!(
                "{described}: create the exchange or give the user write permission on it, then \
                 redrive"
            ))
        }
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
            stop("create the exchange (or set declare_exchange)")
        }
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => stop(
            "check the user and password in the URL, and give the user write permission on the \
             exchange",
        ),
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
            stop("give the user access to the virtual host (rabbitmqctl set_permissions)")
        }
        _ => SinkError::Transient(described),
    }
}

/// What RabbitMQ could never take whatever is retried, found before publishing: AMQP short
/// strings (header names, the content type, the routing key) hold at most 255 bytes, and the
/// properties travel in one frame (a broker closes the whole connection on a bigger one).
fn unsendable(p: &Publish, frame_max: Option<usize>) -> Option<String> {
    const SHORT: usize = 255;
    if p.exchange.len() > SHORT {
        return Some(format!(
            "the exchange name is {} bytes, over AMQP's 255",
            p.exchange.len()
        ));
    }
    // Direct reply-to pseudo-queues exist only for a live RPC caller's channel; RabbitMQ closes
    // the whole connection on a publish to one that does not decode.
    if p.exchange.is_empty() && p.routing_key.starts_with("amq.rabbitmq.reply-to") {
        return Some(format!(
            "routing key {:?} is a direct reply-to pseudo-queue, which only an RPC caller's \
             channel can be sent to",
            &p.routing_key[..p.routing_key.floor_char_boundary(60)]
        ));
    }
    // RabbitMQ reads headers named CC and BCC as extra routing keys (sender-selected
    // distribution, a list), and closes the channel on a text value.
    if let Some(name) = p.message.headers.keys().find(|k| *k == "CC" || *k == "BCC") {
        return Some(format!(
            "header {name} is RabbitMQ's sender-selected distribution (a list of routing keys), \
             which a text value cannot be; rename the header"
        ));
    }
    if p.routing_key.len() > SHORT {
        return Some(format!(
            "the routing key is {} bytes, over AMQP's 255",
            p.routing_key.len()
        ));
    }
    if let Some(name) = p.message.headers.keys().find(|k| k.len() > SHORT) {
        return Some(format!(
            "header name {:?}… is {} bytes, over AMQP's 255",
            &name[..name.floor_char_boundary(40)],
            name.len()
        ));
    }
    if p.message.content_type().len() > SHORT {
        return Some("the content-type header is over AMQP's 255 bytes".into());
    }
    // Each header: name length, name, type, value length, value; plus the fixed properties.
    let properties: usize = 512
        + p.message
            .headers
            .iter()
            .map(|(k, v)| 1 + k.len() + 1 + 4 + v.len())
            .sum::<usize>();
    match frame_max {
        Some(max) if max > 0 && properties + 8 > max => Some(format!(
            "its headers take {properties} bytes, more than one AMQP frame ({max} bytes, the \
             broker's frame_max)"
        )),
        _ => None,
    }
}

/// The routing key a topic-permission refusal names: "access to topic 'k' in exchange 'x'".
fn named_topic(text: &str) -> Option<&str> {
    let rest = &text[text.find("access to topic '")? + "access to topic '".len()..];
    rest.get(..rest.find("' in exchange")?)
}

/// The exchange a refusal names: "no exchange 'x' in vhost '/'", "write access to exchange 'x'".
fn named_exchange(text: &str) -> Option<&str> {
    let rest = &text[text.find("exchange '")? + "exchange '".len()..];
    rest.get(..rest.find('\'')?)
}

/// The limit in RabbitMQ's "message size … is larger than configured max size 16777216".
fn refused_max(text: &str) -> Option<usize> {
    let rest = &text[text.find("max size ")? + "max size ".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
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
    fn send(&self, destination: &Destination, message: &Arc<Message>) -> Ack {
        let Destination::Exchange {
            exchange,
            routing_key,
        } = destination
        else {
            let error = SinkError::Permanent(format!("amqp: {destination:?} is not an exchange"));
            return Box::pin(async move { Err(error) });
        };
        let (ack, acked) = oneshot::channel();
        let queued = self.publishes.send(Publish {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            message: message.clone(),
            properties: properties(message),
            ack,
        });
        Box::pin(async move {
            queued
                .map_err(|_| SinkError::Transient("amqp: the publisher task has stopped".into()))?;
            acked
                .await
                .unwrap_or_else(|_| {
                    Err(SinkError::Transient(
                        "amqp: the publisher task has stopped".into(),
                    ))
                })
                .map(|()| Receipt::default())
        })
    }

    fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn system(&self) -> &'static str {
        "rabbitmq"
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;

    use super::*;

    fn suspect(payload_len: usize, exchange: &str, own_exchange: bool) -> Suspect<'_> {
        Suspect {
            payload_len,
            exchange,
            routing_key: "orders.ok",
            own_exchange,
        }
    }

    /// A topic permission refuses one routing key: those messages are refused for good, the
    /// others re-sent, and the worker never stops for it, even on its own exchange.
    #[test]
    fn a_topic_permission_refusal_is_the_fault_of_that_routing_key() {
        let error = closed(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - access to topic 'orders.bad' in exchange 'events' in vhost '/' refused for user 'guest'",
        );
        let mut bad = suspect(1, "events", true);
        bad.routing_key = "orders.bad";
        assert!(matches!(
            classify(&error, &bad, "x"),
            SinkError::Permanent(_)
        ));
        assert!(matches!(
            classify(&error, &suspect(1, "events", true), "x"),
            SinkError::Transient(_)
        ));
        let mut elsewhere = suspect(1, "other", false);
        elsewhere.routing_key = "orders.bad";
        assert!(matches!(
            classify(&error, &elsewhere, "x"),
            SinkError::Transient(_)
        ));
    }

    /// A route's missing or forbidden exchange refuses that route's messages (dead-lettered); the
    /// other messages on the closed channel are re-sent; only the sink's own exchange stops it.
    #[test]
    fn a_refused_exchange_is_the_fault_of_the_messages_sent_to_it() {
        for (code, text) in [
            (AMQPSoftError::NOTFOUND, "NOT_FOUND - no exchange 'events.odd' in vhost '/'"),
            (
                AMQPSoftError::ACCESSREFUSED,
                "ACCESS_REFUSED - write access to exchange 'events.odd' in vhost '/' refused for user 'u'",
            ),
        ] {
            let error = closed(AMQPErrorKind::Soft(code), text);
            assert!(matches!(
                classify(&error, &suspect(1, "events.odd", false), "x"),
                SinkError::Permanent(_)
            ));
            assert!(matches!(
                classify(&error, &suspect(1, "events", true), "x"),
                SinkError::Transient(_)
            ));
            assert!(matches!(
                classify(&error, &suspect(1, "events.odd", true), "x"),
                SinkError::Closed(_)
            ));
        }
        let default = closed(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user 'u'",
        );
        assert!(matches!(
            classify(&default, &suspect(1, "", true), "x"),
            SinkError::Closed(_)
        ));
    }

    fn closed(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::Error::ProtocolError(AMQPError::new(kind, text.into()))
    }

    #[test]
    fn the_brokers_limit_is_read_from_its_refusal() {
        let text = "amqp: the broker closed the channel: 406 PRECONDITION_FAILED - message size \
                    20971520 is larger than configured max size 16777216";
        assert_eq!(refused_max(text), Some(16_777_216));
        assert_eq!(refused_size(text), Some(20_971_520));
        assert_eq!(refused_max("NOT_FOUND - no exchange 'x'"), None);
    }

    #[test]
    fn a_size_refusal_is_permanent_only_for_the_message_of_that_size() {
        let error = closed(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - message size 20971520 is larger than configured max size 16777216",
        );
        assert!(matches!(
            classify(&error, &suspect(20_971_520, "events", true), "x"),
            SinkError::Permanent(_)
        ));
        assert!(matches!(
            classify(&error, &suspect(100, "events", true), "x"),
            SinkError::Transient(_)
        ));
    }

    #[test]
    fn refusals_of_the_sinks_settings_stop_the_worker_with_a_hint() {
        for (kind, text, hint) in [
            (
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no exchange 'x' in vhost '/'",
                "declare_exchange",
            ),
            (
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - write access to exchange 'x' refused",
                "write permission",
            ),
            (
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x'",
                "declare_exchange",
            ),
            (
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
                "NOT_ALLOWED - access to vhost '/' refused for user 'u'",
                "virtual host",
            ),
        ] {
            let SinkError::Closed(message) =
                classify(&closed(kind, text), &suspect(1, "x", true), "x")
            else {
                panic!("{text}: not closed")
            };
            assert!(
                message.contains(text) && message.contains(hint),
                "{message}"
            );
        }
    }

    fn publish(headers: &[(&str, &str)]) -> Publish {
        let message = Message {
            id: uuid::Uuid::nil(),
            queue: "q".into(),
            key: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            payload: crate::message::Payload::Json("1".into()),
            created_at: chrono::Utc::now(),
            commit_lsn: crate::lsn::Lsn(1),
            index: 1,
            committed_at: chrono::Utc::now(),
        };
        Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            properties: properties(&message),
            message: Arc::new(message),
            ack: oneshot::channel().0,
        }
    }

    #[test]
    fn what_amqp_cannot_carry_is_found_before_publishing() {
        assert!(unsendable(&publish(&[("h", "v")]), Some(131_072)).is_none());
        let long_name = "n".repeat(256);
        assert!(unsendable(&publish(&[(&long_name, "v")]), Some(131_072)).is_some());
        let big = "x".repeat(200_000);
        let problem = unsendable(&publish(&[("h", &big)]), Some(131_072)).unwrap();
        assert!(problem.contains("frame_max"), "{problem}");
        assert!(unsendable(&publish(&[("content-type", &"t".repeat(300))]), None).is_some());
        for name in ["CC", "BCC"] {
            let problem = unsendable(&publish(&[(name, "other-queue")]), None).unwrap();
            assert!(problem.contains("sender-selected"), "{problem}");
        }
        assert!(unsendable(&publish(&[("cc", "v")]), None).is_none());
        let mut reply_to = publish(&[]);
        reply_to.routing_key = "amq.rabbitmq.reply-to.xx.yy".into();
        assert!(unsendable(&reply_to, None).unwrap().contains("reply-to"));
        let mut long_exchange = publish(&[]);
        long_exchange.exchange = "e".repeat(256).into();
        assert!(unsendable(&long_exchange, None)
            .unwrap()
            .contains("exchange name"));
    }

    #[test]
    fn a_lost_connection_is_transient() {
        let error = closed(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - shutdown",
        );
        assert!(matches!(
            classify(&error, &suspect(1, "x", true), "x"),
            SinkError::Transient(_)
        ));
        assert!(matches!(
            classify(
                &lapin::Error::MissingHeartbeatError,
                &suspect(1, "x", true),
                "x"
            ),
            SinkError::Transient(_)
        ));
    }
}
