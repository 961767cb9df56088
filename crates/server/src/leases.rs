//! Leader leases in the shape of Kubernetes `coordination.k8s.io/v1` Leases. Raft is the
//! authority; a Lease mirrors it: holder = the leader's node name, renewTime = when a quorum
//! last acknowledged the leader, acquireTime = the first quorum acknowledgement this node saw
//! as leader of the current term (observed every 100 ms), leaseTransitions = the Raft term, leaseDurationSeconds = the maximum election
//! timeout (how long followers wait before they may elect someone else), rounded up.

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
        let duration = self.node.lease_duration().as_millis().div_ceil(1000).max(1) as i32;
        let acquired = self.acquired.lock().unwrap_or_else(|p| p.into_inner()).clone();
        acquired
            .into_iter()
            .filter_map(|(shard, (epoch, since))| {
                let l = self.node.leadership(shard).filter(|l| l.epoch == epoch)?;
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
                        lease_duration_seconds: duration,
                        acquire_time: micro_time(since),
                        // The quorum ack that confirmed leadership may predate noticing it.
                        renew_time: micro_time((now - l.quorum_acked_ago).max(since)),
                        lease_transitions: i32::try_from(epoch.term).unwrap_or(i32::MAX),
                    }),
                })
            })
            .collect()
    }
}
