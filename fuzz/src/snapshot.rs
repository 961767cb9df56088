//! The `snapshot` target: bytes from a peer → the snapshot reader a receiving node runs
//! ([`coalesce_core::snapshot::RowReader`], chunk by chunk as they arrive, before anything is
//! stored).
//!
//! The first byte picks the [`Limits`] and the second how the rest is cut into chunks; the rest
//! is the snapshot. The reader never panics, and:
//! - its verdict does not depend on the chunking: the whole input at once and the input in
//!   chunks are both accepted with the same rows, or both refused for the same kind of reason
//!   (unless the size limit is involved: that one is checked per chunk, before the chunk's rows;
//!   and a count of trailing bytes is the count in the chunk at hand);
//! - what it accepts is a snapshot a node could have written: the rows, written again with
//!   [`header`] and [`put_row`], are exactly the input bytes; postcard (the whole-snapshot
//!   format of older builds) decodes the same rows from them; every column family exists, keys
//!   ascend within each and fit the limits;
//! - what it refuses is not such a snapshot: if postcard reads the input as rows that satisfy
//!   every rule and write back to the same bytes, the reader must have accepted them.

use coalesce_core::snapshot::{Limits, Row, RowReader, SnapshotError, header, put_row};

/// As many column families as the storage crate's state machine has (`SM_CFS`).
pub const COLUMN_FAMILIES: usize = coalesce_core::snapshot::STATE_COLUMN_FAMILIES;

fn limits(pick: u8, len: usize) -> Limits {
    let len = len as u64;
    Limits {
        max_field_bytes: [0, 1, 16, 4096][usize::from(pick & 3)],
        max_key_bytes: [0, 1, 16, 512][usize::from((pick >> 2) & 3)],
        max_bytes: [len, len.saturating_sub(1), 64, 1 << 20][usize::from((pick >> 4) & 3)],
    }
}

/// Cut points from a small deterministic generator seeded by `seed` (0: one chunk of each byte).
fn chunks(bytes: &[u8], seed: u8) -> Vec<&[u8]> {
    if seed == 0 {
        return bytes.chunks(1).collect();
    }
    let mut state = u32::from(seed).wrapping_mul(0x9e37_79b9) | 1;
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let take = (state as usize % 24).min(rest.len());
        // Empty chunks too: a peer may send one.
        out.push(&rest[..take]);
        rest = &rest[take..];
    }
    out
}

fn read(parts: &[&[u8]], limits: Limits) -> Result<Vec<Row>, SnapshotError> {
    let mut reader = RowReader::new(limits, COLUMN_FAMILIES);
    let mut rows = Vec::new();
    for part in parts {
        reader.push(part, |cf, k, v| {
            rows.push((cf, k.to_vec(), v.to_vec()));
            Ok::<_, SnapshotError>(())
        })?;
    }
    reader.finish()?;
    assert_eq!(reader.read(), rows.len() as u64, "rows returned == rows counted");
    assert_eq!(reader.announced(), Some(rows.len() as u64), "rows returned == rows announced");
    Ok(rows)
}

fn encode(rows: &[Row]) -> Vec<u8> {
    let mut out = header(rows.len() as u64);
    for (cf, k, v) in rows {
        put_row(&mut out, *cf, k, v);
    }
    out
}

/// Whether `rows` keep every rule the reader enforces, apart from the byte encoding.
fn follow_the_rules(rows: &[Row], limits: Limits, bytes: usize) -> bool {
    let mut last: Vec<Option<&[u8]>> = vec![None; COLUMN_FAMILIES];
    bytes as u64 <= limits.max_bytes
        && rows.iter().all(|(cf, k, v)| {
            let Some(prev) = last.get_mut(usize::from(*cf)) else { return false };
            let ordered = prev.is_none_or(|p| p < k.as_slice());
            *prev = Some(k);
            ordered && k.len() <= limits.max_key_bytes && v.len() <= limits.max_field_bytes
        })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let [pick, seed, bytes @ ..] = data else { return };
    let limits = limits(*pick, bytes.len());
    let whole = read(&[bytes], limits);
    let chunked = read(&chunks(bytes, *seed), limits);
    match (&whole, &chunked) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the same rows whatever the chunks"),
        (Err(a), Err(b)) => {
            let sized = |e: &SnapshotError| matches!(e, SnapshotError::TooLarge { .. });
            let same = std::mem::discriminant(a) == std::mem::discriminant(b);
            assert!(same || sized(a) || sized(b), "refused for different reasons: {a} / {b}");
        }
        _ => panic!("the verdict depends on the chunks: whole {whole:?}, chunked {chunked:?}"),
    }
    let postcard = postcard::take_from_bytes::<Vec<Row>>(bytes).ok().filter(|(_, rest)| rest.is_empty());
    match whole {
        Ok(rows) => {
            assert_eq!(encode(&rows), bytes, "accepted bytes are exactly what the rows write");
            assert!(follow_the_rules(&rows, limits, bytes.len()), "accepted rows break a rule: {rows:?}");
            let (from_postcard, _) = postcard.expect("accepted bytes decode with postcard");
            assert_eq!(from_postcard, rows, "postcard reads the same rows");
        }
        Err(e) => {
            if let Some((rows, _)) = postcard {
                assert!(
                    !(follow_the_rules(&rows, limits, bytes.len()) && encode(&rows) == bytes),
                    "a well-formed snapshot was refused: {e}"
                );
            }
        }
    }
}
