//! Shard Leases in Kubernetes (kube + k8s-openapi): while this node leads shard n, it keeps the
//! `coordination.k8s.io/v1` Lease `<cluster>-shard-<n>` in its namespace — holderIdentity = the
//! node (pod) name, acquireTime when it took the Lease over, renewTime refreshed every
//! `renew_interval`, leaseTransitions incremented on each change of holder.
//!
//! **Raft is the authority; the Lease is a publication.** Nothing in Coalesce reads a Lease to
//! decide who leads: a node writes a shard's Lease only while Raft says it leads that shard
//! (checked before every write), and losing a write changes nothing but the publication. An
//! unreachable or slow API server never stops ingest or delivery: writes run in their own task,
//! each bounded by `request_timeout`; failures are logged once per shard and counted in
//! `coalesce_k8s_lease_write_failures_total{reason}`.
//!
//! Writes use optimistic concurrency: a Lease is replaced (PUT) with the `resourceVersion` last
//! read or written; a 409 Conflict means someone else wrote it — re-read and try once more. A
//! shard newly led is written at once (the new leader shows within about one scheduler tick of
//! its election); a Lease that failed to write is retried after `renew_interval`.
//!
//! `leaseDurationSeconds` is `max(Raft lease, 3 × renew_interval)`: readers treating a Lease
//! whose renewTime is older than that as expired never see a live leader's Lease expire between
//! renewals. A dead leader's Lease is overwritten by the next leader's first write (about a
//! second after the failure), long before it expires.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use coalesce_core::output::Epoch;
use coalesce_raft::RaftNode;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use serde::Deserialize;

use crate::leases::lease_name;
use crate::metrics::LEASE_WRITE_FAILURES;

/// `[kubernetes]` in the node config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Publish shard Leases: `true`, `false`, or unset = when running in a pod
    /// (`KUBERNETES_SERVICE_HOST` is set).
    #[serde(default)]
    pub leases: Option<bool>,
    /// The namespace of the Leases; default `COALESCE_K8S_NAMESPACE`, else the pod's own
    /// (from its service account), else the kubeconfig's.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(with = "humantime_serde", default = "default_renew")]
    pub renew_interval: Duration,
    /// Bound on each API request.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub request_timeout: Duration,
}

fn default_renew() -> Duration {
    Duration::from_secs(2)
}
fn default_timeout() -> Duration {
    Duration::from_secs(3)
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self { leases: None, namespace: None, renew_interval: default_renew(), request_timeout: default_timeout() }
    }
}

impl KubernetesConfig {
    /// Whether Leases are published: as configured, else when running in a pod.
    pub fn enabled(&self) -> bool {
        self.leases.unwrap_or_else(|| std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.renew_interval < Duration::from_millis(100) {
            return Err(format!("kubernetes.renew_interval must be at least 100ms, got {:?}", self.renew_interval));
        }
        if self.request_timeout.is_zero() {
            return Err("kubernetes.request_timeout must be positive".into());
        }
        Ok(())
    }

    /// A client from the environment (in-cluster service account, or `KUBECONFIG`), and the
    /// namespace to write in.
    pub async fn client(&self) -> anyhow::Result<(kube::Client, String)> {
        let client = kube::Client::try_default().await?;
        let namespace = self
            .namespace
            .clone()
            .or_else(|| std::env::var("COALESCE_K8S_NAMESPACE").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Ok((client, namespace))
    }
}

/// Why a Lease write failed (the metric's `reason`).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else kept writing the Lease (409 twice in a row).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The API server answered with an error (RBAC, validation, ...).
    #[error("rejected: {0}")]
    Rejected(String),
    /// No answer: connection refused, TLS, timeout.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The Lease does not exist (deleted under us): create it again.
    #[error("not found: {0}")]
    NotFound(String),
}

impl LeaseError {
    fn reason(&self) -> &'static str {
        match self {
            LeaseError::Conflict(_) => "conflict",
            LeaseError::Rejected(_) | LeaseError::NotFound(_) => "rejected",
            LeaseError::Unreachable(_) => "unreachable",
        }
    }

    fn from_kube(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 409 => LeaseError::Conflict(s.message.clone()),
            kube::Error::Api(s) if s.code == 404 => LeaseError::NotFound(s.message.clone()),
            kube::Error::Api(s) => LeaseError::Rejected(format!("{} {}", s.code, s.message)),
            other => LeaseError::Unreachable(other.to_string()),
        }
    }
}

/// What this node last published for a shard it leads.
#[derive(Debug, Clone)]
struct Published {
    /// The Raft leadership the Lease publishes.
    epoch: Epoch,
    /// The object as last read or written (its resourceVersion), if any.
    lease: Option<Lease>,
    /// When it was last written successfully.
    written: Option<Instant>,
    /// When the last attempt failed (retried after `renew_interval`).
    failed: Option<Instant>,
}

/// Keeps the Leases of the shards this node leads.
pub struct LeasePublisher {
    api: Api<Lease>,
    cluster: String,
    holder: String,
    duration_secs: i32,
    renew: Duration,
    timeout: Duration,
    state: Mutex<BTreeMap<u32, Published>>,
}

impl std::fmt::Debug for LeasePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasePublisher").field("cluster", &self.cluster).field("holder", &self.holder).finish()
    }
}

fn micro_time(t: SystemTime) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(MicroTime)
}

impl LeasePublisher {
    /// A publisher writing as `holder` through `client` in `namespace`. `raft_lease` is how long
    /// a quorum acknowledgement keeps a leader valid (see [`RaftNode::lease_duration`]).
    pub fn new(
        client: kube::Client,
        namespace: &str,
        cluster: &str,
        holder: &str,
        raft_lease: Duration,
        config: &KubernetesConfig,
    ) -> Self {
        let duration = raft_lease.max(config.renew_interval * 3);
        Self {
            api: Api::namespaced(client, namespace),
            cluster: cluster.to_owned(),
            holder: holder.to_owned(),
            duration_secs: i32::try_from(duration.as_millis().div_ceil(1000)).unwrap_or(i32::MAX).max(1),
            renew: config.renew_interval,
            timeout: config.request_timeout,
            state: Mutex::new(BTreeMap::new()),
        }
    }

    async fn call<T>(&self, f: impl Future<Output = Result<T, kube::Error>>) -> Result<T, LeaseError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(LeaseError::from_kube),
            Err(_) => Err(LeaseError::Unreachable(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// The Lease this node writes for `shard` when it has none to replace.
    fn fresh(&self, shard: u32, now: SystemTime) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(&self.cluster, shard)),
                labels: Some(
                    [
                        ("app.kubernetes.io/name".to_owned(), "coalesce".to_owned()),
                        ("coalesce.io/cluster".to_owned(), self.cluster.clone()),
                        ("coalesce.io/shard".to_owned(), shard.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.holder.clone()),
                lease_duration_seconds: Some(self.duration_secs),
                acquire_time: micro_time(now),
                renew_time: micro_time(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        }
    }

    /// `current` renewed by this node, or taken over from another holder.
    fn renewed(&self, current: &Lease, now: SystemTime) -> Lease {
        let mut next = current.clone();
        let spec = next.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            spec.holder_identity = Some(self.holder.clone());
            spec.acquire_time = micro_time(now);
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.renew_time = micro_time(now);
        spec.lease_duration_seconds = Some(self.duration_secs);
        next
    }

    /// Writes `shard`'s Lease once (creating it, taking it over or renewing it), re-reading
    /// once after a conflict. `still_leads` is asked before every write.
    pub async fn write(
        &self,
        shard: u32,
        still_leads: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Lease>, LeaseError> {
        let name = lease_name(&self.cluster, shard);
        let cached = self.state.lock().unwrap_or_else(|p| p.into_inner()).get(&shard).and_then(|p| p.lease.clone());
        let mut current = match cached {
            Some(l) => Some(l),
            None => self.call(self.api.get_opt(&name)).await?,
        };
        let pp = PostParams { field_manager: Some("coalesce".into()), ..Default::default() };
        for attempt in 0..2 {
            if !still_leads() {
                return Ok(None);
            }
            let now = SystemTime::now();
            let result = match &current {
                None => self.call(self.api.create(&pp, &self.fresh(shard, now))).await,
                Some(l) => self.call(self.api.replace(&name, &pp, &self.renewed(l, now))).await,
            };
            match result {
                Ok(written) => return Ok(Some(written)),
                // Written by someone else since we read it (or created meanwhile): re-read.
                Err(LeaseError::Conflict(_)) if attempt == 0 => {
                    current = self.call(self.api.get_opt(&name)).await?;
                }
                // Deleted under us: create it again.
                Err(LeaseError::NotFound(_)) if attempt == 0 => current = None,
                Err(e) => return Err(e),
            }
        }
        Err(LeaseError::Conflict(format!("{name} changed again while being written")))
    }

    /// One round: writes the Leases of led shards that are new or due for renewal; forgets
    /// shards no longer led. `led` maps shard → the epoch this node leads it in.
    pub async fn round(&self, led: &BTreeMap<u32, Epoch>, leads: &(dyn Fn(u32, Epoch) -> bool + Sync)) {
        let now = Instant::now();
        let due: Vec<(u32, Epoch)> = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.retain(|shard, _| led.contains_key(shard));
            led.iter()
                .filter(|(shard, epoch)| match state.get(shard) {
                    None => true,
                    Some(p) if p.epoch != **epoch => true,
                    Some(p) => match (p.failed, p.written) {
                        (Some(f), _) => now.duration_since(f) >= self.renew,
                        (None, Some(w)) => now.duration_since(w) >= self.renew,
                        (None, None) => true,
                    },
                })
                .map(|(s, e)| (*s, *e))
                .collect()
        };
        let writes = due.iter().map(|&(shard, epoch)| async move {
            let result = self.write(shard, &|| leads(shard, epoch)).await;
            (shard, epoch, result)
        });
        for (shard, epoch, result) in futures::future::join_all(writes).await {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let entry = state.entry(shard).or_insert(Published { epoch, lease: None, written: None, failed: None });
            if entry.epoch != epoch {
                *entry = Published { epoch, lease: entry.lease.take(), written: None, failed: None };
            }
            match result {
                Ok(Some(lease)) => {
                    if entry.failed.is_some() {
                        tracing::info!(shard, "Lease written again");
                    }
                    entry.lease = Some(lease);
                    entry.written = Some(Instant::now());
                    entry.failed = None;
                }
                Ok(None) => {}
                Err(e) => {
                    LEASE_WRITE_FAILURES.with_label_values(&[e.reason()]).inc();
                    if entry.failed.is_none() {
                        tracing::warn!(shard, error = %e, "cannot write the shard's Lease (Raft leadership is unaffected)");
                    }
                    // Re-read before the next attempt: the cached version may be the problem.
                    entry.lease = None;
                    entry.failed = Some(Instant::now());
                }
            }
        }
    }

    /// Publishes `node`'s leaderships every `tick` until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, node: Arc<RaftNode>, tick: Duration, shutdown: impl Future<Output = ()>) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let leads = |shard: u32, epoch: Epoch| node.leadership(shard).is_some_and(|l| l.epoch == epoch);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = interval.tick() => {}
            }
            let led: BTreeMap<u32, Epoch> =
                node.groups().iter().filter_map(|g| node.leadership(g.shard).map(|l| (g.shard, l.epoch))).collect();
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.round(&led, &leads) => {}
            }
        }
    }

    /// Shards whose Lease this node has written in its current leadership.
    pub fn published(&self) -> BTreeSet<u32> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.iter().filter(|(_, p)| p.written.is_some() && p.failed.is_none()).map(|(s, _)| *s).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::k8s_fake::{FakeApiServer, Fault};

    const NS: &str = "prod";

    fn publisher(fake: &FakeApiServer, holder: &str) -> LeasePublisher {
        let config = KubernetesConfig {
            renew_interval: Duration::from_millis(200),
            request_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        LeasePublisher::new(fake.client(NS), NS, "orders", holder, Duration::from_secs(1), &config)
    }

    fn epoch(term: u64) -> Epoch {
        Epoch { term, node: 1 }
    }

    fn led(shards: &[(u32, u64)]) -> BTreeMap<u32, Epoch> {
        shards.iter().map(|(s, t)| (*s, epoch(*t))).collect()
    }

    fn always(_: u32, _: Epoch) -> bool {
        true
    }

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/prod/leases";

    #[tokio::test]
    async fn acquire_renew_and_hand_over() {
        let fake = FakeApiServer::new();
        let a = publisher(&fake, "coalesce-0");
        // Acquire: the Lease does not exist yet → GET 404, POST.
        a.round(&led(&[(3, 1)]), &always).await;
        assert_eq!(
            fake.take_log(),
            vec![format!("GET {PATH}/orders-shard-3 -> 404"), format!("POST {PATH} -> 201 rv=1")]
        );
        let l = fake.lease(NS, "orders-shard-3").unwrap();
        let spec = l.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("coalesce-0"));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(1), "max(1 s Raft lease, 3 x 200 ms) rounded up");
        assert_eq!(spec.acquire_time, spec.renew_time);
        assert_eq!(l.metadata.labels.unwrap()["coalesce.io/shard"], "3");

        // Not due yet: nothing is written.
        a.round(&led(&[(3, 1)]), &always).await;
        assert!(fake.take_log().is_empty());
        // Due: renewed with the resourceVersion it wrote, no re-read.
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.round(&led(&[(3, 1)]), &always).await;
        assert_eq!(fake.take_log(), vec![format!("PUT {PATH}/orders-shard-3 rv=1 -> 200 rv=2")]);
        let renewed = fake.lease(NS, "orders-shard-3").unwrap().spec.unwrap();
        assert_eq!(renewed.acquire_time, spec.acquire_time, "acquireTime stays while the holder does");
        assert!(renewed.renew_time > spec.renew_time);
        assert_eq!(renewed.lease_transitions, Some(0));

        // Hand-over: another node becomes leader (term 2) and takes the Lease over.
        let b = publisher(&fake, "coalesce-1");
        b.round(&led(&[(3, 2)]), &always).await;
        assert_eq!(
            fake.take_log(),
            vec![
                format!("GET {PATH}/orders-shard-3 -> 200 rv=2"),
                format!("PUT {PATH}/orders-shard-3 rv=2 -> 200 rv=3")
            ]
        );
        let taken = fake.lease(NS, "orders-shard-3").unwrap().spec.unwrap();
        assert_eq!(taken.holder_identity.as_deref(), Some("coalesce-1"));
        assert_eq!(taken.lease_transitions, Some(1));
        assert!(taken.acquire_time > spec.acquire_time);

        // The old leader no longer leads: it forgets the shard and writes nothing.
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.round(&led(&[]), &always).await;
        assert!(fake.take_log().is_empty());
        assert!(a.published().is_empty());
    }

    #[tokio::test]
    async fn a_stale_writer_rereads_on_conflict_and_never_writes_without_leadership() {
        let fake = FakeApiServer::new();
        let a = publisher(&fake, "coalesce-0");
        a.round(&led(&[(0, 1)]), &always).await;
        let b = publisher(&fake, "coalesce-1");
        b.round(&led(&[(0, 2)]), &always).await;
        fake.take_log();
        // `a` still believes it leads (its cache holds rv=1): its PUT conflicts, it re-reads
        // and — still leader by the check it is given — retries with the new version.
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.round(&led(&[(0, 1)]), &always).await;
        assert_eq!(
            fake.take_log(),
            vec![
                format!("PUT {PATH}/orders-shard-0 rv=1 -> 409"),
                format!("GET {PATH}/orders-shard-0 -> 200 rv=2"),
                format!("PUT {PATH}/orders-shard-0 rv=2 -> 200 rv=3"),
            ]
        );
        // When Raft says it lost the shard, the re-read is the last request: no write.
        tokio::time::sleep(Duration::from_millis(250)).await;
        b.round(&led(&[(0, 2)]), &|_, _| false).await;
        assert_eq!(fake.take_log(), Vec::<String>::new(), "nothing written without leadership");
        let lost = std::sync::atomic::AtomicBool::new(false);
        let leads_once = |_: u32, _: Epoch| !lost.swap(true, std::sync::atomic::Ordering::SeqCst);
        b.round(&led(&[(0, 2)]), &leads_once).await;
        assert_eq!(
            fake.take_log(),
            vec![format!("PUT {PATH}/orders-shard-0 rv=2 -> 409"), format!("GET {PATH}/orders-shard-0 -> 200 rv=3")]
        );
        assert_eq!(
            fake.lease(NS, "orders-shard-0").unwrap().spec.unwrap().holder_identity.as_deref(),
            Some("coalesce-0")
        );
    }

    #[tokio::test]
    async fn api_server_outage_is_counted_and_retried_after_the_renew_interval() {
        let fake = FakeApiServer::new();
        let a = publisher(&fake, "coalesce-0");
        let unreachable = || LEASE_WRITE_FAILURES.with_label_values(&["unreachable"]).get();
        let rejected = || LEASE_WRITE_FAILURES.with_label_values(&["rejected"]).get();
        let (u0, r0) = (unreachable(), rejected());

        // Slow: no answer within the request timeout.
        fake.set_fault(Some(Fault::Delay(Duration::from_secs(5))));
        let started = Instant::now();
        a.round(&led(&[(1, 1)]), &always).await;
        assert!(started.elapsed() < Duration::from_secs(2), "bounded by request_timeout: {:?}", started.elapsed());
        assert!(unreachable() > u0);
        // Failing: 503 answers are the API server's refusals.
        fake.set_fault(Some(Fault::Status(503)));
        tokio::time::sleep(Duration::from_millis(250)).await;
        fake.take_log();
        a.round(&led(&[(1, 1)]), &always).await;
        assert_eq!(fake.take_log(), vec![format!("GET {PATH}/orders-shard-1 -> 503")]);
        assert!(rejected() > r0);
        // Not retried before renew_interval…
        a.round(&led(&[(1, 1)]), &always).await;
        assert!(fake.take_log().is_empty());
        assert!(a.published().is_empty());
        // …and written once the API server is back.
        fake.set_fault(None);
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.round(&led(&[(1, 1)]), &always).await;
        assert_eq!(
            fake.take_log(),
            vec![format!("GET {PATH}/orders-shard-1 -> 404"), format!("POST {PATH} -> 201 rv=1")]
        );
        assert_eq!(a.published(), BTreeSet::from([1]));
    }
}
