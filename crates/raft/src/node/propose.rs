//! Proposals: a command proposed on this node's group, or forwarded to the shard's leader
//! (rerouted when leadership moves), and the leader's admission of ingests (outbox and buffer
//! bounds, the rules stamped into the entry).

use std::collections::BTreeMap;
use std::time::Duration;

use coalesce_core::buffer::ShardBuffer;
use coalesce_core::hash::ShardId;
use coalesce_core::stream::{KeyOverflow, MAX_KEY_BYTES_LIMIT, OverflowPolicy};
use coalesce_proto::v1::RaftMessage;
use coalesce_proto::v1::raft_peer_client::RaftPeerClient;
use openraft::errors::{ClientWriteError, ForwardReason, RaftError};

use crate::codec;
use crate::types::{Command, IngestGroup, InvalidCommand, Response};
use coalesce_wire::peer::Forwarded;
use openraft::async_runtime::WatchReceiver;

use super::{Group, ProposeError, RaftNode};
use crate::protocol::{PROTOCOL, PROTOCOL_HEADER};

/// Resolves once `group`'s Raft on this node knows a leader other than `old` (possibly this
/// node). Never resolves while the group has no leader or still names `old`.
pub(super) async fn leader_moves(group: &Group, old: u64) {
    let mut metrics = group.raft.metrics();
    loop {
        // The borrow ends before the await (openraft issue 1238).
        let moved = metrics.borrow_watched().current_leader.is_some_and(|l| l != old);
        if moved || metrics.changed().await.is_err() {
            // A stopped group never reports again: let the forward run its course.
            if !moved {
                std::future::pending::<()>().await;
            }
            return;
        }
    }
}

/// How long a request forwarded to a shard's leader may take: twice the maximum election
/// timeout, within these bounds. A leader that does not answer by then is likely paused or cut
/// off, and a successor is being elected; the client retries (same seqs) and reaches it. (An
/// idempotent request goes to the successor as soon as this node learns of it.)
pub(super) const FORWARD_TIMEOUT_MIN: Duration = Duration::from_millis(500);
pub(super) const FORWARD_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// How many times one request follows a changing leader (see [`RaftNode::submit`]).
pub(super) const MAX_FORWARD_REROUTES: u32 = 3;

/// Set once a leader has written `key_overflow = "reject"` as `flush_early` because a replica
/// spoke an older protocol (logged once per process).
pub(super) static KEY_OVERFLOW_WAITS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl RaftNode {
    /// Proposes `cmd` to `shard`'s log and waits until it is committed and applied here.
    /// The command is validated first ([`Command::validate`]); an invalid one is refused and
    /// never reaches the log.
    pub async fn propose(&self, shard: ShardId, cmd: Command) -> Result<Response, ProposeError> {
        let group = self.live_group(shard)?;
        // Test-only (`skip_validation`): lets a test put an entry below validation into the
        // log, to prove that apply stops the group rather than the node.
        if !crate::failpoints::active("skip_validation")
            && let Err(error) = cmd.validate()
        {
            crate::metrics::INVALID_COMMANDS.with_label_values(&["propose"]).inc();
            return Err(ProposeError::Invalid { shard, error });
        }
        self.wake(&group).await;
        // A leader just elected has no quorum answer yet and openraft would refuse the write
        // (lease expired): wait for the first one instead (a request rerouted to a successor
        // arrives exactly then).
        if group.raft.is_leader() && self.leadership(shard).is_none() {
            self.await_lease(&group).await;
        }
        let (kind, started) = (cmd.kind(), std::time::Instant::now());
        let span = tracing::debug_span!("replicate", shard, command = kind);
        match tracing::Instrument::instrument(group.raft.client_write(cmd), span).await {
            Ok(r) => {
                crate::metrics::PROPOSE.with_label_values(&[kind]).observe(started.elapsed().as_secs_f64());
                Ok(r.data)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => match f.reason {
                ForwardReason::LeaseExpired => Err(ProposeError::LeaseExpired(shard)),
                _ => Err(ProposeError::NotLeader { shard, leader: f.leader_node }),
            },
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_))) => Err(ProposeError::Unknown(shard)),
            Err(e) => Err(ProposeError::Fatal { shard, detail: e.to_string() }),
        }
    }

    /// Applies producer groups to `shard`: proposed here when this node leads it, else
    /// forwarded once to the leader, which stamps and proposes them.
    pub async fn ingest(&self, shard: ShardId, groups: Vec<IngestGroup>) -> Result<Response, ProposeError> {
        self.submit(shard, Forwarded::Ingest(groups)).await
    }

    /// Records a consumer's progress on `shard` (through the leader).
    pub async fn ack(&self, shard: ShardId, cursor: String, upto_seq: u64) -> Result<Response, ProposeError> {
        self.submit(shard, Forwarded::Ack { cursor, upto_seq }).await
    }

    /// Removes dead letters of `sink` on `shard` (replayed or purged), through the leader.
    pub async fn dlq_remove(&self, shard: ShardId, sink: String, seqs: Vec<u64>) -> Result<Response, ProposeError> {
        self.submit(shard, Forwarded::DlqRemove { sink, seqs }).await
    }

    /// Forgets consumer `cursor` on `shard`, through the leader.
    pub async fn drop_cursor(&self, shard: ShardId, cursor: String) -> Result<Response, ProposeError> {
        self.submit(shard, Forwarded::DropCursor { cursor }).await
    }

    /// Checks what a peer forwarded as this node would check its own client's request
    /// ([`Forwarded::check_keys`]; streams, partials and names are checked with the entry in
    /// [`RaftNode::propose`]).
    pub(super) fn check_forwarded(&self, shard: ShardId, req: &Forwarded) -> Result<(), ProposeError> {
        let max_key_bytes = |stream: &str| self.streams.get(stream).map_or(MAX_KEY_BYTES_LIMIT, |d| d.max_key_bytes);
        req.check_keys(shard, self.spec.shards, max_key_bytes).map_err(|error| {
            crate::metrics::INVALID_COMMANDS.with_label_values(&["peer"]).inc();
            ProposeError::Invalid { shard, error }
        })
    }

    pub(super) async fn on_leader(&self, group: &Group, req: Forwarded) -> Result<Response, ProposeError> {
        match req {
            Forwarded::Ingest(groups) => self.ingest_as_leader(group, groups).await,
            Forwarded::Ack { cursor, upto_seq } => self.propose(group.shard, Command::Ack { cursor, upto_seq }).await,
            Forwarded::Retired => {
                crate::metrics::INVALID_COMMANDS.with_label_values(&["peer"]).inc();
                let error = InvalidCommand {
                    kind: "forward".into(),
                    field: "payload".into(),
                    reason: "whole commands are not forwarded; only ingest, ack and operator requests are".into(),
                };
                Err(ProposeError::Invalid { shard: group.shard, error })
            }
            Forwarded::DlqRemove { sink, seqs } => self.propose(group.shard, Command::DlqRemove { sink, seqs }).await,
            Forwarded::DropCursor { cursor } => self.propose(group.shard, Command::DropCursor { cursor }).await,
            Forwarded::SetPreferredLeader { node } => {
                let shard = group.shard;
                if let Some(n) = &node
                    && !self.spec.placement(shard).iter().any(|p| &p.name == n)
                {
                    return Err(ProposeError::NotReplica { shard, node: n.clone() });
                }
                self.propose(shard, Command::SetPreferredLeader { node }).await
            }
        }
    }

    pub(super) async fn submit(&self, shard: ShardId, req: Forwarded) -> Result<Response, ProposeError> {
        let group = self.live_group(shard)?;
        let mut reroutes = 0;
        loop {
            if group.raft.is_leader() {
                return self.on_leader(&group, req).await;
            }
            let (leader_id, leader) = self.leader_of(shard).ok_or(ProposeError::NotLeader { shard, leader: None })?;
            let payload =
                codec::encode_msg("forward", &req).map_err(|e| ProposeError::Fatal { shard, detail: e.to_string() })?;
            let channel = self
                .channels
                .for_peer(&leader)
                .map_err(|e| ProposeError::Unreachable { shard, detail: e.to_string() })?;
            let span = tracing::debug_span!("forward", shard, leader = %leader.name);
            // Bounded: a paused leader or one behind a partition must not hold the request for
            // long; the client gets UNAVAILABLE and retries elsewhere (with the same producer seqs).
            let mut request = tonic::Request::new(RaftMessage { group: shard, payload, target: leader_id });
            request.set_timeout((self.lease_max * 2).clamp(FORWARD_TIMEOUT_MIN, FORWARD_TIMEOUT_MAX));
            crate::tracectx::inject(&span, request.metadata_mut().as_mut());
            request.metadata_mut().insert(PROTOCOL_HEADER, PROTOCOL.into());
            let mut client = RaftPeerClient::new(channel);
            let forward = tracing::Instrument::instrument(client.forward(request), span);
            // A request that is safe to send twice goes to the successor as soon as this node
            // sees one, instead of waiting out the timeout on a leader that went silent.
            let reroute = reroutes < MAX_FORWARD_REROUTES && req.idempotent();
            let reply = tokio::select! {
                reply = forward => reply,
                () = leader_moves(&group, leader_id), if reroute => {
                    reroutes += 1;
                    crate::metrics::FORWARD_REROUTES.inc();
                    tracing::debug!(shard, from = %leader.name, "leader changed during a forward; sending it again");
                    continue;
                }
            };
            let reply = reply.map_err(|s| ProposeError::Unreachable {
                shard,
                detail: format!("{}: {}", leader.name, s.message()),
            })?;
            return codec::decode_msg::<Result<Response, ProposeError>>("forward reply", &reply.into_inner().payload)
                .map_err(|e| ProposeError::Unreachable { shard, detail: e.to_string() })?;
        }
    }

    /// Admission and proposal on the leader.
    pub(super) async fn ingest_as_leader(
        &self,
        group: &Group,
        groups: Vec<IngestGroup>,
    ) -> Result<Response, ProposeError> {
        let shard = group.shard;
        let mut rules = BTreeMap::new();
        let fatal = |e: coalesce_storage::StorageError| ProposeError::Fatal { shard, detail: e.to_string() };
        // A consumer that stays behind bounds the outbox: refuse input, loudly, rather than
        // grow it without limit.
        let outbox = group.reader().outbox().map_err(fatal)?;
        let kept = outbox.next_seq.saturating_sub(outbox.low);
        let max = self.streams.outbox().max_outputs;
        // (Without any consumer nothing waits on the outbox, and nothing is refused.)
        if kept > max
            && let Some((lagging, _)) = outbox.cursors.iter().min_by_key(|(_, acked)| **acked)
        {
            let lagging = lagging.clone();
            return Err(ProposeError::OutboxFull { shard, kept, max, lagging, retry_after_ms: 1_000 });
        } // Keys of `reject` streams may be refused when the buffer is full. First assume every
        // one is new: if even that fits, no key needs looking up (the common case).
        let mut gated = Vec::new();
        for (key, partial) in groups.iter().flat_map(|g| g.partials.iter()) {
            let def = self
                .streams
                .get(&key.stream)
                .ok_or_else(|| ProposeError::UnknownStream { shard, stream: key.stream.clone() })?;

            if def.rules.overflow == OverflowPolicy::Reject {
                gated.push((key, ShardBuffer::new_key_bytes(key, partial)));
            }
            rules.entry(key.stream.clone()).or_insert_with(|| {
                let mut r = def.rules.clone();
                if let Some(d) = self.adaptive_decision(shard, &key.stream) {
                    r.window = r.window.with_extra_ms(d.extra_ms);
                }
                if r.key_overflow != KeyOverflow::FlushEarly && !self.members_speak(shard, 4) {
                    // Replicas of protocol 3 or older could not read the rule: until they are
                    // upgraded the stream flushes early, as those builds do.
                    r.key_overflow = KeyOverflow::FlushEarly;
                    if !KEY_OVERFLOW_WAITS.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            shard,
                            stream = %key.stream,
                            "key_overflow = \"reject\" waits until every replica runs peer protocol 4; until then \
                             keys that outgrow window.max_bytes close early (docs/upgrades.md)"
                        );
                    }
                }
                r
            });
        }
        if !gated.is_empty() {
            let stats = group.reader().stats().map_err(fatal)?;
            let limits = self.streams.limits();
            let all_new_bytes = gated.iter().map(|(_, b)| b).sum();
            if ShardBuffer::admit(&stats, &limits, gated.len() as u64, all_new_bytes, 0).is_err() {
                let reader = group.reader();
                let (mut new_keys, mut new_bytes) = (0u64, 0u64);
                for (key, bytes) in &gated {
                    if reader.buffered(key).map_err(fatal)?.is_none() {
                        new_keys += 1;
                        new_bytes += bytes;
                    }
                }
                if let Err(e) = ShardBuffer::admit(&stats, &limits, new_keys, new_bytes, 0) {
                    let what = match &e {
                        coalesce_core::EventError::BufferFull { what, .. } => (*what).to_owned(),
                        other => other.to_string(),
                    };
                    // Room comes back when the earliest window closes.
                    let now = self.clock.now();
                    let next = reader.next_deadline().ok().flatten().unwrap_or(now);
                    let retry_after_ms = next.saturating_sub(now).clamp(100, 5_000);
                    return Err(ProposeError::BufferFull { shard, what, retry_after_ms });
                }
            }
        }
        self.observe_hot(shard, &groups);
        let cmd = Command::Ingest { stamp: self.clock.now(), rules, limits: self.streams.limits(), groups };
        self.propose(shard, cmd).await
    }
}
