//! Directed TCP links between local nodes that can be cut, for partitions on loopback.
//!
//! In a proxied local cluster ([`crate::local::LocalOptions::proxied`]) node `i` reaches node
//! `j`'s peer port through its own link `i → j`: a TCP proxy on a loopback port of its own.
//! Cutting a link makes it silent, as a partition is: bytes stop moving in both directions on
//! its connections (they wait in socket buffers, so the sender's RPCs time out rather than fail
//! fast), and new connections are accepted but not connected onward. Healing resumes them. The
//! nodes run unchanged: their packets are really held back, nothing in them knows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One directed link: a listener forwarding to `target` while not cut.
#[derive(Debug)]
struct Link {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

/// Links between the nodes of one local cluster, served by their own runtime thread.
#[derive(Debug)]
pub struct Links {
    links: Mutex<BTreeMap<(usize, usize), Link>>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Waits until the link is not cut (returns false when the proxy is going away).
async fn until_open(cut: &mut watch::Receiver<bool>) -> bool {
    cut.wait_for(|c| !*c).await.is_ok()
}

/// Copies `from` → `to`, pausing while the link is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !until_open(&mut cut).await {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Cut while waiting to read: stop reading (the bytes stay in the socket buffer).
            _ = cut.wait_for(|c| *c) => continue,
        };
        // Bytes read just before a cut are held until it heals.
        if !until_open(&mut cut).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

async fn serve(listener: TcpListener, target: SocketAddr, cut: watch::Receiver<bool>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else { continue };
        let mut cut = cut.clone();
        tokio::spawn(async move {
            // A connection made while cut is held, unanswered, until the link heals.
            if !until_open(&mut cut).await {
                return;
            }
            let Ok(outbound) = TcpStream::connect(target).await else { return };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::join!(pump(ir, ow, cut.clone()), pump(or, iw, cut));
        });
    }
}

impl Links {
    /// Starts a link `i → j` for every ordered pair of distinct nodes, to `targets[j]`.
    pub fn start(targets: &[SocketAddr]) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let mut links = BTreeMap::new();
        for (i, _) in targets.iter().enumerate() {
            for (j, target) in targets.iter().enumerate() {
                if i == j {
                    continue;
                }
                // Bound here (std), served by the links' own runtime: this may be called from
                // inside another runtime, where blocking on ours is not allowed.
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                listener.set_nonblocking(true)?;
                let addr = listener.local_addr()?;
                let (cut, cut_rx) = watch::channel(false);
                let target = *target;
                runtime.spawn(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => serve(l, target, cut_rx).await,
                        Err(e) => eprintln!("netproxy: link listener {addr}: {e}"),
                    }
                });
                links.insert((i, j), Link { addr, cut });
            }
        }
        Ok(Self { links: Mutex::new(links), runtime: Some(runtime) })
    }

    /// The address node `from` dials to reach node `to`.
    pub fn addr(&self, from: usize, to: usize) -> Option<SocketAddr> {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).get(&(from, to)).map(|l| l.addr)
    }

    /// Cuts (or heals) every link to and from node `i`: it is partitioned from its peers.
    pub fn isolate(&self, i: usize, cut: bool) {
        for ((from, to), link) in self.links.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if *from == i || *to == i {
                link.cut.send_replace(cut);
            }
        }
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        for link in self.links.lock().unwrap_or_else(|p| p.into_inner()).values() {
            link.cut.send_replace(false);
        }
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
