//! The stable mapping from (stream, key) to a shard.
//!
//! ```text
//! h     = XXH3-64(seed = 0) over  u32-big-endian(len(stream)) ‖ stream ‖ key     (UTF-8 bytes)
//! shard = h mod S
//! ```
//! The length prefix makes the encoding unambiguous (`("ab", "c")` and `("a", "bc")` differ).
//! XXH3 has implementations in most languages (C `xxhash.h`, Go `zeebo/xxh3`, Python `xxhash`),
//! so any client can compute the shard of a key. The number of shards S is fixed when a cluster
//! is created. The test vectors below are committed: if this function ever changes, they fail.

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// A shard id, in `0..S`.
pub type ShardId = u32;

/// The 64-bit routing hash of (stream, key).
pub fn key_hash(stream: &str, key: &str) -> u64 {
    // One-shot hashing of a stack buffer is several times faster than the streaming state for
    // the short keys that dominate; both give the same digest.
    const INLINE: usize = 256;
    let len = 4 + stream.len() + key.len();
    if len <= INLINE {
        let mut buf = [0u8; INLINE];
        buf[..4].copy_from_slice(&(stream.len() as u32).to_be_bytes());
        buf[4..4 + stream.len()].copy_from_slice(stream.as_bytes());
        buf[4 + stream.len()..len].copy_from_slice(key.as_bytes());
        return xxh3_64(&buf[..len]);
    }
    let mut h = Xxh3::new();
    h.update(&(stream.len() as u32).to_be_bytes());
    h.update(stream.as_bytes());
    h.update(key.as_bytes());
    h.digest()
}

/// The shard that owns `(stream, key)` in a cluster of `shards` shards (`shards > 0`).
pub fn shard_for(stream: &str, key: &str, shards: u32) -> ShardId {
    debug_assert!(shards > 0, "a cluster has at least one shard");
    (key_hash(stream, key) % u64::from(shards.max(1))) as ShardId
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (stream, key, hash, shard of 64). Computed independently with Python's `xxhash.xxh3_64(struct.pack(">I", len(s)) + s + k)`
    /// (PyPI `xxhash`); never edit them.
    const VECTORS: &[(&str, &str, u64, u32)] = &[
        ("", "", 0x48b2c92616fc193d, 61),
        ("api-calls", "user:42", 0xd3f9bfa370034b88, 8),
        ("api-calls", "user:43", 0xcfb8d09dc40c750b, 11),
        ("ab", "c", 0xe68a44f28602d7e0, 32),
        ("a", "bc", 0xcca7be0e983a00c7, 7),
        ("accounts", "acct-0001", 0x3639cf56dca4d69b, 27),
        ("ünïcode", "ключ", 0x5ebf85af0df98769, 41),
    ];

    #[test]
    fn test_vectors_never_change() {
        for &(stream, key, hash, shard) in VECTORS {
            assert_eq!(key_hash(stream, key), hash, "hash of ({stream:?}, {key:?})");
            assert_eq!(shard_for(stream, key, 64), shard, "shard of ({stream:?}, {key:?})");
        }
    }

    #[test]
    fn long_keys_hash_like_short_ones_would() {
        let long = "x".repeat(1000);
        let mut bytes = (3u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        bytes.extend_from_slice(long.as_bytes());
        assert_eq!(key_hash("abc", &long), xxh3_64(&bytes));
        let short = "x".repeat(249); // exactly the inline buffer
        assert_eq!(key_hash("abc", &short), {
            let mut h = Xxh3::new();
            h.update(&3u32.to_be_bytes());
            h.update(b"abc");
            h.update(short.as_bytes());
            h.digest()
        });
    }

    #[test]
    fn length_prefix_disambiguates() {
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
    }

    #[test]
    fn shards_are_in_range_and_spread() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            let s = shard_for("s", &format!("k{i}"), 16);
            counts[s as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }
}
