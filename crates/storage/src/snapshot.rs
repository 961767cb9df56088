//! The bytes of a shard snapshot, written and read a row at a time, so neither side holds a
//! whole snapshot in memory.
//!
//! The format is exactly [`crate::StateExport::encode`]'s — postcard of
//! `Vec<(u8, Vec<u8>, Vec<u8>)>`: a varint row count, then per row the column family's index in
//! [`crate::keys::SM_CFS`] (one byte), the key without its shard prefix and the value (each a
//! varint length and the bytes). Builds that read or write a snapshot whole and builds that
//! stream it therefore exchange snapshots in both directions.
//!
//! [`RowReader`] is what a receiving node runs over bytes from a peer, chunk by chunk, before it
//! stores anything: it refuses, with the reason, a column family that does not exist, keys out
//! of order within a column family (RocksDB iteration order, which a sender always produces), a
//! key or value longer than [`Limits`] allow, more bytes than the snapshot may hold, more rows
//! than announced, and (at the end) fewer.

/// One state-machine row: (index in [`crate::keys::SM_CFS`], key without the shard prefix, value).
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
    /// 1 GiB in all; values up to 16 MiB (a merged value stays below 2 MiB, an output or dead
    /// letter a little more); keys up to 128 KiB (a stream's keys are at most 64 KiB).
    fn default() -> Self {
        Self { max_bytes: 1 << 30, max_field_bytes: 16 << 20, max_key_bytes: 128 << 10 }
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
    #[error("row {row}: a malformed length")]
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

/// Reads snapshot bytes chunk by chunk (see the module docs), holding at most one row and one
/// varint beyond what it has returned.
#[derive(Debug)]
pub struct RowReader {
    limits: Limits,
    stage: Stage,
    /// Bytes of the varint or field being read.
    partial: Vec<u8>,
    rows: Option<u64>,
    read: u64,
    seen_bytes: u64,
    row: (u8, Vec<u8>),
    /// The last key read in each column family (order check).
    last_keys: Vec<Option<Vec<u8>>>,
}

impl RowReader {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            stage: Stage::Count,
            partial: Vec::new(),
            rows: None,
            read: 0,
            seen_bytes: 0,
            row: (0, Vec::new()),
            last_keys: vec![None; crate::keys::SM_CFS.len()],
        }
    }

    /// The rows the snapshot announced, once its header was read.
    pub fn announced(&self) -> Option<u64> {
        self.rows
    }

    /// Rows returned so far.
    pub fn read(&self) -> u64 {
        self.read
    }

    /// Feeds the next bytes; returns the rows they complete, in order.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<Vec<Row>, SnapshotError> {
        self.seen_bytes = self.seen_bytes.saturating_add(bytes.len() as u64);
        if self.seen_bytes > self.limits.max_bytes {
            return Err(SnapshotError::TooLarge { max: self.limits.max_bytes });
        }
        let mut out = Vec::new();
        while !bytes.is_empty() {
            if self.rows.is_some_and(|n| self.read == n) {
                return Err(SnapshotError::TrailingBytes { rows: self.read, extra: bytes.len() });
            }
            match self.stage {
                Stage::Count | Stage::KeyLen | Stage::ValueLen => {
                    let Some(v) = self.varint(&mut bytes)? else { continue };
                    match self.stage {
                        Stage::Count => {
                            self.rows = Some(v);
                            self.stage = Stage::Cf;
                        }
                        Stage::KeyLen => {
                            self.stage = Stage::Key(self.field_len(v, "key", self.limits.max_key_bytes)?)
                        }
                        _ => self.stage = Stage::Value(self.field_len(v, "value", self.limits.max_field_bytes)?),
                    }
                    if let Stage::Value(0) = self.stage {
                        out.push(self.finish_row(Vec::new()));
                    }
                }
                Stage::Cf => {
                    let cf = bytes[0];
                    bytes = &bytes[1..];
                    if cf as usize >= crate::keys::SM_CFS.len() {
                        return Err(SnapshotError::UnknownColumnFamily { row: self.read, cf });
                    }
                    self.row.0 = cf;
                    self.stage = Stage::KeyLen;
                }
                Stage::Key(len) | Stage::Value(len) => {
                    let take = (len - self.partial.len()).min(bytes.len());
                    self.partial.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.partial.len() < len {
                        continue;
                    }
                    let field = std::mem::take(&mut self.partial);
                    if let Stage::Key(_) = self.stage {
                        let cf = self.row.0;
                        let last = &mut self.last_keys[cf as usize];
                        if last.as_ref().is_some_and(|l| *l >= field) {
                            return Err(SnapshotError::OutOfOrder { row: self.read, cf });
                        }
                        *last = Some(field.clone());
                        self.row.1 = field;
                        self.stage = Stage::ValueLen;
                    } else {
                        out.push(self.finish_row(field));
                    }
                }
            }
            // A key's length may be zero too: the key is then complete at once.
            if let Stage::Key(0) = self.stage {
                self.push_empty_key()?;
            }
        }
        Ok(out)
    }

    /// Checks that the snapshot ended where it should.
    pub fn finish(&self) -> Result<(), SnapshotError> {
        match self.rows {
            Some(n) if n == self.read && matches!(self.stage, Stage::Cf) && self.partial.is_empty() => Ok(()),
            Some(n) => Err(SnapshotError::Truncated { read: self.read, rows: n }),
            None => Err(SnapshotError::Truncated { read: 0, rows: 0 }),
        }
    }

    fn push_empty_key(&mut self) -> Result<(), SnapshotError> {
        let cf = self.row.0;
        let last = &mut self.last_keys[cf as usize];
        if last.is_some() {
            // An empty key sorts first: only the first key of a column family may be empty.
            return Err(SnapshotError::OutOfOrder { row: self.read, cf });
        }
        *last = Some(Vec::new());
        self.row.1 = Vec::new();
        self.stage = Stage::ValueLen;
        Ok(())
    }

    fn finish_row(&mut self, value: Vec<u8>) -> Row {
        self.read += 1;
        self.stage = Stage::Cf;
        (self.row.0, std::mem::take(&mut self.row.1), value)
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

    fn rows() -> Vec<Row> {
        let mut rows = Vec::new();
        for cf in 0..crate::keys::SM_CFS.len() as u8 {
            for k in 0..(cf as usize * 7 + 1) {
                let key = if k == 0 && cf == 2 { Vec::new() } else { format!("key-{k:04}").into_bytes() };
                let value = vec![cf; (k * 37) % 300];
                rows.push((cf, key, value));
            }
        }
        rows
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
            let mut r = RowReader::new(Limits::default());
            let mut got = Vec::new();
            for c in bytes.chunks(chunk) {
                got.extend(r.push(c).unwrap());
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
            let mut r = RowReader::new(limits);
            r.push(bytes)?;
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
            let mut r = RowReader::new(Limits { max_bytes: 1 << 20, max_field_bytes: 1 << 10, max_key_bytes: 1 << 10 });
            if r.push(&bytes).is_ok() {
                let _ = r.finish();
            }
        }
    }
}
