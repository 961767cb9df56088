//! A replicated log entry's command: the one definition the raft crate uses too
//! (`coalesce_core::entry`, re-exported by `coalesce_raft::types`), so a fuzz input decodes as
//! a log entry's `Normal` payload does, and is validated by the same checks.

pub use coalesce_core::entry::*;
