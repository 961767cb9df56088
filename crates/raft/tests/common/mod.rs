//! Shared by the in-process raft tests: start a node on a database and serve its peer port.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;

use coalesce_proto::v1::raft_peer_server::RaftPeerServer;
use coalesce_raft::{ClusterSpec, PeerService, RaftNode, RaftTiming};
use coalesce_storage::NodeDb;
use tokio::sync::oneshot;

/// Raft timing for tests: fast elections on loopback.
pub const TIMING: RaftTiming = RaftTiming {
    heartbeat_ms: 50,
    election_min_ms: 300,
    election_max_ms: 600,
    quiesce_after_ms: 0,
    checkpoint_ms: 1_000,
    snapshot: coalesce_raft::snapshot::SnapshotOptions::DEFAULT,
};

/// Starts node `name` of `spec` on `db` and serves its peer port on `listener` until the
/// returned sender fires.
pub async fn serve(
    db: Arc<NodeDb>,
    spec: &ClusterSpec,
    name: &str,
    listener: tokio::net::TcpListener,
) -> (Arc<RaftNode>, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let node =
        RaftNode::start(db, spec.clone(), name, TIMING, coalesce_core::stream::StreamTable::default()).await.unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let svc = RaftPeerServer::new(PeerService::new(node.clone()));
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = rx.await;
                },
            )
            .await
            .unwrap();
    });
    (node, stop, server)
}

/// Every state-machine row of `store`'s shard as applied, in the bytes of a snapshot (what the
/// shard's view streams to a peer): two replicas with the same state give the same bytes.
pub fn state_bytes(store: &coalesce_storage::ShardStore) -> Vec<u8> {
    let mut view = store.open_view().unwrap();
    let mut bytes = Vec::new();
    while let Some(chunk) = view.next_chunk().unwrap() {
        bytes.extend(chunk);
    }
    bytes
}
