//! A local cluster of `coalesced` nodes on loopback: config files, processes, signals,
//! graceful stop. Used by `coalescectl demo` and by the multi-process tests in `tests/`. The
//! nodes are child processes, or ([`Runtime::Compose`], for `coalescectl chaos run --backend
//! compose`) containers of the Coalesce image sharing the host's network ([`crate::compose`]);
//! either way they are driven through the same methods.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::compose::{self, ComposeOptions};
use crate::netproxy::Links;

/// A free loopback port, chosen below the kernel's ephemeral range (32768+ by default) so no
/// outgoing connection can take it between this check and the node binding it, and reserved
/// for the life of this process by an advisory lock on `$TMPDIR/coalesce-ports/<port>`: every
/// caller on the machine (parallel test processes, a demo) skips ports another one holds, so
/// two clusters never get the same port even while a node is down between restarts.
pub fn free_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("coalesce-ports");
    let _ = std::fs::create_dir_all(&dir);
    loop {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        // A lock is per open file: a second open in this process conflicts too. Without a
        // writable temp directory only the bind check is left.
        let lock =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(port.to_string())).ok();
        let reserved = lock.as_ref().is_none_or(|f| f.try_lock().is_ok());
        if reserved && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(lock);
            return port;
        }
    }
}

/// The `coalesced` binary: `$COALESCED_BIN`, or next to this executable.
pub fn coalesced_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("COALESCED_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let candidate = exe.parent().context("executable has no directory")?.join("coalesced");
    if !candidate.exists() {
        bail!("coalesced not found at {} (build it, or set COALESCED_BIN)", candidate.display());
    }
    Ok(candidate)
}

/// Empties `dir` for a new local cluster, refusing a non-empty directory that does not look
/// like one (no `streams.toml`), so a typo cannot wipe unrelated data. `what` names the caller.
pub fn reset_dir(dir: &Path, what: &str) -> anyhow::Result<()> {
    if dir.exists() {
        let ours = dir.join("streams.toml").exists() || std::fs::read_dir(dir)?.next().is_none();
        if !ours {
            anyhow::bail!("{} exists and is not a {what} directory; choose another --dir", dir.display());
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    Ok(())
}

/// A metric series (`name{a="x",b="y"}`) as its name and sorted label pairs, so label order
/// does not matter.
fn series_key(series: &str) -> (String, Vec<String>) {
    match series.split_once('{') {
        Some((name, labels)) => {
            let mut pairs: Vec<String> =
                labels.trim_end_matches('}').split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect();
            pairs.sort();
            (name.to_owned(), pairs)
        }
        None => (series.trim().to_owned(), Vec::new()),
    }
}

/// How to lay out a local cluster.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub cluster: String,
    pub nodes: usize,
    pub shards: u32,
    /// The streams file's contents.
    pub streams: String,
    /// `[raft]` table contents (e.g. `heartbeat = "50ms"`), or empty for the defaults.
    pub raft: String,
    /// `RUST_LOG` for the nodes.
    pub log_filter: String,
    /// More node-config tables (e.g. `[tls]`, `[auth]`), appended to every node's config.
    pub extra: String,
    /// Environment variables for the node processes (e.g. a sink's `url_env`).
    pub env: Vec<(String, String)>,
    /// Route peer traffic through cuttable links ([`crate::netproxy`]) so partitions can be
    /// made ([`LocalCluster::isolate`]).
    pub proxied: bool,
}

/// Where the nodes of a [`LocalCluster`] run.
#[derive(Debug, Clone)]
pub enum Runtime {
    /// Child processes of this program, running this `coalesced` binary.
    Processes(PathBuf),
    /// One container per node in a docker compose project ([`crate::compose`]).
    Compose(ComposeOptions),
}

/// The nodes' runtime, as the cluster drives it.
#[derive(Debug)]
enum Driver {
    /// Each node's process is its [`LocalNode::child`].
    Processes(PathBuf),
    Compose(compose::Project),
}

/// One node of a local cluster.
#[derive(Debug)]
pub struct LocalNode {
    pub name: String,
    pub config: PathBuf,
    pub client_addr: String,
    /// The HTTP port (`/metrics`, `/livez`, `/readyz`).
    pub http_addr: String,
    /// Its stderr (a container's whole log, copied whenever it stops).
    pub log: PathBuf,
    /// Its process, while it runs (processes only).
    pub child: Option<Child>,
}

/// Node processes (or containers), their configs and logs under one directory.
#[derive(Debug)]
pub struct LocalCluster {
    pub dir: PathBuf,
    pub nodes: Vec<LocalNode>,
    driver: Driver,
    log_filter: String,
    env: Vec<(String, String)>,
    links: Option<Links>,
}

impl LocalCluster {
    /// Writes the streams file and one config per node under `dir` (nothing is started); the
    /// nodes will be processes of `bin`.
    pub fn create(dir: &Path, bin: PathBuf, opts: &LocalOptions) -> anyhow::Result<Self> {
        Self::create_on(dir, Runtime::Processes(bin), opts)
    }

    /// [`LocalCluster::create`] for nodes run by `runtime`. Containers see `dir` at its own path,
    /// so it is made absolute for them, and Docker and the image are checked here.
    pub fn create_on(dir: &Path, runtime: Runtime, opts: &LocalOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = &match runtime {
            Runtime::Processes(_) => dir.to_owned(),
            Runtime::Compose(_) => dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?,
        };
        std::fs::write(dir.join("streams.toml"), &opts.streams)?;
        let ports: Vec<(u16, u16, u16)> = (0..opts.nodes).map(|_| (free_port(), free_port(), free_port())).collect();
        let links = if opts.proxied {
            let targets: Vec<std::net::SocketAddr> =
                ports.iter().map(|(p, _, _)| std::net::SocketAddr::from(([127, 0, 0, 1], *p))).collect();
            Some(Links::start(&targets)?)
        } else {
            None
        };
        // Node `me`'s view of the members: through its links when proxied.
        let members = |me: usize| -> String {
            ports
                .iter()
                .enumerate()
                .map(|(i, (p, c, _))| {
                    let peer = links
                        .as_ref()
                        .and_then(|l| l.addr(me, i))
                        .map_or_else(|| format!("127.0.0.1:{p}"), |a| a.to_string());
                    format!(
                        "[[cluster.nodes]]\nname = \"coalesce-{i}\"\npeer = \"{peer}\"\nclient = \"127.0.0.1:{c}\"\n\n"
                    )
                })
                .collect()
        };
        let mut nodes = Vec::new();
        for (i, (peer, client, http)) in ports.iter().enumerate() {
            let config = dir.join(format!("node-{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "streams_file = \"streams.toml\"\n\n[node]\nname = \"coalesce-{i}\"\ndata_dir = \"{}\"\n\
                     peer_listen = \"127.0.0.1:{peer}\"\nclient_listen = \"127.0.0.1:{client}\"\n\
                     http_listen = \"127.0.0.1:{http}\"\n\n\
                     [raft]\n{}\n\n[cluster]\nname = \"{}\"\nshards = {}\nreplication = {}\n\n{}\n{}",
                    dir.join(format!("data-{i}")).display(),
                    opts.raft,
                    opts.cluster,
                    opts.shards,
                    opts.nodes.min(3),
                    members(i),
                    opts.extra
                ),
            )?;
            nodes.push(LocalNode {
                name: format!("coalesce-{i}"),
                config,
                client_addr: format!("127.0.0.1:{client}"),
                http_addr: format!("127.0.0.1:{http}"),
                log: dir.join(format!("node-{i}.log")),
                child: None,
            });
        }
        let driver = match runtime {
            Runtime::Processes(bin) => Driver::Processes(bin),
            Runtime::Compose(c) => {
                let services: Vec<compose::Service> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| compose::Service {
                        name: n.name.clone(),
                        config: n.config.clone(),
                        data_dir: dir.join(format!("data-{i}")),
                        env: std::iter::once(("RUST_LOG".to_owned(), opts.log_filter.clone()))
                            .chain(opts.env.iter().cloned())
                            .collect(),
                    })
                    .collect();
                Driver::Compose(compose::Project::create(dir, &opts.cluster, &c, &services)?)
            }
        };
        Ok(Self {
            dir: dir.to_owned(),
            nodes,
            driver,
            log_filter: opts.log_filter.clone(),
            env: opts.env.clone(),
            links,
        })
    }

    /// Empties `dir` (see [`reset_dir`]; `opts.cluster` names what it is for), writes the
    /// configs and starts every node with the `coalesced` next to this executable.
    pub fn launch(dir: &Path, opts: &LocalOptions) -> anyhow::Result<Self> {
        reset_dir(dir, &opts.cluster)?;
        let mut cluster = Self::create(dir, coalesced_bin()?, opts)?;
        cluster.spawn_all()?;
        Ok(cluster)
    }

    /// Starts node `i` (again), appending to its log.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let bin = match &mut self.driver {
            Driver::Processes(bin) => bin,
            Driver::Compose(p) => return p.start(i),
        };
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let child = Command::new(&*bin)
            .arg("--config")
            .arg(&node.config)
            .env("RUST_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Starts every node (containers: every one not running).
    pub fn spawn_all(&mut self) -> anyhow::Result<()> {
        if let Driver::Compose(p) = &mut self.driver {
            return p.start_all();
        }
        (0..self.nodes.len()).try_for_each(|i| self.spawn(i))
    }

    /// Cuts node `i` off from its peers (or heals it); needs a cluster made with
    /// [`LocalOptions::proxied`]. Clients still reach it.
    pub fn isolate(&self, i: usize, cut: bool) -> anyhow::Result<()> {
        match &self.links {
            Some(l) => {
                l.isolate(i, cut);
                Ok(())
            }
            None => bail!("this local cluster was not started with proxied peer links"),
        }
    }

    /// Heals every partition.
    pub fn heal_all(&self) {
        if let Some(l) = &self.links {
            l.heal_all();
        }
    }

    /// Whether node `i` has a process (a running container).
    pub fn is_running(&self, i: usize) -> bool {
        match &self.driver {
            Driver::Processes(_) => self.nodes[i].child.is_some(),
            Driver::Compose(p) => p.is_running(i),
        }
    }

    /// The value of one metric series (its name and labels as exposed, in any label order, e.g.
    /// `coalesce_sink_backlog_outputs{sink="hook"}`) on every running node that exposes it.
    pub async fn metric(&self, series: &str) -> Vec<f64> {
        let want = series_key(series);
        let http = reqwest::Client::new();
        let mut values = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            let Ok(r) = http.get(format!("http://{}/metrics", n.http_addr)).send().await else { continue };
            let text = r.text().await.unwrap_or_default();
            values.extend(
                text.lines()
                    .filter(|l| !l.starts_with('#'))
                    .filter_map(|l| {
                        let (s, v) = l.rsplit_once(' ')?;
                        (series_key(s) == want).then(|| v.trim().parse::<f64>().ok()).flatten()
                    })
                    .take(1),
            );
        }
        values
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Driver::Compose(p) = &mut self.driver {
            if let Err(e) = p.kill(i) {
                eprintln!("local: killing {}: {e:#}", self.nodes[i].name);
            }
            self.save_log(i);
            return;
        }
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` to node `i` (a no-op when it is not running). A container is frozen and
    /// thawed (`docker pause`/`unpause`) for SIGSTOP and SIGCONT.
    pub fn signal(&self, i: usize, signal: Signal) -> anyhow::Result<()> {
        if let Driver::Compose(p) = &self.driver {
            return p.signal(i, signal);
        }
        match &self.nodes[i].child {
            Some(c) => Ok(kill(Pid::from_raw(c.id() as i32), signal)?),
            None => Ok(()),
        }
    }

    /// Copies a container's log to its node's log file (a process writes its own).
    fn save_log(&self, i: usize) {
        if let Driver::Compose(p) = &self.driver
            && let Err(e) = p.save_log(i, &self.nodes[i].log)
        {
            eprintln!("local: saving {}'s log: {e:#}", self.nodes[i].name);
        }
    }

    /// SIGTERMs node `i` and waits for it to exit cleanly within `within` (SIGKILL after).
    /// Returns how long it took.
    pub fn terminate(&mut self, i: usize, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if let Driver::Compose(p) = &mut self.driver {
            let result = p.terminate(i, within);
            self.save_log(i);
            return result.map(|()| started.elapsed());
        }
        self.signal(i, Signal::SIGTERM)?;
        let Some(mut child) = self.nodes[i].child.take() else { return Ok(Duration::ZERO) };
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status} after SIGTERM", self.nodes[i].name);
                }
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not exit within {within:?} of SIGTERM", self.nodes[i].name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERMs every node (each hands off its shards) and waits up to `grace` before SIGKILL.
    pub fn stop_all(&mut self, grace: Duration) {
        if let Driver::Compose(p) = &mut self.driver {
            if let Err(e) = p.stop_all(grace) {
                eprintln!("local: stopping the containers: {e:#}");
            }
            (0..self.nodes.len()).for_each(|i| self.save_log(i));
            return;
        }
        for i in 0..self.nodes.len() {
            let _ = self.signal(i, Signal::SIGCONT);
            let _ = self.signal(i, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        for n in &mut self.nodes {
            let Some(mut child) = n.child.take() else { continue };
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if matches!(self.driver, Driver::Compose(_)) {
            // Even on a panic: no container outlives its cluster (a paused one goes too).
            (0..self.nodes.len()).for_each(|i| self.save_log(i));
            if let Driver::Compose(p) = &mut self.driver
                && let Err(e) = p.down()
            {
                eprintln!("local: removing the containers: {e:#}");
            }
            return;
        }
        for i in 0..self.nodes.len() {
            let _ = self.signal(i, Signal::SIGCONT); // a paused node must wake up to die
            self.kill(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::series_key;

    #[test]
    fn series_match_in_any_label_order() {
        assert_eq!(series_key(r#"m{b="2",a="1"}"#), series_key(r#"m{a="1",b="2"}"#));
        assert_ne!(series_key(r#"m{a="1"}"#), series_key(r#"m{a="2"}"#));
        assert_eq!(series_key("up"), ("up".to_owned(), Vec::new()));
    }
}
