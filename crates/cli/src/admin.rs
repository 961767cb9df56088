//! `coalescectl leases | shards | streams | hot-keys | transfer-leader | drain`: the operator API.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use coalesce_cli::outln;
use coalesce_proto::v1 as pb;
use serde_json::json;

use crate::dlq::admin;

/// The nodes of the cluster, from the node at `addr`.
async fn nodes(addr: &str) -> anyhow::Result<Vec<pb::NodeInfo>> {
    let st =
        crate::connect(addr).await?.status(pb::StatusRequest {}).await.with_context(|| format!("asking {addr}"))?;
    Ok(st.into_inner().nodes)
}

/// How long until a Lease expires by Kubernetes rules (renewTime + leaseDurationSeconds):
/// "0.4s", or "expired".
fn expires_in(renew_time: &str, duration_secs: i32) -> String {
    let Ok(renewed) = humantime::parse_rfc3339(renew_time) else { return "-".into() };
    let expires = renewed + Duration::from_secs(u64::try_from(duration_secs).unwrap_or(0));
    match expires.duration_since(SystemTime::now()) {
        Ok(d) => format!("{:.1}s", d.as_secs_f64()),
        Err(_) => "expired".into(),
    }
}

/// "3.2s", "41m" — how long ago an RFC 3339 time was.
fn ago(rfc3339: &str) -> String {
    match humantime::parse_rfc3339(rfc3339).ok().and_then(|t| SystemTime::now().duration_since(t).ok()) {
        Some(d) if d < Duration::from_secs(10) => format!("{:.1}s", d.as_secs_f64()),
        Some(d) => humantime::format_duration(Duration::from_secs(d.as_secs())).to_string().replace(' ', ""),
        None => "-".into(),
    }
}

/// `coalescectl leases`: every shard's leader lease, asked of every node.
pub(crate) async fn leases(addr: &str, as_json: bool) -> anyhow::Result<()> {
    let mut by_name: BTreeMap<String, pb::Lease> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for n in nodes(addr).await? {
        match admin(&n.client_addr)?.leases(pb::LeasesRequest {}).await {
            Ok(r) => {
                for l in r.into_inner().leases {
                    let name = l.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
                    let term = |l: &pb::Lease| l.spec.as_ref().map_or(0, |s| s.lease_transitions);
                    // During a hand-over two nodes may both claim a shard: the newer term wins.
                    if by_name.get(&name).is_none_or(|old| term(old) < term(&l)) {
                        by_name.insert(name, l);
                    }
                }
            }
            Err(e) => unreachable.push(format!("{} ({})", n.name, e.message())),
        }
    }
    // Shard order, not name order.
    let mut leases: Vec<pb::Lease> = by_name.into_values().collect();
    let shard = |l: &pb::Lease| {
        l.metadata.as_ref().and_then(|m| m.labels.get("coalesce.io/shard")).and_then(|s| s.parse::<u32>().ok())
    };
    leases.sort_by_key(|l| shard(l));
    if as_json {
        let items: Vec<serde_json::Value> = leases
            .iter()
            .map(|l| {
                let (m, s) = (l.metadata.clone().unwrap_or_default(), l.spec.clone().unwrap_or_default());
                json!({
                    "apiVersion": l.api_version, "kind": l.kind,
                    "metadata": { "name": m.name, "labels": m.labels },
                    "spec": {
                        "holderIdentity": s.holder_identity, "leaseDurationSeconds": s.lease_duration_seconds,
                        "acquireTime": s.acquire_time, "renewTime": s.renew_time,
                        "leaseTransitions": s.lease_transitions,
                    },
                })
            })
            .collect();
        outln!("{}", json!({ "apiVersion": "v1", "kind": "List", "items": items }));
    } else {
        outln!("{:<28} {:<16} {:>11} {:>9} {:>9}", "NAME", "HOLDER", "TRANSITIONS", "ACQUIRED", "EXPIRES");
        for l in &leases {
            let (m, s) = (l.metadata.clone().unwrap_or_default(), l.spec.clone().unwrap_or_default());
            outln!(
                "{:<28} {:<16} {:>11} {:>9} {:>9}",
                m.name,
                s.holder_identity,
                s.lease_transitions,
                ago(&s.acquire_time),
                expires_in(&s.renew_time, s.lease_duration_seconds)
            );
        }
    }
    if !unreachable.is_empty() {
        eprintln!("not reachable: {}", unreachable.join(", "));
    }
    Ok(())
}

/// `coalescectl shards`: the shards a node replicates, in detail.
pub(crate) async fn shards(addr: &str, as_json: bool) -> anyhow::Result<()> {
    let r = admin(addr)?.shards(pb::ShardsRequest {}).await.with_context(|| format!("asking {addr}"))?.into_inner();
    if as_json {
        for s in &r.shards {
            let replicas: Vec<_> = s
                .replicas
                .iter()
                .map(|p| json!({ "name": p.name, "node_id": p.node_id, "voter": p.voter, "matched": p.matched, "lag": p.lag }))
                .collect();
            let adaptive: Vec<_> = s
                .adaptive
                .iter()
                .map(|a| json!({ "stream": a.stream, "extra_ms": a.extra_ms, "reason": a.reason, "cause": a.cause }))
                .collect();
            outln!(
                "{}",
                json!({
                    "node": r.node, "shard": s.shard, "role": s.role, "leader": s.leader, "term": s.term,
                    "last_log_index": s.last_log_index, "committed": s.committed, "last_applied": s.last_applied,
                    "apply_lag": s.apply_lag, "replicas": replicas, "buffered_keys": s.buffered_keys,
                    "buffered_bytes": s.buffered_bytes, "next_seq": s.next_seq, "outbox_low": s.outbox_low,
                    "cursors": s.cursors, "preferred_leader": s.preferred_leader, "lease_valid": s.lease_valid,
                    "quiesced": s.quiesced, "adaptive": adaptive,
                })
            );
        }
        return Ok(());
    }
    outln!("node {}{}", r.node, if r.draining { " (draining)" } else { "" });
    outln!(
        "{:>5} {:<9} {:<14} {:>5} {:>9} {:>9} {:>6} {:>9} {:>9} {:>8}  REPLICATION LAG",
        "SHARD",
        "ROLE",
        "LEADER",
        "TERM",
        "COMMITTED",
        "APPLIED",
        "A-LAG",
        "KEYS",
        "NEXT-SEQ",
        "OUTBOX"
    );
    for s in &r.shards {
        let lag: Vec<String> = s
            .replicas
            .iter()
            .filter(|p| s.role == "leader" && p.name != r.node)
            .map(|p| format!("{}:{}", p.name, p.lag))
            .collect();
        let leader = if s.preferred_leader.is_empty() { s.leader.clone() } else { format!("{}*", s.leader) };
        outln!(
            "{:>5} {:<9} {:<14} {:>5} {:>9} {:>9} {:>6} {:>9} {:>9} {:>8}  {}",
            s.shard,
            if s.quiesced { format!("{}~", s.role) } else { s.role.clone() },
            leader,
            s.term,
            s.committed,
            s.last_applied,
            s.apply_lag,
            s.buffered_keys,
            s.next_seq,
            s.next_seq.saturating_sub(s.outbox_low),
            lag.join(" ")
        );
    }
    outln!(
        "(* leader chosen with transfer-leader; ~ quiesced: idle, no heartbeats; OUTBOX = outputs kept for unacked consumers)"
    );
    let adaptive: Vec<_> = r.shards.iter().flat_map(|s| s.adaptive.iter().map(move |a| (s.shard, a))).collect();
    if !adaptive.is_empty() {
        outln!("\n{:>5} {:<20} {:>10}  DECISION", "SHARD", "ADAPTIVE STREAM", "STRETCH");
        for (shard, a) in adaptive {
            let why = if a.cause.is_empty() { a.reason.clone() } else { format!("{} ({})", a.reason, a.cause) };
            outln!("{shard:>5} {:<20} {:>10}  {why}", a.stream, format!("+{} ms", a.extra_ms));
        }
    }
    Ok(())
}

/// `coalescectl streams`.
pub(crate) async fn streams(addr: &str) -> anyhow::Result<()> {
    let r = admin(addr)?.streams(pb::StreamsRequest {}).await.with_context(|| format!("asking {addr}"))?.into_inner();
    outln!("{:<20} {:<18} {:<36} {:<12} {:<12} SINKS", "STREAM", "MERGE", "WINDOW", "OVERFLOW", "KEY-OVERFLOW");
    for s in r.streams {
        let key_overflow = if s.key_overflow.is_empty() { "-" } else { &s.key_overflow };
        outln!(
            "{:<20} {:<18} {:<36} {:<12} {:<12} {}",
            s.name,
            s.merge,
            s.window,
            s.overflow,
            key_overflow,
            s.sinks.join(",")
        );
    }
    Ok(())
}

/// `coalescectl transfer-leader`.
pub(crate) async fn transfer_leader(addr: &str, shard: u32, to: Option<String>) -> anyhow::Result<()> {
    let reset = to.is_none();
    let req = pb::TransferLeaderRequest { shard, to: to.clone().unwrap_or_default(), reset };
    let r = admin(addr)?.transfer_leader(req).await.with_context(|| format!("asking {addr}"))?.into_inner();
    match to {
        Some(to) if r.leader == to => outln!("shard {shard}: {to} leads"),
        Some(to) => anyhow::bail!("shard {shard}: {to} is the preferred leader, but {:?} still leads", r.leader),
        None => outln!("shard {shard}: back to the default placement; {} leads", r.leader),
    }
    Ok(())
}

/// `coalescectl drain`.
pub(crate) async fn drain(addr: &str, undrain: bool) -> anyhow::Result<()> {
    let r = admin(addr)?.drain(pb::DrainRequest { undrain }).await.with_context(|| format!("asking {addr}"))?;
    let r = r.into_inner();
    if undrain {
        outln!("{}: no longer draining; balancing gives its shards back", r.node);
    } else if r.still_leading.is_empty() {
        outln!("{}: drained, it leads no shard", r.node);
    } else {
        anyhow::bail!(
            "{} still leads shards {:?} (replicas catching up; balancing keeps trying)",
            r.node,
            r.still_leading
        );
    }
    Ok(())
}

/// `coalescectl drop-consumer`.
pub(crate) async fn drop_consumer(addr: &str, consumer: String) -> anyhow::Result<()> {
    let r = admin(addr)?
        .drop_consumer(pb::DropConsumerRequest { consumer: consumer.clone() })
        .await
        .with_context(|| format!("asking {addr}"))?
        .into_inner();
    outln!("{consumer}: cursor dropped on {} shards {:?}", r.shards.len(), r.shards);
    Ok(())
}

/// `coalescectl hot-keys`: the heaviest keys by input rate, cluster-wide. Every node answers
/// for the shards it leads; a shard two nodes claim (during a hand-over) is taken from the
/// first that answered. The `k` heaviest over all shards are printed.
pub(crate) async fn hot_keys(addr: &str, stream: Option<String>, k: u32, as_json: bool) -> anyhow::Result<()> {
    let mut by_shard: BTreeMap<u32, (String, Vec<pb::HotKey>)> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for n in nodes(addr).await? {
        let req = pb::HotKeysRequest { shard: None, stream: stream.clone(), k };
        match admin(&n.client_addr)?.hot_keys(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let mut mine: BTreeMap<u32, Vec<pb::HotKey>> = BTreeMap::new();
                for h in r.keys {
                    mine.entry(h.shard).or_default().push(h);
                }
                for (shard, keys) in mine {
                    by_shard.entry(shard).or_insert_with(|| (r.node.clone(), keys));
                }
            }
            Err(e) => unreachable.push(format!("{} ({})", n.name, e.message())),
        }
    }
    let mut all: Vec<(String, pb::HotKey)> =
        by_shard.into_values().flat_map(|(node, keys)| keys.into_iter().map(move |h| (node.clone(), h))).collect();
    // Heaviest first; rates are comparable across shards, counts are when no rate is known yet.
    all.sort_by(|(_, a), (_, b)| {
        b.rate_per_second
            .total_cmp(&a.rate_per_second)
            .then(b.count.total_cmp(&a.count))
            .then_with(|| (&a.stream, &a.key).cmp(&(&b.stream, &b.key)))
    });
    all.truncate(if k == 0 { 10 } else { k as usize });
    if as_json {
        for (node, h) in &all {
            outln!(
                "{}",
                json!({
                    "node": node, "shard": h.shard, "stream": h.stream, "key": h.key,
                    "key_truncated": h.key_truncated, "rate_per_second": h.rate_per_second,
                    "count": h.count, "error": h.error, "share": h.share,
                })
            );
        }
    } else {
        outln!(
            "{:>4} {:<20} {:<32} {:>10} {:>10} {:>9} {:>6} {:>5}  LEADER",
            "RANK",
            "STREAM",
            "KEY",
            "INPUTS/S",
            "COUNT",
            "±ERROR",
            "SHARE",
            "SHARD"
        );
        for (i, (node, h)) in all.iter().enumerate() {
            let key = if h.key_truncated { format!("{}…", h.key) } else { h.key.clone() };
            outln!(
                "{:>4} {:<20} {:<32} {:>10.1} {:>10.0} {:>9.0} {:>5.1}% {:>5}  {}",
                i + 1,
                h.stream,
                key,
                h.rate_per_second,
                h.count,
                h.error,
                h.share * 100.0,
                h.shard,
                node
            );
        }
        outln!("(COUNT: inputs, decayed with a 60 s half-life; SHARE: of the shard's inputs)");
    }
    if !unreachable.is_empty() {
        eprintln!("not reachable: {}", unreachable.join(", "));
    }
    Ok(())
}
