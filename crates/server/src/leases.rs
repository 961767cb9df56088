//! Leader leases in the shape of Kubernetes `coordination.k8s.io/v1` Leases. Raft is the
//! authority; a Lease mirrors it: holder = the leader's node name, leaseTransitions = the Raft
//! term, renewTime + leaseDurationSeconds = the instant this leader's lease runs out (its last
//! quorum acknowledgement plus the minimum election timeout, before which no other replica can
//! be elected — the same bound delivery fences on), and acquireTime = its first quorum
//! acknowledgement in this term (observed every 100 ms) plus that lease: the Lease is
//! published from then on, not before.
//!
//! Kubernetes counts a Lease valid until renewTime + leaseDurationSeconds, in whole seconds,
//! while a Raft lease lasts a few hundred milliseconds. So leaseDurationSeconds is that lease
//! rounded up and renewTime is set back by the difference: it can read earlier than
//! acquireTime. Publishing the acknowledgement itself as renewTime would show a paused or cut
//! off leader's Lease as valid for up to a second after its successor's acquireTime; and a
//! leader that hands leadership over (balancing, drain, SIGTERM) stops leading with its lease
//! still running, its successor elected at once. A previous holder's last acknowledgement
//! precedes its successor's first, so with these times, by Kubernetes rules, no two Leases of
//! one shard (each node publishes the shards it leads) are ever valid at the same instant, on
//! one clock; across hosts, clock skew adds to the bound. The price: a new leader's Lease
//! shows up one lease (a few hundred milliseconds) after it starts leading.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use coalesce_core::output::Epoch;
use coalesce_proto::v1 as pb;
use coalesce_raft::RaftNode;

/// The API version and kind of a Kubernetes Lease.
pub const API_VERSION: &str = "coordination.k8s.io/v1";
pub const KIND: &str = "Lease";

/// When this node became leader of each shard it leads (per epoch).
#[derive(Debug)]
pub struct LeaseBook {
    node: Arc<RaftNode>,
    acquired: Mutex<BTreeMap<u32, (Epoch, SystemTime)>>,
}

/// RFC 3339 with microseconds, as Kubernetes writes `MicroTime`.
fn micro_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The Lease name of `shard` in `cluster`.
pub fn lease_name(cluster: &str, shard: u32) -> String {
    format!("{cluster}-shard-{shard}")
}

impl LeaseBook {
    pub fn new(node: Arc<RaftNode>) -> Arc<Self> {
        Arc::new(Self { node, acquired: Mutex::new(BTreeMap::new()) })
    }

    /// Notes which shards this node leads now, and since when.
    pub fn observe(&self) {
        let now = SystemTime::now();
        let mut acquired = self.acquired.lock().unwrap_or_else(|p| p.into_inner());
        for g in self.node.groups() {
            match self.node.leadership(g.shard) {
                Some(l) => {
                    if acquired.get(&g.shard).is_none_or(|(e, _)| *e != l.epoch) {
                        // The first quorum acknowledgement seen: at or shortly after the election.
                        acquired.insert(g.shard, (l.epoch, now - l.quorum_acked_ago));
                        crate::metrics::LEADER_CHANGES.with_label_values(&["acquired"]).inc();
                    }
                }
                None => {
                    if acquired.remove(&g.shard).is_some() {
                        crate::metrics::LEADER_CHANGES.with_label_values(&["lost"]).inc();
                    }
                }
            }
        }
    }

    /// Observes every `period` until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, period: Duration, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => self.observe(),
            }
        }
    }

    /// The Leases of the shards this node leads.
    pub fn leases(&self) -> Vec<pb::Lease> {
        self.observe();
        let now = SystemTime::now();
        let spec = self.node.spec();
        let lease = self.node.lease();
        let duration = lease.as_millis().div_ceil(1000).max(1) as u64;
        let acquired = self.acquired.lock().unwrap_or_else(|p| p.into_inner()).clone();
        acquired
            .into_iter()
            .filter_map(|(shard, (epoch, since))| {
                let l = self.node.leadership(shard).filter(|l| l.epoch == epoch)?;
                // Not before the previous holder's lease has surely run out.
                let valid_from = since + lease;
                if now < valid_from {
                    return None;
                }
                let labels = [
                    ("app.kubernetes.io/name".to_owned(), "coalesce".to_owned()),
                    ("coalesce.io/cluster".to_owned(), spec.cluster.clone()),
                    ("coalesce.io/shard".to_owned(), shard.to_string()),
                ]
                .into();
                Some(pb::Lease {
                    api_version: API_VERSION.into(),
                    kind: KIND.into(),
                    metadata: Some(pb::ObjectMeta {
                        name: lease_name(&spec.cluster, shard),
                        namespace: String::new(),
                        labels,
                    }),
                    spec: Some(pb::LeaseSpec {
                        holder_identity: self.node.me().name.clone(),
                        lease_duration_seconds: i32::try_from(duration).unwrap_or(i32::MAX),
                        acquire_time: micro_time(valid_from),
                        renew_time: micro_time(now - l.quorum_acked_ago + lease - Duration::from_secs(duration)),
                        lease_transitions: i32::try_from(epoch.term).unwrap_or(i32::MAX),
                    }),
                })
            })
            .collect()
    }
}
