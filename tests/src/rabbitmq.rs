//! A RabbitMQ node started hermetically (own directory, node name and ports), stopped on drop.
//! Recipe: ../shared/NOTES.md. Startup takes 10–25 s.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::postgres::free_port;

pub struct RabbitMq {
    dir: tempfile::TempDir,
    pub port: u16,
    dist_port: u16,
    pub node: String,
}

/// The scripts themselves: /usr/sbin/rabbitmqctl switches to the rabbitmq user, whose Erlang
/// cookie is not this node's.
const BIN: &str = "/usr/lib/rabbitmq/bin";

impl RabbitMq {
    pub fn start() -> RabbitMq {
        Self::start_configured("")
    }

    /// A node with `extra` lines appended to its `rabbitmq.conf` (e.g. `max_message_size = …`).
    pub fn start_configured(extra: &str) -> RabbitMq {
        let dir = tempfile::Builder::new()
            .prefix("outbox_rabbit")
            .tempdir()
            .unwrap();
        let port = free_port();
        let management = free_port();
        let node = format!("outbox{port}@localhost");
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\nmanagement.tcp.ip = 127.0.0.1\n\
                 management.tcp.port = {management}\nloopback_users = none\n{extra}"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("enabled_plugins"),
            "[rabbitmq_management].\n",
        )
        .unwrap();
        let rabbit = RabbitMq {
            dir,
            port,
            dist_port: free_port(),
            node,
        };
        let out = rabbit.command(&format!("{BIN}/rabbitmq-server"), &["-detached"]);
        assert!(
            out.status.success(),
            "rabbitmq-server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        rabbit.await_startup();
        rabbit
    }

    fn command(&self, program: &str, args: &[&str]) -> Output {
        let d = self.dir.path();
        let p = |name: &str| d.join(name).display().to_string();
        Command::new(program)
            .args(args)
            // Erlang writes erl_crash.dump into the working directory: keep it in ours.
            .current_dir(d)
            .env("HOME", d)
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", p("rabbit.pid"))
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// `rabbitmqctl -n NODE ARGS`, asserting success.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        let out = self.command(&format!("{BIN}/rabbitmqctl"), &all);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn await_startup(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = self.command(
                &format!("{BIN}/rabbitmqctl"),
                &["-n", &self.node, "await_startup", "--timeout", "60"],
            );
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// An outage: the whole node stops (connections drop; durable queues and persistent
    /// messages stay on disk).
    pub fn stop_node(&self) {
        self.ctl(&["stop"]);
    }

    /// Starts the node again on the same data directory.
    pub fn start_node(&self) {
        let out = self.command(&format!("{BIN}/rabbitmq-server"), &["-detached"]);
        assert!(
            out.status.success(),
            "rabbitmq-server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.await_startup();
    }

    /// Declares a durable exchange and a durable queue bound to it with `routing_key`.
    pub fn declare(&self, exchange: &str, exchange_type: &str, queue: &str, routing_key: &str) {
        let script = format!(
            "import pika\nc = pika.BlockingConnection(pika.URLParameters('{}'))\nch = c.channel()\n\
             ch.exchange_declare('{exchange}', '{exchange_type}', durable=True)\n\
             ch.queue_declare('{queue}', durable=True)\n\
             ch.queue_bind('{queue}', '{exchange}', routing_key='{routing_key}')\nc.close()\n",
            self.url()
        );
        run_python(&script, &[]);
    }

    /// Like [`RabbitMq::declare`], with a queue that holds at most `max_length` messages and
    /// refuses (nacks) publishes beyond that (`x-overflow = reject-publish`).
    pub fn declare_bounded(&self, exchange: &str, queue: &str, max_length: u32) {
        let script = format!(
            "import pika\nc = pika.BlockingConnection(pika.URLParameters('{}'))\nch = c.channel()\n\
             ch.exchange_declare('{exchange}', 'direct', durable=True)\n\
             ch.queue_declare('{queue}', durable=True, arguments={{'x-max-length': {max_length}, 'x-overflow': 'reject-publish'}})\n\
             ch.queue_bind('{queue}', '{exchange}', routing_key='{queue}')\nc.close()\n",
            self.url()
        );
        run_python(&script, &[]);
    }

    /// Every message in `queue`, read with pika (an independent client) as JSON lines:
    /// `{"message_id", "content_type", "headers", "body"}`; waits until `expected` distinct ids arrived.
    pub fn drain_queue(
        &self,
        queue: &str,
        expected: usize,
        timeout: Duration,
    ) -> Vec<serde_json::Value> {
        self.drain_queue_slowly(queue, expected, timeout, Duration::ZERO)
    }

    /// [`RabbitMq::drain_queue`] by a consumer that pauses `pause` after each message.
    pub fn drain_queue_slowly(
        &self,
        queue: &str,
        expected: usize,
        timeout: Duration,
        pause: Duration,
    ) -> Vec<serde_json::Value> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/amqp_consume.py");
        crate::json_lines(
            "pika consumer",
            Command::new("python3").args([
                script,
                &self.url(),
                queue,
                &expected.to_string(),
                &timeout.as_secs().to_string(),
                &pause.as_secs_f64().to_string(),
            ]),
        )
    }
}

fn run_python(script: &str, args: &[&str]) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        let _ = self.command(&format!("{BIN}/rabbitmqctl"), &["-n", &self.node, "stop"]);
        let pid_file = self.dir.path().join("rabbit.pid");
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let _ = Path::new(&pid_file);
    }
}

/// What [`RabbitMq::drain_queue`] read, as the delivery checks take it.
pub fn seen(messages: &[serde_json::Value]) -> Vec<crate::publish::Seen> {
    messages
        .iter()
        .map(|m| crate::publish::Seen {
            id: m["message_id"].as_str().unwrap().to_owned(),
            key: m["body"]["key"].as_str().map(str::to_owned),
            payload: m["body"].clone(),
        })
        .collect()
}
