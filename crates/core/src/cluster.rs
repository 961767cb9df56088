//! The cluster's identity: 16 random bytes made once, when a cluster is created, and kept in
//! every node's database (`coalesce_raft::identity` settles and stores it).
//!
//! Shard numbers, seqs and Raft terms start again from the bottom when a cluster is created
//! anew (its data directories wiped, or a second cluster pointed at the same downstream), so
//! they cannot tell two clusters apart. Whatever a sink keeps to deduplicate or fence deliveries
//! — PostgreSQL fence rows, the HTTP `Idempotency-Key` — is keyed by this id as well.

use serde::{Deserialize, Serialize};

/// A cluster id, shown as 32 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub [u8; 16]);

impl ClusterId {
    /// The id `bytes` hold (exactly 16), or `None`.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// Parses the 32 hex digits [`ClusterId`]'s `Display` writes.
    pub fn parse(s: &str) -> Result<Self, String> {
        let digits = s.as_bytes();
        if digits.len() != 32 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!("a cluster id is 32 hex digits, got {s:?}"));
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Self(out))
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterId({self})")
    }
}

/// A cluster id and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub id: ClusterId,
    /// The cluster held data before it had an id: it was created by a build from before
    /// cluster ids (December 2026) and upgraded. Its sinks carry on from what they recorded
    /// downstream without an id (PostgreSQL fence rows keyed by table and shard only); a
    /// cluster created with an id never reads such records, which may be another cluster's.
    pub predates_id: bool,
}

impl ClusterIdentity {
    /// The stored form: the 16 id bytes, then 1 if the cluster predates ids, else 0.
    pub fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[..16].copy_from_slice(&self.id.0);
        out[16] = u8::from(self.predates_id);
        out
    }

    /// Reads [`ClusterIdentity::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [id @ .., flag] if id.len() == 16 && *flag <= 1 => {
                Some(Self { id: ClusterId::from_bytes(id)?, predates_id: *flag == 1 })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse_back() {
        let id = ClusterId([7; 16]);
        assert_eq!(ClusterId::parse(&id.to_string()), Ok(id));
        assert_eq!(id.to_string().len(), 32);
        assert!(ClusterId::parse("xyz").is_err());
        assert!(ClusterId::parse(&"g".repeat(32)).is_err());
        assert_eq!(
            ClusterId::parse("000102030405060708090a0b0c0d0e0f").unwrap().0,
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
        );
    }

    #[test]
    fn identities_round_trip_and_refuse_other_bytes() {
        for predates_id in [false, true] {
            let identity = ClusterIdentity { id: ClusterId([predates_id as u8; 16]), predates_id };
            assert_eq!(ClusterIdentity::decode(&identity.encode()), Some(identity));
        }
        assert_eq!(ClusterIdentity::decode(&[0; 16]), None);
        assert_eq!(ClusterIdentity::decode(&[0; 18]), None);
        let mut bad = [0u8; 17];
        bad[16] = 2;
        assert_eq!(ClusterIdentity::decode(&bad), None);
    }
}
