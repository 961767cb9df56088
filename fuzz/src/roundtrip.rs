//! Postcard round trips: what a replica, RocksDB row, outbox entry or snapshot does to a value.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes `v`, decodes the bytes and encodes again: the decode must succeed and give the same
/// bytes (the state machine stores what it computed and must read back exactly that).
pub fn must_roundtrip<T: Serialize + DeserializeOwned + std::fmt::Debug>(v: &T, what: &str) -> T {
    let bytes = postcard::to_allocvec(v).unwrap_or_else(|e| panic!("a {what} does not encode: {e}"));
    let back: T = postcard::from_bytes(&bytes)
        .unwrap_or_else(|e| panic!("a {what} does not decode from its own bytes: {e}: {v:?}\n  bytes: {bytes:?}"));
    let again = postcard::to_allocvec(&back).unwrap_or_else(|e| panic!("a decoded {what} does not encode: {e}"));
    assert!(bytes == again, "a {what} changes through postcard:\n  {bytes:?}\n  {again:?}");
    back
}

/// Decodes `T` from the front of `bytes` (as a log entry or row holds it): `None` if the bytes
/// are not a `T`; otherwise the value, which must survive [`must_roundtrip`], and the rest.
pub fn decode_front<'a, T: Serialize + DeserializeOwned + std::fmt::Debug>(
    bytes: &'a [u8],
    what: &str,
) -> Option<(T, &'a [u8])> {
    let (v, rest) = postcard::take_from_bytes::<T>(bytes).ok()?;
    must_roundtrip(&v, what);
    Some((v, rest))
}
