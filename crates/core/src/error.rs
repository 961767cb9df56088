//! Errors with stable codes. Every variant carries the context needed to act on it; the server
//! maps [`EventError::category`] to a gRPC status in one place.

use thiserror::Error;

/// How an error should be reported to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The request is malformed or does not fit the stream (INVALID_ARGUMENT).
    InvalidArgument,
    /// The named stream does not exist (NOT_FOUND).
    NotFound,
    /// A buffer or limit is full; retry later (RESOURCE_EXHAUSTED).
    ResourceExhausted,
    /// The producer sequence contradicts what was already accepted (FAILED_PRECONDITION).
    FailedPrecondition,
}

/// Why one event was refused. A refused event changes nothing.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EventError {
    #[error("unknown stream {stream:?}")]
    UnknownStream { stream: String },
    #[error("key is empty")]
    EmptyKey,
    #[error("key is {len} bytes, the limit is {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value is {len} bytes, the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("operator {op} takes a {expected} value, got {got}")]
    TypeMismatch { op: &'static str, expected: &'static str, got: &'static str },
    #[error("operator {op} does not accept NaN or infinite values")]
    NotFinite { op: &'static str },
    #[error("value is not valid for {op}: {reason}")]
    InvalidValue { op: &'static str, reason: String },
    #[error("event time {event_time} is more than {max_skew_ms} ms ahead of the server clock")]
    EventTimeInFuture { event_time: u64, max_skew_ms: u64 },
    #[error("shard buffer is full ({what}); retry after {retry_after_ms} ms")]
    BufferFull { what: &'static str, retry_after_ms: u64 },
    #[error("producer {producer} sequence {seq} overlaps sequences already accepted (up to {accepted})")]
    SequenceOverlap { producer: u64, seq: u64, accepted: u64 },
    #[error(
        "merged with this request's earlier events of its key it passes the window's max_bytes ({max}) and the \
         stream has key_overflow = \"reject\": send it in a later request, as a new event"
    )]
    KeyFullInRequest { max: u64 },
}

impl EventError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            EventError::UnknownStream { .. } => "unknown_stream",
            EventError::EmptyKey => "empty_key",
            EventError::KeyTooLarge { .. } => "key_too_large",
            EventError::ValueTooLarge { .. } => "value_too_large",
            EventError::TypeMismatch { .. } => "type_mismatch",
            EventError::NotFinite { .. } => "not_finite",
            EventError::InvalidValue { .. } => "invalid_value",
            EventError::EventTimeInFuture { .. } => "event_time_in_future",
            EventError::BufferFull { .. } => "buffer_full",
            EventError::SequenceOverlap { .. } => "sequence_overlap",
            EventError::KeyFullInRequest { .. } => "key_full_in_request",
        }
    }

    /// The event field the error is about, for messages like `events[3].value: ...`.
    pub fn field(&self) -> &'static str {
        match self {
            EventError::UnknownStream { .. } => "stream",
            EventError::EmptyKey | EventError::KeyTooLarge { .. } => "key",
            EventError::ValueTooLarge { .. }
            | EventError::TypeMismatch { .. }
            | EventError::NotFinite { .. }
            | EventError::InvalidValue { .. } => "value",
            EventError::EventTimeInFuture { .. } => "event_time",
            EventError::BufferFull { .. } => "key",
            EventError::SequenceOverlap { .. } => "producer_seq",
            EventError::KeyFullInRequest { .. } => "value",
        }
    }

    /// How the error is reported.
    pub fn category(&self) -> Category {
        match self {
            EventError::UnknownStream { .. } => Category::NotFound,
            EventError::BufferFull { .. } => Category::ResourceExhausted,
            EventError::SequenceOverlap { .. } => Category::FailedPrecondition,
            _ => Category::InvalidArgument,
        }
    }
}

/// A configuration problem, naming the stream and the field.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    #[error("config is not valid TOML: {0}")]
    Parse(String),
    #[error("stream {stream:?}: {field} {message}")]
    Stream { stream: String, field: String, message: String },
    #[error("{field} {message}")]
    Global { field: String, message: String },
}

impl ConfigError {
    pub(crate) fn stream(stream: &str, field: &str, message: impl Into<String>) -> Self {
        ConfigError::Stream { stream: stream.to_owned(), field: field.to_owned(), message: message.into() }
    }
}

/// Bytes that do not encode or decode as the value they should be: a stored row or log entry,
/// or a peer's message (`coalesce-wire`'s codec). The storage crate reports these as its own
/// errors of the same names.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// A stored row of `shard` that does not decode.
    #[error("corrupt {what} in shard {shard}: {detail}")]
    Corrupt { shard: u32, what: &'static str, detail: String },
    #[error("encoding {what}: {detail}")]
    Encode { what: &'static str, detail: String },
    /// A message from a peer that does not decode.
    #[error("decoding {what}: {detail}")]
    Decode { what: &'static str, detail: String },
}

impl From<CodecError> for std::io::Error {
    fn from(e: CodecError) -> Self {
        std::io::Error::other(e)
    }
}
