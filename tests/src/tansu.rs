//! tansu, a Kafka-protocol broker, as a separate process on a free port with in-memory storage.
//! It has no topic auto-create: topics are created up front.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::postgres::free_port;

pub struct Tansu {
    child: Child,
    pub port: u16,
}

impl Tansu {
    /// Starts a broker and creates `topics` (name, partitions).
    pub fn start(topics: &[(&str, u32)]) -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu on PATH (scripts/install-deps installs it)");
        let tansu = Tansu { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        for (topic, partitions) in topics {
            tansu.create_topic(topic, *partitions);
        }
        tansu
    }

    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let out = Command::new("tansu")
            .args([
                "topic",
                "create",
                topic,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .args(["--partitions", &partitions.to_string()])
            .output()
            .expect("tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGSTOP: the broker hangs with its connections open, like a stalled machine.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

impl Drop for Tansu {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
