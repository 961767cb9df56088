//! The values events carry and aggregates produce.

use serde::{Deserialize, Serialize};

/// One event's payload. Which variants a stream accepts depends on its merge operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub enum Value {
    /// No payload (e.g. for `count`).
    #[default]
    None,
    /// A signed 64-bit integer.
    Int(i64),
    /// A 64-bit float. NaN and infinities are rejected by every operator.
    Float(f64),
    /// UTF-8 text.
    Str(String),
    /// Opaque bytes.
    Bytes(Vec<u8>),
    /// A JSON document, kept as canonical text in storage.
    Json(#[serde(with = "json_text")] serde_json::Value),
}

impl Value {
    /// The name of the variant, as used in error messages and the wire protocol.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "none",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::Json(_) => "json",
        }
    }

    /// Approximate bytes this value occupies in a buffer; used for byte limits and triggers.
    pub fn size(&self) -> usize {
        match self {
            Value::None => 1,
            Value::Int(_) | Value::Float(_) => 8,
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::Json(j) => json_size(j),
        }
    }

    /// Canonical bytes for hashing (HyperLogLog) and set membership: the same value always has
    /// the same bytes, across processes and languages (documented in `docs/architecture.md`).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        match self {
            Value::None => Vec::new(),
            Value::Int(i) => i.to_be_bytes().to_vec(),
            Value::Float(f) => f.to_bits().to_be_bytes().to_vec(),
            Value::Str(s) => s.as_bytes().to_vec(),
            Value::Bytes(b) => b.clone(),
            Value::Json(j) => j.to_string().into_bytes(),
        }
    }

    /// The value as JSON, for sinks that speak JSON. Bytes become base-16 text.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::None => serde_json::Value::Null,
            Value::Int(i) => (*i).into(),
            Value::Float(f) => {
                serde_json::Number::from_f64(*f).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
            }
            Value::Str(s) => s.clone().into(),
            Value::Bytes(b) => hex(b).into(),
            Value::Json(j) => j.clone(),
        }
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Approximate serialized size of a JSON value without allocating.
pub(crate) fn json_size(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(_) => 4,
        serde_json::Value::Number(_) => 8,
        serde_json::Value::String(s) => s.len() + 2,
        serde_json::Value::Array(a) => 2 + a.iter().map(|x| json_size(x) + 1).sum::<usize>(),
        serde_json::Value::Object(o) => 2 + o.iter().map(|(k, x)| k.len() + 4 + json_size(x)).sum::<usize>(),
    }
}

/// Serde adapter storing JSON as its text, so binary formats that cannot `deserialize_any`
/// (postcard) can carry it and the stored form is canonical (serde_json sorts object keys).
pub(crate) mod json_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &serde_json::Value, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}
