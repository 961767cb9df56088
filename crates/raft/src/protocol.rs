//! The peer protocol's version and the call metadata peers exchange: what this build writes and
//! reads, and the check every Hello runs.

/// The peer protocol this build writes: the encoding of log entries ([`crate::types::Command`]),
/// forwards and openraft messages ([`crate::codec`]) between nodes. Bump it with every change a node of the
/// previous version could not read, and keep writing the old encoding until every member
/// announces the new one (docs/upgrades.md).
///
/// - 1: the first announced protocol (December 2026).
/// - 2: a forward's reply may carry [`crate::types::GroupOutcome::TooOld`].
/// - 3: log entries may carry [`crate::types::Command::Trim`] (proposed only once every member of the group
///   announced 3: [`crate::node::RaftNode::members_speak`]).
/// - 4: Ingest entries may carry `key_overflow = "reject"` rules (a variant of their own,
///   `coalesce_core::entry::wire`; written only once every member announced 4), and a
///   forward's reply may carry [`crate::types::GroupOutcome::KeyFull`].
pub const PROTOCOL: u32 = 4;
/// The oldest peer protocol this build reads.
pub const PROTOCOL_MIN: u32 = 1;

/// Whether a peer announcing `protocol` (what it writes) and `protocol_min` (the oldest it
/// reads) can replicate with this build. 0 is a build from before the announcement: 1.
pub(crate) fn check_protocol(protocol: u32, protocol_min: u32) -> Result<(), String> {
    let (theirs, their_min) = (protocol.max(1), protocol_min.max(1));
    if theirs < PROTOCOL_MIN || their_min > PROTOCOL {
        return Err(format!(
            "the peer writes protocol {theirs} and reads {their_min}..={theirs}; this build writes {PROTOCOL} and \
             reads {PROTOCOL_MIN}..={PROTOCOL}: upgrade one release at a time (docs/upgrades.md)"
        ));
    }
    Ok(())
}

/// Metadata of a `Forward` call: the protocol the forwarding node reads, so the leader writes
/// a reply it can decode.
pub(crate) const PROTOCOL_HEADER: &str = "x-coalesce-protocol";

/// Metadata of a `StreamAppend` call: the group, and the node id meant.
pub(crate) const STREAM_GROUP_HEADER: &str = "x-coalesce-group";
pub(crate) const STREAM_TARGET_HEADER: &str = "x-coalesce-target";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_must_read_what_each_other_writes() {
        assert!(check_protocol(PROTOCOL, PROTOCOL_MIN).is_ok());
        assert!(check_protocol(0, 0).is_ok(), "a build from before the announcement speaks 1");
        let e = check_protocol(PROTOCOL + 5, PROTOCOL + 3).unwrap_err();
        assert!(e.contains("upgrade one release at a time"), "{e}");
        assert!(check_protocol(PROTOCOL + 1, PROTOCOL).is_ok(), "a newer peer that still reads ours");
    }
}
