//! JSON lines on standard output: the zero-setup sink. A message counts as delivered once its
//! line has been written and stdout flushed.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};

use super::{Ack, Receipt, Sink, SinkError};
use crate::message::Message;
use crate::router::Destination;

/// The message itself, not its line: a line is built only when it is written, so what waits for
/// a slow reader is counted once, in delivery's budget.
type Pending = (Arc<Message>, oneshot::Sender<Result<(), SinkError>>);

pub struct StdoutSink {
    lines: mpsc::UnboundedSender<Pending>,
}

impl StdoutSink {
    /// Spawns the writer task, which batches lines between flushes.
    pub fn start() -> StdoutSink {
        let (lines, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_lines(rx));
        StdoutSink { lines }
    }
}

async fn write_lines(mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut out = BufWriter::with_capacity(256 * 1024, tokio::io::stdout());
    let mut batch = Vec::with_capacity(1024);
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let mut result = Ok(());
        for (message, _) in &batch {
            let line = message.json_line();
            result = result.and(out.write_all(line.head.as_bytes()).await);
            result = result.and(out.write_all(&line.payload).await);
            result = result.and(out.write_all(line.tail.as_bytes()).await);
            result = result.and(out.write_all(b"\n").await);
        }
        result = result.and(out.flush().await);
        let result = result.map_err(|e| {
            let message = format!("cannot write to stdout: {e}");
            // A closed pipe never opens again; other errors (a full disk) may pass.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                SinkError::Closed(message)
            } else {
                SinkError::Transient(message)
            }
        });
        for (_, ack) in batch.drain(..) {
            let _ = ack.send(result.clone());
        }
    }
}

impl Sink for StdoutSink {
    fn send(&self, _: &Destination, message: &Arc<Message>) -> Ack {
        let (ack, acked) = oneshot::channel();
        let sent = self.lines.send((message.clone(), ack));
        Box::pin(async move {
            sent.map_err(|_| SinkError::Transient("the stdout writer has stopped".into()))?;
            acked
                .await
                .unwrap_or_else(|_| {
                    Err(SinkError::Transient("the stdout writer has stopped".into()))
                })
                .map(|()| Receipt::default())
        })
    }
}
