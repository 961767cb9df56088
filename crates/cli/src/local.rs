//! A local cluster of `coalesced` processes on loopback: configs, processes, shutdown.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A free loopback port, chosen below the kernel's ephemeral range so no outgoing connection
/// can take it before the node binds it.
pub(crate) fn free_port() -> u16 {
    loop {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The `coalesced` binary: `$COALESCED_BIN`, or next to this executable.
pub(crate) fn coalesced_bin() -> anyhow::Result<PathBuf> {
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

#[derive(Debug)]
pub(crate) struct LocalNode {
    pub client_addr: String,
    pub child: Child,
}

/// Writes node configs under `dir` and starts `n` nodes.
pub(crate) fn start(dir: &Path, n: usize, shards: u32, streams: &str) -> anyhow::Result<Vec<LocalNode>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("streams.toml"), streams)?;
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let members: String = ports
        .iter()
        .enumerate()
        .map(|(i, (p, c))| {
            format!(
                "[[cluster.nodes]]\nname = \"coalesce-{i}\"\npeer = \"127.0.0.1:{p}\"\nclient = \"127.0.0.1:{c}\"\n\n"
            )
        })
        .collect();
    let bin = coalesced_bin()?;
    let mut nodes = Vec::new();
    for (i, (peer, client)) in ports.iter().enumerate() {
        let config = dir.join(format!("node-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "streams_file = \"streams.toml\"\n\n[node]\nname = \"coalesce-{i}\"\ndata_dir = \"{}\"\n\
                 peer_listen = \"127.0.0.1:{peer}\"\nclient_listen = \"127.0.0.1:{client}\"\n\n\
                 [cluster]\nname = \"demo\"\nshards = {shards}\nreplication = {}\n\n{members}",
                dir.join(format!("data-{i}")).display(),
                n.min(3)
            ),
        )?;
        let log = dir.join(format!("node-{i}.log"));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        nodes.push(LocalNode { client_addr: format!("127.0.0.1:{client}"), child });
    }
    Ok(nodes)
}

/// SIGTERMs every node (graceful hand-off) and waits up to `grace` before SIGKILL.
pub(crate) fn stop(nodes: &mut [LocalNode], grace: Duration) {
    for n in nodes.iter() {
        let _ = kill(Pid::from_raw(n.child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for n in nodes.iter_mut() {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
