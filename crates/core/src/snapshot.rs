//! The bytes of a shard snapshot, written and read a row at a time, so neither side holds a
//! whole snapshot in memory.
//!
//! The format is postcard of `Vec<(u8, Vec<u8>, Vec<u8>)>` (what builds before December 2026
//! sent whole): a varint row count, then per row the index of the row's column
//! family among the state machine's (`coalesce_storage::keys::SM_CFS`; one byte), the key
//! without its shard prefix and the value (each a varint length and the bytes). Builds that read
//! or write a snapshot whole and builds that stream it therefore exchange snapshots in both
//! directions.
//!
//! [`RowReader`] is what a receiving node runs over bytes from a peer, chunk by chunk, before it
//! stores anything: it refuses, with the reason, a column family that does not exist, keys out
//! of order within a column family (RocksDB iteration order, which a sender always produces), a
//! key or value longer than [`Limits`] allow, more bytes than the snapshot may hold, more rows
//! than announced, (at the end) fewer, and a length not written the shortest way (so the bytes
//! it accepts are exactly those [`header`] and [`put_row`] write for its rows).
//!
//! The format lives here, beside the other bytes nodes exchange, so the fuzz targets (`fuzz/`,
//! no RocksDB) read snapshots with the code a node runs; the storage crate streams its rows.

/// How many column families a shard's state machine has (`coalesce_storage::keys::SM_CFS`,
/// which asserts it): a snapshot row's column family index is below this.
pub const STATE_COLUMN_FAMILIES: usize = 6;

/// One state-machine row: (column family index, key without the shard prefix, value).
pub type Row = (u8, Vec<u8>, Vec<u8>);

/// The longest varint postcard writes (a `u64`).
const MAX_VARINT: usize = 10;

/// Appends `v` as a postcard varint (LEB128).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The header of a snapshot of `rows` rows.
pub fn header(rows: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_VARINT);
    put_varint(&mut out, rows);
    out
}

/// Appends one row's bytes to `out`.
pub fn put_row(out: &mut Vec<u8>, cf: u8, key: &[u8], value: &[u8]) {
    out.push(cf);
    put_varint(out, key.len() as u64);
    out.extend_from_slice(key);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// What a snapshot read from a peer may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// All bytes of the snapshot, header included.
    pub max_bytes: u64,
    /// One value.
    pub max_field_bytes: usize,
    /// One key (without the shard prefix). The reader keeps the last key of each column
    /// family, so this bounds its memory with `max_field_bytes`.
    pub max_key_bytes: usize,
}

impl Default for Limits {
    /// No bound on the whole (a receiving node sets its own, `[raft] snapshot_max_bytes`);
    /// values up to 16 MiB (a merged value stays below 2 MiB, an output or dead letter a little
    /// more); keys up to 128 KiB (a stream's keys are at most 64 KiB).
    fn default() -> Self {
        Self { max_bytes: u64::MAX, max_field_bytes: 16 << 20, max_key_bytes: 128 << 10 }
    }
}

/// Why snapshot bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("the snapshot passes its limit of {max} bytes")]
    TooLarge { max: u64 },
    #[error("row {row}: a {what} of {len} bytes passes the limit of {max}")]
    FieldTooLarge { row: u64, what: &'static str, len: u64, max: usize },
    #[error("row {row}: column family {cf} does not exist")]
    UnknownColumnFamily { row: u64, cf: u8 },
    #[error("row {row}: keys out of order in column family {cf}")]
    OutOfOrder { row: u64, cf: u8 },
    #[error("row {row}: a malformed length (too long, or not in its shortest form)")]
    BadVarint { row: u64 },
    #[error("{extra} bytes after the last of {rows} rows")]
    TrailingBytes { rows: u64, extra: usize },
    #[error("the snapshot ends after {read} of {rows} rows")]
    Truncated { read: u64, rows: u64 },
}

/// Where a [`RowReader`] is within the bytes.
#[derive(Debug)]
enum Stage {
    Count,
    Cf,
    KeyLen,
    Key(usize),
    ValueLen,
    Value(usize),
}

/// Reads snapshot bytes chunk by chunk (see the module docs). It holds the last key of each
/// column family and at most one field (key or value) that a chunk boundary cut, so its memory
/// is bounded by [`Limits`] whatever a peer sends; rows are handed to the caller as slices,
/// copied only when a chunk boundary cuts them.
#[derive(Debug)]
pub struct RowReader {
    limits: Limits,
    stage: Stage,
    /// Bytes of the varint or field being read, when a chunk ended inside it.
    partial: Vec<u8>,
    rows: Option<u64>,
    read: u64,
    seen_bytes: u64,
    /// The column family of the row being read.
    cf: u8,
    /// The last key read in each column family (the order check); the row being read's key is
    /// the last of its column family.
    last_keys: Vec<Option<Vec<u8>>>,
}

impl RowReader {
    /// A reader of a snapshot whose rows belong to `column_families` column families (indexes
    /// `0..column_families`).
    pub fn new(limits: Limits, column_families: usize) -> Self {
        Self {
            limits,
            stage: Stage::Count,
            partial: Vec::new(),
            rows: None,
            read: 0,
            seen_bytes: 0,
            cf: 0,
            last_keys: vec![None; column_families],
        }
    }

    /// The rows the snapshot announced, once its header was read.
    pub fn announced(&self) -> Option<u64> {
        self.rows
    }

    /// Rows read so far.
    pub fn read(&self) -> u64 {
        self.read
    }

    /// Feeds the next bytes, calling `each(column family, key, value)` for every row they
    /// complete, in order. Stops at the first refusal ([`SnapshotError`]) or error of `each`;
    /// rows before a refusal in the same bytes have been handed to `each` by then (a caller
    /// that stores rows as they come must drop what it stored when the snapshot is refused).
    pub fn push<E: From<SnapshotError>>(
        &mut self,
        mut bytes: &[u8],
        mut each: impl FnMut(u8, &[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.seen_bytes = self.seen_bytes.saturating_add(bytes.len() as u64);
        if self.seen_bytes > self.limits.max_bytes {
            return Err(SnapshotError::TooLarge { max: self.limits.max_bytes }.into());
        }
        loop {
            // A field of no bytes is complete without any, even at the end of a chunk.
            let empty_field = matches!(self.stage, Stage::Key(0) | Stage::Value(0));
            if bytes.is_empty() && !empty_field {
                return Ok(());
            }
            if !empty_field && self.rows.is_some_and(|n| self.read == n) {
                return Err(SnapshotError::TrailingBytes { rows: self.read, extra: bytes.len() }.into());
            }
            match self.stage {
                Stage::Count | Stage::KeyLen | Stage::ValueLen => {
                    let Some(v) = self.varint(&mut bytes)? else { continue };
                    self.stage = match self.stage {
                        Stage::Count => {
                            self.rows = Some(v);
                            Stage::Cf
                        }
                        Stage::KeyLen => Stage::Key(self.field_len(v, "key", self.limits.max_key_bytes)?),
                        _ => Stage::Value(self.field_len(v, "value", self.limits.max_field_bytes)?),
                    };
                }
                Stage::Cf => {
                    let cf = bytes[0];
                    bytes = &bytes[1..];
                    if cf as usize >= self.last_keys.len() {
                        return Err(SnapshotError::UnknownColumnFamily { row: self.read, cf }.into());
                    }
                    self.cf = cf;
                    self.stage = Stage::KeyLen;
                }
                Stage::Key(len) | Stage::Value(len) => {
                    // Straight from the chunk when all of it is there; otherwise gathered.
                    let whole = self.partial.is_empty() && bytes.len() >= len;
                    let mut gathered = Vec::new();
                    let field: &[u8] = if whole {
                        let (field, rest) = bytes.split_at(len);
                        bytes = rest;
                        field
                    } else {
                        let take = (len - self.partial.len()).min(bytes.len());
                        self.partial.extend_from_slice(&bytes[..take]);
                        bytes = &bytes[take..];
                        if self.partial.len() < len {
                            continue;
                        }
                        gathered = std::mem::take(&mut self.partial);
                        &gathered
                    };
                    let cf = self.cf;
                    let last = &mut self.last_keys[cf as usize];
                    if let Stage::Key(_) = self.stage {
                        if last.as_deref().is_some_and(|l| l >= field) {
                            return Err(SnapshotError::OutOfOrder { row: self.read, cf }.into());
                        }
                        let key = last.get_or_insert_with(Vec::new);
                        key.clear();
                        key.extend_from_slice(field);
                        self.stage = Stage::ValueLen;
                    } else {
                        self.read += 1;
                        self.stage = Stage::Cf;
                        each(cf, last.as_deref().unwrap_or_default(), field)?;
                    }
                    if !whole {
                        gathered.clear();
                        self.partial = gathered;
                    }
                }
            }
        }
    }

    /// Checks that the snapshot ended where it should.
    pub fn finish(&self) -> Result<(), SnapshotError> {
        match self.rows {
            Some(n) if n == self.read && matches!(self.stage, Stage::Cf) && self.partial.is_empty() => Ok(()),
            Some(n) => Err(SnapshotError::Truncated { read: self.read, rows: n }),
            None => Err(SnapshotError::Truncated { read: 0, rows: 0 }),
        }
    }

    fn field_len(&self, len: u64, what: &'static str, max: usize) -> Result<usize, SnapshotError> {
        match usize::try_from(len) {
            Ok(l) if l <= max => Ok(l),
            _ => Err(SnapshotError::FieldTooLarge { row: self.read, what, len, max }),
        }
    }

    /// Reads a varint from `bytes`, across chunks; `None` until its last byte arrived.
    fn varint(&mut self, bytes: &mut &[u8]) -> Result<Option<u64>, SnapshotError> {
        while let Some((&b, rest)) = bytes.split_first() {
            *bytes = rest;
            self.partial.push(b);
            if self.partial.len() > MAX_VARINT {
                return Err(SnapshotError::BadVarint { row: self.read });
            }
            if b & 0x80 == 0 {
                // The shortest form only: a last byte of 0 after others adds nothing.
                if b == 0 && self.partial.len() > 1 {
                    return Err(SnapshotError::BadVarint { row: self.read });
                }
                let mut v: u64 = 0;
                for (i, byte) in self.partial.iter().enumerate() {
                    let part = u64::from(byte & 0x7f);
                    let shifted = part.checked_shl(7 * i as u32).filter(|s| s >> (7 * i as u32) == part);
                    v |= shifted.ok_or(SnapshotError::BadVarint { row: self.read })?;
                }
                self.partial.clear();
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CFS: usize = STATE_COLUMN_FAMILIES;

    fn rows() -> Vec<Row> {
        let mut rows = Vec::new();
        for cf in 0..CFS as u8 {
            for k in 0..(cf as usize * 7 + 1) {
                let key = if k == 0 && cf == 2 { Vec::new() } else { format!("key-{k:04}").into_bytes() };
                let value = vec![cf; (k * 37) % 300];
                rows.push((cf, key, value));
            }
        }
        rows
    }

    /// Feeds `bytes` to `r`, collecting the rows.
    fn rows_of(r: &mut RowReader, bytes: &[u8], out: &mut Vec<Row>) -> Result<(), SnapshotError> {
        r.push(bytes, |cf, k, v| {
            out.push((cf, k.to_vec(), v.to_vec()));
            Ok::<_, SnapshotError>(())
        })
    }

    fn encode(rows: &[Row]) -> Vec<u8> {
        let mut out = header(rows.len() as u64);
        for (cf, k, v) in rows {
            put_row(&mut out, *cf, k, v);
        }
        out
    }

    #[test]
    fn the_bytes_are_those_of_the_whole_snapshot_encoding() {
        let rows = rows();
        assert_eq!(encode(&rows), postcard::to_allocvec(&rows).unwrap());
        assert_eq!(encode(&[]), postcard::to_allocvec(&Vec::<Row>::new()).unwrap());
    }

    #[test]
    fn rows_come_back_whatever_the_chunks() {
        let rows = rows();
        let bytes = encode(&rows);
        for chunk in [1, 2, 3, 7, 64, 1000, bytes.len()] {
            let mut r = RowReader::new(Limits::default(), CFS);
            let mut got = Vec::new();
            for c in bytes.chunks(chunk) {
                rows_of(&mut r, c, &mut got).unwrap();
            }
            r.finish().unwrap();
            assert_eq!(got, rows, "chunks of {chunk}");
            assert_eq!(r.announced(), Some(rows.len() as u64));
        }
    }

    #[test]
    fn bad_snapshots_are_refused_with_the_reason() {
        let rows = rows();
        let bytes = encode(&rows);
        let read = |bytes: &[u8], limits: Limits| -> Result<(), SnapshotError> {
            let mut r = RowReader::new(limits, CFS);
            rows_of(&mut r, bytes, &mut Vec::new())?;
            r.finish()
        };
        let small = Limits { max_bytes: bytes.len() as u64 - 1, ..Limits::default() };
        assert!(matches!(read(&bytes, small), Err(SnapshotError::TooLarge { .. })));
        let narrow = Limits { max_field_bytes: 100, ..Limits::default() };
        assert!(matches!(read(&bytes, narrow), Err(SnapshotError::FieldTooLarge { what: "value", .. })));
        assert!(matches!(read(&bytes[..bytes.len() - 1], Limits::default()), Err(SnapshotError::Truncated { .. })));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(matches!(read(&extra, Limits::default()), Err(SnapshotError::TrailingBytes { .. })));
        let mut unknown = header(1);
        put_row(&mut unknown, 6, b"k", b"v");
        assert!(matches!(read(&unknown, Limits::default()), Err(SnapshotError::UnknownColumnFamily { cf: 6, .. })));
        let mut unordered = header(2);
        put_row(&mut unordered, 0, b"b", b"v");
        put_row(&mut unordered, 0, b"a", b"v");
        assert!(matches!(read(&unordered, Limits::default()), Err(SnapshotError::OutOfOrder { .. })));
        let overlong = [0xffu8; 11];
        assert!(matches!(read(&overlong, Limits::default()), Err(SnapshotError::BadVarint { .. })));
        // A length that claims more than a u64 holds.
        let mut huge = vec![0xff; 9];
        huge.push(0x7f);
        assert!(matches!(read(&huge, Limits::default()), Err(SnapshotError::BadVarint { .. })));
        // Zero written in two bytes: the value is fine, the form is not the shortest.
        assert!(matches!(read(&[0x80, 0x00], Limits::default()), Err(SnapshotError::BadVarint { .. })));
        let mut padded = header(1);
        padded.extend_from_slice(&[0, 0x81, 0x00, b'k', 0]);
        assert!(matches!(read(&padded, Limits::default()), Err(SnapshotError::BadVarint { .. })));
        assert!(matches!(read(&[], Limits::default()), Err(SnapshotError::Truncated { .. })));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8).collect();
            let mut r =
                RowReader::new(Limits { max_bytes: 1 << 20, max_field_bytes: 1 << 10, max_key_bytes: 1 << 10 }, CFS);
            if rows_of(&mut r, &bytes, &mut Vec::new()).is_ok() {
                let _ = r.finish();
            }
        }
    }
}
