//! A local cluster of real `coalesced` processes for integration tests: free loopback ports,
//! config files in a temp dir, readiness polled with a deadline, SIGKILL / SIGSTOP / restart.

#![allow(dead_code, unreachable_pub, missing_debug_implementations, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coalesce_proto::v1 as pb;
use coalesce_proto::v1::coalesce_client::CoalesceClient;
use tonic::transport::Channel;

/// The `coalesced` binary built for these tests.
pub const COALESCED: &str = env!("CARGO_BIN_EXE_coalesced");

/// A free loopback port for a node to bind. Chosen at random below the kernel's ephemeral
/// range (32768+ by default), so no outgoing connection can take it between this check and
/// the node binding it; checked by binding it once.
pub fn free_port() -> u16 {
    loop {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct NodeProc {
    pub name: String,
    pub config: PathBuf,
    pub client_addr: String,
    pub log: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    pub shards: u32,
}

impl Cluster {
    /// Writes configs for `n` nodes and `shards` shards with `streams` (TOML) and starts them.
    pub fn start(n: usize, shards: u32, streams: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("streams.toml"), streams).unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut members = String::new();
        for (i, (peer, client)) in ports.iter().enumerate() {
            members.push_str(&format!(
                "[[cluster.nodes]]\nname = \"coalesce-{i}\"\npeer = \"127.0.0.1:{peer}\"\nclient = \"127.0.0.1:{client}\"\n\n"
            ));
        }
        let mut nodes = Vec::new();
        for (i, (peer, client)) in ports.iter().enumerate() {
            let cfg = format!(
                "streams_file = \"streams.toml\"\n\n[node]\nname = \"coalesce-{i}\"\ndata_dir = \"{}\"\npeer_listen = \"127.0.0.1:{peer}\"\nclient_listen = \"127.0.0.1:{client}\"\n\n\
                 [raft]\nheartbeat = \"50ms\"\nelection_timeout_min = \"300ms\"\nelection_timeout_max = \"600ms\"\n\n\
                 [cluster]\nname = \"test\"\nshards = {shards}\nreplication = 3\n\n{members}",
                dir.path().join(format!("data-{i}")).display()
            );
            let path = dir.path().join(format!("node-{i}.toml"));
            std::fs::write(&path, cfg).unwrap();
            nodes.push(NodeProc {
                name: format!("coalesce-{i}"),
                config: path,
                client_addr: format!("127.0.0.1:{client}"),
                log: dir.path().join(format!("node-{i}.log")),
                child: None,
            });
        }
        let mut c = Cluster { dir, nodes, shards };
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    /// Starts node `i` (again), appending to its log.
    pub fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let child = Command::new(COALESCED)
            .arg("--config")
            .arg(&node.config)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs node `i` and waits for it to exit; returns how long it took.
    pub fn terminate(&mut self, i: usize, within: Duration) -> Duration {
        let started = Instant::now();
        self.signal(i, "TERM");
        let mut child = self.nodes[i].child.take().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status} after SIGTERM", self.nodes[i].name);
                return started.elapsed();
            }
            if started.elapsed() > within {
                let _ = child.kill();
                self.dump_logs();
                panic!("{} did not exit within {within:?} of SIGTERM", self.nodes[i].name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal ("STOP", "CONT", "TERM") to node `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        self.try_signal(i, sig).unwrap();
    }

    fn try_signal(&self, i: usize, sig: &str) -> nix::Result<()> {
        use nix::sys::signal::{Signal, kill};
        let signal = match sig {
            "STOP" => Signal::SIGSTOP,
            "CONT" => Signal::SIGCONT,
            "TERM" => Signal::SIGTERM,
            other => panic!("unsupported signal {other}"),
        };
        match &self.nodes[i].child {
            Some(c) => kill(nix::unistd::Pid::from_raw(c.id() as i32), signal),
            None => Ok(()),
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// A client for node `i` (connects lazily).
    pub fn client(&self, i: usize) -> CoalesceClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.nodes[i].client_addr))
            .unwrap()
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        CoalesceClient::new(ch)
    }

    /// The status of node `i`, if it answers.
    pub async fn status(&self, i: usize) -> Option<pb::StatusResponse> {
        self.client(i).status(pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
    }

    /// Leader name per shard, as reported by running nodes that agree a leader exists.
    pub async fn leaders(&self) -> BTreeMap<u32, String> {
        let mut out = BTreeMap::new();
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                continue;
            }
            if let Some(s) = self.status(i).await {
                for sh in s.local_shards {
                    if !sh.leader.is_empty() && self.index_of(&sh.leader).is_some_and(|l| self.is_running(l)) {
                        out.entry(sh.shard).or_insert(sh.leader);
                    }
                }
            }
        }
        out
    }

    /// Waits until every shard has a running leader.
    pub async fn wait_ready(&self, within: Duration) -> BTreeMap<u32, String> {
        let deadline = Instant::now() + within;
        loop {
            let l = self.leaders().await;
            if l.len() == self.shards as usize {
                return l;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("cluster not ready within {within:?}: leaders {l:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Prints the tail of every node's log (on failure).
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("==== {} ({}) ====", n.name, n.log.display());
            for l in text.lines().filter(|l| l.contains("panicked") || l.contains("ERROR")).take(10) {
                eprintln!("!! {l}");
            }
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.try_signal(i, "CONT"); // a paused node must wake up to die
            self.kill(i);
        }
    }
}

/// An event of a sum stream.
pub fn sum_event(stream: &str, key: &str, v: i64, seq: u64) -> pb::Event {
    pb::Event {
        stream: stream.into(),
        key: key.into(),
        value: Some(pb::Value { kind: Some(pb::value::Kind::Int(v)) }),
        event_time_ms: None,
        producer_seq: seq,
    }
}
